"""The reference training step of this working tree against an earlier revision, side by side:
step time, counted FLOPs and utilisation of each, and their ratios.

    python -m benchmarks against REV [--rounds 3] [--scale 1] [key=value ...]

REV (any git revision, e.g. the commit before a set of speed-ups) is exported with
``git archive`` into a temporary folder. Each round runs one fresh process per tree, current then
baseline, so both see the same machine load; each process imports only its own tree's vsd,
builds the reference step with the measuring code of this tree, counts its FLOPs, times it and
measures the machine's ceiling (large matmul / wide conv3d) in the same process. Reported per
tree: the median over rounds of the per-process step medians; utilisation divides by the median
ceiling of all processes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from .common import counted_flops, peak_flops, table, timeit

ROOT = Path(__file__).resolve().parent.parent


def worker(spec: dict) -> dict:
    """One tree's measurement, in its own process: the step's FLOPs, time and the ceiling."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    try:  # process settings the tree's own training applies (absent in older trees)
        from vsd.apps.memory import keep_freed_memory

        keep_freed_memory()
    except ImportError:
        pass
    import vsd

    from .train_step import build, scale_overrides

    base = {"image": 32, "volume": 16, "samples": 32}
    _, _, step = build(spec["recipe"], [*scale_overrides(spec["scale"], base), *spec["overrides"]], "cpu")
    flops = counted_flops(step)
    t = timeit(step, spec["repeats"], 2, "cpu")
    peak = peak_flops("cpu")["peak_flops"]
    return {"vsd": vsd.__file__, "flops": flops, "step_s": t["median"], "peak_flops": peak}


def export(rev: str, into: Path) -> Path:
    """``git archive REV`` unpacked under ``into/tree``; returns a folder whose ``vsd`` is it."""
    tree = into / "tree"
    tree.mkdir(parents=True)
    archive = into / "tree.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tree, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return link(tree, into / "baseline")


def link(tree: Path, where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "vsd").symlink_to(tree, target_is_directory=True)
    return where


def run_worker(path: Path, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path)}
    code = "import json, sys; from benchmarks.against import worker; print('RESULT', json.dumps(worker(json.loads(sys.argv[1]))))"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"benchmark worker for {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run(args) -> dict:
    spec = {"recipe": args.recipe, "scale": args.scale, "overrides": args.overrides, "repeats": args.repeats, "threads": args.threads or 1}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip())
    labels = {"current": f"{head}{' + uncommitted changes' if dirty else ''}", "baseline": args.rev}
    results: dict[str, list[dict]] = {"current": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"current": link(ROOT, Path(tmp) / "current"), "baseline": export(args.rev, Path(tmp))}
        for r in range(args.rounds):
            for name in ("current", "baseline"):
                res = run_worker(paths[name], spec)
                results[name].append(res)
                print(f"round {r + 1} {name}: {res['step_s']:.4f} s, {res['flops'] / 1e9:.2f} GFLOP, ceiling {res['peak_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    # the ceiling is the machine's, not a tree's: one figure from every process of both trees
    # (per-process measurements scatter by several per cent on a shared machine)
    ceiling = statistics.median(r["peak_flops"] for rs in results.values() for r in rs)
    rows = []
    for name in ("baseline", "current"):
        rs = results[name]
        step_s = statistics.median(r["step_s"] for r in rs)
        flops = rs[0]["flops"]
        rows.append({
            "tree": name, "revision": labels[name], "step_s": step_s, "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / step_s / 1e9, "ceiling_gflops": ceiling / 1e9, "utilisation": flops / step_s / ceiling,
            "step_s_per_round": [r["step_s"] for r in rs], "ceiling_gflops_per_round": [r["peak_flops"] / 1e9 for r in rs],
        })
    speedup = rows[0]["step_s"] / rows[1]["step_s"]
    util_ratio = rows[1]["utilisation"] / rows[0]["utilisation"]
    md = table(rows, ["tree", "revision", "step_s", "gflop_per_step", "achieved_gflops", "ceiling_gflops", "utilisation"])
    md += f"\n\nstep time baseline / current: {speedup:.2f}x; utilisation current / baseline: {util_ratio:.2f}x ({args.rounds} rounds of {args.repeats} steps, {spec['threads']} thread(s))"
    return {"spec": spec, "rows": rows, "speedup": speedup, "utilisation_ratio": util_ratio, "markdown": md}


def add_arguments(p) -> None:
    p.add_argument("rev", nargs="?", default="HEAD", help="git revision to compare against")
    p.add_argument("--rounds", type=int, default=3, help="processes per tree, alternated")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--recipe", default="voxel_minens.yaml")
    p.add_argument("overrides", nargs="*", default=[])
