"""Side-by-side pictures of several models on the same held-out objects.

    python benchmarks/compare_runs.py RUN [RUN ...] --out docs/images/x.png [--objects 6] [--steps 25]

Every RUN (a run directory, checkpoint or shipped model name) reconstructs the first --objects
test viewsets of the first RUN's recipe from their first view (one sample, DDIM --steps, seed 0).
One row per object: the true views, then each run's renders at the same cameras (the first
render of each block is at the conditioning camera). The blocks follow the order of the RUNs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vsd.apps.media import save_grid
from vsd.apps.sampling import load_model
from vsd.apps.training import fixed_batch


@torch.no_grad()
def compare(runs: list[str], out: Path, objects: int, steps: int) -> Path:
    models = [load_model(r, device="cpu").eval() for r in runs]
    first = models[0]
    V = first.recipe.data.settings.views - first.recipe.train.heldout_views
    batch = fixed_batch(first.recipe.data.build(split="test"), objects, "cpu").select_views(slice(0, V))
    blocks = [(batch.images + 1) / 2]
    for m in models:
        pred = m.sample(batch.cameras, batch.images[:, :1], steps=steps, generator=torch.Generator().manual_seed(0))
        blocks.append((pred.x0.clamp(-1, 1) + 1) / 2)
    return save_grid(torch.cat(blocks, 1), out, upscale=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--objects", type=int, default=6)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(compare(args.runs, args.out, args.objects, args.steps))


if __name__ == "__main__":
    main()
