"""Sweeps: train and evaluate a family of recipes, in parallel, resumably (``vsd-run sweep``).

A sweep file is a YAML mapping::

    name: aggregators                  # optional; default: the file's stem
    base: voxel_minens.yaml            # a recipe path (relative to this file, or the working
                                       # directory) or the name of a shipped recipe
    overrides:                         # key.path=value, applied to every run
      - train.steps=500
    axes:                              # key.path -> the values it takes
      aggregator.type: [attention, mean, max, weighted-mean]
      seed: [0, 1]
    mode: grid                         # grid: every combination (cartesian product);
                                       # zip: the i-th values of every axis together (equal lengths)
    # runs:                            # instead of axes/mode: the exact runs, one mapping each
    #   - {aggregator.type: mean, seed: 0}
    #   - {aggregator.type: max, train.lr: 1.0e-4}
    eval: {cond_views: 1, samples: 4, objects: 16, steps: 20}
    metric: psnr_best_of_1             # what results.md leads with and metric.png shows
    metrics: [ssim_best_of_1]          # optional: more columns in results.md
    out: runs/sweeps/aggregators       # relative to the working directory; --out overrides it

Each run applies ``overrides`` and then its own values (so an axis over a plugin ``type``
replaces that slot's settings, as on the command line; within an explicit run, list a new
``type`` before its settings). A run lives in ``OUT/<key>=<value>__<key>=<value>`` (e.g.
``aggregator.type=mean__seed=1``) holding ``recipe.yaml`` (its fully resolved recipe), the
training run (``checkpoints/``, ``log.csv``, ``samples/``), ``eval/`` (``vsd-run eval`` output),
``status.json`` (``state``: pending | running | done | failed, the ``error`` text of a failure
with its traceback, ``attempts``, the final metrics) and ``worker.log`` (its output).

Metric names (``metric``, ``metrics``, the columns of results.csv) come from the evaluation
summary of all objects: ``{psnr,ssim,lpips}_best_of_{n}`` (n in 1, 5, 10, 20, ... up to
``samples``), ``{psnr,ssim,lpips}_mean`` (mean over samples), ``{psnr,ssim,lpips}_averaged_sample``,
``pairwise_mse``, ``pairwise_l2``, ``pairwise_psnr``, the same with ``fg_psnr`` / ``fg_ssim`` (foreground only),
``input_view_psnr``, ``identity_accuracy``, ``colour_error``, ``colour_spread_pred``,
``colour_spread_true``, ``colour_spread_ratio`` (see vsd.apps.evaluation), each also with an ``ambiguous_`` or
``unambiguous_`` prefix for those subsets; unconditional evaluation (``cond_views: 0``) gives
``kid_random_conv`` and ``kid_pixel_stats``.

Execution. Every run is trained, then evaluated, in its own worker; ``--workers N`` run at
once. ``--executor local`` (default) starts worker processes (multiprocessing, spawn) on this
machine; each uses ``cores // N`` CPU threads (``--threads`` to choose), and on a CUDA machine
worker slot i trains on GPU ``i mod device_count`` (recipes whose ``device`` is ``auto`` or
``cuda``). A run that fails is recorded as failed with its error and the others go on; recipes
that do not validate fail before anything trains. Re-running the same sweep skips the runs that
are done (trained and evaluated), resumes interrupted ones from their newest checkpoint (and
a partly done evaluation from its ``results.jsonl``) and retries failed ones. A run directory
holding a run of a different recipe is never reused: that run fails, naming the keys that
differ. When the sweep process itself is killed, its workers notice, checkpoint and stop; a
lock file keeps a re-run from touching a run until its old worker has let go of it.

``--executor ray`` submits each run as a Ray task instead (``pip install ray``). It connects to
``ray.init(address=$RAY_ADDRESS)``: unset, a local Ray instance is started on this machine;
``RAY_ADDRESS=ray://<head>:10001`` connects through the Ray client to a cluster's head, and on
a machine that joined a cluster with ``ray start --address=<head>:6379``, ``RAY_ADDRESS=auto``
uses that cluster. Each task asks for ``--threads`` CPUs (default: the cluster's CPUs //
``--workers``) and one GPU when the cluster has GPUs; ``--workers`` bounds the tasks in
flight. Tasks write into the run directories directly, so on a cluster ``--out`` must be a
path every node sees (a shared file system), and every node needs vsd and the plugins the
recipes name installed.

Outputs in OUT: ``results.csv`` (one row per run: its axis values, status, training step and
every metric, error), ``results.md`` (the runs, and when ``seed`` is an axis, mean ± std over
seeds of every other combination) and ``metric.png`` (with matplotlib: ``metric`` per
combination, error bars over seeds). ``vsd-run sweep FILE --status`` prints every run's state;
there, and in results.csv, a run marked running that no worker holds shows as ``interrupted``.
``vsd-run sweep`` exits with status 1 when a run did not finish.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import itertools
import json
import math
import os
import re
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import Field

from ..core.errors import RecipeError, VsdError
from ..core.progress import Progress
from ..core.settings import Settings

STATES = ("pending", "running", "done", "failed")
STATUS = "status.json"
SWEEP_KEYS = ("name", "base", "overrides", "axes", "mode", "runs", "eval", "metric", "metrics", "out")
DEFAULT_COLUMNS = ("psnr_best_of_1", "ssim_best_of_1", "pairwise_psnr")


class SweepError(VsdError):
    """A sweep file that cannot be used: names the file and key."""

    exit_code = 2

    def __init__(self, source: str, key: str | None, message: str):
        where = f"sweep {source}" + (f", key `{key}`" if key else "")
        super().__init__(f"{where}: {message}")


class SweepInterrupted(VsdError):
    """The sweep was stopped (Ctrl-C, SIGTERM); its workers checkpointed."""

    exit_code = 130


class SweepEval(Settings):
    """The evaluation every run of a sweep gets (the fields of ``vsd-run eval``)."""

    split: str = Field("test", description="dataset split evaluated")
    cond_views: int = Field(1, ge=0, description="clean conditioning views (0: unconditional, KID)")
    samples: int = Field(4, ge=1, description="samples per object")
    objects: int | None = Field(16, ge=1, description="objects evaluated (null: the whole split)")
    steps: int | None = Field(20, ge=1, description="sampler steps (null: the recipe's)")
    batch_size: int = Field(4, ge=1, description="samples drawn at once")
    seed: int = Field(0, description="evaluation seed, the same for every run")
    guidance: float | None = Field(None, description="classifier-free guidance weight (null: the recipe's)")


@dataclass
class RunSpec:
    """One run of a sweep: its axis values and the overrides that make its recipe."""

    name: str
    values: dict[str, Any]
    overrides: list[str]
    dir: Path


@dataclass
class Sweep:
    source: str
    name: str
    base: Path
    overrides: list[str]
    axes: list[str]
    runs: list[RunSpec]
    eval: SweepEval
    metric: str
    columns: list[str]
    out: Path


@dataclass
class Job:
    """What a worker needs to train and evaluate one run (picklable, paths as strings)."""

    name: str
    run_dir: str
    recipe: dict
    eval: dict
    threads: int | None = None
    extra: dict = field(default_factory=dict)


# ---- the sweep file ------------------------------------------------------------------------
def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read and check a sweep file (recipes are validated later, per run)."""
    path = Path(path)
    src = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepError(src, None, f"cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SweepError(src, None, f"malformed YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SweepError(src, None, f"expected a mapping at the top level, got {type(data).__name__}")
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise SweepError(src, str(unknown[0]), f"unknown key; expected one of: {', '.join(SWEEP_KEYS)}")
    name = str(data.get("name") or path.stem)
    base = _find_base(data.get("base"), path, src)
    overrides = _overrides(data.get("overrides"), src)
    ev = _eval_settings(data.get("eval"), src)
    metric, columns = _metrics(data, ev, src)
    out_dir = Path(out) if out is not None else Path(data.get("out") or Path("runs") / "sweeps" / name)
    axes, combos = _combinations(data, src)
    names = _names(combos, src, "runs" if "runs" in data else "axes")
    runs = [RunSpec(n, v, overrides + [_override(k, x) for k, x in v.items()], out_dir / n) for n, v in zip(names, combos)]
    return Sweep(src, name, base, overrides, axes, runs, ev, metric, columns, out_dir)


def _find_base(ref, path: Path, src: str) -> Path:
    from ..core.recipe import find_recipe

    if not isinstance(ref, str) or not ref:
        raise SweepError(src, "base", f"expected a recipe path or shipped recipe name, got {ref!r}")
    beside = path.parent / ref
    if beside.is_file():
        return beside.resolve()
    try:
        return find_recipe(ref).resolve()
    except RecipeError as exc:
        raise SweepError(src, "base", f"{ref!r}: {exc.detail}") from None


def _overrides(items, src: str) -> list[str]:
    items = items or []
    if not isinstance(items, list) or not all(isinstance(o, str) and "=" in o for o in items):
        raise SweepError(src, "overrides", f"expected a list of key.path=value strings, got {items!r}")
    return list(items)


def _eval_settings(block, src: str) -> SweepEval:
    from ..core.recipe import _settings

    if block is not None and not isinstance(block, dict):
        raise SweepError(src, "eval", f"expected a mapping of evaluation settings, got {block!r}")
    try:
        return _settings(SweepEval, block or {}, src, "eval")
    except RecipeError as exc:
        raise SweepError(src, exc.key, exc.detail) from None


def metric_names(ev: SweepEval) -> list[str]:
    """Every metric name an evaluation with these settings can report."""
    from .evaluation import best_of_counts

    if ev.cond_views == 0:
        return ["kid_random_conv", "kid_pixel_stats"]
    names = []
    for m in ("psnr", "ssim", "fg_psnr", "fg_ssim", "lpips"):
        names += [f"{m}_best_of_{n}" for n in best_of_counts(ev.samples)] + [f"{m}_mean", f"{m}_averaged_sample"]
    names += ["pairwise_mse", "pairwise_l2", "pairwise_psnr"]
    names += ["input_view_psnr", "identity_accuracy", "colour_error", "colour_spread_pred", "colour_spread_true", "colour_spread_ratio"]
    return names + [f"{g}_{n}" for g in ("ambiguous", "unambiguous") for n in names]


def _metrics(data: dict, ev: SweepEval, src: str) -> tuple[str, list[str]]:
    known = metric_names(ev)
    metric = data.get("metric") or known[0]
    extra = data.get("metrics") or []
    if not isinstance(extra, list):
        raise SweepError(src, "metrics", f"expected a list of metric names, got {extra!r}")
    shown = ", ".join(n for n in known if not n.startswith(("ambiguous_", "unambiguous_")))
    if ev.cond_views:
        shown += " (each also with an ambiguous_ or unambiguous_ prefix)"
    for key, name in [("metric", metric)] + [("metrics", m) for m in extra]:
        if name not in known:
            raise SweepError(src, key, f"unknown metric {name!r}; this evaluation reports: {shown}")
    defaults = [] if "metrics" in data else [c for c in DEFAULT_COLUMNS if c in known]
    return metric, list(dict.fromkeys([metric, *extra, *defaults]))


def _combinations(data: dict, src: str) -> tuple[list[str], list[dict]]:
    if "runs" in data:
        if "axes" in data:
            raise SweepError(src, "runs", "give either `axes` (with `mode`) or an explicit list of `runs`, not both")
        runs = data["runs"]
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) and r for r in runs):
            raise SweepError(src, "runs", f"expected a non-empty list of {{key.path: value}} mappings, got {runs!r}")
        axes = list(dict.fromkeys(str(k) for r in runs for k in r))
        return axes, [{str(k): v for k, v in r.items()} for r in runs]
    axes = data.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise SweepError(src, "axes", f"expected a mapping key.path -> [values] (or a list of `runs`), got {axes!r}")
    for k, vals in axes.items():
        if not isinstance(vals, list) or not vals:
            raise SweepError(src, f"axes.{k}", f"expected a non-empty list of values, got {vals!r}")
    keys, lists = [str(k) for k in axes], list(axes.values())
    mode = data.get("mode", "grid")
    if mode == "grid":
        return keys, [dict(zip(keys, combo)) for combo in itertools.product(*lists)]
    if mode == "zip":
        lengths = {k: len(v) for k, v in zip(keys, lists)}
        if len(set(lengths.values())) > 1:
            raise SweepError(src, "axes", f"mode zip needs axes of equal length, got {lengths}")
        return keys, [dict(zip(keys, combo)) for combo in zip(*lists)]
    raise SweepError(src, "mode", f"expected grid or zip, got {mode!r}")


def _override(key: str, value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str) and _yaml_value(value) != value:
        text = json.dumps(value)  # JSON is YAML: quoted, the string parses back unchanged
    return f"{key}={text}"


def _yaml_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def format_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def run_name(values: dict) -> str:
    """The directory name of a run: ``key=value`` pairs joined by ``__``, file-name safe."""
    text = "__".join(f"{k}={format_value(v)}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._=,+\-]", "_", text)


def _names(combos: list[dict], src: str, key: str) -> list[str]:
    names = [run_name(c) for c in combos]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise SweepError(src, key, f"two runs would share the directory {dup!r}; every run needs different values")
    return names


# ---- status files --------------------------------------------------------------------------
def read_status(run_dir: str | Path) -> dict:
    path = Path(run_dir) / STATUS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"state": "pending"}


def update_status(run_dir: str | Path, **fields) -> dict:
    """Merge ``fields`` into a run's status.json (written atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    status = read_status(run_dir) | fields | {"updated": time.time()}
    tmp = run_dir / f".{STATUS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(status, indent=2, default=str))
    os.replace(tmp, run_dir / STATUS)
    return status


@contextlib.contextmanager
def run_lock(run_dir: Path, blocking: bool = True):
    """Hold a run directory's lock (yields False when ``blocking`` is off and it is taken).

    The lock of :mod:`vsd.core.runlock`, dropped by the OS when its holder dies; the trainer
    inside the worker shares it."""
    from ..core.errors import RunLockedError
    from ..core.runlock import RunLock

    lock = RunLock(run_dir, wait=blocking, nested=True, quiet=True)
    try:
        lock.acquire()
    except RunLockedError:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def is_active(run_dir: Path) -> bool:
    """Whether a worker holds the run right now."""
    from ..core.runlock import is_locked

    return is_locked(run_dir)


# ---- one run (inside a worker) -------------------------------------------------------------
def summary_metrics(summary: dict) -> dict[str, float]:
    """An evaluation summary (metrics.json) flattened to ``name -> value`` (see the module docstring)."""
    if summary["kind"] == "unconditional":
        kid = summary.get("kid") or {}
        return {f"kid_{k}": float(v) for k, v in kid.items() if k in ("random_conv", "pixel_stats") and isinstance(v, (int, float))}
    out = {}
    for group, g in summary["groups"].items():
        if not g:
            continue
        pre = "" if group == "all" else f"{group}_"
        parts = [(f"_best_of_{n}", ms) for n, ms in g["best_of"].items()]
        parts += [("_mean", g["mean_over_samples"]), ("_averaged_sample", g["averaged_sample"])]
        for suffix, ms in parts:
            out |= {f"{pre}{m}{suffix}": float(v) for m, v in ms.items() if isinstance(v, (int, float))}
        out |= {f"{pre}{k}": float(v) for k, v in (g.get("diversity") or {}).items() if isinstance(v, (int, float))}
        out |= {f"{pre}{k}": v for k, v in fidelity_metrics(g.get("fidelity")).items() if isinstance(v, (int, float))}
    return out


def fidelity_metrics(f: dict | None) -> dict:
    """A summary's fidelity block flattened (input_view_psnr, identity_accuracy, colour_*)."""
    if not f:
        return {}
    out = {"input_view_psnr": f["input_view_psnr"], "identity_accuracy": (f.get("identity") or {}).get("accuracy")}
    return out | {f"colour_{k}": v for k, v in f["colour"].items()}


def _has_checkpoint(run_dir: Path) -> bool:
    from ..core.checkpoint import run_checkpoints

    return bool(run_checkpoints(run_dir)) or (run_dir / "checkpoints" / "last.pt").exists()


def execute_run(job: Job) -> dict:
    """Train (or resume) and evaluate one run, recording its state; never raises for a failed
    run (the error goes into status.json). Returns the final status."""
    run_dir = Path(job.run_dir)
    with run_lock(run_dir):  # waits for a worker of an earlier, killed sweep to let go
        status = read_status(run_dir)
        if status.get("state") == "done":
            return status
        update_status(run_dir, state="running", stage="train", attempts=status.get("attempts", 0) + 1, error=None, traceback=None,
                      pid=os.getpid(), host=socket.gethostname(), started=time.time())
        try:
            return _train_and_eval(job, run_dir, status)
        except BaseException as exc:  # KeyboardInterrupt too: record it, then let it stop the worker
            msg = f"{type(exc).__name__}: {exc}" if not isinstance(exc, VsdError) else str(exc)
            final = update_status(run_dir, state="failed", error=msg, traceback=traceback.format_exc(), finished=time.time())
            if not isinstance(exc, Exception):
                raise
            return final


def _train_and_eval(job: Job, run_dir: Path, status: dict) -> dict:
    import torch

    from .evaluation import EvalConfig, run_eval
    from ..core.recipe import load_recipe_dict
    from .training import Trainer

    if job.threads:
        torch.set_num_threads(job.threads)
    recipe = load_recipe_dict(job.recipe, source=str(run_dir / "recipe.yaml"))
    if not status.get("trained"):
        t0 = time.time()
        trainer = Trainer(recipe, run_dir, resume=_has_checkpoint(run_dir), quiet=True)
        result = trainer.run()
        loss = result["last"].get("loss")
        update_status(run_dir, trained=True, train_step=result["step"], train_loss=loss, train_seconds=round(time.time() - t0, 2))
    update_status(run_dir, stage="eval")
    t0 = time.time()
    summary, _ = run_eval(run_dir, EvalConfig(**job.eval), run_dir / "eval", device=recipe.device, quiet=True)
    return update_status(run_dir, state="done", stage=None, metrics=summary_metrics(summary), eval_seconds=round(time.time() - t0, 2),
                         finished=time.time())


# ---- planning ------------------------------------------------------------------------------
def _flat(d: dict, pre: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{pre}{k}.")
        else:
            out[f"{pre}{k}"] = v
    return out


def _recipe_diff(old: dict, new: dict) -> list[str]:
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b) if k != "device" and a.get(k) != b.get(k))


def plan(sweep: Sweep) -> list[Job]:
    """Validate every run's recipe and mark its state; the jobs still to do, in order.

    Done runs are skipped, runs whose recipe does not validate (or whose directory holds a
    different recipe) are marked failed, the rest pending."""
    from ..core.recipe import load_recipe

    sweep.out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for run in sweep.runs:
        run.dir.mkdir(parents=True, exist_ok=True)
        status = read_status(run.dir)
        try:
            recipe = load_recipe(sweep.base, run.overrides)
        except VsdError as exc:
            update_status(run.dir, state="failed", values=run.values, error=str(exc), traceback=None, stage="recipe")
            continue
        problem = _reuse_problem(run.dir, recipe.raw)
        if problem:
            update_status(run.dir, state="failed", values=run.values, error=problem, stage="recipe")
            continue
        if status.get("state") == "done":
            continue
        if not (run.dir / "recipe.yaml").exists():
            (run.dir / "recipe.yaml").write_text(recipe.dump())
        update_status(run.dir, state="pending", values=run.values, overrides=run.overrides, error=None, stage=None)
        jobs.append(Job(run.name, str(run.dir.resolve()), recipe.raw, sweep.eval.model_dump()))
    return jobs


def _reuse_problem(run_dir: Path, raw: dict) -> str | None:
    path = run_dir / "recipe.yaml"
    if not path.exists() or not (_has_checkpoint(run_dir) or read_status(run_dir).get("state") == "done"):
        return None
    diff = _recipe_diff(yaml.safe_load(path.read_text()) or {}, raw)
    if not diff:
        return None
    return f"{run_dir} holds a run of a different recipe (differs in {', '.join(diff)}); delete that directory or choose another out"


# ---- executors -----------------------------------------------------------------------------
Callback = Callable[[Job], None]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _child_main(job: Job, parent: int) -> None:
    """Entry point of a local worker process: output to worker.log, stop when the sweep dies."""
    import signal
    import threading

    log = open(Path(job.run_dir) / "worker.log", "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log

    def watch():  # SIGTERM makes the trainer finish its step and checkpoint
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    execute_run(job)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_local(jobs: list[Job], workers: int, threads: int | None, on_start: Callback, on_end: Callable[[Job, int | None], None]) -> None:
    """Run ``jobs`` in up to ``workers`` spawned processes at once."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    threads = threads or max(1, _cpu_count() // workers)
    gpus = _cuda_devices()
    pending, running, free = list(jobs), {}, list(range(workers))
    try:
        while pending or running:
            while pending and free:
                slot, job = free.pop(0), pending.pop(0)
                job = _place(job, slot, gpus, threads)
                proc = ctx.Process(target=_child_main, args=(job, os.getpid()), name=f"vsd-sweep:{job.name}")
                proc.start()
                running[proc.sentinel] = (proc, job, slot)
                on_start(job)
            for sentinel in wait(list(running), timeout=5):
                proc, job, slot = running.pop(sentinel)
                proc.join()
                free.append(slot)
                on_end(job, proc.exitcode)
    except BaseException:
        _stop(running)
        for proc, job, _ in running.values():
            on_end(job, proc.exitcode)
        raise


def _place(job: Job, slot: int, gpus: int, threads: int) -> Job:
    recipe = job.recipe
    if gpus and str(recipe.get("device", "auto")) in ("auto", "cuda"):
        recipe = copy.deepcopy(recipe) | {"device": f"cuda:{slot % gpus}"}
    device = recipe.get("device", "auto")
    return Job(job.name, job.run_dir, recipe, job.eval, threads, {"device": device, "slot": slot})


def _stop(running: dict, grace: float = 60.0) -> None:
    """Ask workers to stop (they checkpoint first), then kill those that do not."""
    for proc, _, _ in running.values():
        if proc.is_alive():
            proc.terminate()
    deadline = time.time() + grace
    for proc, _, _ in running.values():
        proc.join(max(0.0, deadline - time.time()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_ray(jobs: list[Job], workers: int, threads: int | None, on_start: Callback, on_end: Callable[[Job, int | None], None]) -> None:
    """Run ``jobs`` as Ray tasks (see the module docstring for pointing it at a cluster)."""
    try:
        import ray
    except ImportError:
        raise VsdError("--executor ray needs the ray package (pip install ray); it does not import here") from None
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, **({} if address else {"include_dashboard": False}), log_to_driver=False)
    try:
        res = ray.cluster_resources()
        threads = threads or max(1, int(res.get("CPU", 1)) // workers)
        task = ray.remote(execute_run).options(num_cpus=threads, num_gpus=1 if res.get("GPU", 0) >= 1 else 0, max_retries=0)
        pending, flight = list(jobs), {}
        while pending or flight:
            while pending and len(flight) < workers:
                job = pending.pop(0)
                job = Job(job.name, job.run_dir, job.recipe, job.eval, threads, {"executor": "ray"})
                flight[task.remote(job)] = job
                on_start(job)
            done, _ = ray.wait(list(flight), num_returns=1)
            for ref in done:
                job = flight.pop(ref)
                try:
                    ray.get(ref)
                    on_end(job, 0)
                except Exception as exc:  # the task's process died; its status says running
                    update_status(job.run_dir, state="failed", error=f"Ray task failed: {type(exc).__name__}: {exc}")
                    on_end(job, 1)
    finally:
        if started:
            ray.shutdown()


EXECUTORS = {"local": run_local, "ray": run_ray}


# ---- the sweep -----------------------------------------------------------------------------
def run_sweep(sweep: Sweep, *, workers: int = 1, executor: Literal["local", "ray"] = "local", threads: int | None = None,
              log: Callable[[str], None] = print, quiet: bool = False) -> list[dict]:
    """Plan, run what is left and write the results; returns results.csv's rows.

    ``log`` gets a line as each run starts and ends; unless ``quiet``, a progress of the runs
    done (of all the sweep's runs) shows the rate and the time left."""
    if executor not in EXECUTORS:
        raise VsdError(f"unknown executor {executor!r}; use one of: {', '.join(EXECUTORS)}")
    jobs = plan(sweep)
    skipped = len(sweep.runs) - len(jobs)
    log(f"sweep {sweep.name}: {len(sweep.runs)} runs, {len(jobs)} to run, {skipped} done or failed before training, into {sweep.out}")
    counter = itertools.count(1)

    def on_start(job: Job) -> None:
        where = job.extra.get("device") or job.extra.get("executor", "")
        log(f"start {job.name} ({where}, {job.threads} thread{'s' * (job.threads != 1)})")

    def on_end(job: Job, code: int | None) -> None:
        st = read_status(job.run_dir)
        if st.get("state") not in ("done", "failed"):
            why = "was stopped" if code is None else f"exited with code {code}"
            st = update_status(job.run_dir, state="failed", error=f"the worker process {why} before the run finished; re-run the sweep to resume it")
        value = (st.get("metrics") or {}).get(sweep.metric)
        error = (st.get("error") or "").splitlines()[:1]
        tail = f"{sweep.metric} {value:.4g}" if isinstance(value, float) else (error[0][:300] if error else "")
        log(f"[{next(counter)}/{len(jobs)}] {st['state']} {job.name}: {tail}")
        write_results(sweep, plot=False)
        bar.advance()

    bar = Progress(f"sweep {sweep.name}", len(sweep.runs), unit="runs", done=skipped, quiet=quiet or not jobs)
    try:
        with _sigterm_interrupts(), bar:
            if jobs:
                EXECUTORS[executor](jobs, max(1, workers), threads, on_start, on_end)
    finally:
        rows = write_results(sweep)
    return rows


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM stops a sweep like Ctrl-C: workers are asked to checkpoint and stop, results written."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---- results -------------------------------------------------------------------------------
def collect(sweep: Sweep) -> list[dict]:
    """One row per run: name, axis values, state, training step, metrics, error."""
    rows = []
    for run in sweep.runs:
        st = read_status(run.dir)
        state = st.get("state", "pending")
        if state == "running" and not is_active(run.dir):
            state = "interrupted"
        row = {"run": run.name, **{k: run.values.get(k, "") for k in sweep.axes}, "status": state, "stage": st.get("stage") or "",
               "attempts": st.get("attempts", 0), "train_step": st.get("train_step", _checkpoint_step(run.dir))}
        row |= {k: st.get(k) for k in ("train_loss", "train_seconds", "eval_seconds")}
        row |= st.get("metrics") or {}
        row["error"] = (st.get("error") or "") if state == "failed" else ""
        rows.append(row)
    return rows


def _checkpoint_step(run_dir: Path) -> int | None:
    from ..core.checkpoint import run_checkpoints

    ckpts = run_checkpoints(run_dir)
    return int(ckpts[-1].stem.split("_")[1]) if ckpts else None


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(rows: list[dict], axes: list[str], columns: list[str]) -> list[dict]:
    """Per combination of the non-seed axes: the number of done seeds and, per column,
    (mean, std over seeds) of its finished runs (std None for a single run)."""
    keys = [a for a in axes if a != "seed"]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row.get(k) for k in keys]), []).append(row)
    out = []
    for members in groups.values():
        done = [r for r in members if r["status"] == "done"]
        entry = {k: members[0].get(k) for k in keys} | {"runs": len(members), "done": len(done)}
        for c in columns:
            vals = [float(r[c]) for r in done if isinstance(r.get(c), (int, float)) and math.isfinite(r[c])]
            entry[c] = _mean_std(vals) if vals else None
        out.append(entry)
    return out


def _num(x, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.3g}"
    return str(x)


def _pm(cell) -> str:
    if cell is None:
        return "–"
    mean, std = cell
    return _num(mean) if std is None else f"{_num(mean)} ± {_num(std)}"


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]


def results_markdown(sweep: Sweep, rows: list[dict], plotted: bool | None) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    lines = [f"# Sweep {sweep.name}", "", f"- base: {sweep.base}", f"- overrides: {' '.join(sweep.overrides) or 'none'}",
             f"- evaluation: {json.dumps(sweep.eval.model_dump())}", f"- metric: {sweep.metric}",
             "- runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), ""]
    if "seed" in sweep.axes:
        agg = aggregate(rows, sweep.axes, sweep.columns)
        keys = [a for a in sweep.axes if a != "seed"]
        lines += ["## Mean ± std over seeds", ""]
        lines += _md_table(keys + ["seeds done"] + sweep.columns,
                           [[format_value(e[k]) for k in keys] + [f"{e['done']}/{e['runs']}"] + [_pm(e[c]) for c in sweep.columns] for e in agg])
        lines.append("")
    lines += ["## Runs", ""]
    header = ["run", *sweep.axes, "status", "step", *sweep.columns, "error"]
    body = [[r["run"], *(format_value(r[a]) for a in sweep.axes), r["status"], _num(r["train_step"]), *(_num(r.get(c)) for c in sweep.columns),
             (r["error"] or "").splitlines()[0][:200] if r["error"] else ""] for r in rows]
    lines += _md_table(header, body) + [""]
    if plotted is False:
        lines += [f"({sweep.metric} plot not drawn: matplotlib is not installed)", ""]
    return "\n".join(lines)


def write_results(sweep: Sweep, plot: bool = True) -> list[dict]:
    """results.csv, results.md and (``plot``, with matplotlib) metric.png in the sweep's out."""
    rows = collect(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    fixed = ["run", *sweep.axes, "status", "stage", "attempts", "train_step", "train_loss", "train_seconds", "eval_seconds"]
    lead = {c: i for i, c in enumerate(sweep.columns)}
    metrics = sorted({k for r in rows for k in r} - set(fixed) - {"error"}, key=lambda k: (lead.get(k, len(lead)), k))
    fields = fixed + metrics + ["error"]
    tmp = sweep.out / ".results.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows({k: format_value(v) if k in sweep.axes else v for k, v in r.items()} for r in rows)
    os.replace(tmp, sweep.out / "results.csv")
    plotted = plot_metric(sweep, rows, sweep.out / "metric.png") if plot else None
    (sweep.out / "results.md").write_text(results_markdown(sweep, rows, plotted))
    return rows


def plot_metric(sweep: Sweep, rows: list[dict], path: Path) -> bool:
    """Bars of ``sweep.metric`` per combination of the non-seed axes, error bars = std over
    seeds. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    agg = [e for e in aggregate(rows, sweep.axes, [sweep.metric]) if e[sweep.metric]]
    if not agg:  # nothing finished yet
        return True
    keys = [a for a in sweep.axes if a != "seed"]
    labels = ["\n".join(f"{k}={format_value(e[k])}" if len(keys) > 1 else format_value(e[k]) for k in keys) or "all" for e in agg]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(agg) + 1), 3.6))
    means = [e[sweep.metric][0] for e in agg]
    errs = [e[sweep.metric][1] or 0.0 for e in agg]
    ax.errorbar(range(len(agg)), means, yerr=errs, fmt="o", capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(agg)), labels, fontsize=8)
    ax.set_ylabel(sweep.metric)
    title = sweep.name + (" (mean ± std over seeds)" if "seed" in sweep.axes else "")
    ax.set_title(title, fontsize=10)
    if keys and len(keys) == 1:
        ax.set_xlabel(keys[0])
    ax.set_xlim(-0.5, len(agg) - 0.5)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def status_rows(sweep: Sweep) -> list[dict]:
    """Every run's state for ``--status`` (``interrupted``: marked running, but no worker holds it)."""
    return collect(sweep)


__all__ = [
    "SweepEval", "RunSpec", "Sweep", "Job", "SweepError", "load_sweep", "plan", "run_sweep", "execute_run", "collect",
    "aggregate", "write_results", "summary_metrics", "metric_names", "run_name", "read_status", "update_status", "STATES",
]
