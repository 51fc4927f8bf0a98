"""Recipes through the command line: validation errors, extends, overrides, dry runs, listing."""

from __future__ import annotations

import textwrap
import types

import pytest
import yaml

from vsd.cli.main import main
from vsd.core import registry as registry_module
from vsd.core.contracts import Representation
from vsd.core.hookspecs import hookimpl
from vsd.core.recipe import SHIPPED_RECIPES, load_recipe, shipped_recipes
from vsd.core.registry import Registry
from vsd.core.settings import Settings
from vsd.plugins.aggregators.pooling import MeanAggregator


class NeedsK(MeanAggregator):
    class Settings(Settings):
        k: int  # no default: a recipe must give it


class MeshOnly(Representation):
    kind = "mesh"

    class Settings(Settings):
        pass


@hookimpl
def vsd_aggregators():
    return {"test-needs-k": NeedsK}


@hookimpl
def vsd_representations():
    return {"test-mesh": MeshOnly}


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """The process registry: built-ins plus two test plugins, no installed third-party ones."""
    fakes = types.ModuleType("recipe_test_plugins")
    fakes.vsd_aggregators, fakes.vsd_representations = vsd_aggregators, vsd_representations
    reg = Registry.load(autoload=False, extra=[(fakes, "vsd-recipe-tests")])
    assert not reg.failures
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    return reg


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a recipe that wrongly validated would train into ./runs


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ---- errors -------------------------------------------------------------------------------------
BAD = {
    "unknown-plugin": (
        "extends: voxel_minens.yaml\naggregator: {type: atention}\n",
        "aggregator.type",
        ["unknown aggregator 'atention'", "attention (vsd)", "mean (vsd)"],
    ),
    "typo-key": (
        "extends: voxel_minens.yaml\nrenderer:\n  type: volume\n  sample: 16\n",
        "renderer.sample",
        ["unknown key `sample`", "samples", "importance_samples"],
    ),
    "wrong-type": (
        "extends: voxel_minens.yaml\ntrain:\n  steps: lots\n",
        "train.steps",
        ["'lots'", "integer", "number of optimiser steps"],
    ),
    "missing-required": (
        "extends: voxel_minens.yaml\naggregator: {type: test-needs-k}\n",
        "aggregator.k",
        ["missing required value"],
    ),
    "type-not-a-name": (
        "extends: voxel_minens.yaml\nrepresentation: {type: [voxel-grid]}\n",
        "representation.type",
        ["missing or not a name (got ['voxel-grid'])", "voxel-grid (vsd)"],
    ),
    "incompatible-renderer": (
        "extends: voxel_minens.yaml\nrepresentation: {type: test-mesh}\n",
        "renderer.type",
        ["renderer 'volume' draws field", "'test-mesh' is a mesh", "use one of: "],
    ),
    "unknown-section": (
        "extends: voxel_minens.yaml\ntrian: {steps: 5}\n",
        "trian",
        ["unknown section", "train"],
    ),
    "cross-check": (
        "extends: voxel_minens.yaml\ndata: {views: 1}\n",
        "data.views",
        ["train.heldout_views (1)", "got 1"],
    ),
    "missing-parent": (
        "extends: no_such_base.yaml\n",
        "extends",
        ["'no_such_base.yaml'", "no such file", "voxel_minens.yaml"],
    ),
    "malformed-yaml": (
        "extends: voxel_minens.yaml\ntrain: {steps: 5\nmodel:\n  volume_size: 8\n",
        None,
        ["malformed YAML at line"],
    ),
}


def assert_one_paragraph_naming(err: str, path, key: str | None, out: str = "") -> None:
    assert "Traceback" not in err + out and "\n" not in err.strip(), err
    assert err.startswith("error: recipe ")
    assert str(path) in err or str(path.resolve()) in err, err
    if key is not None:
        assert f"key `{key}`" in err, err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_exits_2_naming_file_and_key(tmp_path, capsys, case):
    text, key, fragments = BAD[case]
    path = write(tmp_path / f"bad [{case}].yaml", text)  # brackets: printed literally, not as markup
    code, out, err = run(capsys, "recipe", str(path))
    assert code == 2
    assert_one_paragraph_naming(err, path, key, out)
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_incompatible_renderer_suggests_the_ones_that_fit(tmp_path, capsys, registry):
    path = write(tmp_path / "mesh.yaml", "extends: voxel_minens.yaml\nrepresentation: {type: test-mesh}\n")
    code, _, err = run(capsys, "recipe", str(path))
    fits = sorted(n for n, i in registry.plugins["renderer"].items() if "mesh" in i.cls.accepts)
    assert code == 2 and err.rstrip().endswith("use one of: " + (", ".join(fits) or "none installed"))


def test_extends_cycle(tmp_path, capsys):
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    code, out, err = run(capsys, "recipe", str(a))
    assert code == 2 and "cycle" in err
    assert_one_paragraph_naming(err, a, "extends", out)


def test_bad_override_names_the_command_line_and_suggests_the_key(tmp_path, capsys):
    path = write(tmp_path / "ok.yaml", "extends: voxel_minens.yaml\n")
    code, out, err = run(capsys, "recipe", str(path), "train.stpes=10", "--dry-run")
    assert code == 2 and out == "" and "Traceback" not in err and "\n" not in err.strip(), err
    assert err.startswith("error: command-line override `train.stpes=10` (on recipe "), err
    assert str(path) in err and "unknown key `stpes` (did you mean `train.steps`?)" in err, err
    code, out, err = run(capsys, "recipe", str(path), "trian.steps=3", "--dry-run")
    assert code == 2 and "override `trian.steps=3`" in err and "(did you mean `train`?)" in err, err
    code, out, err = run(capsys, "recipe", str(path), "train.steps=3=4", "--dry-run")
    assert code == 2 and "override `train.steps=3=4`" in err and "'3=4'" in err
    # no near name: no suggestion; a bad key in the file itself is still the file's
    code, out, err = run(capsys, "recipe", str(path), "train.zzzzzz=1", "--dry-run")
    assert code == 2 and "did you mean" not in err
    bad = write(tmp_path / "bad.yaml", "extends: voxel_minens.yaml\ntrain: {stpes: 3}\n")
    code, out, err = run(capsys, "recipe", str(bad), "train.steps=3", "--dry-run")
    assert code == 2 and err.startswith("error: recipe ") and "key `train.stpes`" in err and "command-line" not in err, err


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    path = write(tmp_path / "broken.yaml", "name: x\ntrain:\n  steps: 5: 6\n")
    code, _, err = run(capsys, "recipe", str(path))
    assert code == 2 and "malformed YAML at line 3, column 11: mapping values are not allowed here" in err


def test_unknown_recipe_name_lists_shipped_ones(capsys):
    code, _, err = run(capsys, "recipe", "voxel_minnes")
    assert code == 2 and "voxel_minnes" in err and "voxel_minens.yaml" in err and "\n" not in err.strip()


# ---- extends and overrides ----------------------------------------------------------------------
def test_extends_relative_and_shipped(tmp_path, monkeypatch):
    write(tmp_path / "bases" / "small.yaml", "extends: voxel_minens.yaml\ntrain: {steps: 7, lr: 1.0e-3}\nmodel: {volume_size: 8}\n")
    child = write(tmp_path / "child.yaml", "extends: bases/small.yaml\ntrain: {lr: 5.0e-4}\n")
    monkeypatch.chdir(tmp_path / "bases")  # relative to the extending file, not to the cwd
    r = load_recipe(child)
    assert (r.train.steps, r.train.lr, r.train.batch_size) == (7, 5.0e-4, 4)  # child, base, shipped
    assert r.model.volume_size == 8 and r.data.type == "minens" and r.aggregator.type == "attention"
    assert r.name == "child"  # named after itself, not after the recipe it extends
    assert "extends" not in r.raw


def test_overrides_and_plugin_switch(tmp_path):
    path = write(tmp_path / "att.yaml", "extends: voxel_minens.yaml\naggregator: {type: attention, heads: 2}\n")
    assert load_recipe(path).aggregator.settings.heads == 2
    r = load_recipe(path, ["train.steps=5", "aggregator.type=mean", "model.channel_mult=[1, 2]", "renderer.near=null"])
    assert r.train.steps == 5 and isinstance(r.train.steps, int)
    assert r.raw["aggregator"] == {"type": "mean"} and r.aggregator.cls is MeanAggregator  # heads dropped
    assert r.model.channel_mult == (1, 2) and r.renderer.settings.near is None
    same = load_recipe(path, ["aggregator.type=attention"])  # same plugin: settings kept
    assert same.aggregator.settings.heads == 2
    # A plugin switch in a child recipe drops the parent's settings of the old plugin too.
    child = write(tmp_path / "child.yaml", "extends: att.yaml\naggregator: {type: max}\n")
    assert load_recipe(child).raw["aggregator"] == {"type": "max"}


def test_dry_run_prints_the_resolved_recipe(tmp_path, capsys):
    path = write(tmp_path / "mine.yaml", "extends: voxel_minens.yaml\nseed: 3\n")
    code, out, err = run(capsys, "recipe", str(path), "train.steps=5", "aggregator.type=mean", "--dry-run")
    assert code == 0 and err == ""
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 5 and printed["seed"] == 3 and printed["aggregator"] == {"type": "mean"}
    assert printed["data"]["type"] == "minens" and printed["renderer"]["samples"] == 32
    again = write(tmp_path / "again.yaml", out)  # what dry-run prints is itself a valid recipe
    assert load_recipe(again).raw == printed


@pytest.mark.parametrize("ref", ["voxel_minens", "voxel_minens.yaml"])
def test_shipped_recipe_by_bare_name(capsys, ref):
    code, out, _ = run(capsys, "recipe", ref, "--dry-run")
    assert code == 0 and yaml.safe_load(out)["name"] == "voxel_minens"
    assert load_recipe(ref).source == str(SHIPPED_RECIPES / "voxel_minens.yaml")


def test_recipes_command_lists_shipped_recipes(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert set(lines) == set(shipped_recipes()) and "voxel_minens.yaml" in lines
    assert "32 px, a 16^3 voxel grid" in lines["voxel_minens.yaml"]


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_validates_or_names_its_plugin(name, registry):
    first = (SHIPPED_RECIPES / name).read_text().splitlines()[0]
    assert first.startswith("# "), f"{name}: first line should describe the recipe"
    try:
        load_recipe(name)
    except Exception as exc:  # only allowed when the recipe says which plugin it needs
        assert "pip install" in first and "unknown" in str(exc), (name, exc)
