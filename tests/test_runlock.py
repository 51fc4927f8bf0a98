"""One live writer per run directory: `vsd-run recipe` (and `vsd-run eval`) refuse a folder
another live process is writing to (exit 2, saying who and what to do), take over the lock left
by a killed one, and let go however they end."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsd.cli.main import main
from vsd.core import runlock
from vsd.core.errors import RunLockedError, VsdError
from vsd.core.recipe import load_recipe
from vsd.core.runlock import LOCK_NAME, RunLock, is_locked, read_holder

from conftest import TINY

HOLD = """
import sys, time
import vsd.core.runlock as runlock
if sys.argv[2] == "no-fcntl":
    runlock.fcntl = None
lock = runlock.RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(300)
"""


@contextlib.contextmanager
def held_elsewhere(folder: Path, mode: str = "flock"):
    """Another live process holding ``folder``'s lock; yields its pid."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), mode], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def finished_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_lock_file(folder: Path, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": time.time() - 60}))


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }  # fmt: skip


def can_lock_from_another_process(folder: Path) -> bool:
    code = "import sys; from vsd.core.runlock import RunLock; RunLock(sys.argv[1]).acquire().release()"
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True).returncode == 0


def train_args(run: Path, *extra: str) -> list[str]:
    return ["recipe", "voxel_minens.yaml", *TINY, *extra, "--out", str(run), "--quiet"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("locked") / "run"
    assert main(train_args(run)) == 0
    return run


# ---- a folder another live process writes to ---------------------------------------------------
@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_a_second_writer_gets_exit_2_and_the_first_run_is_untouched(trained_run, resume, capsys):
    with held_elsewhere(trained_run) as pid:
        before = snapshot(trained_run)
        capsys.readouterr()
        rc = main(train_args(trained_run, "train.steps=4", *(["--resume"] if resume else [])))
        err = capsys.readouterr().err.replace("\n", "")
        assert rc == 2, err
        assert f"error: {trained_run} is in use: process {pid} has been writing to it since " in err
        assert "wait for that run to finish, or choose another --out" in err
        assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", err)
        assert snapshot(trained_run) == before  # checkpoints, log.csv and the lock file alike
    assert (trained_run / "checkpoints" / "last.pt").exists() and (trained_run / "log.csv").exists()


def test_two_trainers_in_one_process_on_one_folder(tiny_recipe, tmp_path):
    from vsd.apps.training import Trainer

    first = Trainer(tiny_recipe(), tmp_path / "run", quiet=True)
    with pytest.raises(RunLockedError, match=rf"process {os.getpid()} \(this process\) has been writing to it"):
        Trainer(tiny_recipe(), tmp_path / "run", quiet=True)
    assert is_locked(tmp_path / "run")  # the refused one did not take the first one's lock away
    first.run()
    assert not is_locked(tmp_path / "run")
    # the folder now holds a run: without --resume that is still refused, and the lock let go
    with pytest.raises(VsdError, match=r"already holds a run .* pass --resume"):
        Trainer(tiny_recipe(), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / LOCK_NAME).exists() and can_lock_from_another_process(tmp_path / "run")


def test_eval_refuses_an_output_folder_in_use(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    with held_elsewhere(out) as pid:
        capsys.readouterr()
        rc = main(["eval", str(trained_run), "--split", "val", "--objects", "1", "--samples", "1", "--steps", "1", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.replace("\n", "")
        assert rc == 2
        assert f"{out} is in use: process {pid} has been writing to it" in err
        assert "wait for that evaluation to finish, or choose another --out" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]


# ---- a lock left behind by a process that died -------------------------------------------------
def test_a_lock_left_by_a_finished_process_is_taken_over(tmp_path, capsys):
    pid = finished_pid()
    stale_lock_file(tmp_path / "run", pid)
    lock = RunLock(tmp_path / "run").acquire()
    try:
        expected = f"taking over the lock left by process {pid}, which is no longer running"
        assert expected in lock.notice and str(tmp_path / "run") in lock.notice
        assert expected in capsys.readouterr().err
        assert read_holder(tmp_path / "run")["pid"] == os.getpid()
        assert read_holder(tmp_path / "run")["host"] == socket.gethostname()
        assert not can_lock_from_another_process(tmp_path / "run")
    finally:
        lock.release()
    assert can_lock_from_another_process(tmp_path / "run")


def test_training_takes_over_a_stale_lock_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    pid = finished_pid()
    stale_lock_file(run, pid)
    args = train_args(run)
    assert main(args[:-1]) == 0  # without --quiet: the notice is printed
    assert f"taking over the lock left by process {pid}, which is no longer running" in capsys.readouterr().err.replace("\n", "")
    assert (run / "checkpoints" / "last.pt").exists() and not (run / LOCK_NAME).exists()


def test_a_killed_holder_lets_go(tmp_path):
    with held_elsewhere(tmp_path / "run") as pid:
        assert is_locked(tmp_path / "run")
    lock = RunLock(tmp_path / "run", quiet=True).acquire()  # the kernel dropped the dead process's flock
    assert f"process {pid}, which is no longer running" in lock.notice
    lock.release()


# ---- letting go however a run ends -------------------------------------------------------------
def test_the_lock_is_released_after_a_normal_run(tmp_path):
    run = tmp_path / "run"
    assert main(train_args(run)) == 0
    assert not (run / LOCK_NAME).exists() and not is_locked(run)
    assert can_lock_from_another_process(run)


def test_the_lock_is_released_after_an_error_in_run(tiny_recipe, tmp_path, monkeypatch):
    from vsd.apps.training import Trainer

    t = Trainer(tiny_recipe(), tmp_path / "run", quiet=True)
    assert is_locked(tmp_path / "run")

    def boom():
        raise VsdError("boom")

    monkeypatch.setattr(t, "train_step", boom)
    with pytest.raises(VsdError, match="boom"):
        t.run()
    assert not is_locked(tmp_path / "run") and can_lock_from_another_process(tmp_path / "run")


def test_the_lock_is_released_after_an_error_while_starting(tiny_recipe, tmp_path):
    from vsd.apps.training import Trainer

    run = tmp_path / "run"
    with pytest.raises(VsdError, match="holds no checkpoints"):
        Trainer(tiny_recipe(), run, resume=True, quiet=True)
    assert not is_locked(run) and not run.exists()  # nothing was written: not even the folder is left
    srn = load_recipe("voxel_cars.yaml", [*TINY, f"data.root={tmp_path / 'nothing'}", "data.prepare=null"])
    with pytest.raises(VsdError, match="nothing is not a folder"):  # the dataset is built after the lock is taken
        Trainer(srn, run, quiet=True)
    assert not is_locked(run) and not run.exists() and can_lock_from_another_process(run)


def test_an_out_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(VsdError, match="is a file, not a folder"):
        RunLock(tmp_path / "file").acquire()


# ---- sweeps: the worker's hold is shared with its trainer ---------------------------------------
def test_a_sweep_worker_and_its_trainer_share_the_lock(tiny_recipe, tmp_path):
    from vsd.apps.sweep import is_active, run_lock
    from vsd.apps.training import Trainer

    run = tmp_path / "run"
    with run_lock(run) as got:
        assert got and is_active(run)
        Trainer(tiny_recipe(), run, quiet=True).run()
        assert is_active(run) and not can_lock_from_another_process(run)
    assert not is_active(run)
    with held_elsewhere(run):
        with run_lock(run, blocking=False) as got:
            assert got is False


# ---- without fcntl: an exclusively created lock file -------------------------------------------
def test_without_fcntl_the_lock_file_itself_is_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "fcntl", None)
    run = tmp_path / "run"
    with held_elsewhere(run, "no-fcntl") as pid:
        with pytest.raises(RunLockedError, match=rf"process {pid} has been writing to it"):
            RunLock(run).acquire()
        assert is_locked(run)
    # the holder was killed: its file is left, naming a process that is gone
    assert read_holder(run)["pid"] == pid
    lock = RunLock(run, quiet=True).acquire()
    assert f"taking over the lock left by process {pid}, which is no longer running" in lock.notice
    assert read_holder(run)["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()
