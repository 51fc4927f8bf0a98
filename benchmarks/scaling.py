"""How a training step's time and memory grow with volume size D, image size H and views V:
log-log slopes (time ~ x^slope) from steps at a few sizes, one factor varied at a time.

    python -m benchmarks scaling [--volumes 8 16 32] [--images 16 32 64] [--views 2 3 5]
"""

from __future__ import annotations

import math

import torch

from .common import max_rss_mib, table, timeit
from .train_step import build


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
    rows, slopes = [], {}
    for axis, (key, values) in axes.items():
        times, mems = [], []
        for v in sorted(values):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            before = max_rss_mib()
            recipe, model, step = build(args.recipe, [f"{key}={v}"], args.device)
            t = timeit(step, args.repeats, 1, args.device)["median"]
            mem = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else max_rss_mib()
            shown = v - 1 if key == "data.views" else v
            rows.append({"axis": axis, "value": shown, "step_s": t, "peak_mem_mib": mem, "rss_growth_mib": max_rss_mib() - before})
            print(rows[-1], flush=True)
            times.append(t)
            mems.append(mem)
            del model, step
        xs = [v - 1 if key == "data.views" else v for v in sorted(values)]
        slopes[axis] = {"time": slope(xs, times), "memory": slope(xs, mems)}
    md = table(rows, ["axis", "value", "step_s", "peak_mem_mib"]) + "\n\n" + table(
        [{"axis": a, "time slope": s["time"], "memory slope": s["memory"]} for a, s in slopes.items()], ["axis", "time slope", "memory slope"])
    return {"rows": rows, "slopes": slopes, "markdown": md,
            "note": "CPU peak memory is the process's maximum resident size so far (sizes run in increasing order)"}


def add_arguments(p) -> None:
    p.add_argument("--volumes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--images", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--views", type=int, nargs="+", default=[2, 3, 5])
    p.add_argument("--recipe", default="voxel_minens.yaml")
