"""Evaluation: per-frame metrics, their reductions, the kernel distance, LPIPS gating, the
ambiguity rule, and `vsd-run eval` on a tiny trained checkpoint (resumable)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import types

import pytest
import torch

from vsd.apps import evaluation as ev
from vsd.apps.metrics import psnr, ssim
from vsd.cli.main import main
from vsd.core.engine import ViewsetDiffusion
from vsd.core.errors import VsdError

from conftest import TINY


# ---- metrics and reductions ----------------------------------------------------------------
def test_psnr_of_constant_images_is_20_db():
    a, b = torch.full((2, 3, 8, 8), 0.5), torch.full((2, 3, 8, 8), 0.6)
    # MSE 0.01 -> 20 dB; metrics run in float32, hence the tolerance
    assert psnr(a, b).tolist() == pytest.approx([20.0, 20.0], abs=1e-5)
    assert psnr(a, torch.full_like(a, 0.7)).tolist() == pytest.approx([10 * math.log10(25)] * 2, abs=1e-5)


def test_ssim_of_identical_images_is_one_and_lower_otherwise():
    x = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(torch.ones(2, 3), abs=1e-5)
    assert (ssim(x, 1 - x) < 0.5).all()


def test_best_of_n_is_the_max_over_the_first_n_samples_by_mean_psnr():
    gen = torch.Generator().manual_seed(1)
    frames = {"psnr": 20 + 5 * torch.rand(20, 4, generator=gen), "ssim": torch.rand(20, 4, generator=gen)}
    per_sample = frames["psnr"].mean(1)
    for n in ev.best_of_counts(20):
        got = ev.best_of(frames, n)
        assert got["psnr"] == pytest.approx(float(per_sample[:n].max()))
        # SSIM is that of the PSNR-chosen sample, not the best SSIM
        assert got["ssim"] == pytest.approx(float(frames["ssim"][per_sample[:n].argmax()].mean()))
    assert ev.best_of(frames, 20)["psnr"] >= ev.best_of(frames, 5)["psnr"] >= ev.best_of(frames, 1)["psnr"]
    assert ev.best_of(frames, 1)["psnr"] == pytest.approx(float(per_sample[0]))


def test_best_of_counts():
    assert ev.best_of_counts(1) == [1]
    assert ev.best_of_counts(7) == [1, 5, 7]
    assert ev.best_of_counts(20) == [1, 5, 10, 20]
    assert ev.best_of_counts(100) == [1, 5, 10, 20, 50, 100]


def test_averaged_sample_metrics_use_the_pixel_mean_and_pairwise_distance_is_exact():
    gt = torch.full((2, 3, 8, 8), 0.5)
    d = torch.full_like(gt, 0.1)
    acc = ev._Accumulator(gt, None)
    acc.add(torch.stack([gt + d, gt - d]))  # each sample is 20 dB off, their mean is exact
    assert acc.per_frame()["psnr"] == pytest.approx(torch.full((2, 2), 20.0), abs=1e-3)
    assert acc.averaged()["psnr"] == pytest.approx(100.0, abs=1e-3)  # PSNR of a zero error (clamped)
    assert acc.averaged()["ssim"] == pytest.approx(1.0, abs=1e-5)
    # three random samples: the closed form equals the brute-force mean over pairs
    r = torch.rand(3, 2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    brute = torch.stack([((r[i] - r[j]) ** 2).flatten(1).mean(1) for i in range(3) for j in range(i + 1, 3)]).mean(0)
    got = ev.pairwise_distance(r.sum(0), (r**2).sum(0), 3)
    assert got == pytest.approx(brute, rel=1e-9)
    assert ev.diversity(got)["pairwise_psnr"] == pytest.approx(float((-10 * torch.log10(brute)).mean()))
    assert ev.pairwise_distance(r[0], r[0] ** 2, 1) is None


# ---- kernel distance -----------------------------------------------------------------------
def test_kernel_distance_is_about_zero_for_one_distribution_and_positive_for_two():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(200, 16, generator=gen), torch.randn(200, 16, generator=gen)
    far = torch.randn(200, 16, generator=gen) + 2.0
    same, diff = ev.kernel_distance(a, b), ev.kernel_distance(a, far)
    assert diff > 1.0
    assert abs(same) < 0.01 * diff
    assert abs(ev.kernel_distance(a, a)) < 0.01 * diff  # identical sets: only the unbiased correction
    with pytest.raises(ValueError, match="at least 2"):
        ev.kernel_distance(a[:1], b)


def test_random_feature_network_is_fixed_and_separates_image_sets():
    gen = torch.Generator().manual_seed(4)
    noise = lambda: torch.rand(24, 3, 16, 16, generator=gen)  # noqa: E731
    flat = torch.rand(24, 3, 1, 1, generator=gen).expand(24, 3, 16, 16) * 0.3
    nets = ev.RandomConvFeatures(), ev.RandomConvFeatures()
    x = noise()
    assert torch.equal(nets[0](x), nets[1](x))  # seeded: the same features everywhere
    f = lambda imgs: torch.cat([nets[0](imgs), ev.pixel_features(imgs)], 1)  # noqa: E731
    for sl in (slice(0, 256), slice(256, None)):
        same = ev.kernel_distance(f(noise())[:, sl], f(noise())[:, sl])
        diff = ev.kernel_distance(f(noise())[:, sl], f(flat)[:, sl])
        assert diff > 0 and abs(same) < 0.1 * diff


# ---- LPIPS gating --------------------------------------------------------------------------
def test_lpips_is_unavailable_without_the_package_or_weights(monkeypatch, tmp_path):
    monkeypatch.delenv(ev.LPIPS_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "lpips", None)  # import fails
    net, status = ev.load_lpips()
    assert net is None and status.startswith("unavailable") and "lpips" in status
    fake = types.ModuleType("lpips")
    fake.LPIPS = lambda **kw: pytest.fail("LPIPS must not be built without local weights")
    monkeypatch.setitem(sys.modules, "lpips", fake)
    net, status = ev.load_lpips()
    assert net is None and ev.LPIPS_ENV in status and "never downloaded" in status
    monkeypatch.setenv(ev.LPIPS_ENV, str(tmp_path / "missing.pth"))
    net, status = ev.load_lpips()
    assert net is None and "missing.pth" in status and "does not exist" in status


def test_vgg_weights_map_onto_lpips_slices():
    state = {f"features.{i}.weight": torch.zeros(1) for i in (0, 2, 5, 7, 10, 28)} | {"classifier.0.weight": torch.zeros(1)}
    mapped = ev._vgg_slices_state(state)
    assert set(mapped) == {"slice1.0.weight", "slice1.2.weight", "slice2.5.weight", "slice2.7.weight", "slice3.10.weight", "slice5.28.weight"}


# ---- ambiguity -----------------------------------------------------------------------------
class _Described:
    def __init__(self, back_differs):
        self.back_differs = back_differs

    def describe(self, i):
        return {"back_differs": self.back_differs[i]}


def _cam_at(x, z):
    c2w = torch.eye(4)
    c2w[:3, 3] = torch.tensor([x, 0.0, z])
    return c2w


def test_ambiguity_rule():
    ds = _Described([True, False, True])
    front, back = _cam_at(0.0, 5.0), _cam_at(-1.0, -4.9)
    a = ev.ambiguity(ds, 0, front[None])
    assert a["ambiguous"] and a["sees_front"] and not a["sees_back"] and a["cond_azimuth_deg"] == [0.0]
    assert ev.ambiguity(ds, 0, back[None])["ambiguous"]  # the front is hidden and differs from the back
    assert not ev.ambiguity(ds, 1, front[None])["ambiguous"]  # both sides alike
    assert not ev.ambiguity(ds, 2, torch.stack([front, back]))["ambiguous"]  # both sides seen
    assert ev.ambiguity(object(), 0, front[None]) is None
    assert ev.ambiguity(ds, 0, front[None][:0]) is None


def test_results_file_drops_a_line_torn_by_a_kill(tmp_path):
    path = tmp_path / ev.RESULTS
    path.write_text('{"settings": {"samples": 2}}\n{"index": 0, "id": "a"}\n{"index": 1, "id"')
    header, rows = ev.read_results(path)
    assert header == {"samples": 2} and list(rows) == [0]
    assert path.read_text().endswith('"a"}\n')  # the next append starts on a fresh line


# ---- on a trained checkpoint ---------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("eval") / "run"
    assert main(["recipe", "voxel_minens.yaml", *TINY, "--out", str(run), "--quiet"]) == 0
    return run


def _count_sampling(monkeypatch) -> list:
    calls = []
    original = ViewsetDiffusion.sample

    def counted(self, cameras, *a, **k):
        calls.append(cameras.shape[0])
        return original(self, cameras, *a, **k)

    monkeypatch.setattr(ViewsetDiffusion, "sample", counted)
    return calls


def test_cli_eval_writes_metrics_and_resumes(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(ev.LPIPS_ENV, raising=False)
    out = tmp_path / "ev"
    args = ["eval", str(run_dir), "--samples", "3", "--batch-size", "2", "--steps", "2", "--out", str(out), "--quiet"]
    calls = _count_sampling(monkeypatch)
    assert main(args + ["--objects", "2"]) == 0
    assert calls == [2, 1, 2, 1]  # 3 samples in batches of 2, per object
    first = (out / ev.RESULTS).read_text().splitlines()
    calls.clear()
    assert main(args + ["--objects", "3"]) == 0
    assert calls == [2, 1]  # only the third object is sampled
    lines = (out / ev.RESULTS).read_text().splitlines()
    assert lines[: len(first)] == first and len(lines) == len(first) + 1
    assert [json.loads(line)["index"] for line in lines[1:]] == [0, 1, 2]

    summary = json.loads((out / "metrics.json").read_text())
    assert summary["objects"] == 3 and summary["settings"]["samples"] == 3
    assert summary["lpips"].startswith("unavailable")
    g = summary["groups"]["all"]
    assert set(g["best_of"]) == {"1", "3"} and g["best_of"]["3"]["psnr"] >= g["best_of"]["1"]["psnr"]
    assert "lpips" not in g["mean_over_samples"]
    assert {"ambiguous", "unambiguous"} <= set(summary["groups"])
    n_amb = sum(summary["groups"][k]["objects"] for k in ("ambiguous", "unambiguous") if summary["groups"][k])
    assert n_amb == 3
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == ["test-000000", "test-000001", "test-000002"]
    assert all(r["lpips"] == "unavailable" for r in rows)
    assert all(0 < float(r["psnr_best_of_3"]) < 100 for r in rows)
    assert "| group |" in (out / "metrics.md").read_text()

    # other settings into the same folder are refused, naming what differs
    assert main(["eval", str(run_dir), "--samples", "4", "--steps", "2", "--out", str(out), "--objects", "3", "--quiet"]) != 0
    with pytest.raises(VsdError, match="samples"):
        ev.run_eval(run_dir, ev.EvalConfig(samples=4, steps=2, objects=3), out, quiet=True)


def test_deterministic_checkpoints_draw_one_sample(run_dir, tmp_path):
    from vsd.apps.sampling import load_model

    model = load_model(run_dir)
    model.recipe = dataclasses.replace(model.recipe, train=model.recipe.train.model_copy(update={"deterministic": True}))
    ds = model.recipe.data.build(split="test")
    summary = ev.evaluate(model, ds, tmp_path / "det", ev.EvalConfig(samples=5, objects=1), quiet=True)
    assert summary["settings"]["samples"] == 1
    row = json.loads((tmp_path / "det" / ev.RESULTS).read_text().splitlines()[1])
    assert row["samples"] == 1 and row["diversity"] is None and len(row["per_frame"]["psnr"]) == 1
    assert list(summary["groups"]["all"]["best_of"]) == ["1"]


def test_unconditional_eval_reports_kernel_distances(run_dir, tmp_path):
    out = tmp_path / "uncond"
    assert main(["eval", str(run_dir), "--cond-views", "0", "--samples", "2", "--objects", "2", "--steps", "1", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    kid = summary["kid"]
    assert kid["generated_images"] == 2 * 2 * 4 and kid["reference_images"] == 2 * 4
    assert isinstance(kid["random_conv"], float) and isinstance(kid["pixel_stats"], float)
    assert math.isfinite(kid["random_conv"])
    assert "randomly initialised" in summary["notes"]["kid"]
    assert (out / "metrics.csv").is_file()
