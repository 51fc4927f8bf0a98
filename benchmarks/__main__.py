"""Benchmarks of vsd, run on demand (never part of the tests):

    python -m benchmarks render            # compositing vs nerfacc's batched path
    python -m benchmarks train-step        # step time, memory, FLOP/s and utilisation at 1x/2x/4x size
    python -m benchmarks sampling          # DDIM steps vs time and PSNR; feature-cache speed-up
    python -m benchmarks representations   # query throughput per representation, DMTet extraction
    python -m benchmarks scaling           # log-log slopes of step time/memory in D, H and V
    python -m benchmarks against REV       # this tree's training step vs an earlier revision's
    python -m benchmarks all

Each writes benchmarks/results/<name>.json (medians, quartiles, the machine) and prints a
markdown table. Timings compared in one table are measured interleaved in one process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from .common import machine, write

BENCHMARKS = {
    "render": "render",
    "train-step": "train_step",
    "sampling": "sampling",
    "representations": "representations",
    "scaling": "scaling",
    "against": "against",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="name", required=True)
    for name, mod in [*BENCHMARKS.items(), ("all", None)]:
        p = sub.add_parser(name)
        p.add_argument("--repeats", type=int, default=5, help="timed repetitions (the median is reported)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
        if mod is not None:
            importlib.import_module(f".{mod}", __package__).add_arguments(p)
    args = ap.parse_args(argv)
    from vsd.apps.memory import keep_freed_memory

    keep_freed_memory()  # as training and the CLI do
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in BENCHMARKS if n != "against"] if args.name == "all" else [args.name]
    for name in names:
        mod = importlib.import_module(f".{BENCHMARKS[name]}", __package__)
        if args.name == "all":  # defaults of that benchmark's own options
            p = argparse.ArgumentParser()
            mod.add_arguments(p)
            for k, v in vars(p.parse_args([])).items():
                setattr(args, k, v)
        print(f"== {name} on {json.dumps(machine())}", flush=True)
        result = mod.run(args)
        path = write(args.out, name, result)
        print(result.get("markdown") or json.dumps(result, indent=2))
        print(f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
