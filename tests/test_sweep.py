"""`vsd-run sweep`: expansion of sweep files, parallel runs, failures, kill-and-resume,
results tables with mean ± std over seeds, a third-party plugin and the Ray executor."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vsd.cli.main import main
from vsd.core.checkpoint import load_checkpoint
from vsd.core.registry import get_registry
from vsd.apps.sweep import (
    Job, SweepError, _place, aggregate, load_sweep, metric_names, read_status, run_name, summary_metrics,
)

from conftest import TINY

TINY_EVAL = {"samples": 2, "objects": 2, "steps": 2}


def write_sweep(tmp_path: Path, name: str, **spec) -> Path:
    body = {"base": "voxel_minens.yaml", "overrides": list(TINY), "eval": TINY_EVAL, "out": str(tmp_path / name), **spec}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---- the sweep file ------------------------------------------------------------------------
def test_grid_zip_and_explicit_runs_expand_to_named_runs(tmp_path):
    grid = load_sweep(write_sweep(tmp_path, "g", axes={"aggregator.type": ["mean", "max"], "seed": [0, 1, 2]}))
    assert [r.name for r in grid.runs] == [f"aggregator.type={a}__seed={s}" for a in ("mean", "max") for s in (0, 1, 2)]
    assert grid.runs[1].values == {"aggregator.type": "mean", "seed": 1}
    assert grid.runs[1].overrides[-2:] == ["aggregator.type=mean", "seed=1"]
    assert grid.runs[1].dir == tmp_path / "g" / "aggregator.type=mean__seed=1"

    zipped = load_sweep(write_sweep(tmp_path, "z", axes={"train.lr": [1e-3, 2e-4], "seed": [3, 4]}, mode="zip"))
    assert [r.values for r in zipped.runs] == [{"train.lr": 1e-3, "seed": 3}, {"train.lr": 2e-4, "seed": 4}]

    explicit = load_sweep(write_sweep(tmp_path, "e", runs=[{"aggregator.type": "max"}, {"seed": 5, "train.lr": 1e-4}]))
    assert explicit.axes == ["aggregator.type", "seed", "train.lr"]
    assert [r.name for r in explicit.runs] == ["aggregator.type=max", "seed=5__train.lr=0.0001"]
    # characters that do not belong in a file name become _
    assert run_name({"model.channel_mult": [1, 2], "name": "a b/c"}) == "model.channel_mult=_1,2___name=a_b_c"


@pytest.mark.parametrize(
    "spec, key, words",
    [
        ({"axes": {"seed": [0, 1], "train.lr": [1e-3]}, "mode": "zip"}, "axes", "equal length"),
        ({"axes": {"seed": [0]}, "mode": "shuffle"}, "mode", "grid or zip"),
        ({"axes": {"seed": []}}, "axes.seed", "non-empty list"),
        ({"axes": {"seed": [0]}, "metric": "psnr_best_of_7"}, "metric", "psnr_best_of_2"),
        ({"axes": {"seed": [0]}, "eval": {"sample": 2}}, "eval.sample", "unknown key"),
        ({"axes": {"seed": [0]}, "base": "no_such_recipe.yaml"}, "base", "no such file"),
        ({"axes": {"seed": [0]}, "runs": [{"seed": 1}]}, "runs", "not both"),
        ({"runs": [{"seed": 1}, {"seed": 1}]}, "runs", "share the directory 'seed=1'"),
        ({"axes": {"seed": [0]}, "axis": {}}, "axis", "unknown key"),
    ],
)
def test_bad_sweep_files_name_the_key(tmp_path, spec, key, words):
    with pytest.raises(SweepError) as exc:
        load_sweep(write_sweep(tmp_path, "bad", **spec))
    assert f"key `{key}`" in str(exc.value) and words in str(exc.value)


def test_metric_names_follow_the_evaluation_settings(tmp_path):
    sw = load_sweep(write_sweep(tmp_path, "m", axes={"seed": [0]}, eval={"samples": 12}))
    names = metric_names(sw.eval)
    assert {"psnr_best_of_1", "psnr_best_of_5", "psnr_best_of_10", "psnr_best_of_12", "ssim_mean", "ambiguous_psnr_best_of_1"} <= set(names)
    assert "psnr_best_of_20" not in names
    assert metric_names(sw.eval.model_copy(update={"cond_views": 0})) == ["kid_random_conv", "kid_pixel_stats"]


def test_summary_metrics_flatten_groups_like_the_eval_csv():
    group = {"objects": 2, "best_of": {"1": {"psnr": 20.0, "ssim": 0.5}, "2": {"psnr": 21.0, "ssim": 0.6}},
             "mean_over_samples": {"psnr": 19.0, "ssim": 0.4}, "averaged_sample": {"psnr": 22.0, "ssim": 0.7},
             "diversity": {"pairwise_mse": 0.01, "pairwise_l2": 0.1, "pairwise_psnr": 20.0}}
    flat = summary_metrics({"kind": "conditional", "groups": {"all": group, "ambiguous": None, "unambiguous": group}})
    assert flat["psnr_best_of_2"] == 21.0 and flat["ssim_mean"] == 0.4 and flat["psnr_averaged_sample"] == 22.0
    assert flat["pairwise_psnr"] == 20.0 and flat["unambiguous_ssim_best_of_1"] == 0.5
    assert not any(k.startswith("ambiguous_") for k in flat)
    kid = summary_metrics({"kind": "unconditional", "kid": {"random_conv": 0.25, "pixel_stats": "unavailable: x", "generated_images": 8}})
    assert kid == {"kid_random_conv": 0.25}


def test_aggregate_is_mean_and_sample_std_over_seeds_of_finished_runs():
    rows = [
        {"aggregator.type": "mean", "seed": 0, "status": "done", "psnr": 10.0},
        {"aggregator.type": "mean", "seed": 1, "status": "done", "psnr": 14.0},
        {"aggregator.type": "mean", "seed": 2, "status": "failed", "psnr": None},
        {"aggregator.type": "max", "seed": 0, "status": "done", "psnr": 12.0},
    ]
    agg = aggregate(rows, ["aggregator.type", "seed"], ["psnr"])
    assert [(e["aggregator.type"], e["runs"], e["done"]) for e in agg] == [("mean", 3, 2), ("max", 1, 1)]
    assert agg[0]["psnr"] == pytest.approx((12.0, 2 ** 0.5 * 2))  # stdev of (10, 14) = 2 sqrt 2
    assert agg[1]["psnr"] == (12.0, None)


def test_cuda_workers_get_one_gpu_each_round_robin():
    job = Job("r", "/tmp/r", {"device": "auto"}, {})
    assert [_place(job, slot, 2, 3).recipe["device"] for slot in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert _place(job, 1, 2, 3).threads == 3 and job.recipe["device"] == "auto"
    assert _place(Job("r", "/tmp/r", {"device": "cpu"}, {}), 1, 2, 3).recipe["device"] == "cpu"
    assert _place(job, 1, 0, 3).recipe["device"] == "auto"


def test_status_lists_every_run_and_tells_interrupted_from_running(tmp_path, capsys):
    from vsd.apps.sweep import run_lock, update_status

    path = write_sweep(tmp_path, "st", axes={"aggregator.type": ["mean", "max", "attention", "weighted-mean"]})
    runs = load_sweep(path).runs
    update_status(runs[1].dir, state="running", stage="train")  # its worker died: nobody holds the lock
    update_status(runs[2].dir, state="running", stage="eval")
    update_status(runs[3].dir, state="failed", stage="train", error="ValueError: bad skins\ntraceback here")
    with run_lock(runs[2].dir):  # a live worker
        assert main(["sweep", str(path), "--status"]) == 0
    shown = capsys.readouterr().out
    rows = {line.split()[1]: line for line in shown.splitlines() if line.startswith("│")}
    assert set(rows) == {"mean", "max", "attention", "weighted-mean"}
    assert " pending " in rows["mean"] and " interrupted (train) " in rows["max"]
    assert " running (eval) " in rows["attention"] and " failed (train) " in rows["weighted-mean"]
    assert "aggregator.type=weighted-mean: ValueError: bad skins" in shown and "traceback here" not in shown
    assert not (tmp_path / "st" / "results.csv").exists()  # --status only reads


# ---- running sweeps ------------------------------------------------------------------------
def _wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = cond()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, capsys):
    path = write_sweep(tmp_path, "agg", axes={"aggregator.type": ["mean", "max"], "seed": [0, 1]}, metric="psnr_best_of_1")
    sweep = load_sweep(path)
    dirs = [r.dir for r in sweep.runs]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vsd.cli", "sweep", str(path), "--workers", "1", "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = _wait_for(lambda: next((d for d in dirs if read_status(d).get("state") == "done"), None), 240, "a finished run")
        # kill once the next run has trained a step: its re-run must resume it
        second = _wait_for(lambda: next((d for d in dirs if d != first and (d / "checkpoints" / "last.pt").exists()), None), 120,
                           "a second run's checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = first / "checkpoints" / "last.pt"
    mtime, eval_mtime = ckpt.stat().st_mtime_ns, (first / "eval" / "results.jsonl").stat().st_mtime_ns
    assert read_status(first)["attempts"] == 1

    assert main(["sweep", str(path), "--workers", "2", "--threads", "1"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "agg").iterdir() if p.is_dir()) == sorted(r.name for r in sweep.runs)
    # the finished run was not touched again, the interrupted one was resumed, not restarted
    assert ckpt.stat().st_mtime_ns == mtime and (first / "eval" / "results.jsonl").stat().st_mtime_ns == eval_mtime
    assert read_status(first)["attempts"] == 1 and read_status(second)["attempts"] == 2
    assert all(read_status(d)["state"] == "done" and load_checkpoint(d)["step"] == 2 for d in dirs)
    log_steps = [int(line.split(",")[0]) for line in (second / "log.csv").read_text().splitlines()[1:]]
    assert log_steps == [1, 2]

    rows = read_csv(tmp_path / "agg" / "results.csv")
    expected = [("mean", "0"), ("mean", "1"), ("max", "0"), ("max", "1")]
    assert [(r["aggregator.type"], r["seed"], r["status"]) for r in rows] == [(a, s, "done") for a, s in expected]
    md = (tmp_path / "agg" / "results.md").read_text()
    assert "## Mean ± std over seeds" in md
    for agg in ("mean", "max"):
        vals = [float(r["psnr_best_of_1"]) for r in rows if r["aggregator.type"] == agg]
        assert all(5 < v < 60 for v in vals)
        assert f"| {agg} | 2/2 | {statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f} |" in md
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "agg" / "metric.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["sweep", str(path), "--status"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│") and " done " in line]
    assert len(lines) == 4  # one table row per run: its axis values, state, step, metric
    for r in sweep.runs:
        assert any(f" {r.values['aggregator.type']} " in line and f" {r.values['seed']} " in line and " 2 " in line for line in lines)


def test_failed_runs_are_reported_and_the_others_finish(tmp_path):
    runs = [{"aggregator.type": "mean"}, {"aggregator.type": "no-such-aggregator"}, {"data.skins": "no-such-skins-folder"}]
    path = write_sweep(tmp_path, "fail", runs=runs)
    assert main(["sweep", str(path), "--workers", "2", "--threads", "1"]) == 1  # some runs failed
    rows = {r["run"]: r for r in read_csv(tmp_path / "fail" / "results.csv")}
    assert [r["status"] for r in rows.values()] == ["done", "failed", "failed"]
    assert rows["aggregator.type=mean"]["psnr_best_of_1"] and not rows["aggregator.type=mean"]["error"]
    assert "unknown aggregator 'no-such-aggregator'" in rows["aggregator.type=no-such-aggregator"]["error"]
    # validated away before any training: nothing but its status
    assert [p.name for p in (tmp_path / "fail" / "aggregator.type=no-such-aggregator").iterdir()] == ["status.json"]
    # a run that passes validation but raises while training: its error and traceback are kept
    st = read_status(tmp_path / "fail" / "data.skins=no-such-skins-folder")
    assert st["state"] == "failed" and st["stage"] == "train" and st["attempts"] == 1
    assert st["error"].startswith("ValueError: skins must be") and "no-such-skins-folder is not a folder" in st["error"]
    assert "Trainer" in st["traceback"]
    assert rows["data.skins=no-such-skins-folder"]["error"] == st["error"]
    assert "no-such-aggregator" in (tmp_path / "fail" / "results.md").read_text()


@pytest.mark.skipif("gaussian-blobs" not in get_registry().plugins["representation"], reason="the vsd-gaussian-blobs example plugin is not installed")
def test_sweep_over_a_third_party_representation(tmp_path):
    path = write_sweep(tmp_path, "blobs", axes={"representation.type": ["gaussian-blobs"], "representation.blobs": [3]})
    assert main(["sweep", str(path), "--threads", "1"]) == 0
    run = tmp_path / "blobs" / "representation.type=gaussian-blobs__representation.blobs=3"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["representation"] == {"type": "gaussian-blobs", "blobs": 3}
    assert load_checkpoint(run)["step"] == 2
    (row,) = read_csv(tmp_path / "blobs" / "results.csv")
    assert row["status"] == "done" and 5 < float(row["psnr_best_of_1"]) < 60
    assert json.loads((run / "eval" / "metrics.json").read_text())["objects"] == 2


def _ray_cannot_start(timeout: float = 120.0) -> str | None:
    """Why a local Ray instance cannot start here (None when it starts): probed in a child
    process group, so a start that hangs is killed whole instead of hanging the suite."""
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:  # absent, or only a folder named ray on sys.path
        return "ray is not installed"
    code = "import ray; ray.init(num_cpus=1, include_dashboard=False); ray.shutdown()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"a local Ray instance did not start within {timeout:.0f} s on this machine"
    return None if proc.returncode == 0 else f"a local Ray instance failed to start: {err.decode(errors='replace')[-300:]}"


def test_ray_executor_runs_each_run_as_a_task(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray instance
    reason = _ray_cannot_start()
    if reason:
        pytest.skip(reason)
    path = write_sweep(tmp_path, "ray", runs=[{"aggregator.type": "max"}])
    assert main(["sweep", str(path), "--executor", "ray", "--threads", "1"]) == 0
    (row,) = read_csv(tmp_path / "ray" / "results.csv")
    assert row["status"] == "done" and float(row["psnr_best_of_1"]) > 5
    st = read_status(tmp_path / "ray" / "aggregator.type=max")
    assert st["pid"] != os.getpid() and st["attempts"] == 1


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "examples" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load_and_every_run_recipe_validates(path):
    from vsd.core.recipe import load_recipe
    from vsd.apps.sweep import load_sweep

    sweep = load_sweep(path)
    assert len(sweep.runs) >= 4 and len({r.name for r in sweep.runs}) == len(sweep.runs)
    for run in sweep.runs:
        recipe = load_recipe(sweep.base, run.overrides)
        for key, value in run.values.items():
            section, _, field = key.partition(".")
            block = getattr(recipe, section)
            if not field:
                got = block
            elif field == "type":
                got = block.type
            else:
                got = getattr(getattr(block, "settings", block), field)
            assert (list(got) if isinstance(got, tuple) else got) == value, (run.name, key)
    if path.name == "aggregators.yaml":  # the README's ablation: every built-in aggregator, 2 seeds
        assert {r.values["aggregator.type"] for r in sweep.runs} == {"attention", "mean", "max", "weighted-mean"}
        assert {r.values["seed"] for r in sweep.runs} == {0, 1}
