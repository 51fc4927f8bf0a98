"""Mesh export: marching cubes on fields, Mesh conversion, file formats and `vsd-run export`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from vsd.apps.export import export_mesh, field_to_mesh, mesh_to_trimesh, scene_to_meshes
from vsd.cli.main import main
from vsd.core.checkpoint import load_checkpoint
from vsd.core.contracts import Mesh
from vsd.representations.voxel_grid import VoxelField

from conftest import TINY

BOUND, R = 1.5, 32


def coords(n: int = R, bound: float = BOUND):
    c = bound * ((2 * torch.arange(n) + 1) / n - 1)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return x, y, z


def sphere_density(centre=(0.0, 0.0, 0.0), radius=0.9, level=20.0) -> torch.Tensor:
    """(R, R, R) density ramping linearly through ``level`` at ``radius``: the level set is the
    sphere up to trilinear interpolation."""
    x, y, z = coords()
    dist = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2).sqrt()
    return level * (1 + (radius - dist) / (2 * BOUND / R)).clamp(0, 2)


def voxel_field(density: torch.Tensor, rgb=(0.2, 0.6, 0.9)) -> VoxelField:
    colour = torch.tensor(rgb).view(3, 1, 1, 1).expand(3, *density.shape)
    return VoxelField(torch.cat([density[None], colour])[None], BOUND)


def test_sphere_mesh_is_closed_with_the_right_volume_and_area():
    r = 0.9
    mesh = field_to_mesh(voxel_field(sphere_density(radius=r)), 0, R, threshold=20.0)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * r**3, rel=0.03)  # positive: outward faces
    assert mesh.area == pytest.approx(4 * math.pi * r**2, rel=0.03)
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(radii - r).max() < 2 * BOUND / R


def test_vertices_are_in_world_coordinates():
    centre = (0.5, -0.3, 0.2)  # distinct per axis: a swapped axis moves the centroid
    mesh = field_to_mesh(voxel_field(sphere_density(centre, radius=0.6)), 0, R, threshold=20.0)
    np.testing.assert_allclose(mesh.vertices.mean(0), centre, atol=0.02)


def test_surfaces_reaching_the_cube_faces_are_closed():
    dens = torch.full((R, R, R), 50.0)  # the whole cube is solid
    mesh = field_to_mesh(voxel_field(dens), 0, R, threshold=20.0)
    assert mesh.is_watertight
    # the padding voxel is empty: the surface closes on the cube's faces, not beyond them
    np.testing.assert_allclose(np.abs(mesh.vertices).max(0), [BOUND] * 3, atol=1e-6)
    assert mesh.volume == pytest.approx((2 * BOUND) ** 3, rel=0.01)


def test_vertex_colours_come_from_the_field():
    field = voxel_field(sphere_density(), rgb=(1.0, 0.5, 0.0))
    mesh = field_to_mesh(field, 0, R, threshold=20.0)
    colours = np.asarray(mesh.visual.vertex_colors)
    # within one 8-bit level: 0.5 * 255 sits on a rounding boundary
    assert np.abs(colours[:, :3].astype(int) - [255, 128, 0]).max() <= 1 and (colours[:, 3] == 255).all()


def test_small_components_are_dropped_on_request():
    dens = torch.maximum(sphere_density((-0.6, 0, 0), 0.6), sphere_density((0.9, 0.9, 0.9), 0.2))
    field = voxel_field(dens)
    assert len(field_to_mesh(field, 0, R, threshold=20.0).split(only_watertight=False)) == 2
    kept = field_to_mesh(field, 0, R, threshold=20.0, min_component_ratio=0.2)
    assert len(kept.split(only_watertight=False)) == 1
    np.testing.assert_allclose(kept.vertices.mean(0), (-0.6, 0, 0), atol=0.02)


@pytest.mark.parametrize("fmt", ["glb", "ply", "obj"])
def test_formats_load_back(fmt, tmp_path):
    mesh = field_to_mesh(voxel_field(sphere_density()), 0, R, threshold=20.0)
    path = export_mesh(mesh, tmp_path / "sphere", fmt)
    assert path.suffix == f".{fmt}" and path.exists()
    back = trimesh.load(path, force="mesh")
    assert back.is_watertight and len(back.faces) == len(mesh.faces)
    assert back.volume == pytest.approx(mesh.volume, rel=1e-4)
    assert np.abs(np.asarray(back.visual.vertex_colors)[:, :3].astype(int) - [51, 153, 230]).max() <= 1


def test_a_field_exports_directly_and_batches_give_one_mesh_each(tmp_path):
    dens = torch.stack([sphere_density(radius=0.5), sphere_density(radius=0.9)])
    field = VoxelField(torch.cat([dens[:, None], torch.full((2, 3, R, R, R), 0.5)], 1), BOUND)
    meshes = scene_to_meshes(field, R, threshold=20.0)
    for mesh, r in zip(meshes, (0.5, 0.9)):
        assert mesh.volume == pytest.approx(4 / 3 * math.pi * r**3, rel=0.05)
    path = export_mesh(field, tmp_path / "second.ply", index=1, resolution=R, threshold=20.0)
    assert trimesh.load(path, force="mesh").volume == pytest.approx(meshes[1].volume, rel=1e-4)


def test_meshes_convert_with_colours_or_texture(tmp_path):
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    coloured = Mesh(verts, faces, vertex_colors=torch.eye(4, 3))
    out = scene_to_meshes([coloured])[0]
    assert out.is_watertight and out.volume == pytest.approx(1 / 6)
    assert (np.asarray(out.visual.vertex_colors)[:3, :3] == np.eye(3) * 255).all()
    back = trimesh.load(export_mesh(coloured, tmp_path / "tet.glb"), force="mesh")
    assert len(back.faces) == 4

    texture = torch.zeros(3, 2, 2)
    texture[0, 0] = 1.0  # top row red, bottom row black
    uv = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    textured = mesh_to_trimesh(Mesh(verts, faces, uv=uv, texture=texture))
    # v counts from the texture's first row in vsd, from the bottom in trimesh
    np.testing.assert_allclose(textured.visual.uv, [[0.25, 0.75], [0.75, 0.75], [0.25, 0.25], [0.75, 0.25]])
    ply = trimesh.load(export_mesh(Mesh(verts, faces, uv=uv, texture=texture), tmp_path / "tex.ply"), force="mesh")
    red = np.asarray(ply.visual.vertex_colors)[:, 0]
    assert red[0] > 200 and red[2] < 50  # vertex 0 sits on the red row, vertex 2 on the black one


def test_bad_requests_are_named(tmp_path):
    mesh = trimesh.creation.box()
    with pytest.raises(ValueError, match="unknown mesh format 'stl'"):
        export_mesh(mesh, tmp_path / "x.stl")
    with pytest.raises(TypeError, match="cannot export a str"):
        scene_to_meshes("not a scene")
    with pytest.raises(IndexError, match="object 3 out of a batch of 1"):
        field_to_mesh(voxel_field(sphere_density()), 3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("export") / "run"
    assert main(["recipe", "voxel_minens.yaml", *TINY, "--out", str(run), "--quiet"]) == 0
    return run


def test_cli_export_writes_one_mesh_per_sample(tiny_run, tmp_path, capsys):
    out = tmp_path / "meshes"
    # a barely trained model is nearly empty; a tiny threshold meshes the occupied cube instead
    argv = ["export", str(tiny_run), "--num-samples", "2", "--steps", "2", "--resolution", "8", "--threshold", "1e-3"]
    assert main([*argv, "--format", "ply", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    bound = load_checkpoint(tiny_run / "checkpoints" / "last.pt")["info"]["bound"]
    for i in range(2):
        path = out / f"sample_{i}.ply"
        assert str(path) in printed
        mesh = trimesh.load(path, force="mesh")
        assert len(mesh.faces) > 0 and mesh.is_watertight
        assert np.abs(mesh.vertices).max() <= bound * (1 + 1e-6)  # inside the model's cube
    assert main([*argv, "--num-samples", "1", "--format", "obj", "--out", str(out), "--overwrite"]) == 0
    assert len(trimesh.load(out / "sample_0.obj", force="mesh").faces) > 0
    assert main([*argv, "--format", "stl", "--out", str(out)]) == 1
    assert "unknown mesh format 'stl'" in capsys.readouterr().err


def test_a_field_without_surface_is_refused_with_the_density_range(tmp_path):
    from vsd.apps.export import export_mesh
    from vsd.core.errors import EmptyMeshError
    from vsd.representations.voxel_grid import VoxelField

    grid = torch.zeros(1, 4, 8, 8, 8)
    grid[:, 0] = 0.5  # density 0.5 everywhere: below the default threshold
    field = VoxelField(grid, bound=0.5)
    with pytest.raises(EmptyMeshError, match=r"no surface at density threshold 22\.2 .*, 0\.5\].*try --threshold 0\.25") as exc:
        export_mesh(field, tmp_path / "m.glb")
    assert exc.value.exit_code == 2 and "m.glb" in str(exc.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_export_of_an_empty_surface_exits_2_and_writes_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "meshes"
    argv = ["export", str(tiny_run), "--num-samples", "1", "--steps", "2", "--resolution", "8", "--threshold", "1e9"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no surface at density threshold 1e+09" in err and "try --threshold" in err and "Traceback" not in err, err
    assert not out.exists() or not list(out.iterdir())
