"""Where `vsd-run sample`, `export` and `refine` write (a fresh default folder, never over an
earlier output), the notice on a barely trained model, and Python warnings kept off the terminal."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vsd.apps.sampling import UNTRAINED_STEPS, load_model, untrained_notice
from vsd.cli.main import main
from vsd.core.errors import DataError
from vsd.core.checkpoint import load_checkpoint, save_checkpoint

from conftest import TINY

FAST = {
    "sample": ["--num-samples", "1", "--steps", "1"],
    # a barely trained model is nearly empty; a tiny threshold meshes the occupied cube
    "export": ["--steps", "1", "--resolution", "8", "--threshold", "1e-3", "--format", "ply"],
    "refine": ["--sample-steps", "1", "--steps", "2", "--views", "2", "--size", "8", "--levels", "2", "--max-resolution", "8",
               "--log2-table-size", "8", "--rays", "64", "--resolution", "8", "--threshold", "1e-3", "--format", "ply", "--quiet"],
}
WRITES = {"sample": "samples.png", "export": "sample_0.ply", "refine": "refined.ply"}
PARENT = {"sample": "samples", "export": "meshes", "refine": "refined"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("outputs") / "run"
    assert main(["recipe", "voxel_minens.yaml", *TINY, "--out", str(run), "--quiet"]) == 0
    return run


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("command", ["export", "refine"])
def test_default_folders_are_fresh_and_named_after_the_model_and_input(command, run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [command, str(run), *FAST[command]]
    assert main(args) == 0
    first = tmp_path / PARENT[command] / "run-unconditional"
    before = _digest(first)
    assert WRITES[command] in before
    capsys.readouterr()
    assert main(args) == 0
    second = tmp_path / PARENT[command] / "run-unconditional-2"
    assert (second / WRITES[command]).is_file()
    assert _digest(first) == before  # the first output is untouched
    printed = capsys.readouterr().out
    assert f"{Path(PARENT[command]) / 'run-unconditional-2' / WRITES[command]}" in printed
    assert f"folder: {Path(PARENT[command]) / 'run-unconditional-2'}\n" in printed


@pytest.mark.parametrize("command", ["sample", "export", "refine"])
def test_an_out_folder_holding_files_is_refused_unless_overwrite(command, run, tmp_path, capsys):
    out = tmp_path / "out"
    args = [command, str(run), *FAST[command], "--out", str(out)]
    assert main(args) == 0  # a new folder is used as given
    before = _digest(out)
    capsys.readouterr()

    assert main(args) == 2
    err = capsys.readouterr().err.replace("\n", "")
    files = f"{len(before)} file{'s' if len(before) > 1 else ''}"
    assert f"{out} already holds {files} (e.g. {', '.join(sorted(before)[:3])}" in err
    assert "pass --overwrite to write into it, or choose another --out" in err and "Traceback" not in err
    assert _digest(out) == before

    (out / WRITES[command]).write_bytes(b"stale")
    assert main([*args, "--overwrite"]) == 0
    assert (out / WRITES[command]).read_bytes() != b"stale"  # written again
    assert set(_digest(out)) == set(before)
    assert f"folder: {out}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["sample", "export", "refine"])
def test_an_out_that_is_a_file_is_refused(command, run, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main([command, str(run), *FAST[command], "--out", str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "is a file, not a folder" in err and "Traceback" not in err
    assert target.read_text() == "mine"


def test_an_empty_out_folder_is_used_without_overwrite(run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["sample", str(run), *FAST["sample"], "--out", str(out)]) == 0
    assert (out / "samples.png").is_file()


# ---- a barely trained model ----------------------------------------------------------------
def test_sampling_a_barely_trained_run_says_so(run, tmp_path, capsys):
    assert main(["sample", str(run), *FAST["sample"], "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    last = [line for line in (run / "log.csv").read_text().splitlines()[1:] if line.startswith("2,")][-1]
    loss = float(last.split(",")[1])
    assert f"note: {run} was trained for 2 steps (last loss {loss:.3g}); its samples will look like noise" in err.replace("\n", "")
    assert err.count("note:") == 1

    import vsd

    vsd.load(run / "checkpoints" / "last.pt")
    assert "was trained for 2 steps" in capsys.readouterr().err


def test_no_notice_for_a_model_trained_long_enough(run, tmp_path, capsys):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state.pop("path")
    state["step"] = UNTRAINED_STEPS
    ckpt = save_checkpoint(tmp_path / "long" / "checkpoints" / "step_00001000.pt", state)
    load_model(ckpt, notice=True)
    load_model("minens-voxel", notice=True)  # shipped: 5000 steps
    assert "note:" not in capsys.readouterr().err
    state["step"] = UNTRAINED_STEPS - 1
    save_checkpoint(ckpt, state)
    load_model(ckpt, notice=True)
    # no log.csv beside that checkpoint: the notice gives no loss
    assert f"note: {ckpt} was trained for 999 steps; its samples" in capsys.readouterr().err.replace("\n", "")


def test_the_notice_takes_the_last_loss_logged_at_or_before_the_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "log.csv").write_text("step,loss,mse\n10,0.5,0.4\n20,nan,0.3\n30,0.25,0.2\n40,0.125,0.1\n")
    state = {"step": 30, "path": str(tmp_path / "checkpoints" / "step_00000030.pt")}
    assert "(last loss 0.25)" in untrained_notice(state, "r")
    state["step"] = 29  # the row at 30 comes after it; the row at 20 holds no finite loss
    assert "(last loss 0.5)" in untrained_notice(state, "r")
    assert untrained_notice({"step": 5000}, "r") is None


# ---- Python warnings -----------------------------------------------------------------------
def _warning_then_fail(path):
    warnings.warn("a library's fallback", UserWarning)  # as a third-party package would
    raise DataError(f"{path}: nothing to load")


def test_a_warning_inside_a_command_goes_to_the_log_not_the_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VSD_SHOW_WARNINGS", raising=False)
    import vsd.apps.sampling as sampling

    monkeypatch.setattr(sampling, "load_model", lambda path, **k: _warning_then_fail(path))
    shown, handlers = warnings.showwarning, list(logging.getLogger("py.warnings").handlers)
    assert main(["sample", "minens-voxel"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nothing to load" in err
    assert "Warning" not in err and "warnings.warn" not in err and "fallback" not in err
    log = (tmp_path / "cache" / "warnings.log").read_text()
    assert "UserWarning" in log and "a library's fallback" in log
    # main() leaves the process as it found it
    assert warnings.showwarning is shown and logging.getLogger("py.warnings").handlers == handlers


def test_vsd_notices_reach_the_user_in_one_line(tmp_path):
    code = _SUBPROCESS.replace(
        'warnings.warn("a library\'s fallback", UserWarning)',
        'from vsd.core.errors import VsdNotice; warnings.warn(VsdNotice("the newest checkpoint is damaged; trying an older checkpoint"))',
    )
    assert "VsdNotice(" in code
    env = dict(os.environ, VSD_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("VSD_SHOW_WARNINGS", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[0] == "warning: the newest checkpoint is damaged; trying an older checkpoint", run.stderr
    assert "VsdNotice" not in run.stderr and not (tmp_path / "cache" / "warnings.log").exists()


_SUBPROCESS = """
import sys, warnings
import vsd.apps.sampling as sampling
from vsd.core.errors import DataError
def load_model(path, **k):
    warnings.warn("a library's fallback", UserWarning)
    raise DataError("nothing to load")
sampling.load_model = load_model
from vsd.cli.main import main
sys.exit(main(["sample", "minens-voxel"]))
"""


def test_warnings_reach_stderr_only_when_asked(tmp_path):
    env = dict(os.environ, VSD_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("VSD_SHOW_WARNINGS", None)
    argv = [sys.executable, "-c", _SUBPROCESS]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 2 and "error:" in quiet.stderr
    assert "Warning" not in quiet.stderr, quiet.stderr
    assert "UserWarning" in (tmp_path / "cache" / "warnings.log").read_text()
    shown = subprocess.run(argv, capture_output=True, text=True, env={**env, "VSD_SHOW_WARNINGS": "1"}, timeout=300)
    assert shown.returncode == 2 and "UserWarning" in shown.stderr


def test_a_mistyped_option_is_a_usage_error_with_exit_2(capsys):
    assert main(["sample", "minens-voxel", "--num-sample", "4"]) == 2
    err = capsys.readouterr().err
    assert "No such option: --num-sample" in err and "--num-samples" in err and "Traceback" not in err
