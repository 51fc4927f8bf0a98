"""The slot contracts, checked for every registered plugin (built-in or installed).

Each slot has one test class parametrised over the registry's plugins of that slot, so a
third-party package is held to the same contract as the built-ins as soon as it is installed:
``python -m pytest tests/test_contracts.py -k gaussian-blobs``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from vsd.core.cameras import Cameras
from vsd.core.contracts import Field, Mesh
from vsd.core.registry import get_registry
from vsd.core.settings import Settings

REGISTRY = get_registry()


def plugins(slot: str):
    """pytest params, one per registered plugin of ``slot``, with the registry name as id."""
    return [pytest.param(info, id=name) for name, info in sorted(REGISTRY.plugins[slot].items())]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 0.0) -> None:
    """Elementwise |actual - expected| <= atol + rtol |expected|, with the worst offender reported.

    (torch.testing.assert_close would do, but its first call imports torch.distributed: seconds.)
    """
    expected = expected.to(actual)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert not (excess > 0).any(), f"off by up to {excess.max().item():.3g} beyond tolerance:\n{actual}\n!=\n{expected}"


def weighted_sum(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar with a random weight per element: no output symmetry can cancel a gradient."""
    g = torch.Generator().manual_seed(0)
    return sum((t * torch.randn(t.shape, generator=g).to(t)).sum() for t in tensors)


def assert_grads_reach_every_parameter(module: torch.nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"


def assert_float32_on(t: torch.Tensor, device: torch.device) -> None:
    assert t.dtype == torch.float32 and t.device == device and torch.isfinite(t).all()


# ---- settings schemas (every slot) --------------------------------------------------------------
@pytest.mark.parametrize("info", [p for slot in REGISTRY.plugins for p in plugins(slot)])
def test_settings_schema(info):
    schema = info.cls.Settings
    assert isinstance(schema, type) and issubclass(schema, Settings), f"{info.name}: Settings must subclass vsd Settings"
    assert schema is not Settings, f"{info.name}: declares no Settings of its own"
    required = [n for n, f in schema.model_fields.items() if f.is_required()]
    if info.slot == "dataset":
        # Only the location of data on disk may lack a default.
        for n in required:
            assert schema.model_fields[n].annotation in (str, Path), f"{info.name}: {n} needs a default"
        assert {"image_size", "views"} <= set(schema.model_fields)
    else:
        assert not required, f"{info.name}: settings without defaults: {required}"
        settings = schema()
        with pytest.raises(ValidationError, match="not_a_setting"):
            schema(not_a_setting=1)
        with pytest.raises(ValidationError):
            settings.__setattr__(next(iter(schema.model_fields), "x"), None)  # frozen


# ---- encoders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("info", plugins("encoder"))
class TestEncoder:
    def test_shapes_dtype_and_gradients(self, info):
        enc = info.cls(info.cls.Settings(), in_channels=12, time_dim=16)
        assert isinstance(enc.out_channels, int) and isinstance(enc.stride, int) and enc.stride >= 1
        x = torch.randn(3, 12, 16, 16, requires_grad=True)
        out = enc(x, torch.randn(3, 16))
        assert out.shape == (3, enc.out_channels, 16 // enc.stride, 16 // enc.stride)
        assert_float32_on(out, x.device)
        weighted_sum(out).backward()
        assert x.grad.abs().sum() > 0
        assert_grads_reach_every_parameter(enc)

    def test_views_are_independent(self, info):
        # N = B * V views are encoded one by one: a view's features ignore the other views.
        enc = info.cls(info.cls.Settings(), in_channels=12, time_dim=16).eval()
        x, temb = torch.randn(3, 12, 16, 16), torch.randn(3, 16)
        both = enc(x, temb)
        alone = enc(x[1:2], temb[1:2])
        assert_close(both[1:2], alone, atol=1e-5, rtol=1e-4)


# ---- aggregators --------------------------------------------------------------------------------
@pytest.mark.parametrize("info", plugins("aggregator"))
class TestAggregator:
    C, D = 8, 4

    def make(self, info):
        torch.manual_seed(0)
        return info.cls(info.cls.Settings(), channels=self.C, resolution=self.D).eval()

    def test_shapes_dtype_and_gradients(self, info):
        agg = self.make(info)
        feats = torch.randn(2, 3, self.C, self.D, self.D, self.D, requires_grad=True)
        query = torch.randn(2, self.C, self.D, self.D, self.D, requires_grad=True)
        outs = [agg(feats, query), agg(feats)]  # at a skip connection, and at the bottleneck
        for out in outs:
            assert out.shape == (2, self.C, self.D, self.D, self.D)
            assert_float32_on(out, feats.device)
        weighted_sum(*outs).backward()
        assert feats.grad.abs().sum() > 0
        assert_grads_reach_every_parameter(agg)

    @pytest.mark.parametrize("with_query", [True, False], ids=["query", "bottleneck"])
    def test_view_order_does_not_matter(self, info, with_query):
        agg = self.make(info)
        feats = torch.randn(2, 4, self.C, self.D, self.D, self.D)
        query = torch.randn(2, self.C, self.D, self.D, self.D) if with_query else None
        with torch.no_grad():
            a = agg(feats, query)
            b = agg(feats[:, [2, 0, 3, 1]], query)
        assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(a, agg(feats[:, :2], query), atol=1e-4), "output ignores some views"

    def test_one_view(self, info):
        agg = self.make(info)
        feats = torch.randn(2, 1, self.C, self.D, self.D, self.D)
        for query in (torch.randn(2, self.C, self.D, self.D, self.D), None):
            out = agg(feats, query)
            assert out.shape == (2, self.C, self.D, self.D, self.D)
            assert torch.isfinite(out).all()


# ---- representations ----------------------------------------------------------------------------
@pytest.mark.parametrize("info", plugins("representation"))
class TestRepresentation:
    C, D, BOUND = 8, 4, 0.75

    def make(self, info):
        torch.manual_seed(0)
        return info.cls(info.cls.Settings(), in_channels=self.C, resolution=self.D, bound=self.BOUND)

    def test_kind(self, info):
        assert info.cls.kind in ("field", "mesh")
        assert any(info.cls.kind in r.cls.accepts for r in REGISTRY.plugins["renderer"].values()), (
            f"no installed renderer draws {info.cls.kind!r}"
        )

    def test_output_and_gradients(self, info):
        rep = self.make(info)
        volume = torch.randn(2, self.C, self.D, self.D, self.D, requires_grad=True)
        scene = rep(volume)
        if info.cls.kind == "field":
            tensors = self.check_field(scene, volume.device)
        else:
            tensors = self.check_meshes(scene, volume.device)
        weighted_sum(*tensors).backward()
        assert volume.grad.abs().sum() > 0
        assert_grads_reach_every_parameter(rep)

    def check_field(self, field, device):
        assert isinstance(field, Field)
        assert field.bound == pytest.approx(self.BOUND) and field.batch_size == 2
        pts = (torch.rand(2, 50, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * self.BOUND * 0.95
        sigma, rgb = field.query(pts)
        assert sigma.shape == (2, 50) and rgb.shape == (2, 50, 3)
        for t in (sigma, rgb):
            assert_float32_on(t, device)
        assert (sigma >= 0).all() and (rgb >= 0).all() and (rgb <= 1).all()
        # Outside the cube: zero density, however close to its faces.
        out = pts.clone()
        out[:, :, 0] = self.BOUND * torch.where(torch.arange(50) % 2 == 0, 1.05, -1.3)
        assert (field.query(out)[0] == 0).all()
        grid = field.density_grid(3)
        assert grid.shape == (2, 3, 3, 3) and (grid >= 0).all()
        return sigma, rgb

    def check_meshes(self, meshes, device):
        assert isinstance(meshes, list) and len(meshes) == 2
        tensors = []
        for m in meshes:
            assert isinstance(m, Mesh)
            assert m.vertices.ndim == 2 and m.vertices.shape[1] == 3
            assert_float32_on(m.vertices, device)
            assert m.faces.dtype == torch.long and m.faces.ndim == 2 and m.faces.shape[1] == 3
            if m.faces.numel():
                assert m.faces.min() >= 0 and m.faces.max() < m.vertices.shape[0]
            assert (m.vertices.abs() <= self.BOUND + 1e-5).all()
            tensors.append(m.vertices)
            if m.vertex_colors is not None:
                assert m.vertex_colors.shape == m.vertices.shape
                assert (m.vertex_colors >= 0).all() and (m.vertex_colors <= 1).all()
                tensors.append(m.vertex_colors)
        return tensors


# ---- renderers ----------------------------------------------------------------------------------
class SphereField(Field):
    """A ball of radius r at the origin: constant colour, density ``scale * 50`` inside
    (smoothly to 0 across a shell of width ~0.02), so renders have closed-form depths."""

    def __init__(self, scale: torch.Tensor, colour: torch.Tensor, radius: float = 0.5, bound: float = 1.0):
        self.scale, self.colour, self.radius, self.bound = scale, colour, radius, bound
        self.batch_size, self.device = colour.shape[0], colour.device

    def query(self, points):
        inside = torch.sigmoid((self.radius - points.norm(dim=-1)) * 200)
        sigma = 50 * self.scale[:, None] * inside * (points.abs() <= self.bound).all(-1)
        return sigma, self.colour[:, None].expand(-1, points.shape[1], 3)


def cube_mesh(colour: torch.Tensor, half: float = 0.5) -> Mesh:
    """The cube [-half, half]^3 as 12 outward-facing triangles with one vertex colour."""
    corners = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float32)
    faces = []
    for axis in range(3):
        for sign in (-1, 1):
            quad = [i for i in range(8) if corners[i, axis] == sign]  # 4 corners, z-order
            for tri in ([quad[0], quad[1], quad[3]], [quad[0], quad[3], quad[2]]):
                a, b, c = corners[tri]
                if torch.dot(torch.cross(b - a, c - a, dim=0), a + b + c) < 0:
                    tri = [tri[0], tri[2], tri[1]]
                faces.append(tri)
    return Mesh(corners * half, torch.tensor(faces), vertex_colors=colour.expand(8, 3))


@pytest.mark.parametrize("info", plugins("renderer"))
class TestRenderer:
    SIZE = 9  # odd: the centre pixel's ray passes through the origin

    def scene(self, kind: str):
        scale = torch.tensor([1.0, 1.0], requires_grad=True)
        colour = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.8, 0.3]], requires_grad=True)
        if kind == "field":
            return SphereField(scale, colour), [scale, colour]
        return [cube_mesh(colour[b]) for b in range(2)], [colour]

    def cameras(self):
        # Each centre ray meets the cube inside a face, never on an edge.
        eyes = torch.tensor([[[0.0, 0.0, -3.0], [3.0, 0.0, 0.0]], [[0.0, 1.0, 2.8284], [-1.2, -2.7495, 0.0]]])
        assert torch.allclose(eyes.norm(dim=-1), torch.tensor(3.0), atol=1e-3)
        return Cameras.look_at(eyes, fov_deg=40.0, height=self.SIZE, width=self.SIZE)

    @staticmethod
    def centre_depth(kind: str, cams: Cameras) -> torch.Tensor:
        """(B, V, 1) distance from each camera to the object along its centre ray (at the origin)."""
        eye = cams.origins
        if kind == "field":
            return eye.norm(dim=-1, keepdim=True) - 0.5  # the ball's radius
        d = -eye / eye.norm(dim=-1, keepdim=True)
        t0, t1 = (-0.5 - eye) / d, (0.5 - eye) / d  # slab test against the cube's half size 0.5
        return torch.minimum(t0, t1).amax(-1, keepdim=True)

    @pytest.mark.parametrize("kind", ["field", "mesh"])
    def test_render(self, info, kind):
        if kind not in info.cls.accepts:
            pytest.skip(f"{info.name} does not draw {kind}")
        renderer = info.cls(info.cls.Settings()).eval()
        scene, params = self.scene(kind)
        cams = self.cameras()
        bg = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
        out = renderer(scene, cams, bg)
        c = self.SIZE // 2
        shapes = {"rgb": 3, "depth": 1, "opacity": 1}
        for key, ch in shapes.items():
            assert out[key].shape == (2, 2, ch, self.SIZE, self.SIZE), key
            assert_float32_on(out[key], cams.device)
        rgb, depth, opacity = out["rgb"], out["depth"], out["opacity"]
        assert (rgb >= -1e-6).all() and (rgb <= 1 + 1e-6).all()
        assert (opacity >= -1e-6).all() and (opacity <= 1 + 1e-6).all() and (depth >= -1e-6).all()
        # The centre ray meets the object at a known distance; the corner rays miss it.
        centre = (slice(None), slice(None), slice(None), c, c)
        assert (opacity[centre] > 0.95).all()
        assert_close(depth[centre] / opacity[centre], self.centre_depth(kind, cams), atol=0.1, rtol=0)
        colour = params[-1].detach()
        assert_close(rgb[centre], colour[:, None].expand(2, 2, 3), atol=0.06, rtol=0)
        corner = (slice(None), slice(None), slice(None), 0, 0)
        assert (opacity[corner] < 1e-3).all() and (depth[corner] < 1e-2).all()
        assert_close(rgb[corner], bg[:, None].expand(2, 2, 3), atol=1e-3, rtol=0)
        weighted_sum(rgb, opacity).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    def test_shared_background(self, info):
        kind = info.cls.accepts[0]
        renderer = info.cls(info.cls.Settings()).eval()
        scene, _ = self.scene(kind)
        out = renderer(scene, self.cameras(), torch.tensor([0.2, 0.4, 0.6]))
        assert_close(out["rgb"][:, :, :, 0, 0], torch.tensor([0.2, 0.4, 0.6]).expand(2, 2, 3), atol=1e-3, rtol=0)


# ---- datasets -----------------------------------------------------------------------------------
def _write_srn(root: Path) -> dict:
    from vsd.plugins.datasets.srn import write_srn_object

    eyes = torch.tensor([[0.0, 0.0, 1.3], [1.3, 0.0, 0.0], [0.0, -1.3, 0.0]])
    cams = Cameras.look_at(eyes, up=(0.0, 0.0, 1.0), fov_deg=51.98, height=24, width=24)
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    for split in ("train", "val", "test"):
        write_srn_object(root, split, "obj0", images, cams.c2w, cams.K[0], (24, 24))
    return {"root": str(root)}


# Datasets that read files from disk get a tiny generated copy of their format.
DATA_ON_DISK = {"srn": _write_srn}


@pytest.mark.parametrize("info", plugins("dataset"))
class TestDataset:
    def make(self, info, tmp_path, split="train"):
        schema = info.cls.Settings
        values = {"image_size": 16, "views": 2}
        if any(f.is_required() for f in schema.model_fields.values()):
            if info.name not in DATA_ON_DISK:
                pytest.skip(f"{info.name} reads data from disk and this test cannot write its format")
            values.update(DATA_ON_DISK[info.name](tmp_path))
        return info.cls(schema(**values), split=split)

    @pytest.mark.parametrize("split", ["train", "val"])
    def test_items(self, info, tmp_path, split):
        ds = self.make(info, tmp_path, split)
        assert len(ds) > 0
        info_ = ds.info
        assert info_.bound > 0 and 0 <= info_.near < info_.far and info_.fov_deg > 0
        assert info_.up_axis in ("y", "z") and info_.background in ("white", "black", "random")
        item = ds[len(ds) - 1]
        V, S = 2, 16
        assert item["images"].shape == (V, 3, S, S)
        assert item["images"].dtype == torch.float32
        assert item["images"].min() >= -1 and item["images"].max() <= 1
        assert item["images"].std() > 0  # not a blank image
        if "masks" in item:
            assert item["masks"].shape == (V, 1, S, S) and item["masks"].min() >= 0 and item["masks"].max() <= 1
        c2w, K = item["c2w"], item["K"]
        assert c2w.shape == (V, 4, 4) and K.shape == (V, 4) and c2w.dtype == K.dtype == torch.float32
        self.check_cameras(c2w, K, S, info_)

    @staticmethod
    def check_cameras(c2w, K, S, info_):
        R = c2w[:, :3, :3]
        assert_close(R.transpose(1, 2) @ R, torch.eye(3).expand(len(R), 3, 3), atol=1e-4, rtol=0)
        assert_close(torch.linalg.det(R), torch.ones(len(R)), atol=1e-4, rtol=0)
        assert_close(c2w[:, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(len(R), 4))
        assert (K[:, :2] > 0).all() and (K[:, 2:] > 0).all() and (K[:, 2:] < S).all()
        # Every camera sees the centre of the object's cube, inside the ray range it renders.
        uv, z = Cameras(c2w, K, S, S).project(torch.zeros(len(R), 1, 3))
        assert (z > 0).all() and (uv >= 0).all() and (uv <= S).all()
        dist = c2w[:, :3, 3].norm(dim=-1)
        assert (dist > info_.bound).all()
        assert (dist >= info_.near - 1e-4).all() and (dist <= info_.far + 1e-4).all()
        assert math.isfinite(info_.camera_radius) and info_.camera_radius > info_.bound


def test_every_slot_has_a_plugin():
    assert all(REGISTRY.plugins[slot] for slot in REGISTRY.plugins), {s: list(p) for s, p in REGISTRY.plugins.items()}

