"""The input fit (``diffusion.input_fit_steps``) side by side: for a shipped model's held-out
viewsets, one row per object: the true views (the first is the input), the sample without the fit,
the sample with it (same seed, DDIM at the recipe's steps; the fit's steps and rate are the
model's recipe's unless --fit-steps is given).

    python benchmarks/input_fit.py [minens-voxel cars-voxel] [--objects 6] [--fit-steps N]

Writes docs/images/input_fit_<name>.png and prints the input-view PSNR of both samples.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import vsd
from vsd.apps import pretrained
from vsd.apps.media import save_grid
from vsd.apps.metrics import psnr

ROOT = Path(__file__).resolve().parent.parent


def compare(name: str, objects: int, fit_steps: int | None) -> dict:
    model = vsd.load(name).model
    fit_steps = fit_steps or model.recipe.diffusion.input_fit_steps or 2
    held = pretrained.heldout(name)
    images, cams = held["images"][:objects], held["cameras"][:objects]
    rows, scores = [], {0: [], fit_steps: []}
    for i in range(images.shape[0]):
        row = [images[i]]
        for fit in (0, fit_steps):
            gen = torch.Generator().manual_seed(i)
            pred = model.sample(cams[i : i + 1], images[i : i + 1, :1] * 2 - 1, generator=gen, fit_steps=fit)
            views = ((pred.x0[0] + 1) / 2).clamp(0, 1)
            scores[fit].append(psnr(views[:1], images[i, :1]).item())
            row.append(views)
        rows.append(torch.cat(row))
    path = save_grid(torch.stack(rows), ROOT / "docs" / "images" / f"input_fit_{name}.png", upscale=3)
    return {"picture": str(path.relative_to(ROOT)), **{f"input_view_psnr_fit{k}": sum(v) / len(v) for k, v in scores.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=["minens-voxel", "cars-voxel"])
    p.add_argument("--objects", type=int, default=6)
    p.add_argument("--fit-steps", type=int, default=None, help="default: the recipe's input_fit_steps (2 if it has none)")
    args = p.parse_args()
    torch.set_num_threads(1)
    with torch.no_grad():
        for name in args.names:
            print(name, compare(name, args.objects, args.fit_steps), flush=True)


if __name__ == "__main__":
    main()
