"""VolumeRenderer against closed forms: slabs of uniform density seen along +z."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from vsd.core.cameras import Cameras
from vsd.core.contracts import Field
from vsd.renderers import volume
from vsd.renderers.volume import VolumeRenderer, composite, ray_box_intersect

BOUND = 1.0
COLOUR = (0.9, 0.3, 0.1)


class Slab(Field, nn.Module):
    """Density ``sigma`` and colour ``COLOUR`` where z0 < z < z1 (and |x|, |y| <= bound).

    ``everywhere=True`` also fills the space outside the cube, to show the renderer never
    samples there.
    """

    def __init__(self, z0: float, z1: float, sigma: float, batch_size: int = 1, everywhere: bool = False):
        nn.Module.__init__(self)
        self.z0, self.z1, self.bound, self.batch_size = z0, z1, BOUND, batch_size
        self.everywhere = everywhere
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))
        self.colour = nn.Parameter(torch.tensor(COLOUR))

    def query(self, points):
        z = points[..., 2]
        inside = (z > self.z0) & (z < self.z1) & (points[..., :2].abs() <= self.bound).all(-1)
        if self.everywhere:
            inside = torch.ones_like(inside)
        return self.sigma * inside, self.colour.expand(points.shape)


def front_camera(batch: int = 1, eye=(0.0, 0.0, -3.0), target=(0.0, 0.0, 0.0)) -> Cameras:
    """(batch, 1) cameras looking along +z; with fov 10 deg every ray enters through z = -1."""
    eye_t = torch.tensor(eye).expand(batch, 1, 3)
    return Cameras.look_at(eye_t, torch.tensor(target), fov_deg=10, height=8, width=8)


def dir_z(cams: Cameras) -> torch.Tensor:
    """(B, V, 1, H, W) z component of the unit ray directions."""
    return cams.rays()[1][..., 2].unsqueeze(2)


def renderer(**kw) -> VolumeRenderer:
    return VolumeRenderer(VolumeRenderer.Settings(**kw)).eval()


def expected_rgb(opacity, bg):
    c = torch.tensor(COLOUR).view(1, 1, 3, 1, 1)
    return c * opacity + bg.view(-1, 1, 3, 1, 1) * (1 - opacity)


def test_uniform_slab_matches_beer_lambert():
    # 32 samples over z in [-1, 1] are 1/16 apart and the faces +-0.25 lie on bin edges, so the
    # midpoint rule integrates the piecewise-constant density exactly: only float error remains.
    sigma, h = 2.0, 0.5
    cams, bg = front_camera(), torch.tensor([0.2, 0.4, 0.6])
    out = renderer(samples=32)(Slab(-h / 2, h / 2, sigma), cams, bg)
    opacity = 1 - torch.exp(-sigma * h / dir_z(cams))
    assert out["rgb"].shape == (1, 1, 3, 8, 8) and out["opacity"].shape == out["depth"].shape == (1, 1, 1, 8, 8)
    torch.testing.assert_close(out["opacity"], opacity, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["rgb"], expected_rgb(opacity, bg), atol=1e-5, rtol=0)


def test_uniform_slab_jittered_within_sampling_bound():
    # Jittered samples place each interval border within half a bin of a bin edge, so at each face
    # at most 2 bins' length is misassigned: |error in optical depth| <= 4 sigma (t_out - t_in) / S,
    # and opacity = 1 - exp(-tau) moves by no more than tau does.
    sigma, h, S = 2.0, 0.5, 256
    cams = front_camera()
    r = renderer(samples=S).train()
    out_a = r(Slab(-h / 2 + 0.013, h / 2 + 0.013, sigma), cams, torch.zeros(3))
    out_b = r(Slab(-h / 2 + 0.013, h / 2 + 0.013, sigma), cams, torch.zeros(3))
    opacity = 1 - torch.exp(-sigma * h / dir_z(cams))
    tol = 4 * sigma * (2 / dir_z(cams)) / S
    assert ((out_a["opacity"] - opacity).abs() <= tol).all()
    assert not torch.equal(out_a["opacity"], out_b["opacity"])  # training samples are jittered


def test_thick_opaque_slab_depth_is_front_face():
    # Exponential free path: expected distance = front face + 1/sigma. The midpoint rule credits
    # each sample to its interval's middle, so agreement is to within one sample spacing.
    sigma, S = 50.0, 64
    cams = front_camera()
    out = renderer(samples=S)(Slab(-0.5, 0.5, sigma), cams, torch.ones(3))
    dz = dir_z(cams)
    assert (out["opacity"] > 1 - 1e-6).all()
    analytic = (3.0 - 0.5) / dz + 1 / sigma
    spacing = (2 / dz) / S
    assert ((out["depth"] - analytic).abs() < spacing).all()


def test_ray_missing_the_cube_is_exactly_background():
    # The field is dense even outside the cube: only the ray/box clipping keeps it out.
    field = Slab(-1, 1, 5.0, everywhere=True)
    cams = front_camera(eye=(0.0, 3.0, -3.0), target=(0.0, 3.0, 0.0))
    bg = torch.tensor([0.25, 0.5, 0.75])
    for kw in ({}, {"importance_samples": 8}):
        out = renderer(samples=16, **kw)(field, cams, bg)
        assert torch.equal(out["rgb"], bg.view(1, 1, 3, 1, 1).expand(1, 1, 3, 8, 8))
        assert torch.equal(out["opacity"], torch.zeros(1, 1, 1, 8, 8))
        assert torch.equal(out["depth"], torch.zeros(1, 1, 1, 8, 8))


def test_ray_box_intersect_entry_exit_and_axis_parallel_rays():
    o = torch.tensor([[0.0, 0.0, -3.0], [0.5, 0.0, -3.0], [0.0, 2.0, -3.0], [0.0, 0.0, 0.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    t_in, t_out = ray_box_intersect(o, d, 1.0)
    torch.testing.assert_close(t_in[[0, 1, 3]], torch.tensor([2.0, 2.0, -1.0]))
    torch.testing.assert_close(t_out[[0, 1, 3]], torch.tensor([4.0, 4.0, 1.0]))
    assert t_out[2] <= t_in[2]


@pytest.mark.parametrize("z0, z1", [(0.28, 0.36), (-0.46, -0.41)])
def test_importance_samples_beat_stratified_on_thin_dense_sheet(z0, z1):
    # 16 coarse samples (1/8 apart in z) see the sheet; 48 importance samples then crowd its bin.
    sigma = 60.0
    cams = front_camera()
    field = Slab(z0, z1, sigma)
    exact = 1 - torch.exp(-sigma * (z1 - z0) / dir_z(cams))
    err_strat = (renderer(samples=64)(field, cams, torch.ones(3))["opacity"] - exact).abs().mean()
    imp = renderer(samples=16, importance_samples=48)(field, cams, torch.ones(3))
    err_imp = (imp["opacity"] - exact).abs().mean()
    assert err_imp < 0.5 * err_strat


def test_gradients_reach_field_and_eval_is_deterministic():
    field = Slab(-0.3, 0.2, 1.5)
    cams = front_camera()
    r = renderer(samples=16, importance_samples=8)
    out = r(field, cams, torch.zeros(3))
    out["rgb"].sum().backward()
    assert field.sigma.grad is not None and field.sigma.grad.abs() > 0
    assert field.colour.grad is not None and (field.colour.grad.abs() > 0).all()
    again = r(field, cams, torch.zeros(3))
    for k in ("rgb", "depth", "opacity"):
        assert torch.equal(out[k].detach(), again[k].detach())


def test_near_far_clip_the_ray_range():
    # Each clip plane cuts the slab |z| < 0.25 roughly in half. In eval each face (slab or clip)
    # is off by at most half a bin, so |error in optical depth| <= sigma * spacing.
    sigma, S = 2.0, 64
    cams = front_camera()
    dz = dir_z(cams)
    field = Slab(-0.25, 0.25, sigma)
    near = renderer(samples=S, near=3.0)(field, cams, torch.ones(3))
    path = 3.25 / dz - 3.0
    tol = sigma * (4 / dz - 3.0) / S
    assert ((near["opacity"] - (1 - torch.exp(-sigma * path))).abs() <= tol).all()

    far = renderer(samples=S, far=3.0)(field, cams, torch.ones(3))
    path = 3.0 - 2.75 / dz
    tol = sigma * (3.0 - 2 / dz) / S
    assert ((far["opacity"] - (1 - torch.exp(-sigma * path))).abs() <= tol).all()

    with pytest.raises(ValueError, match="far"):  # an empty ray range is refused, not rendered empty
        renderer(samples=S, near=3.5, far=3.2)


def test_background_per_batch_or_shared():
    sigma, h = 2.0, 0.5
    cams = front_camera(batch=2)
    field = Slab(-h / 2, h / 2, sigma, batch_size=2)
    bgs = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 0.0]])
    out = renderer(samples=32)(field, cams, bgs)
    opacity = 1 - torch.exp(-sigma * h / dir_z(cams))
    torch.testing.assert_close(out["rgb"], expected_rgb(opacity, bgs), atol=1e-5, rtol=0)
    shared = renderer(samples=32)(field, cams, bgs[1])
    torch.testing.assert_close(shared["rgb"][1], out["rgb"][1])
    torch.testing.assert_close(shared["rgb"][0], out["rgb"][1])


def test_chunking_does_not_change_the_result():
    field = Slab(-0.3, 0.2, 3.0, batch_size=2)
    cams = front_camera(batch=2)
    whole = renderer(samples=16, importance_samples=8)(field, cams, torch.ones(3))
    chunked = renderer(samples=16, importance_samples=8, chunk_rays=10)(field, cams, torch.ones(3))
    for k in whole:
        torch.testing.assert_close(whole[k], chunked[k])


def test_composite_closed_form_two_samples():
    sigmas = torch.tensor([[1.0, 2.0]])
    rgbs = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    starts, ends = torch.tensor([[0.0, 0.5]]), torch.tensor([[0.5, 1.5]])
    bg = torch.tensor([[0.0, 0.0, 1.0]])
    rgb, depth, opacity, w = composite(sigmas, rgbs, starts, ends, bg)
    a0, a1 = 1 - torch.exp(torch.tensor(-0.5)), 1 - torch.exp(torch.tensor(-2.0))
    w_ref = torch.stack([a0, (1 - a0) * a1])
    torch.testing.assert_close(w[0], w_ref)
    torch.testing.assert_close(opacity[0], w_ref.sum())
    torch.testing.assert_close(rgb[0], torch.stack([w_ref[0], w_ref[1], 1 - w_ref.sum()]))
    torch.testing.assert_close(depth[0], w_ref[0] * 0.25 + w_ref[1] * 1.0)


def test_explicit_nerfacc_on_cpu_falls_back_with_one_notice(monkeypatch):
    monkeypatch.setattr(volume, "_NOTICES", set())
    field, cams = Slab(-0.25, 0.25, 2.0), front_camera()
    ref = renderer(samples=16)(field, cams, torch.ones(3))
    r = renderer(samples=16, implementation="nerfacc")
    with pytest.warns(UserWarning, match="nerfacc"):
        out = r(field, cams, torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r(field, cams, torch.ones(3))  # no second notice
        renderer(samples=16, implementation="auto")(field, cams, torch.ones(3))  # CPU: silent torch
    assert r.backend(torch.device("cpu")) == "torch"
    torch.testing.assert_close(out["rgb"], ref["rgb"])


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="samples"):
        VolumeRenderer(VolumeRenderer.Settings(samples=0))
    with pytest.raises(ValueError, match="implementation"):
        VolumeRenderer.Settings(implementation="cuda")


def test_nerfacc_batched_compositing_matches_torch():
    nerfacc = pytest.importorskip("nerfacc")
    g = torch.Generator().manual_seed(0)
    sigmas = torch.rand(6, 12, generator=g) * 5
    rgbs = torch.rand(6, 12, 3, generator=g)
    edges = torch.sort(torch.rand(6, 13, generator=g) * 3, dim=-1).values
    starts, ends = edges[:, :-1], edges[:, 1:]
    bg = torch.rand(6, 3, generator=g)
    rgb, depth, opacity, w = composite(sigmas, rgbs, starts, ends, bg)

    w_ref = nerfacc.render_weight_from_density(starts, ends, sigmas)[0]
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(opacity, nerfacc.accumulate_along_rays(w_ref, None)[:, 0])
    rgb_ref = nerfacc.accumulate_along_rays(w_ref, rgbs) + (1 - opacity[:, None]) * bg
    torch.testing.assert_close(rgb, rgb_ref)
    mids = (0.5 * (starts + ends))[..., None]
    torch.testing.assert_close(depth, nerfacc.accumulate_along_rays(w_ref, mids)[:, 0])

    via_backend = composite(sigmas, rgbs, starts, ends, bg, backend="nerfacc")
    for a, b in zip(via_backend, (rgb, depth, opacity, w)):
        torch.testing.assert_close(a, b)


def test_composite_hand_written_backward_matches_autograd_of_the_formula():
    """The fused backward gives the gradients of the textbook formula, for every input and output."""
    torch.manual_seed(0)
    sh = (2, 5, 7)
    sig = (torch.rand(*sh, dtype=torch.double) * 3).requires_grad_()
    rgb = torch.rand(*sh, 3, dtype=torch.double, requires_grad=True)
    t = torch.sort(torch.rand(*sh[:-1], sh[-1] + 1, dtype=torch.double), -1).values
    ts, te = t[..., :-1].clone().requires_grad_(), t[..., 1:].clone().requires_grad_()
    bg = torch.rand(3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: composite(*a), (sig, rgb, ts, te, bg))

    def formula(sig, rgb, ts, te, bg):
        tau = sig * (te - ts)
        w = torch.cumprod(torch.cat([torch.ones_like(tau[..., :1]), torch.exp(-tau[..., :-1])], -1), -1) * (1 - torch.exp(-tau))
        o = w.sum(-1)
        return (w[..., None] * rgb).sum(-2) + (1 - o[..., None]) * bg, (w * 0.5 * (ts + te)).sum(-1), o, w

    weights = [torch.rand(2, 5, 3), torch.rand(2, 5), torch.rand(2, 5), torch.rand(*sh)]
    grads = []
    for f in (composite, formula):
        outs = f(sig, rgb, ts, te, bg)
        loss = sum((o * w.double()).sum() for o, w in zip(outs, weights))
        grads.append(torch.autograd.grad(loss, (sig, rgb, ts, te, bg)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)
