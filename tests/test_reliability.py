"""Reliability guarantees of training, checkpoints, inputs, plugins and disk, one test each.

Slow tests (training subprocesses that are killed and resumed) are marked ``slow``; the whole file
takes about two minutes of CPU on a laptop core. Deselect them with ``-m "not slow"``.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import types
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from vsd.apps.training import Trainer, step_seed
from vsd.cli.main import main
from vsd.core import checkpoint as checkpoint_module
from vsd.core import registry as registry_module
from vsd.core.checkpoint import FORMAT, load_checkpoint, run_checkpoints
from vsd.core.errors import DataError, RecipeError, VsdError
from vsd.core.hookspecs import hookimpl
from vsd.core.recipe import SLOT_KEYS, TOP_LEVEL, Recipe, _engine_schemas, load_recipe, load_recipe_dict
from vsd.core.registry import Registry, get_registry

from conftest import TINY

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---- helpers -------------------------------------------------------------------------------
def _cli_args(run: Path, steps: int, *extra: str) -> list[str]:
    return ["recipe", "voxel_minens.yaml", *TINY, f"train.steps={steps}", *extra, "--out", str(run), "--quiet"]


def _log(run: Path) -> dict[int, float]:
    """step -> loss from a run's log.csv."""
    rows = (run / "log.csv").read_text().splitlines()[1:]
    out = {}
    for row in rows:
        step, loss = row.split(",")[:2]
        assert int(step) not in out, f"step {step} logged twice in {run / 'log.csv'}"
        out[int(step)] = float(loss)
    return out


def _logged_steps(run: Path) -> int:
    path = run / "log.csv"
    if not path.exists():
        return 0
    rows = [r for r in path.read_text().splitlines()[1:] if r.count(",") >= 7]
    return max((int(r.split(",")[0]) for r in rows), default=0)


def _newest_saved(run: Path) -> int:
    return max((int(p.stem.split("_")[1]) for p in run_checkpoints(run)), default=0)


def _wait(proc: subprocess.Popen, done, what: str, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not done():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}: {proc.stderr.read().decode()[-2000:]}")
        if time.time() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], env=ENV, cwd=TESTS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _all_finite(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run keeping its 2 newest checkpoints (copy it before changing it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    torch.set_num_threads(1)
    assert main(_cli_args(run, 4, "train.keep_checkpoints=2")) == 0
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 1. kill and resume ------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_the_uninterrupted_run(tmp_path):
    """SLOW (3 training subprocesses). Three SIGKILLs at seeded-random steps and moments, one of
    them while a checkpoint is being written; every resume loses at most one checkpoint interval
    and the finished run's losses and weights equal an uninterrupted run's."""
    rng = random.Random(20240611)
    mid_save = rng.randrange(3)  # which kill happens while a checkpoint is being written
    # each kill lands 2-3 steps past the step the previous one resumed from (so the paused save
    # is always still ahead), which bounds the last kill at 2 + 4 + 4 + (a step of slack)
    total = 14
    run = tmp_path / "run"
    marker = tmp_path / "pausing"
    resumed_from = []
    at = rng.randint(1, 2)
    for k in range(3):
        cli = _cli_args(run, total, *(["--resume"] if k else []))
        if k == mid_save:
            proc = _spawn([str(TESTS / "reliability_worker.py"), str(at), str(marker), *cli])
            _wait(proc, marker.exists, f"the save of step {at}")
        else:
            proc = _spawn(["-m", "vsd.cli", *cli])
            _wait(proc, lambda: _newest_saved(run) >= at - 1, f"the checkpoint of step {at - 1}")
            start = time.time()
            _wait(proc, lambda: _newest_saved(run) >= at, f"the checkpoint of step {at}")
            # somewhere inside a later step: up to one step's duration, however fast steps are
            time.sleep(rng.uniform(0.0, time.time() - start))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        progress = _logged_steps(run)  # the last step completed and logged before the kill
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no corrupt checkpoint is met: writes are atomic
            state = load_checkpoint(run)
        if k == mid_save:
            assert state["step"] in (at - 1, at)
            assert (run / "checkpoints" / f"step_{at:08d}.pt").exists()
            assert not (run / "checkpoints" / f"step_{at:08d}.pt.sha256").exists()
        assert 0 <= progress - state["step"] <= 1, f"kill {k}: logged {progress}, resumable {state['step']}"
        resumed_from.append(state["step"])
        at = state["step"] + rng.randint(2, 3)
    assert main(_cli_args(run, total, "--resume")) == 0
    assert main(_cli_args(tmp_path / "straight", total)) == 0

    got, want = _log(run), _log(tmp_path / "straight")
    assert sorted(got) == sorted(want) == list(range(1, total + 1))
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=1e-5, abs_tol=1e-9), f"step {step}: {got[step]} != {want[step]}"
    a, b = load_checkpoint(run), load_checkpoint(tmp_path / "straight")
    assert a["step"] == b["step"] == total
    for name, p in b["model"].items():
        torch.testing.assert_close(a["model"][name], p, rtol=1e-5, atol=1e-7, msg=name)
    assert resumed_from == sorted(resumed_from) and len(resumed_from) == 3


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_the_current_step_then_exit(tmp_path, sig):
    """SLOW (1 training subprocess each). No periodic checkpoints: the one found afterwards was
    written because of the signal, at the step the run had reached."""
    run = tmp_path / "run"
    proc = _spawn(["-m", "vsd.cli", *_cli_args(run, 500, "train.checkpoint_every=100000")])
    _wait(proc, lambda: _logged_steps(run) >= 2, "two logged steps")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode != 0
    assert "--resume" in err and sig.name in err and "Traceback" not in err
    saved = run_checkpoints(run)
    assert len(saved) == 1
    state = load_checkpoint(run)
    assert state["step"] == _logged_steps(run) >= 2
    assert saved[0].name == f"step_{state['step']:08d}.pt"


def test_resume_with_a_different_model_is_a_clear_error(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path / "run")
    assert main(_cli_args(run, 6, "model.base_channels=16", "--resume")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "step_00000004.pt" in err and "recipe" in err


# ---- 2. checkpoints ------------------------------------------------------------------------
def test_only_the_newest_checkpoints_are_kept_and_last_is_the_newest(trained):
    ck = trained / "checkpoints"
    assert [p.name for p in run_checkpoints(trained)] == ["step_00000003.pt", "step_00000004.pt"]
    assert sorted(p.name for p in ck.iterdir()) == [
        "last.pt", "last.pt.sha256", "step_00000003.pt", "step_00000003.pt.sha256", "step_00000004.pt", "step_00000004.pt.sha256",
    ]  # fmt: skip
    assert os.path.samefile(ck / "last.pt", ck / "step_00000004.pt")
    assert (ck / "step_00000004.pt.sha256").read_text() == _sha(ck / "step_00000004.pt")
    assert load_checkpoint(ck / "last.pt")["step"] == 4


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(trained, tmp_path, damage, capsys):
    run = _copy_run(trained, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000004.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    newest.write_bytes(bytes(data))

    with pytest.raises(DataError, match=re.escape(str(newest))):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=re.escape(str(newest))):
        assert load_checkpoint(run)["step"] == 3
    if damage == "truncate":  # without its checksum, torch still finds the file cut short
        loose = shutil.copy(newest, tmp_path / "loose.pt")
        with pytest.raises(DataError, match=re.escape(str(loose))):
            load_checkpoint(loose)

    # --resume continues from step 3 and redoes step 4 exactly
    with pytest.warns(UserWarning, match=re.escape(str(newest))):
        assert main(_cli_args(run, 5, "train.keep_checkpoints=2", "--resume")) == 0
    got, want = _log(run), _log(trained)
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert math.isclose(got[4], want[4], rel_tol=1e-5)
    assert load_checkpoint(run)["step"] == 5


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + shlex.quote(str(self.marker)),))


def test_a_malicious_pickle_is_refused_without_running_it(trained, tmp_path, capsys):
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw_pickle.pt"
    raw.write_bytes(pickle.dumps({"format": FORMAT, "step": 1, "model": _Payload(marker)}, protocol=2))
    zipped = tmp_path / "torch_save.pt"
    torch.save({"format": FORMAT, "step": 1, "model": _Payload(marker)}, zipped)
    for evil in (raw, zipped):
        with pytest.raises(DataError, match=re.escape(str(evil))):
            load_checkpoint(evil)
        assert main(["sample", str(evil), "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert evil.name in err and "Traceback" not in err
    # as a run's newest checkpoint, with a matching checksum: refused, the older one is used
    run = _copy_run(trained, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000009.pt"
    shutil.copy(zipped, newest)
    (run / "checkpoints" / "step_00000009.pt.sha256").write_text(_sha(newest))
    with pytest.warns(UserWarning, match=re.escape(str(newest))):
        assert load_checkpoint(run)["step"] == 4
    assert not marker.exists()
    # the payload is live: plain unpickling does run it
    pickle.loads(raw.read_bytes())
    assert marker.exists()


def test_files_that_are_not_vsd_checkpoints_are_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, foreign)
    with pytest.raises(DataError, match=re.escape(str(foreign)) + ".*not a vsd checkpoint"):
        load_checkpoint(foreign)
    for name, data in {"empty.pt": b"", "text.pt": b"hello", "png.pt": b"\x89PNG\r\n\x1a\n" + bytes(64)}.items():
        with pytest.raises(DataError, match=re.escape(str(tmp_path / name))):
            (tmp_path / name).write_bytes(data)
            load_checkpoint(tmp_path / name)


# ---- 3. numerical faults -------------------------------------------------------------------
def _trainer(tiny_recipe, out: Path, *extra: str) -> Trainer:
    return Trainer(tiny_recipe(["train.steps=4", *extra]), out, quiet=True)


def _poison(trainer: Trainer, bad_seed: int, seen: list) -> None:
    """training_loss returns NaN for the batch drawn from ``bad_seed`` (every time it is drawn)."""
    loss_fn = trainer.model.training_loss

    def poisoned(batch, seed, rows, total):
        params = [p.detach().clone() for p in trainer.model.parameters()]
        seen.append((trainer.step, seed, params))
        loss, stats = loss_fn(batch, seed, rows, total)
        if seed == bad_seed:
            return loss * float("nan"), {**stats, "loss": float("nan")}
        return loss, stats

    trainer.model.training_loss = poisoned


def test_nonfinite_skip_skips_the_step_and_training_continues(tiny_recipe, tmp_path):
    t = _trainer(tiny_recipe, tmp_path / "run", "train.nonfinite=skip")
    bad = step_seed(t.recipe.seed, 2) + 1  # the loss seed of step index 2 (the third step)
    seen = []
    _poison(t, bad, seen)
    result = t.run()
    assert result["step"] == 4
    steps = [s for s, _, _ in seen]
    assert steps == [0, 1, 2, 2, 3]  # the third step was retried once, on a fresh draw
    assert seen[2][1] == bad and seen[3][1] != bad
    for before, after in zip(seen[2][2], seen[3][2]):
        assert torch.equal(before, after)  # the skipped step changed no parameter
    assert sorted(_log(tmp_path / "run")) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in _log(tmp_path / "run").values())
    for path in run_checkpoints(tmp_path / "run"):
        assert _all_finite(load_checkpoint(path)), path


def test_nonfinite_stop_stops_with_a_clear_error(tiny_recipe, tmp_path):
    t = _trainer(tiny_recipe, tmp_path / "run", "train.nonfinite=stop")
    _poison(t, step_seed(t.recipe.seed, 2) + 1, [])
    with pytest.raises(VsdError, match=r"stopped at step 2: non-finite loss nan"):
        t.run()
    saved = run_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == ["step_00000001.pt", "step_00000002.pt"]
    assert all(_all_finite(load_checkpoint(p)) for p in saved)


def test_a_nonfinite_parameter_never_reaches_a_checkpoint(tiny_recipe, tmp_path):
    t = _trainer(tiny_recipe, tmp_path / "run", "train.nonfinite=skip", "train.max_skipped_steps=2")
    with torch.no_grad():
        next(t.model.denoiser.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(VsdError, match=r"3 step\(s\) in a row"):
        t.run()
    assert t.step == 0 and run_checkpoints(tmp_path / "run") == []


# ---- 4. bad input: recipes -----------------------------------------------------------------
def _base_recipe() -> dict:
    return load_recipe("voxel_minens.yaml", TINY).raw


def _schema_keys() -> dict[str, list[str]]:
    """Every real key per section: engine schemas and the settings of every registered plugin."""
    reg = get_registry()
    keys = {sec: list(schema.model_fields) for sec, schema in _engine_schemas().items()}
    for sec, slot in SLOT_KEYS.items():
        keys[sec] = sorted({"type", *(f for info in reg.plugins[slot].values() for f in info.cls.Settings.model_fields)})
    keys.update({k: [] for k in ("name", "seed", "device")})
    return keys


KEYS = _schema_keys()
PLUGIN_NAMES = sorted({n for slot in SLOT_KEYS.values() for n in get_registry().names(slot)})
CROSS_KEYS = {"data.views", "train.cond_probs", "train.grad_accum", "renderer.type"}


def _typo(word: str, draw) -> str:
    i = draw(st.integers(0, max(0, len(word) - 1)))
    kind = draw(st.sampled_from(["drop", "double", "swap", "upper", "dash"]))
    if kind == "drop" and len(word) > 1:
        return word[:i] + word[i + 1 :]
    if kind == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "upper":
        return word.upper()
    if kind == "dash" and "_" in word:
        return word.replace("_", "-")
    return word[: i + 1] + word[i:]


plausible = st.integers(0, 64) | st.floats(0, 1) | st.booleans() | st.lists(st.integers(1, 4), min_size=1, max_size=3)
values = plausible | st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["auto", "cpu", "1e400", "nan", "[1, 2]", "cosine", "ddim", *PLUGIN_NAMES]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=2),
    max_leaves=4,
)


@st.composite
def mutated_recipes(draw):
    """A valid recipe with 1-3 random mutations; returns (raw, sections touched)."""
    raw, touched = _base_recipe(), set()
    for _ in range(draw(st.integers(1, 3))):
        sec = draw(st.sampled_from(sorted(KEYS)))
        touched.add(sec)
        kind = draw(st.sampled_from(["set"] * 5 + ["typo", "drop", "section", "type", "new-section"]))
        block = raw.get(sec)
        if kind == "new-section":
            bad = _typo(sec, draw)
            raw[bad] = draw(values)
            touched.add(bad)
        elif kind == "section" or not KEYS[sec] or not isinstance(block, dict):
            if kind == "drop":
                raw.pop(sec, None)
            else:
                raw[sec] = draw(values)
        elif kind == "type" and sec in SLOT_KEYS:
            block["type"] = draw(st.sampled_from(PLUGIN_NAMES) | st.text(max_size=8))
        elif kind == "drop" and block:
            block.pop(draw(st.sampled_from(sorted(block))), None)
        elif kind == "typo" and block:
            key = draw(st.sampled_from(sorted(block)))
            block[_typo(key, draw)] = block.pop(key)
        else:
            block[draw(st.sampled_from(KEYS[sec]))] = draw(values)
    return raw, touched


def _check_recipe_error(exc: RecipeError, touched: set) -> None:
    assert exc.key, f"no key named: {exc}"
    assert f"`{exc.key}`" in str(exc)
    top = exc.key.split(".")[0]
    assert top in touched or exc.key in CROSS_KEYS or (top == "<top level>" and touched & {"name", "seed", "device"}), (exc, touched)


FUZZ = settings(max_examples=150, deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(mutated_recipes())
def test_fuzzed_recipes_validate_or_name_the_bad_key(case):
    raw, touched = case
    try:
        recipe = load_recipe_dict(raw)
    except RecipeError as exc:
        _check_recipe_error(exc, touched)
    else:
        assert isinstance(recipe, Recipe)
        assert load_recipe_dict(yaml.safe_load(recipe.dump())).raw == recipe.raw  # dumps what it read


override_texts = st.sampled_from(
    ["1", "-3", "0.5", "nan", ".inf", "1e400", "yes", "null", "~", "", "[1, 2", "{a: 1}", "[]", "'x'", "srn", "volume",
     "!!python/object/apply:os.system ['echo pwned']", "!!binary aGk=", "&a [*a]", "{type: conv}", "[0.5, 0.5]"]
) | st.text(max_size=6)  # fmt: skip


@st.composite
def overrides(draw):
    sec = draw(st.sampled_from(sorted(KEYS)))
    parts = [sec if draw(st.integers(0, 4)) else _typo(sec, draw)]
    if KEYS[sec] and draw(st.integers(0, 5)):
        key = draw(st.sampled_from(KEYS[sec]))
        parts.append(key if draw(st.integers(0, 3)) else _typo(key, draw))
        if draw(st.integers(0, 6)) == 0:
            parts.append("deeper")
    return ".".join(parts) + "=" + draw(override_texts), parts[0]


@settings(max_examples=40, deadline=10000, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(overrides(), min_size=1, max_size=2), mutated_recipes())
def test_fuzzed_cli_dry_runs_exit_0_or_2_naming_the_key(capsys, ovs, case):
    raw, touched = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.yaml"
        path.write_text(yaml.safe_dump(raw))
        rc = main(["recipe", str(path), *[o for o, _ in ovs], "--dry-run"])
    out, err = capsys.readouterr()
    assert rc in (0, 2), err
    assert "Traceback" not in err
    if rc == 2:
        assert re.search(r"key `[^`]+`", err), err
    else:
        assert yaml.safe_load(out)  # the resolved recipe


def test_a_python_tag_in_a_recipe_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    path = tmp_path / "evil.yaml"
    path.write_text(f"extends: voxel_minens.yaml\nseed: !!python/object/apply:os.system [{cmd!r}]\n")
    with pytest.raises(RecipeError, match=re.escape(str(path)) + ".*malformed YAML at line 2"):
        load_recipe(path)
    assert main(["recipe", str(path), "--dry-run"]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    # as an override the tag is only text, which is not a valid seed
    assert main(["recipe", "voxel_minens.yaml", f"seed=!!python/object/apply:os.system [{cmd!r}]", "--dry-run"]) == 2
    assert re.search(r"key `[^`]*seed`: Input should be a valid integer", capsys.readouterr().err)
    assert not marker.exists()
    yaml.unsafe_load(path.read_text().split("\n", 1)[1])  # the tag is live under an unsafe loader
    assert marker.exists()


# ---- 4. bad input: dataset folders ---------------------------------------------------------
def _look_at(position: torch.Tensor) -> torch.Tensor:
    """OpenCV camera-to-world at ``position`` looking at the origin, z up."""
    z = -position / position.norm()
    x = torch.linalg.cross(z, torch.tensor([0.0, 0.0, 1.0]))
    x = x / x.norm()
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, torch.linalg.cross(z, x), z, position
    return c2w


def _srn(root: Path, views: int = 4) -> Path:
    """A tiny SRN folder: one object in cars_train and one in cars_val, 16 px, 4 views each."""
    from vsd.plugins.datasets.srn import write_srn_object

    g = torch.Generator().manual_seed(0)
    angles = torch.linspace(0, 2 * math.pi, views + 1)[:-1]
    c2w = torch.stack([_look_at(torch.stack([1.3 * a.cos(), 1.3 * a.sin(), torch.tensor(0.4)])) for a in angles])
    for split in ("train", "val"):
        write_srn_object(root, split, "obj0", torch.rand(views, 3, 16, 16, generator=g), c2w, torch.tensor([20.0, 20.0, 8.0, 8.0]), (16, 16))
    return root


def _corrupt_png(root):
    path = root / "cars_train" / "obj0" / "rgb" / "000001.png"
    path.write_bytes(path.read_bytes()[:60])
    return path


def _wrong_size(root):
    path = root / "cars_train" / "obj0" / "rgb" / "000002.png"
    Image.new("RGB", (24, 24), (9, 9, 9)).save(path)
    return path


def _missing_pose(root):
    path = root / "cars_train" / "obj0" / "pose" / "000003.txt"
    path.unlink()
    return path


def _nan_pose(root):
    path = root / "cars_train" / "obj0" / "pose" / "000000.txt"
    rows = [line.split() for line in path.read_text().splitlines()]
    rows[2][3] = "nan"  # the camera's height
    path.write_text("\n".join(" ".join(r) for r in rows) + "\n")
    return path


def _empty_split(root):
    shutil.rmtree(root / "cars_train" / "obj0")
    return root / "cars_train"


DATA_FAULTS = {"corrupt-png": _corrupt_png, "wrong-size": _wrong_size, "missing-pose": _missing_pose, "nan-pose": _nan_pose, "empty-split": _empty_split}


def test_an_intact_srn_folder_passes_the_check(tmp_path, capsys):
    assert main(["data", "check", str(_srn(tmp_path / "srn"))]) == 0


@pytest.mark.parametrize("fault", sorted(DATA_FAULTS))
def test_a_damaged_srn_folder_is_a_data_error_naming_the_file(tmp_path, capsys, fault):
    root = _srn(tmp_path / "srn")
    bad = DATA_FAULTS[fault](root)
    assert main(["data", "check", str(root)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    # training on it stops at the first read of the bad file, naming it
    args = ["recipe", "triplane_cars.yaml", *TINY, "train.steps=1", f"data.root={root}", "data.prepare=null", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err


# ---- 4. bad input: images given to `sample --input` --------------------------------------
def _png_bomb(path: Path) -> Path:
    """A valid PNG header declaring 40000 x 40000 pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_input_images_of_other_modes_and_sizes_are_read(tmp_path):
    from vsd.apps.media import load_image

    Image.new("L", (16, 16), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("RGB", (40, 24), (0, 255, 0)).save(tmp_path / "wide.jpg")
    gray = load_image(tmp_path / "gray.png", 16)
    assert gray.shape == (3, 16, 16) and torch.allclose(gray, torch.full_like(gray, 128 / 255 * 2 - 1), atol=1e-6)
    clear = load_image(tmp_path / "clear.png", 16)
    assert torch.equal(clear, torch.ones_like(clear))  # transparent pixels over white
    wide = load_image(tmp_path / "wide.jpg", 16)
    assert wide.shape == (3, 16, 16) and wide[1].mean() > 0.9 and wide[0].mean() < -0.9


def test_bad_input_images_are_named_and_earlier_outputs_survive(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    sample = ["sample", str(trained), "--num-samples", "1", "--steps", "1", "--overwrite", "--out", str(out)]
    good = {
        "gray.png": Image.new("L", (16, 16), 90),
        "rgba.png": Image.new("RGBA", (16, 16), (200, 10, 10, 128)),
        "wide.png": Image.new("RGB", (40, 24), (10, 200, 10)),
    }
    for name, img in good.items():
        img.save(tmp_path / name)
        assert main([*sample, "--input", str(tmp_path / name)]) == 0, name
    before = {p.name: _sha(p) for p in out.iterdir()}
    assert {"samples.png", "turntable.gif", "notes.txt"} <= set(before)

    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy()).save(tmp_path / "noise.png")
    (tmp_path / "half.png").write_bytes((tmp_path / "noise.png").read_bytes()[:400])
    (tmp_path / "folder.png").mkdir()
    bad = [tmp_path / "text.png", tmp_path / "half.png", tmp_path / "missing.png", tmp_path / "folder.png", _png_bomb(tmp_path / "bomb.png")]
    capsys.readouterr()
    for path in bad:
        assert main([*sample, "--input", str(path)]) == 2, path
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err, err
    assert {p.name: _sha(p) for p in out.iterdir()} == before  # nothing lost or overwritten
    # an --out that is a file is an error naming it, and the file is kept
    assert main([*sample[:-1], str(out / "notes.txt")]) != 0
    err = capsys.readouterr().err
    assert "notes.txt" in err and "Traceback" not in err
    assert (out / "notes.txt").read_text() == "mine"


# ---- 5. plugins ----------------------------------------------------------------------------
def test_a_plugin_whose_hook_raises_is_reported_by_name(monkeypatch, capsys):
    mod = types.ModuleType("broken_plugin")

    def vsd_renderers():
        raise RuntimeError("renderer table is corrupt")

    mod.vsd_renderers = hookimpl(vsd_renderers)
    reg = Registry.load(autoload=False, extra=[(mod, "vsd-broken-plugin")])
    [failure] = reg.failures
    assert failure.provider == "vsd-broken-plugin"
    assert "vsd_renderers" in failure.error and "RuntimeError: renderer table is corrupt" in failure.error
    assert "volume" in reg.names("renderer")  # the others still load
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "vsd-broken-plugin" in out and "renderer table is corrupt" in out


# ---- 6. disk -------------------------------------------------------------------------------
def test_a_full_disk_stops_training_with_a_clear_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    calls = []
    write = checkpoint_module._atomic_write

    def full_after_first_checkpoint(path, data):
        calls.append(Path(path).name)
        if len(calls) > 2:  # step 1's data and checksum are written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data)

    monkeypatch.setattr(checkpoint_module, "_atomic_write", full_after_first_checkpoint)
    run = tmp_path / "run"
    assert main(_cli_args(run, 4)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(run) in err and "Traceback" not in err
    assert calls[:3] == ["step_00000001.pt", "step_00000001.pt.sha256", "step_00000002.pt"]
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = load_checkpoint(run)
    assert state["step"] == 1 and load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "last.pt.sha256", "step_00000001.pt", "step_00000001.pt.sha256"]
    assert main(_cli_args(run, 2, "--resume")) == 0  # and the run continues once there is space
    assert load_checkpoint(run)["step"] == 2
