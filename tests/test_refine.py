"""Refinement: a free hash grid fitted to the renders of one object, and `vsd-run refine`."""

from __future__ import annotations

import re

import pydantic
import pytest
import torch
import trimesh

from vsd.apps.refine import FreeHashField, RefineSettings, refine_scene, target_cameras
from vsd.apps.sampling import load_model
from vsd.cli.main import main
from vsd.representations.voxel_grid import VoxelField

from conftest import TINY

TINY_REFINE = dict(
    levels=4, log2_table_size=10, min_resolution=4, max_resolution=16, hidden=16, views=4,
    elevations=(0.0, 30.0), size=12, samples=16, steps=40, rays_per_step=256, lr=2e-2,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("refine") / "run"
    assert main(["recipe", "voxel_minens.yaml", *TINY, "--out", str(run), "--quiet"]) == 0
    return run


def two_spheres(bound: float, R: int = 16) -> VoxelField:
    """Object 0: a red ball; object 1: a smaller blue ball off centre."""
    c = bound * ((2 * torch.arange(R) + 1) / R - 1)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    grids = []
    for centre, r, rgb in (((0, 0, 0), 0.6, (1, 0, 0)), ((0.3, 0, 0), 0.3, (0, 0, 1))):
        dist = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2).sqrt()
        sigma = (dist < r * bound).float() * 40 / bound
        grids.append(torch.cat([sigma[None], torch.tensor(rgb, dtype=torch.float).view(3, 1, 1, 1).expand(3, R, R, R)]))
    return VoxelField(torch.stack(grids), bound)


def test_refinement_reduces_the_photometric_loss(tiny_run):
    model = load_model(tiny_run)
    scene = two_spheres(model.info.bound)
    settings = RefineSettings(**TINY_REFINE)
    result = refine_scene(model, scene, settings, index=1, generator=torch.Generator().manual_seed(0))
    assert len(result.history) == 40
    assert result.loss_after < 0.3 * result.loss_before
    # the targets are object 1 (blue), not object 0 (red)
    rgb = result.targets["rgb"]
    assert rgb[:, :, 2].mean() > rgb[:, :, 0].mean()
    # the fitted field is blue where it is dense
    with torch.no_grad():
        sigma, colour = result.field.query(torch.tensor([[[0.3 * model.info.bound, 0.0, 0.0]]]))
    assert sigma.item() > 1.0 and colour[0, 0, 2] > colour[0, 0, 0]


def test_gradients_reach_the_free_table_and_decoder():
    field = FreeHashField(RefineSettings(**TINY_REFINE), bound=1.0, device=torch.device("cpu"))
    sigma, rgb = field.query(torch.rand(1, 200, 3) * 2 - 1)
    (sigma.sum() + rgb.sum()).backward()
    names = [n for n, _ in field.named_parameters()]
    assert "encoding.table" in names
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert field.batch_size == 1 and field.density_grid(4).shape == (1, 4, 4, 4)


def test_target_cameras_alternate_rings(tiny_run):
    model = load_model(tiny_run)
    cams = target_cameras(model, RefineSettings(**{**TINY_REFINE, "views": 6, "elevations": (0.0, 30.0)}))
    assert cams.shape == (1, 6) and cams.height == 12
    eye = cams.c2w[0, :, :3, 3]
    torch.testing.assert_close(eye.norm(dim=-1), torch.full((6,), model.info.camera_radius))
    up = 1 if model.info.up_axis == "y" else 2
    heights = eye[:, up].abs() / model.info.camera_radius
    torch.testing.assert_close(heights[:3], torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(heights[3:], torch.full((3,), 0.5), atol=1e-5, rtol=0)  # sin 30 deg


def test_settings_are_checked():
    with pytest.raises(pydantic.ValidationError, match="implementation"):
        RefineSettings(implementation="cuda")
    with pytest.raises(pydantic.ValidationError, match="stepz"):
        RefineSettings(stepz=3)


def test_cli_refine_writes_turntable_views_and_mesh(tiny_run, tmp_path, capsys):
    out = tmp_path / "refined"
    argv = [
        "refine", str(tiny_run), "--sample-steps", "2", "--steps", "15", "--views", "4", "--size", "12",
        "--levels", "4", "--max-resolution", "16", "--log2-table-size", "10", "--rays", "128", "--resolution", "12",
        "--threshold", "1e-3", "--format", "ply", "--quiet", "--out", str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    before, after = map(float, re.search(r"photometric mse: ([\d.]+) -> ([\d.]+)", printed).groups())
    assert after < before
    assert (out / "views.png").stat().st_size > 0 and (out / "turntable.gif").stat().st_size > 0
    mesh = trimesh.load(out / "refined.ply", force="mesh")
    assert len(mesh.faces) > 0
    assert main([*argv[:-2], "--implementation", "cuda", "--out", str(out)]) == 1
    assert "implementation" in capsys.readouterr().err
