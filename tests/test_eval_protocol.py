"""`vsd-run eval --protocol paper`: the published evaluation's views (SRN: clean view 64, noisy
views 90, 104, 120, the other views scored; other datasets: item view 0 clean, views 1-3 noisy),
250 DDIM steps unless --steps, the settings recorded in metrics.json/md, and an object without the
protocol's views refused with exit 2 naming the object and the view."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vsd.apps import evaluation as ev
from vsd.cli.main import main
from vsd.core.cameras import Cameras
from vsd.core.engine import ViewsetDiffusion
from vsd.plugins.datasets.srn import SRNDataset, read_pose, write_srn_object

from conftest import TINY

SRN_VIEWS = 121  # the fewest views that hold view 120, the last noisy view of the protocol
OTHERS = [v for v in range(SRN_VIEWS) if v != 64]


def _write_srn(root, split: str, object_id: str, n: int, seed: int, size: int = 8) -> None:
    gen = torch.Generator().manual_seed(seed)
    az = torch.arange(n) * 2 * math.pi / n
    eye = torch.stack([1.3 * torch.cos(az), 1.3 * torch.sin(az), torch.full((n,), 0.5)], -1)
    cams = Cameras.look_at(eye, fov_deg=51.98, height=size, width=size)
    write_srn_object(root, split, object_id, torch.rand(n, 3, size, size, generator=gen), cams.c2w, cams.K[0], (size, size))


@pytest.fixture(scope="module")
def srn_run(tmp_path_factory):
    """A tiny model trained on SRN folders (3 views per viewset: 2 sampled, 1 held out) whose test
    split holds one object of SRN_VIEWS views."""
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("protocol")
    root = base / "srn"
    _write_srn(root, "train", "tr", 6, 0)
    _write_srn(root, "val", "va", 6, 1)
    _write_srn(root, "test", "car", SRN_VIEWS, 2)
    run = base / "run"
    overrides = ["data.type=srn", f"data.root={root}", "data.views=3", "train.cond_probs=[0.5, 0.5]"]
    # the type first: a new data.type starts from that dataset's defaults
    assert main(["recipe", "voxel_minens.yaml", *overrides, *TINY, "--out", str(run), "--quiet"]) == 0
    return run, root


@pytest.fixture(scope="module")
def minens_run(tmp_path_factory):
    """A tiny minens model with 3 views per item (so the protocol's items are rebuilt with 4)."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("protocol_minens") / "run"
    assert main(["recipe", "voxel_minens.yaml", *TINY, "data.views=3", "train.cond_probs=[0.5, 0.5]", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.fixture
def sampled(monkeypatch):
    """Records what each ViewsetDiffusion.sample call was given, then samples in 1 step (fast)."""
    calls = []
    original = ViewsetDiffusion.sample

    def recorded(self, cameras, cond_images=None, **kw):
        calls.append({"c2w": cameras.c2w.detach().cpu().clone(), "cond": None if cond_images is None else cond_images.cpu().clone(),
                      "steps": kw.get("steps"), "guidance": kw.get("guidance"),
                      "sampler": (self.recipe.diffusion.sampler, self.recipe.diffusion.eta)})
        return original(self, cameras, cond_images, **{**kw, "steps": 1})

    monkeypatch.setattr(ViewsetDiffusion, "sample", recorded)
    return calls


def _rows(out):
    return [json.loads(line) for line in (out / ev.RESULTS).read_text().splitlines()[1:]]


def test_srn_paper_protocol_conditions_on_view_64_samples_90_104_120_and_scores_the_rest(srn_run, sampled, tmp_path):
    run, root = srn_run
    out = tmp_path / "paper"
    assert main(["eval", str(run), "--protocol", "paper", "--samples", "2", "--batch-size", "2", "--out", str(out), "--quiet"]) == 0

    # one sampler call (2 samples in one batch) of a 4-view viewset, although the model was trained on 2 sampled views
    assert len(sampled) == 1
    call = sampled[0]
    assert call["c2w"].shape[:2] == (2, 4)
    folder = root / "cars_test" / "car"
    want = torch.stack([read_pose(folder / "pose" / f"{v:06d}.txt") for v in (64, 90, 104, 120)])
    assert torch.allclose(call["c2w"][0], want) and torch.allclose(call["c2w"][1], want)
    # the clean view is view 64's image, as the dataset reads it
    ds = SRNDataset(SRNDataset.Settings(root=str(root), image_size=16, views=3), split="test")
    assert call["cond"].shape == (2, 1, 3, 16, 16)
    assert torch.allclose(call["cond"][0, 0], ds.load(0, [64])["images"][0])
    # 250 DDIM steps by default (the sampler recorded), no guidance
    assert call["steps"] == 250 and call["guidance"] == 0.0 and call["sampler"] == ("ddim", 0.0)

    (row,) = _rows(out)
    assert row["views"]["clean"] == [64] and row["views"]["noisy"] == [90, 104, 120]
    assert row["views"]["scored"] == OTHERS and row["target_views"] == SRN_VIEWS - 1 == 120
    assert len(row["per_frame"]["psnr"]) == 2 and all(len(s) == 120 for s in row["per_frame"]["psnr"])

    summary = json.loads((out / "metrics.json").read_text())
    st = summary["settings"]
    assert st["protocol"] == "paper" and st["steps"] == 250 and st["guidance"] == 0.0 and st["sampler"] == "ddim, eta 0"
    assert st["samples"] == 2 and st["cond_views"] == 1
    assert st["protocol_views"]["clean"] == [64] and st["protocol_views"]["noisy"] == [90, 104, 120]
    assert "every view of the object but view 64" == st["protocol_views"]["scored"]
    assert "SRNDataset: view 64" in st["protocol_views"]["source_view"]
    g = summary["groups"]["all"]
    assert set(g["best_of"]) == {"1", "2"} and "psnr" in g["averaged_sample"]
    md = (out / "metrics.md").read_text()
    assert "## Settings" in md and '- protocol: "paper"' in md and '"noisy": [90, 104, 120]' in md and "- steps: 250" in md


def test_steps_are_overridable_and_the_default_protocol_is_unchanged(srn_run, minens_run, sampled, tmp_path):
    run, _ = srn_run
    out = tmp_path / "paper7"
    assert main(["eval", str(run), "--protocol", "paper", "--steps", "7", "--samples", "1", "--out", str(out), "--quiet"]) == 0
    assert [c["steps"] for c in sampled] == [7]
    assert json.loads((out / "metrics.json").read_text())["settings"]["steps"] == 7

    # without --protocol: the recipe's steps (None to the sampler), the item's views, no protocol keys in rows
    sampled.clear()
    out = tmp_path / "default"
    assert main(["eval", str(minens_run), "--samples", "1", "--objects", "1", "--out", str(out), "--quiet"]) == 0
    assert [c["steps"] for c in sampled] == [None] and sampled[0]["guidance"] is None
    assert sampled[0]["c2w"].shape[:2] == (1, 2)  # 3 views per item, 1 held out: 1 clean + 1 noisy
    (row,) = _rows(out)
    assert "views" not in row and row["target_views"] == 2
    st = json.loads((out / "metrics.json").read_text())["settings"]
    assert st["protocol"] == "default" and "protocol_views" not in st and st["steps"] == 2
    assert ev.EvalConfig().sampler_steps() is None and ev.EvalConfig(protocol="paper").sampler_steps() == ev.PAPER_STEPS == 250


def test_minens_paper_protocol_uses_view_0_clean_and_views_1_to_3_noisy(minens_run, sampled, tmp_path):
    from vsd.apps.sampling import load_model

    out = tmp_path / "minens"
    assert main(["eval", str(minens_run), "--protocol", "paper", "--samples", "1", "--objects", "2", "--out", str(out), "--quiet"]) == 0
    # the recipe's items have 3 views; the protocol's have 4: view 0 clean, 1, 2, 3 noisy, 1..3 scored
    recipe = load_model(minens_run).recipe
    ds = recipe.data.cls(recipe.data.settings.model_copy(update={"views": 4}), split="test")
    assert len(sampled) == 2
    for i, call in enumerate(sampled):
        assert call["c2w"].shape[:2] == (1, 4) and call["steps"] == 250
        item = ds[i]
        assert torch.allclose(call["c2w"][0], item["c2w"]) and torch.allclose(call["cond"][0, 0], item["images"][0])
    rows = _rows(out)
    assert [r["views"] for r in rows] == [{"clean": [0], "noisy": [1, 2, 3], "scored": [1, 2, 3], "numbering": "views of the dataset item"}] * 2
    assert all(r["target_views"] == 3 for r in rows)
    st = json.loads((out / "metrics.json").read_text())["settings"]
    assert st["protocol_views"]["clean"] == [0] and st["protocol_views"]["noisy"] == [1, 2, 3]
    assert "view 0 of each item is the clean view" in st["protocol_views"]["source_view"]

    # evaluated directly on items of 3 views, the protocol is refused naming the object and the missing view
    model = load_model(minens_run)
    with pytest.raises(ev.ProtocolError, match=r"object test-000000 \(index 0\) has 3 views.*view 3 does not exist") as exc:
        ev.evaluate(model, recipe.data.build(split="test"), tmp_path / "three", ev.EvalConfig(protocol="paper", samples=1, objects=1), quiet=True)
    assert exc.value.exit_code == 2


def test_an_object_without_view_64_exits_2_naming_the_object_and_the_view(srn_run, tmp_path, capsys):
    run, root = srn_run
    _write_srn(root, "test", "short", 40, 3)  # sorted after "car": object index 1
    try:
        out = tmp_path / "bad"
        assert main(["eval", str(run), "--protocol", "paper", "--samples", "1", "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "object short (index 1) has 40 views" in err and "view 64 does not exist" in err
        assert not (out / ev.RESULTS).exists()  # checked before anything is written or sampled
        # an object that has view 64 but not the noisy view 120
        _write_srn(root, "test", "short", 110, 3)
        assert main(["eval", str(run), "--protocol", "paper", "--samples", "1", "--out", str(tmp_path / "bad2"), "--quiet"]) == 2
        assert "object short (index 1) has 110 views" in capsys.readouterr().err
        # the paper protocol conditions on one view only
        assert main(["eval", str(run), "--protocol", "paper", "--cond-views", "2", "--out", str(tmp_path / "bad3"), "--quiet"]) == 2
        assert "--cond-views 2" in capsys.readouterr().err
    finally:
        import shutil

        shutil.rmtree(root / "cars_test" / "short")
