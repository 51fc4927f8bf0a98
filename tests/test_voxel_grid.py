"""VoxelGrid: heads, grid alignment with the volume convention, and gradients."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F

from vsd.core.cameras import Cameras
from vsd.core.contracts import Field
from vsd.renderers.volume import VolumeRenderer
from vsd.representations.voxel_grid import VoxelField, VoxelGrid

B, C, D, BOUND = 2, 4, 8, 1.5


def make(**kw) -> VoxelGrid:
    torch.manual_seed(0)
    return VoxelGrid(VoxelGrid.Settings(**kw), in_channels=C, resolution=D, bound=BOUND)


def centres(n: int, bound: float = BOUND) -> torch.Tensor:
    """(n^3, 3) voxel centres, flattened in [k, j, i] order with xyz coordinates."""
    c = bound * ((2 * torch.arange(n) + 1) / n - 1)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], -1).reshape(-1, 3)


@pytest.mark.parametrize("activation", ["softplus", "exp"])
def test_query_at_voxel_centres_returns_head_outputs(activation):
    rep = make(hidden_channels=0, density_activation=activation, density_scale=0.7)
    volume = torch.randn(B, C, D, D, D)
    field = rep(volume)
    w_s, b_s = rep.density_head.weight.view(1, C), rep.density_head.bias
    w_c, b_c = rep.rgb_head.weight.view(3, C), rep.rgb_head.bias
    raw = torch.einsum("oc,bckji->bokji", w_s, volume) + b_s.view(1, 1, 1, 1, 1)
    act = F.softplus(raw) if activation == "softplus" else torch.exp(raw)
    sigma_ref = (act * 0.7 * D / (2 * BOUND)).reshape(B, -1)
    rgb_ref = torch.sigmoid(torch.einsum("oc,bckji->bokji", w_c, volume) + b_c.view(1, 3, 1, 1, 1))
    rgb_ref = rgb_ref.reshape(B, 3, -1).transpose(1, 2)

    sigma, rgb = field.query(centres(D).expand(B, -1, -1))
    torch.testing.assert_close(sigma, sigma_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rgb, rgb_ref, atol=1e-5, rtol=1e-5)


def test_hot_voxel_lands_at_its_world_position():
    rep = VoxelGrid(VoxelGrid.Settings(hidden_channels=0), in_channels=1, resolution=D, bound=BOUND)
    with torch.no_grad():
        rep.density_head.weight.fill_(1.0)
        rep.density_head.bias.zero_()
    k, j, i = 1, 4, 6  # distinct, so a swapped axis would be caught
    volume = torch.zeros(1, 1, D, D, D)
    volume[0, 0, k, j, i] = 8.0
    field = rep(volume)
    x = lambda n: BOUND * ((2 * n + 1) / D - 1)  # noqa: E731
    sigma, _ = field.query(torch.tensor([[[x(i), x(j), x(k)], [x(k), x(j), x(i)]]]))
    # the stored value, up to the ~1e-5 voxel precision of the sampler's image coordinates
    torch.testing.assert_close(sigma[0, 0], field.grid[0, 0].max(), rtol=1e-5, atol=0)
    torch.testing.assert_close(sigma[0, 1], field.grid[0, 0].min())  # an empty voxel
    grid = Field.density_grid(field, D)  # the generic query-based path
    assert grid[0].argmax() == (k * D + j) * D + i


def test_zero_density_outside_the_cube():
    field = make()(torch.randn(B, C, D, D, D))
    half_voxel = BOUND / D
    # Just outside every face, closer than half a voxel: interpolation alone would not give zero.
    faces = torch.eye(3).repeat(2, 1) * torch.tensor([1.0] * 3 + [-1.0] * 3)[:, None]
    outside = faces * (BOUND + 0.3 * half_voxel)
    sigma, rgb = field.query(outside.expand(B, -1, -1))
    assert torch.equal(sigma, torch.zeros_like(sigma))
    assert ((rgb >= 0) & (rgb <= 1)).all()
    sigma_in, _ = field.query((faces * (BOUND - 0.3 * half_voxel)).expand(B, -1, -1))
    assert (sigma_in > 0).all()


def test_shapes_upsample_and_density_grid():
    volume = torch.randn(B, C, D, D, D)
    plain = make()(volume)
    up = make(upsample=2, hidden_channels=8)(volume)
    up0 = make(upsample=2, hidden_channels=0)(volume)
    assert isinstance(plain, VoxelField) and plain.grid.shape == (B, 4, D, D, D)
    assert up.grid.shape == up0.grid.shape == (B, 4, 2 * D, 2 * D, 2 * D)
    sigma, rgb = up.query(torch.rand(B, 17, 3) * 2 - 1)
    assert sigma.shape == (B, 17) and rgb.shape == (B, 17, 3)
    assert (sigma >= 0).all() and ((rgb >= 0) & (rgb <= 1)).all()
    assert up.density_grid(5).shape == (B, 5, 5, 5)
    # At the stored resolution the override returns the grid; the generic path must agree.
    torch.testing.assert_close(up.density_grid(2 * D), Field.density_grid(up, 2 * D), atol=1e-5, rtol=1e-5)


def test_untrained_density_head_starts_at_the_bias():
    assert torch.equal(make().density_head.bias, torch.tensor([-3.0]))
    rep = make(density_bias=-1.5, hidden_channels=0)
    field = rep(torch.zeros(1, C, D, D, D))
    # Zero input: every voxel holds softplus(bias) optical depth per voxel side.
    per_voxel = field.grid[0, 0] * (2 * BOUND / D)
    torch.testing.assert_close(per_voxel, F.softplus(torch.tensor(-1.5)).expand(D, D, D))


@pytest.mark.parametrize("settings", [dict(upsample=2, hidden_channels=8), dict(upsample=2, hidden_channels=0), {}])
def test_gradients_reach_every_parameter_through_rendering(settings):
    rep = make(**settings)
    field = rep(torch.randn(1, C, D, D, D))
    cams = Cameras.look_at(torch.tensor([[[0.3, 0.5, -4.0]]]), fov_deg=40, height=8, width=8)
    out = VolumeRenderer(VolumeRenderer.Settings(samples=16))(field, cams, torch.ones(3))
    out["rgb"].mean().backward()
    for name, p in rep.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_settings_and_shapes_are_named():
    with pytest.raises(pydantic.ValidationError, match="upsample"):
        VoxelGrid.Settings(upsample=3)
    with pytest.raises(pydantic.ValidationError, match="density_activation"):
        VoxelGrid.Settings(density_activation="relu")
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8, 8\)"):
        make()(torch.randn(1, 3, D, D, D))
