"""Triplane: plane orientation, the learned reduction, decoding, fitting a sphere, gradients."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F

from vsd.representations.triplane import Triplane, TriplaneField, mlp

B, C, D, BOUND = 2, 4, 8, 1.5


def make(**kw) -> Triplane:
    torch.manual_seed(0)
    return Triplane(Triplane.Settings(**kw), in_channels=C, resolution=D, bound=BOUND)


def centres(n: int, bound: float = BOUND) -> torch.Tensor:
    return bound * ((2 * torch.arange(n) + 1) / n - 1)


def linear_planes(R: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Planes whose single channel is x on XY, 10 z on XZ and 100 y on YZ, at texel centres."""
    c = centres(R)
    rows, cols = torch.meshgrid(c, c, indexing="ij")  # plane[..., row, col]
    xy = cols  # xy[j, i] = x_i
    xz = 10 * rows  # xz[k, i] = z_k
    yz = 100 * cols  # yz[k, j] = y_j
    return tuple(p[None, None].expand(B, 1, R, R).clone() for p in (xy, xz, yz))


def interior_points(n: int, R: int, seed: int = 0) -> torch.Tensor:
    """(B, n, 3) points within the texel-centre range, where bilinear sampling of a linear
    function is exact."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, n, 3, generator=g) * 2 - 1) * BOUND * (1 - 1 / R)


@pytest.mark.parametrize("combine", ["sum", "concat", "product"])
def test_planes_are_addressed_by_the_right_coordinates(combine):
    R = 6
    planes = linear_planes(R)
    p = interior_points(50, R)
    x, y, z = p.unbind(-1)
    seen = {}
    field = TriplaneField(planes, lambda f: (seen.setdefault("f", f)[..., 0] * 0 + 1, torch.zeros(*f.shape[:-1], 3)), BOUND, combine)
    field.query(p)
    expected = {
        "sum": (x + 10 * z + 100 * y)[..., None],
        "concat": torch.stack([x, 10 * z, 100 * y], -1),
        "product": (x * 10 * z * 100 * y)[..., None],
    }[combine]
    torch.testing.assert_close(seen["f"], expected, atol=1e-3, rtol=1e-4)


def test_linear_decoder_gives_the_analytic_density_and_colour():
    rep = Triplane(Triplane.Settings(plane_channels=1, layers=0), in_channels=C, resolution=D, bound=BOUND)
    lin = rep.decoder[-1]
    planes = linear_planes(D)
    field = TriplaneField(planes, rep.decode, BOUND, "sum")
    p = interior_points(40, D)
    x, y, z = p.unbind(-1)
    s = (x + 10 * z + 100 * y)[..., None]
    raw = s * lin.weight[:, 0] + lin.bias  # (B, N, 4)
    sigma, rgb = field.query(p)
    torch.testing.assert_close(sigma, F.softplus(raw[..., 0]) * D / (2 * BOUND), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rgb, torch.sigmoid(raw[..., 1:]), atol=1e-5, rtol=1e-5)
    assert lin.bias[0].item() == pytest.approx(-3.0)  # density_bias


def test_hot_voxel_lands_on_each_plane_at_its_projection():
    rep = make()
    k, j, i = 1, 4, 6
    vol = torch.zeros(1, C, D, D, D)
    vol[0, :, k, j, i] = 5.0
    xy, xz, yz = (rep.reduce[n](vol)[0, 0] for n in ("xy", "xz", "yz"))
    assert divmod(int(xy.argmax()), D) == (j, i)
    assert divmod(int(xz.argmax()), D) == (k, i)
    assert divmod(int(yz.argmax()), D) == (k, j)


def test_reduction_keeps_a_volume_constant_along_the_axis_and_is_learned():
    rep = make()
    torch.manual_seed(1)
    with torch.no_grad():  # arbitrary learned weights: the result must not depend on them
        for red in rep.reduce.values():
            red.score.weight.normal_()
            red.position.normal_()
    img = torch.randn(B, C, D, D)
    const_z = img[:, :, None].expand(B, C, D, D, D)  # volume[b, c, k, j, i] = img[b, c, j, i]
    torch.testing.assert_close(rep.reduce["xy"](const_z), img)

    # a strongly positive score picks the largest value along the axis instead of the mean
    red = rep.reduce["xy"]
    with torch.no_grad():
        red.score.weight.zero_()
        red.score.weight[0, 0] = 500.0
        red.position.zero_()
    vol = torch.randn(1, C, D, D, D)
    out = red(vol)
    torch.testing.assert_close(out[:, 0], vol[:, 0].amax(1), atol=1e-3, rtol=1e-3)
    assert (out[:, 0] - vol[:, 0].mean(1)).abs().mean() > 0.5


def test_fits_a_sphere():
    torch.manual_seed(0)
    rep = Triplane(Triplane.Settings(plane_channels=8, hidden=32), in_channels=C, resolution=16, bound=1.0)
    planes = [torch.nn.Parameter(torch.randn(1, 8, 16, 16) * 0.1) for _ in range(3)]
    opt = torch.optim.Adam([*planes, *rep.decoder.parameters()], lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        p = torch.rand(1, 1024, 3, generator=g) * 2 - 1
        inside = (p.norm(dim=-1) < 0.6).float()
        sigma, _ = TriplaneField(tuple(planes), rep.decode, 1.0, "sum").query(p)
        loss = ((sigma / 8 - inside) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.rand(1, 4096, 3, generator=g) * 2 - 1
    with torch.no_grad():
        sigma, _ = TriplaneField(tuple(planes), rep.decode, 1.0, "sum").query(p)
    accuracy = ((sigma > 4) == (p.norm(dim=-1) < 0.6)).float().mean()
    assert accuracy > 0.95


@pytest.mark.parametrize("combine,upsample", [("sum", 1), ("concat", 2), ("product", 2)])
def test_gradients_reach_every_parameter(combine, upsample):
    rep = make(combine=combine, plane_upsample=upsample)
    with torch.no_grad():  # product of three near-zero features would make gradients vanish
        for head in rep.heads.values():
            head[-1].bias.fill_(0.5)
    field = rep(torch.randn(B, C, D, D, D))
    assert field.planes[0].shape == (B, 16, D * upsample, D * upsample)
    sigma, rgb = field.query((torch.rand(B, 256, 3) * 2 - 1) * BOUND)
    (sigma.sum() + rgb.sum()).backward()
    for name, p in rep.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_density_outside_and_density_grid():
    field = make()(torch.randn(B, C, D, D, D))
    outside = torch.tensor([[BOUND * 1.01, 0, 0], [0, -BOUND * 1.01, 0], [0, 0, BOUND * 1.2]])
    sigma, rgb = field.query(outside.expand(B, -1, -1))
    assert torch.equal(sigma, torch.zeros_like(sigma)) and ((rgb >= 0) & (rgb <= 1)).all()
    assert (field.query(torch.zeros(B, 1, 3))[0] > 0).all()
    grid = field.density_grid(4)
    assert grid.shape == (B, 4, 4, 4) and field.batch_size == B and field.device == torch.device("cpu")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"expected a volume \(B, 4, 8, 8, 8\)"):
        make()(torch.randn(1, C, D, D, D + 1))
    with pytest.raises(pydantic.ValidationError, match="combine"):
        Triplane.Settings(combine="max")
    with pytest.raises(pydantic.ValidationError, match="plane_upsample"):
        Triplane.Settings(plane_upsample=3)
    with pytest.raises(pydantic.ValidationError, match=r"layers\n.*greater than or equal to 0"):
        Triplane.Settings(layers=-1)


def test_mlp_layer_count():
    net = mlp(5, 7, 2, 4)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(7, 5), (7, 7), (4, 7)]
