"""A real third-party plugin: examples/gaussian_blobs_plugin, installed with pip.

These tests INSTALL that package (``pip install --no-deps --no-build-isolation -e``) into the
running environment when it is not installed yet; deselect them with ``-m "not installs"``.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from vsd.core import registry as registry_module
from vsd.core.cameras import Cameras
from vsd.core.recipe import load_recipe
from vsd.renderers.volume import VolumeRenderer

pytestmark = pytest.mark.installs

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "examples" / "gaussian_blobs_plugin"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 0.0) -> None:
    """Elementwise |actual - expected| <= atol + rtol |expected|, with the worst offender reported.

    (torch.testing.assert_close would do, but its first call imports torch.distributed: seconds.)
    """
    expected = expected.to(actual)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert not (excess > 0).any(), f"off by up to {excess.max().item():.3g} beyond tolerance:\n{actual}\n!=\n{expected}"


def _has_entry_point() -> bool:
    try:
        dist = md.distribution("vsd-gaussian-blobs")
    except md.PackageNotFoundError:
        return False
    return any(ep.group == "vsd" and ep.name == "gaussian_blobs" for ep in dist.entry_points)


@pytest.fixture(scope="module")
def blobs():
    """The plugin's module, installed from this checkout if it was not installed already."""
    if not _has_entry_point():
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(PLUGIN_DIR)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        importlib.invalidate_caches()
        assert _has_entry_point()
    if importlib.util.find_spec("vsd_gaussian_blobs") is None:
        # An editable install is activated by a .pth file, which only a new interpreter reads.
        sys.path.insert(0, str(PLUGIN_DIR))
    return importlib.import_module("vsd_gaussian_blobs")


@pytest.fixture
def fresh_registry(monkeypatch):
    """The process registry, reloaded so that it sees what is installed now."""
    for var in (registry_module.ENV_ALLOW, registry_module.ENV_DISABLE):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    return registry_module.get_registry()


def vsd_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("vsd-run")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vsd.cli"]
    switches = (registry_module.ENV_ALLOW, registry_module.ENV_DISABLE)
    full_env = {k: v for k, v in os.environ.items() if k not in switches}
    full_env.update({"COLUMNS": "400", **(env or {})})  # wide enough that no cell is folded
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300, env=full_env)


def plugin_rows(output: str) -> list[dict[str, str]]:
    """The rows of the `vsd-run plugins` table as dicts keyed by column title."""
    lines = output.splitlines()
    header = next(line for line in lines if "┃" in line and "slot" in line)
    cols = [c.strip() for c in header.strip().strip("┃").split("┃")]
    return [
        dict(zip(cols, (c.strip() for c in line.strip().strip("│").split("│"))))
        for line in lines
        if line.strip().startswith("│")
    ]


# ---- installed and listed -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugins_listing(blobs, tmp_path_factory):
    """`vsd-run plugins` run once, with a broken distribution on PYTHONPATH beside the real plugin."""
    site = tmp_path_factory.mktemp("site")
    info = site / "vsd_test_exploding-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vsd-test-exploding\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text("[vsd]\nexploding = vsd_test_exploding_mod\n")
    (site / "vsd_test_exploding_mod.py").write_text("raise RuntimeError('kaboom [on import]')\n")
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return vsd_run("plugins", env={"PYTHONPATH": path})


def test_vsd_run_plugins_lists_it(plugins_listing):
    assert plugins_listing.returncode == 0, plugins_listing.stderr
    rows = {(r["slot"], r["name"]): r for r in plugin_rows(plugins_listing.stdout)}
    row = rows[("representation", "gaussian-blobs")]
    assert row["provider"] == "vsd-gaussian-blobs" and row["version"] == "0.1.0" and row["status"] == "ok"
    assert rows[("representation", "voxel-grid")]["provider"] == "vsd"


def test_a_plugin_that_raises_on_import_does_not_stop_the_cli(plugins_listing):
    assert plugins_listing.returncode == 0, plugins_listing.stderr
    assert "Traceback" not in plugins_listing.stdout + plugins_listing.stderr
    rows = plugin_rows(plugins_listing.stdout)
    [failed] = [r for r in rows if r["provider"] == "vsd-test-exploding"]
    assert failed["name"] == "exploding" and failed["version"] == "2.0"
    assert failed["status"] == "failed: RuntimeError: kaboom [on import]"  # brackets kept verbatim
    assert {"voxel-grid", "volume", "minens", "gaussian-blobs"} <= {r["name"] for r in rows if r["status"] == "ok"}


@pytest.mark.parametrize("allow, listed", [("some-other-plugin", False), ("vsd-gaussian-blobs", True), ("gaussian_blobs", True)])
def test_allowlist_selects_it(blobs, monkeypatch, allow, listed):
    monkeypatch.delenv(registry_module.ENV_DISABLE, raising=False)
    monkeypatch.setenv(registry_module.ENV_ALLOW, allow)
    reg = registry_module.Registry.load()
    assert ("gaussian-blobs" in reg.names("representation")) == listed
    monkeypatch.setenv(registry_module.ENV_DISABLE, "1")
    assert "gaussian-blobs" not in registry_module.Registry.load().names("representation")  # the switch wins


# ---- used from a recipe -------------------------------------------------------------------------
def test_recipe_validates_and_its_field_renders_with_gradients(blobs, fresh_registry):
    r = load_recipe("blobs_minens")
    rep_spec = r.representation
    assert (rep_spec.type, rep_spec.provider, rep_spec.cls) == ("gaussian-blobs", "vsd-gaussian-blobs", blobs.GaussianBlobs)
    assert r.raw["representation"] == {"type": "gaussian-blobs", "blobs": 16, "hidden": 64}  # no voxel-grid keys
    assert r.name == "blobs_minens" and r.data.type == "minens"

    torch.manual_seed(0)
    rep = load_recipe("blobs_minens", ["representation.blobs=4"]).representation.build(in_channels=8, resolution=4, bound=0.6)
    renderer = r.renderer.build().eval()
    volume = torch.randn(1, 8, 4, 4, 4, requires_grad=True)
    field = rep(volume)
    assert isinstance(field, blobs.BlobField) and field.centres.shape == (1, 4, 3)
    eyes = torch.tensor([[[0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]])
    cams = Cameras.look_at(eyes, fov_deg=15.0, height=12, width=12)
    out = renderer(field, cams, torch.ones(3))
    assert out["rgb"].shape == (1, 2, 3, 12, 12) and out["opacity"].max() > 0.05
    (out["rgb"] - 0.5).square().mean().backward()
    assert volume.grad.abs().sum() > 0
    for name, p in rep.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_one_training_step_reaches_the_blobs(blobs, fresh_registry, tiny_recipe):
    from vsd.core.engine import ViewsetDiffusion
    from vsd.core.viewset import collate_viewsets

    r = tiny_recipe(["representation.blobs=4", "representation.hidden=16"], ref="blobs_minens.yaml")
    ds = r.data.build(split="train")
    torch.manual_seed(0)
    model = ViewsetDiffusion(r, ds.info)
    loss, _ = model.training_loss(collate_viewsets([ds[0], ds[1]]), seed=0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.representation.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# ---- the field in closed form -------------------------------------------------------------------
def one_blob(blobs, centre=(0.1, -0.2, 0.3), scales=(0.1, 0.1, 0.1), amplitude=4.0, colour=(0.2, 0.4, 0.6)):
    """A BlobField of one object holding one blob."""
    c, s, rgb = (torch.tensor([[v]]) for v in (centre, scales, colour))
    return blobs.BlobField(c, s, torch.tensor([[amplitude]]), rgb, bound=1.0)


def test_blob_density_and_colour(blobs):
    f = one_blob(blobs, scales=(0.1, 0.2, 0.4))
    c = torch.tensor([0.1, -0.2, 0.3])
    pts = torch.stack([c, c + torch.tensor([0.1, 0, 0]), c + torch.tensor([0.1, 0.2, 0]), c + torch.tensor([0, 0, -0.8])])
    sigma, rgb = f.query(pts[None])
    assert_close(sigma[0], 4.0 * torch.exp(torch.tensor([0.0, -0.5, -1.0, -2.0])), rtol=1e-4, atol=1e-6)
    assert_close(rgb[0], torch.tensor([0.2, 0.4, 0.6]).expand(4, 3))
    # Outside the cube, no density.
    assert f.query(torch.tensor([[[1.01, 0.0, 0.0], [0.0, -1.2, 0.3]]]))[0].eq(0).all()


def test_two_blobs_mix_colours_by_density(blobs):
    f = blobs.BlobField(
        torch.tensor([[[-0.2, 0.0, 0.0], [0.2, 0.0, 0.0]]]),
        torch.full((1, 2, 3), 0.1),
        torch.tensor([[3.0, 1.0]]),
        torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]),
        bound=1.0,
    )
    pts = torch.tensor([[[0.0, 0.0, 0.0], [-0.2, 0.0, 0.0], [0.9, 0.9, 0.9]]])
    sigma, rgb = f.query(pts)
    g = math.exp(-0.5 * (0.2 / 0.1) ** 2)
    assert sigma[0, 0].item() == pytest.approx(4 * g, rel=1e-4)
    assert_close(rgb[0, 0], torch.tensor([0.75, 0.0, 0.25]), atol=1e-5, rtol=0)
    assert sigma[0, 1].item() == pytest.approx(3 + math.exp(-0.5 * 16), rel=1e-4)
    # Far from both: still a colour in [0, 1] (the nearer blob's), not 0/0.
    assert_close(rgb[0, 2], torch.tensor([0.0, 0.0, 1.0]), atol=1e-4, rtol=0)


def test_expanded_distance_matches_the_direct_formula(blobs):
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(2, 5, 3, generator=g) * 1.6 - 0.8
    scales = torch.rand(2, 5, 3, generator=g) * 0.3 + 0.05
    amps = torch.rand(2, 5, generator=g) + 0.5
    f = blobs.BlobField(centres, scales, amps, torch.rand(2, 5, 3, generator=g), bound=1.0)
    pts = torch.rand(2, 40, 3, generator=g) * 2 - 1
    direct = (amps[:, None] * torch.exp(-0.5 * (((pts[:, :, None] - centres[:, None]) / scales[:, None]) ** 2).sum(-1))).sum(-1)
    assert_close(f.query(pts)[0], direct, rtol=1e-3, atol=1e-6)


def test_rendered_opacity_is_one_minus_exp_of_the_line_integral(blobs):
    # Through the centre of a blob, the optical depth is a * sqrt(2 pi) * s.
    s = 0.1
    a = 1.0 / (math.sqrt(2 * math.pi) * s)
    f = one_blob(blobs, centre=(0.0, 0.0, 0.0), scales=(s, s, s), amplitude=a)
    renderer = VolumeRenderer(VolumeRenderer.Settings(samples=256)).eval()
    cams = Cameras.look_at(torch.tensor([[[0.0, 0.0, -3.0]]]), fov_deg=10.0, height=5, width=5)
    out = renderer(f, cams, torch.zeros(3))
    opacity, depth = out["opacity"][0, 0, 0, 2, 2], out["depth"][0, 0, 0, 2, 2]
    assert opacity.item() == pytest.approx(1 - math.exp(-1), abs=2e-3)
    # Expected hit distance: 3 + s E[z], z weighted by T * sigma = exp(-Phi(z)) phi(z) (tau = 1).
    z = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    w = torch.exp(-0.5 * (1 + torch.erf(z / math.sqrt(2)))) * torch.exp(-0.5 * z**2)
    expected = 3.0 + s * (w * z).sum() / w.sum()
    assert expected < 3.0 - 0.01  # the near half of the blob is seen more than the far half
    assert (depth / opacity).item() == pytest.approx(expected.item(), abs=2e-3)
    assert_close(out["rgb"][0, 0, :, 2, 2], torch.tensor([0.2, 0.4, 0.6]) * opacity, atol=1e-5, rtol=0)


def test_settings_and_predicted_ranges(blobs):
    S = blobs.GaussianBlobs.Settings
    assert (S().blobs, S().hidden) == (16, 64)
    with pytest.raises(ValidationError, match="min_scale"):
        S(min_scale=0.5, max_scale=0.2)
    with pytest.raises(ValidationError):
        S(blobs=0)
    rep = blobs.GaussianBlobs(S(blobs=5, anisotropic=True, min_scale=0.1, max_scale=0.2), in_channels=4, resolution=4, bound=2.0)
    f = rep(torch.randn(3, 4, 4, 4, 4) * 5)
    assert f.centres.shape == (3, 5, 3) and (f.centres.abs() < 2.0).all()
    assert (f.scales >= 0.2 - 1e-6).all() and (f.scales <= 0.4 + 1e-6).all()
    assert not torch.allclose(f.scales[..., 0], f.scales[..., 1])  # one scale per axis
    assert (f.amplitudes > 0).all() and (f.colours >= 0).all() and (f.colours <= 1).all()
    with pytest.raises(ValueError, match=r"expected a volume \(B, 4, 4, 4, 4\), got \(3, 4, 8, 8, 8\)"):
        rep(torch.randn(3, 4, 8, 8, 8))
