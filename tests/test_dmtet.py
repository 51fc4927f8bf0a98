"""Tet grid, marching tetrahedra and the DMTet representation."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pydantic
import pytest
import torch
import trimesh

from vsd.core.cameras import Cameras
from vsd.core.contracts import Mesh
from vsd.renderers.rasterizer import MeshRasterizer
from vsd.representations import marching_tets as mt
from vsd.representations.dmtet import DMTet, sdf_sign_regulariser
from vsd.representations.grid_sample import sample_features
from vsd.representations.marching_tets import NUM_TRIANGLES, TRIANGLE_TABLE, kaolin_available, marching_tets
from vsd.representations.tetgrid import tet_grid

C, D, BOUND = 4, 8, 0.8


def signed_volumes(vertices: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
    p = vertices.double()[tets]
    return torch.linalg.det(p[:, 1:] - p[:, :1]) / 6


def as_trimesh(verts: torch.Tensor, faces: torch.Tensor) -> trimesh.Trimesh:
    return trimesh.Trimesh(verts.detach().double().numpy(), faces.numpy(), process=False)


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    p = verts[faces]
    return torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])


# ---- tet grid -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, bound", [(1, 1.0), (3, 0.5), (5, 2.0)])
def test_tets_tile_the_cube_with_positive_orientation(n, bound):
    g = tet_grid(n, bound)
    assert g.vertices.shape == ((n + 1) ** 3, 3) and g.tets.shape == (6 * n**3, 4)
    assert g.tets.dtype == torch.long
    vol = signed_volumes(g.vertices, g.tets)
    assert (vol > 0).all()
    torch.testing.assert_close(vol.sum().item(), (2 * bound) ** 3, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(vol, torch.full_like(vol, (2 * bound / n) ** 3 / 6))
    assert g.vertices.amin().item() == -bound and g.vertices.amax().item() == bound


def test_interior_faces_are_shared_by_exactly_two_tets():
    n, bound = 4, 1.0
    g = tet_grid(n, bound)
    faces = g.tets[:, [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]].reshape(-1, 3).sort(-1).values
    counts = Counter(map(tuple, faces.tolist()))
    assert set(counts.values()) == {1, 2}
    on_surface = lambda f: any((g.vertices[list(f), a].abs() == bound).all() for a in range(3))  # noqa: E731
    for face, count in counts.items():
        assert (count == 1) == on_surface(face), face
    boundary_faces = sum(1 for c in counts.values() if c == 1)
    assert boundary_faces == 6 * 2 * n * n  # each cube face: n^2 squares, two triangles each


def test_grid_is_cached_and_indexed_like_the_lattice():
    g = tet_grid(3, 1.5)
    assert tet_grid(3, 1.5) is g
    i, j, k = 1, 2, 3
    x = lambda t: 1.5 * (2 * t / 3 - 1)  # noqa: E731
    torch.testing.assert_close(g.vertices[i + 4 * (j + 4 * k)], torch.tensor([x(i), x(j), x(k)]))
    assert g.boundary.sum() == 4**3 - 2**3
    assert g.edges.shape == (torch.unique(g.edges, dim=0).shape[0], 2) and (g.edges[:, 0] < g.edges[:, 1]).all()


def test_bad_grid_arguments_are_named():
    with pytest.raises(ValueError, match="resolution"):
        tet_grid(0)
    with pytest.raises(ValueError, match="bound"):
        tet_grid(2, -1.0)


# ---- marching tetrahedra --------------------------------------------------------------------------
UNIT_TET = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)


@pytest.mark.parametrize("case", range(16))
def test_every_sign_case_of_one_tet_gives_outward_triangles(case):
    torch.manual_seed(case)
    A = torch.randn(3, 3, dtype=torch.float64)
    A = A if torch.linalg.det(A) > 0 else -A  # any positively oriented tet
    verts = UNIT_TET @ A.T
    inside = torch.tensor([case >> i & 1 for i in range(4)], dtype=torch.bool)
    sdf = torch.where(inside, -1.0, 1.0).double() * (0.2 + torch.rand(4, dtype=torch.float64))
    v, f = marching_tets(verts, torch.tensor([[0, 1, 2, 3]]), sdf, "torch")
    assert f.shape[0] == NUM_TRIANGLES[case] == (0 if case in (0, 15) else 1 + (bin(case).count("1") == 2))
    if f.shape[0]:
        direction = verts[~inside].mean(0) - verts[inside].mean(0)
        assert (face_normals(v, f) @ direction > 0).all()
        assert (TRIANGLE_TABLE[case, : 3 * f.shape[0]] >= 0).all()


def sphere(n: int = 24, radius: float = 0.6, bound: float = 1.0):
    g = tet_grid(n, bound)
    return marching_tets(g.vertices.double(), g.tets, g.vertices.double().norm(dim=-1) - radius, "torch")


def test_sphere_is_closed_with_the_right_area_and_outward_normals():
    r = 0.6
    v, f = sphere(24, r)
    mesh = as_trimesh(v, f)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.area == pytest.approx(4 * math.pi * r**2, rel=0.03)
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * r**3, rel=0.03)  # positive: outward
    assert (v.norm(dim=-1) - r).abs().max() < 2 * 2 / 24 * 0.25  # within a fraction of a cell
    centres = v[f].mean(1)
    assert ((face_normals(v, f) * centres).sum(-1) > 0).all()
    assert len(torch.unique(v, dim=0)) == len(v)  # crossed edges de-duplicated


def test_plane_gives_a_flat_sheet_at_its_height():
    h, bound = 0.3, 1.0
    g = tet_grid(6, bound)
    v, f = marching_tets(g.vertices, g.tets, g.vertices[:, 1] - h, "torch")  # inside below y = h
    torch.testing.assert_close(v[:, 1], torch.full_like(v[:, 1], h))
    n = face_normals(v, f)
    assert (n[:, 1] > 0).all()  # towards positive SDF
    assert n.norm(dim=-1).sum().item() / 2 == pytest.approx((2 * bound) ** 2, rel=1e-5)


def test_one_sign_everywhere_gives_an_empty_mesh():
    g = tet_grid(4, 1.0)
    for sign in (1.0, -1.0):
        v, f = marching_tets(g.vertices, g.tets, torch.full((len(g.vertices),), sign), "torch")
        assert v.shape == (0, 3) and f.shape == (0, 3) and f.dtype == torch.long


def test_gradients_reach_sdf_and_vertex_offsets():
    g = tet_grid(4, 1.0)
    offsets = torch.zeros_like(g.vertices, requires_grad=True)
    sdf = (g.vertices.norm(dim=-1) - 0.55).requires_grad_()
    v, f = marching_tets(g.vertices + offsets, g.tets, sdf, "torch")
    (v * torch.rand(v.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    s = sdf.detach()
    crossed = g.edges[(s[g.edges[:, 0]] < 0) != (s[g.edges[:, 1]] < 0)]
    on_surface = torch.zeros(len(s), dtype=torch.bool)
    on_surface[crossed.reshape(-1)] = True
    assert on_surface.any() and (sdf.grad[on_surface] != 0).all() and (sdf.grad[~on_surface] == 0).all()
    # each surface vertex is a convex combination of its edge's ends: positive weights
    assert (offsets.grad[on_surface] > 0).all() and (offsets.grad[~on_surface] == 0).all()


def test_zero_crossing_interpolation_and_its_gradient():
    verts = UNIT_TET.clone().requires_grad_()
    sdf = torch.tensor([-1.0, 3.0, 3.0, 3.0], dtype=torch.float64, requires_grad=True)
    v, f = marching_tets(verts, torch.tensor([[0, 1, 2, 3]]), sdf, "torch")
    torch.testing.assert_close(v.sort(0).values, (torch.eye(3, dtype=torch.float64) * 0.25).sort(0).values)
    torch.autograd.gradcheck(lambda p, s: marching_tets(p, torch.tensor([[0, 1, 2, 3]]), s, "torch")[0], (verts, sdf))


def test_kaolin_on_cpu_falls_back_with_one_notice(monkeypatch):
    monkeypatch.setattr(mt, "_NOTICES", set())
    g = tet_grid(3, 1.0)
    sdf = g.vertices.norm(dim=-1) - 0.5
    with pytest.warns(UserWarning, match="kaolin"):
        v, f = marching_tets(g.vertices, g.tets, sdf, "kaolin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        marching_tets(g.vertices, g.tets, sdf, "kaolin")
    ref_v, ref_f = marching_tets(g.vertices, g.tets, sdf, "torch")
    assert torch.equal(v, ref_v) and torch.equal(f, ref_f)
    with pytest.raises(ValueError, match="implementation"):
        marching_tets(g.vertices, g.tets, sdf, "cuda")
    with pytest.raises(ValueError, match=r"sdf must be \(64,\), got \(64, 1\)"):
        marching_tets(g.vertices, g.tets, sdf[:, None], "torch")


@pytest.mark.skipif(not (kaolin_available() and torch.cuda.is_available()), reason="needs kaolin and CUDA")
def test_kaolin_matches_torch():
    g = tet_grid(16, 1.0, "cuda")
    sdf = g.vertices.norm(dim=-1) - 0.6 + 0.05 * torch.sin(5 * g.vertices[:, 0])
    kv, kf = marching_tets(g.vertices, g.tets, sdf, "kaolin")
    tv, tf = marching_tets(g.vertices, g.tets, sdf, "torch")
    torch.testing.assert_close(kv.sort(0).values, tv.sort(0).values)
    assert kf.shape == tf.shape
    vol = lambda v, f: (v[f[:, 0]] * torch.linalg.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6  # noqa: E731
    torch.testing.assert_close(vol(kv, kf), vol(tv, tf))


# ---- DMTet representation -------------------------------------------------------------------------
def make(**kw) -> DMTet:
    torch.manual_seed(0)
    return DMTet(DMTet.Settings(**{"grid_resolution": 8, "hidden": 8, **kw}), in_channels=C, resolution=D, bound=BOUND)


def test_sample_features_follows_the_feature_volume_convention():
    volume = torch.randn(1, C, D, D, D)
    k, j, i = 1, 4, 6
    x = lambda n: BOUND * ((2 * n + 1) / D - 1)  # noqa: E731
    feats = sample_features(volume, torch.tensor([[[x(i), x(j), x(k)]]]), BOUND)
    torch.testing.assert_close(feats[0, 0], volume[0, :, k, j, i])


def test_forward_gives_closed_coloured_spheres_at_init():
    rep = make(init_radius=0.6)
    meshes = rep(torch.randn(2, C, D, D, D))
    assert isinstance(meshes, list) and len(meshes) == 2 and rep.kind == "mesh"
    cell = 2 * BOUND / 8
    for m in meshes:
        assert isinstance(m, Mesh) and m.faces.dtype == torch.long
        assert m.vertices.shape[1] == 3 and m.vertex_colors.shape == m.vertices.shape
        assert 0 <= m.faces.min() and m.faces.max() < len(m.vertices)
        assert ((m.vertex_colors >= 0) & (m.vertex_colors <= 1)).all()
        assert as_trimesh(m.vertices, m.faces).is_watertight
        assert as_trimesh(m.vertices, m.faces).volume > 0
        radius = m.vertices.norm(dim=-1)
        assert (radius - 0.6 * BOUND).abs().max() < cell


def test_offsets_are_bounded_by_offset_scale_cells():
    rep = make(offset_scale=0.25)
    with torch.no_grad():
        rep.geometry[-1].bias[1:] = 100.0  # saturate the tanh
    f = rep.fields(torch.randn(1, C, D, D, D))
    moved = (f.vertices[0] - f.grid.vertices).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 0.25 * 2 * BOUND / 8))


def test_empty_surface_gives_an_empty_mesh_and_renders_background():
    rep = make(init_radius=0.0)
    with torch.no_grad():
        rep.geometry[-1].bias[0] = 5.0  # positive everywhere: nothing inside
    meshes = rep(torch.randn(1, C, D, D, D))
    assert meshes[0].vertices.shape == (0, 3) and meshes[0].faces.shape == (0, 3)
    cams = Cameras.look_at(torch.tensor([[[0.0, 0.0, -3.0]]]), fov_deg=40, height=8, width=8)
    out = MeshRasterizer(MeshRasterizer.Settings())(meshes, cams, torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(out["rgb"], torch.tensor([0.1, 0.2, 0.3]).view(1, 1, 3, 1, 1).expand(1, 1, 3, 8, 8))
    assert (out["opacity"] == 0).all()


def test_outer_shell_keeps_surfaces_closed():
    rep = make(init_radius=0.0)
    with torch.no_grad():
        rep.geometry[-1].bias[0] = -5.0  # negative everywhere but on the clamped shell
    (m,) = rep(torch.randn(1, C, D, D, D))
    mesh = as_trimesh(m.vertices, m.faces)
    assert mesh.is_watertight and mesh.volume > 0.5 * (2 * BOUND) ** 3


def test_gradients_reach_every_parameter_through_vertices_and_colours():
    rep = make()
    volume = torch.randn(2, C, D, D, D, requires_grad=True)
    meshes = rep(volume)
    sum(m.vertices.sum() + (m.vertex_colors * torch.arange(3.0)).sum() for m in meshes).backward()
    for name, p in rep.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert volume.grad.abs().sum() > 0


def test_gradients_reach_the_geometry_through_the_rasteriser():
    rep = make()
    meshes = rep(torch.randn(1, C, D, D, D))
    cams = Cameras.look_at(torch.tensor([[[0.0, 0.3, -4.0]]]), fov_deg=30, height=12, width=12)
    out = MeshRasterizer(MeshRasterizer.Settings())(meshes, cams, torch.ones(3))
    out["rgb"].mean().backward()
    assert rep.geometry[0].weight.grad.abs().sum() > 0 and rep.colour[0].weight.grad.abs().sum() > 0


def test_sdf_sign_regulariser():
    edges = torch.tensor([[0, 1], [1, 2]])
    sdf = torch.tensor([[-1.0, 2.0, 3.0]])  # only edge (0, 1) is crossed
    expected = (torch.nn.functional.softplus(torch.tensor(1.0)) + torch.nn.functional.softplus(torch.tensor(2.0))) / 2
    torch.testing.assert_close(sdf_sign_regulariser(sdf, edges), expected)
    assert sdf_sign_regulariser(sdf.abs(), edges) == 0
    rep = make()
    reg = rep.sdf_regulariser(torch.randn(1, C, D, D, D))
    reg.backward()
    assert reg > 0 and rep.geometry[-1].weight.grad.abs().sum() > 0


def test_bad_settings_and_volumes_are_named():
    with pytest.raises(pydantic.ValidationError, match="grid_resolution"):
        DMTet.Settings(grid_resolution=0)
    with pytest.raises(pydantic.ValidationError, match="offset_scale"):
        DMTet.Settings(offset_scale=-1)
    with pytest.raises(ValueError, match=r"DMTet expected a volume \(B, 4, 8, 8, 8\)"):
        make()(torch.randn(1, C, 6, 6, 6))


def test_the_sdf_regulariser_setting_adds_to_the_training_loss(tiny_recipe):
    from vsd.core.engine import ViewsetDiffusion
    from vsd.apps.training import fixed_batch

    for weight in (0.0, 0.5):
        recipe = tiny_recipe(["representation.type=dmtet", "renderer.type=rasterizer", f"representation.sdf_regulariser={weight}"], ref="dmtet_minens.yaml")
        ds = recipe.data.build(split="train")
        torch.manual_seed(0)
        model = ViewsetDiffusion(recipe, ds.info)
        loss, stats = model.training_loss(fixed_batch(ds, 2, torch.device("cpu")), seed=0)
        if weight == 0:
            assert "regulariser" not in stats and model.representation.regulariser(torch.zeros(1, 8, 8, 8, 8)) is None
            base = loss.item()
        else:
            assert stats["regulariser"] > 0
            torch.testing.assert_close(loss.item(), base + stats["regulariser"].item(), rtol=1e-5, atol=1e-7)


def test_the_shipped_recipe_starts_from_the_shipped_voxel_model():
    from vsd.core.engine import ViewsetDiffusion
    from vsd.core.recipe import load_recipe
    from vsd.apps.sampling import load_model
    from vsd.apps.training import initialise_from
    from vsd.plugins.datasets.minens import MinensDataset

    recipe = load_recipe("dmtet_minens.yaml", ["data.skins=procedural"])
    assert recipe.train.init_from == "minens-voxel"
    model = ViewsetDiffusion(recipe, MinensDataset(recipe.data.settings, split="train").info)
    copied = initialise_from(model, recipe.train.init_from, quiet=True)
    denoiser = [k for k in model.state_dict() if k.startswith("denoiser.")]
    assert set(denoiser) <= set(copied)  # the whole shared network, the DMTet head fresh
    source = load_model("minens-voxel", device="cpu").state_dict()
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in denoiser)
