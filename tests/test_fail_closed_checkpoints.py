"""Checkpoint and weights files handed in fail closed: exit 2 with one paragraph naming the file
and the problem, never a traceback and never a model that silently samples garbage."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import vsd
from vsd.cli.main import main
from vsd.core.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from vsd.core.errors import DataError, RecipeError
from vsd.core.weights import save_weights

from conftest import TINY

RECIPE = "voxel_minens.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fail_closed") / "run"
    assert main(["recipe", RECIPE, *TINY, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def state(run):
    st = load_checkpoint(run / "checkpoints" / "last.pt")
    st.pop("path")
    return st


def refused(capsys, argv: list[str], *needles: str) -> str:
    """``vsd-run argv`` exits 2 with one short paragraph holding every needle."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert len(err) < 1200, err
    for needle in needles:
        assert needle in err, err
    return err


def with_recipe(state: dict, change) -> dict:
    raw = yaml.safe_load(state["recipe"])
    change(raw)
    return {**state, "recipe": yaml.safe_dump(raw, sort_keys=False)}


def first_float(sd: dict) -> str:
    return next(k for k, v in sd.items() if v.is_floating_point() and v.numel())


def poisoned(sd: dict, value: float) -> tuple[dict, str]:
    key = first_float(sd)
    t = sd[key].clone()
    t.view(-1)[0] = value
    return {**sd, key: t}, key


# ---- safetensors weights --------------------------------------------------------------------
def weights_with(tmp_path, state: dict, **meta) -> Path:
    """A weights file of ``state`` whose metadata keys are replaced (None: removed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = save_weights(tmp_path / "good.safetensors", state, state["recipe"])
    with safe_open(str(good), framework="pt") as fh:
        m, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    for k, v in meta.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=m)
    return path


def test_intact_weights_load(tmp_path, state):
    pipe = vsd.load(save_weights(tmp_path / "w.safetensors", state, state["recipe"]), device="cpu")
    assert pipe.model.recipe.model.base_channels == 8


@pytest.mark.parametrize("meta, needles", [
    ({"info": "{not json"}, ["metadata `info` is not JSON"]),
    ({"info": "x" * 5000}, ["metadata `info` is not JSON"]),
    ({"info": '{"bound": 1}'}, ["metadata `info`", "camera_radius"]),
    ({"info": '{"bound": 1, "camera_radius": 2, "fov_deg": "wide", "near": 1, "far": 3}'}, ["`fov_deg`", "'wide'"]),
    ({"step": "abc"}, ["metadata `step`", "'abc'", "integer"]),
    ({"step": None}, ["lacks metadata `step`"]),
    ({"recipe": "- a\n- b\n"}, ["metadata `recipe`", "not a mapping"]),
    ({"recipe": "model: [1, 2\n"}, ["metadata `recipe`", "malformed YAML"]),
    ({"recipe": "seed: 0\nseed: 1\n"}, ["metadata `recipe`", "duplicate key 'seed'"]),
    ({"recipe": None}, ["lacks metadata `recipe`"]),
], ids=["info-not-json", "info-long", "info-fields", "info-type", "step-abc", "step-missing", "recipe-list", "recipe-yaml", "recipe-duplicate",
        "recipe-missing"])
def test_bad_weights_metadata_is_refused(tmp_path, capsys, state, meta, needles):
    path = weights_with(tmp_path, state, **meta)
    refused(capsys, ["sample", str(path), "--out", str(tmp_path / "s")], str(path), *needles)
    with pytest.raises(DataError, match="bad.safetensors"):
        vsd.load(path, device="cpu")
    assert not (tmp_path / "s").exists()


# ---- torch checkpoints ----------------------------------------------------------------------
@pytest.mark.parametrize("change, needles", [
    (lambda st: {"format": FORMAT, "model": st["model"]}, ["lacks `ema`, `recipe`, `info`, `step`"]),
    (lambda st: {**st, "step": "abc"}, ["`step` is 'abc'"]),
    (lambda st: {**st, "step": 2.5}, ["`step` is 2.5"]),
    (lambda st: {**st, "model": [1, 2]}, ["`model` is of type list"]),
    (lambda st: {**st, "ema": {**st["ema"], "x": 3}}, ["`ema` is not a state dict of tensors", "x is of type int"]),
    (lambda st: {**st, "info": {k: v for k, v in st["info"].items() if k != "near"}}, ["`info` lacks near"]),
    (lambda st: {**st, "info": {**st["info"], "up_axis": "w"}}, ["`up_axis` is 'w'"]),
    (lambda st: {**st, "recipe": 42}, ["`recipe` is of type int"]),
    (lambda st: {**st, "recipe": "just text"}, ["`recipe` is YAML of type str"]),
], ids=["missing-keys", "step-str", "step-float", "model-list", "ema-non-tensor", "info-missing", "info-choice", "recipe-int", "recipe-scalar"])
def test_malformed_checkpoint_is_refused(tmp_path, capsys, state, change, needles):
    path = tmp_path / "bad.pt"
    torch.save({"format": FORMAT, **change(state)}, path)
    refused(capsys, ["sample", str(path), "--out", str(tmp_path / "s")], str(path), *needles)
    with pytest.raises(DataError, match="bad.pt"):
        vsd.load(path, device="cpu")


def test_embedded_recipe_that_does_not_validate_names_the_checkpoint(tmp_path, capsys, state):
    path = save_checkpoint(tmp_path / "bad.pt", with_recipe(state, lambda r: r["model"].update(bogus=1)))
    refused(capsys, ["sample", str(path)], str(path), "model.bogus")
    with pytest.raises(RecipeError, match="bad.pt"):
        vsd.load(path, device="cpu")


def test_weights_of_the_wrong_shape_are_named(tmp_path, capsys, state):
    path = save_checkpoint(tmp_path / "wide.pt", with_recipe(state, lambda r: r["model"].update(base_channels=16)))
    err = refused(capsys, ["sample", str(path)], str(path), "wrong shape", "in the file", "in the model", "others")
    assert err.count(" in the file, ") == 3  # the first three, then a count
    with pytest.raises(DataError, match="wrong shape"):
        vsd.load(path, device="cpu")
    # the same weights as a weights file
    w = save_weights(tmp_path / "wide.safetensors", {**state}, with_recipe(state, lambda r: r["model"].update(base_channels=16))["recipe"])
    refused(capsys, ["sample", str(w)], str(w), "wrong shape")


def test_missing_and_unexpected_tensors_are_named(tmp_path, capsys, state):
    key = first_float(state["ema"])
    ema = {k: v for k, v in state["ema"].items() if k != key}
    ema["extra.weight"] = torch.zeros(3)
    path = save_checkpoint(tmp_path / "keys.pt", {**state, "ema": ema})
    refused(capsys, ["sample", str(path)], str(path), f"missing from the file: {key}", "does not have: extra.weight")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_are_refused_by_sample_and_eval(tmp_path, capsys, state, value):
    ema, key = poisoned(state["ema"], value)
    path = save_checkpoint(tmp_path / "nan.pt", {**state, "ema": ema})
    refused(capsys, ["sample", str(path), "--out", str(tmp_path / "s")], str(path), "NaN or Inf", key)
    refused(capsys, ["eval", str(path), "--objects", "1", "--samples", "1", "--steps", "1", "--out", str(tmp_path / "e")], str(path), key)
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()
    with pytest.raises(DataError, match="NaN or Inf"):
        vsd.load(path, device="cpu")
    model, key = poisoned(state["model"], value)  # raw weights too, even when sampling from the EMA
    path = save_checkpoint(tmp_path / "raw.pt", {**state, "model": model})
    refused(capsys, ["sample", str(path)], "`model` weights", key)


def test_init_from_a_broken_checkpoint_is_a_recipe_error(tmp_path, capsys, state):
    ema, _ = poisoned(state["ema"], math.nan)
    path = save_checkpoint(tmp_path / "nan.pt", {**state, "ema": ema})
    refused(capsys, ["recipe", RECIPE, *TINY, f"train.init_from={path}", "--out", str(tmp_path / "r"), "--quiet"], "train.init_from", str(path))
    assert not (tmp_path / "r" / "checkpoints").exists()


# ---- resume ---------------------------------------------------------------------------------
def test_resume_with_a_changed_recipe_is_refused(tmp_path, capsys, run):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    saved = (copy / "recipe.yaml").read_text()
    args = ["recipe", RECIPE, *TINY, "--out", str(copy), "--resume", "--quiet"]
    refused(capsys, args + ["train.lr=0.001", "diffusion.self_condition_prob=0.25"],
            "train.lr: 0.0005 in the run, 0.001 now", "diffusion.self_condition_prob: 0.5 in the run, 0.25 now", "recipe.yaml")
    refused(capsys, args + ["model.base_channels=16"], "model.base_channels: 8 in the run, 16 now")
    refused(capsys, args + ["seed=1"], "seed: 0 in the run, 1 now")
    assert load_checkpoint(copy)["step"] == 2
    assert (copy / "recipe.yaml").read_text() == saved


def test_resume_may_change_steps_sampling_and_device(tmp_path, capsys, run):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # train.grad_accum=1 is the default, written out here and left out of the run's recipe
    args = ["recipe", RECIPE, *TINY, "train.steps=3", "sample.num_samples=1", "device=cpu", "train.grad_accum=1", "--out", str(copy), "--resume", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    assert load_checkpoint(copy)["step"] == 3
