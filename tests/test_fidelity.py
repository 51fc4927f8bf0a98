"""Fidelity metrics of `vsd-run eval`: does a reconstruction reproduce *its* input? A model that
returns the truth must score perfectly, one that returns the same object for every input must
score chance identity and zero colour spread, whatever its silhouette PSNR."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from vsd.apps import evaluation as ev
from vsd.apps.metrics import foreground_colour, masked_psnr, masked_ssim, psnr
from vsd.core.recipe import load_recipe

N_OBJECTS = 6


@pytest.fixture(scope="module")
def flat_test_set():
    recipe = load_recipe("voxel_minens.yaml", ["data.skins=flat", "data.image_size=16", "data.views=4", f"data.num_objects={N_OBJECTS}"])
    return recipe.data.build(split="test"), recipe


class _Oracle(nn.Module):
    """Stands in for a trained model: its 'scene' is an object index, rendered exactly by the
    dataset. ``constant``: every input reconstructs as object 0; otherwise as the object the
    conditioning view shows."""

    def __init__(self, dataset, recipe, constant: bool):
        super().__init__()
        self.dataset, self.recipe, self.constant = dataset, recipe, constant
        self.dummy = nn.Parameter(torch.zeros(()))

    def background(self, batch, device):
        return torch.ones(batch, 3, device=device)

    def _which(self, cond: torch.Tensor) -> int:
        if self.constant:
            return 0
        errs = [float(((self.dataset[j]["images"][0] - cond) ** 2).mean()) for j in range(len(self.dataset))]
        return min(range(len(errs)), key=errs.__getitem__)

    def sample(self, cameras, cond, **_):
        return types.SimpleNamespace(scene=[self._which(c[0]) for c in cond])

    def render(self, scene, cameras):
        rgb, mask = zip(*(self.dataset.render_object(i, cameras[b]) for b, i in enumerate(scene)))
        return {"rgb": torch.stack(rgb), "opacity": torch.stack(mask)}


def _evaluate(tmp_path, dataset, recipe, constant):
    model = _Oracle(dataset, recipe, constant)
    return ev.evaluate(model, dataset, tmp_path, ev.EvalConfig(samples=2, batch_size=2), quiet=True)["groups"]["all"]


def test_the_truth_scores_perfect_fidelity(flat_test_set, tmp_path):
    g = _evaluate(tmp_path, *flat_test_set, constant=False)
    f = g["fidelity"]
    assert f["identity"] == {"accuracy": 1.0, "chance": pytest.approx(1 / N_OBJECTS), "objects": N_OBJECTS, "candidates": N_OBJECTS}
    assert f["input_view_psnr"] > 60  # re-rendered exactly (supersampling makes it not quite 100)
    assert g["best_of"]["1"]["fg_psnr"] > 60 and g["best_of"]["1"]["fg_ssim"] == pytest.approx(1.0, abs=1e-4)
    assert f["colour"]["error"] == pytest.approx(0.0, abs=1e-4)
    assert f["colour"]["spread_pred"] == pytest.approx(f["colour"]["spread_true"], rel=1e-3)
    assert f["colour"]["spread_true"] > 0.05  # flat-colour characters differ in colour


def test_one_object_for_every_input_scores_chance_and_no_spread(flat_test_set, tmp_path):
    g = _evaluate(tmp_path, *flat_test_set, constant=True)
    f = g["fidelity"]
    assert f["identity"]["accuracy"] == pytest.approx(1 / N_OBJECTS)  # only object 0 is "identified"
    # one object seen from each object's cameras: its mean colour barely moves
    assert f["colour"]["spread_ratio"] < 0.15
    assert f["colour"]["error"] > 0.1
    # foreground PSNR sees the wrong object where plain PSNR is flattered by the white background
    assert g["best_of"]["1"]["fg_psnr"] < g["best_of"]["1"]["psnr"] - 3
    rows = ev.read_results(tmp_path / ev.RESULTS)[1]
    assert all(max(r["input_view_psnr"]) < 25 for i, r in rows.items() if i != 0)
    assert min(rows[0]["input_view_psnr"]) > 60


def test_fidelity_is_in_the_tables_and_the_sweep_metrics(flat_test_set, tmp_path):
    from vsd.apps.sweep import summary_metrics

    _evaluate(tmp_path, *flat_test_set, constant=True)
    import json

    summary = json.loads((tmp_path / "metrics.json").read_text())
    flat = summary_metrics(summary)
    assert flat["identity_accuracy"] == pytest.approx(1 / N_OBJECTS) and flat["colour_spread_ratio"] < 0.15
    assert "fg_psnr_best_of_2" in flat
    md = (tmp_path / "metrics.md").read_text()
    assert "Fidelity to the input" in md and "1/6" in md
    assert "identity" in summary["notes"]["fidelity"]


def test_masked_metrics_score_only_the_mask():
    gt = torch.ones(1, 3, 8, 8)
    pred = gt.clone()
    pred[..., :2, :2] = 0.0  # a 2x2 wrong patch
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :4, :4] = True  # 16 pixels, 4 of them wrong: MSE 0.25 -> 6.02 dB
    assert float(masked_psnr(pred, gt, mask)) == pytest.approx(10 * torch.log10(torch.tensor(4.0)).item(), abs=1e-4)
    assert float(psnr(pred, gt)) == pytest.approx(10 * torch.log10(torch.tensor(16.0)).item(), abs=1e-4)
    assert float(masked_psnr(pred, gt, torch.zeros_like(mask))) == pytest.approx(100.0)
    assert float(masked_ssim(gt, gt, mask)) == pytest.approx(1.0, abs=1e-5)
    assert float(masked_ssim(pred, gt, mask)) < 0.9
    colours = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    m[0, :, 0, 0] = True
    got = foreground_colour(colours, m)
    assert torch.allclose(got[0], colours[0, :, 0, 0]) and torch.allclose(got[1], colours[1].mean((1, 2)))
