"""How a training step's time and memory grow with volume size D, image size H and views V:
log-log slopes (time ~ x^slope) from steps at a few sizes, one factor varied at a time.

    python -m benchmarks scaling [--volumes 8 16 32] [--images 16 32 64] [--views 2 3 5]
"""

from __future__ import annotations

import math

import torch

from .common import max_rss_mib, table, timeit
from .train_step import build


def measure(recipe: str, overrides: list[str], device: str, repeats: int, threads: int | None) -> dict:
    """Median step time and this process's peak memory for one configuration (run in a fresh
    process, so that the peak belongs to this configuration alone)."""
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, model, step = build(recipe, overrides, device)
    t = timeit(step, repeats, 1, device)["median"]
    mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else max_rss_mib()
    return {"step_s": t, "peak_mem_mib": mem}


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def run(args) -> dict:
    axes = {
        "volume D": ("model.volume_size", args.volumes),
        "image H": ("data.image_size", args.images),
        "views V": ("data.views", [v + 1 for v in args.views]),  # + the held-out view
    }
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    rows, slopes = [], {}
    for axis, (key, values) in axes.items():
        if args.axes and axis.split()[0] not in args.axes:
            continue
        times, mems = [], []
        for v in sorted(values):
            # views: 0 or 1 clean views in every viewset, which any V >= 2 allows
            extra = ["train.cond_probs=[0.2,0.8]"] if key == "data.views" else []
            with ctx.Pool(1) as pool:
                m = pool.apply(measure, (args.recipe, [f"{key}={v}", *extra], args.device, args.repeats, args.threads))
            t, mem = m["step_s"], m["peak_mem_mib"]
            shown = v - 1 if key == "data.views" else v
            rows.append({"axis": axis, "value": shown, "step_s": t, "peak_mem_mib": mem})
            print(rows[-1], flush=True)
            times.append(t)
            mems.append(mem)
        xs = [v - 1 if key == "data.views" else v for v in sorted(values)]
        slopes[axis] = {"time": slope(xs, times), "memory": slope(xs, mems)}
    md = table(rows, ["axis", "value", "step_s", "peak_mem_mib"]) + "\n\n" + table(
        [{"axis": a, "time slope": s["time"], "memory slope": s["memory"]} for a, s in slopes.items()], ["axis", "time slope", "memory slope"])
    return {"rows": rows, "slopes": slopes, "markdown": md,
            "note": "each size runs in a fresh process; CPU peak memory is that process's maximum resident size"}


def add_arguments(p) -> None:
    p.add_argument("--volumes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--images", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--views", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--recipe", default="voxel_minens.yaml")
    p.add_argument("--axes", nargs="+", choices=["volume", "image", "views"], default=None, help="only these axes (default: all)")
