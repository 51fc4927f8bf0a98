"""Figures and numbers of the shipped models' cards (docs/results.md, "Pretrained models").

    python benchmarks/model_cards.py [minens-voxel cars-voxel] [--objects 8] [--steps 50]
        [--test-objects minens-voxel=20 cars-voxel=9]

For each model: single-view novel-view PSNR on its shipped held-out viewsets (DDIM, one sample,
view 0 conditions; the same protocol as tests/test_pretrained.py) against the mean training
image, and docs/images/<name>_card.png: one row per object: the input, the true other views,
then the sampled views of two samples. With --test-objects, also `vsd-run eval NAME --split test
--samples 1 --objects M` (run where the model's data folder is; output in runs/cards/NAME): PSNR,
foreground PSNR and the fidelity metrics. Writes benchmarks/results/model_cards.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vsd
from vsd.apps import pretrained
from vsd.apps.media import save_grid

ROOT = Path(__file__).resolve().parent.parent


def test_split(name: str, objects: int, steps: int) -> dict:
    """The test-split figures of `vsd-run eval NAME --split test --samples 1 --objects M --steps S`."""
    from vsd.apps.evaluation import EvalConfig, run_eval

    cfg = EvalConfig(split="test", cond_views=1, samples=1, objects=objects, steps=steps, batch_size=1, seed=0)
    summary, out = run_eval(name, cfg, ROOT / "runs" / "cards" / name, quiet=True)
    group = summary["groups"]["all"]
    best = group["best_of"]["1"]
    return {"objects": summary["objects"], "steps": steps, "psnr": best["psnr"], "fg_psnr": best["fg_psnr"],
            "fg_ssim": best["fg_ssim"], "fidelity": group["fidelity"], "metrics": str((out / "metrics.json").relative_to(ROOT))}


def card(name: str, objects: int, steps: int, figure_objects: int = 4, test_objects: int | None = None) -> dict:
    pipe = vsd.load(name, device="cpu")
    t0 = time.time()
    scores = {s: pretrained.heldout_psnr(pipe, name, objects=objects, steps=s, seed=0) for s in sorted({20, steps})}
    seconds = time.time() - t0
    held = pretrained.heldout(name)
    rows = []
    for i in range(min(figure_objects, held["images"].shape[0])):
        V = held["images"].shape[1]
        res = pipe.reconstruct(held["images"][i, :1], held["cameras"][i], num_samples=2, views=V, steps=steps, seed=i)
        rows.append(torch.cat([held["images"][i], res.views[0, 1:], res.views[1, 1:]]))
    fig = save_grid(torch.stack(rows), ROOT / "docs" / "images" / f"{name}_card.png", upscale=3)
    w = pretrained.load_weights(pretrained.PRETRAINED_DIR / name / "model.safetensors")
    size = sum(p.stat().st_size for p in (pretrained.PRETRAINED_DIR / name).iterdir())
    return {"name": name, "step": w["step"], "size_mib": size / 2**20, "parameters": sum(v.numel() for v in w["ema"].values()),
            "psnr_by_steps": scores, "eval_seconds": seconds, "figure": str(fig.relative_to(ROOT)),
            "test_split": test_split(name, test_objects, steps) if test_objects else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=None)
    ap.add_argument("--objects", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--test-objects", nargs="*", default=[], metavar="NAME=M", help="also evaluate NAME on M test-split objects")
    args = ap.parse_args()
    test_objects = {k: int(v) for k, v in (a.split("=", 1) for a in args.test_objects)}
    out = []
    for name in args.names or pretrained.names():
        out.append(card(name, args.objects, args.steps, test_objects=test_objects.get(name)))
        print(json.dumps(out[-1], indent=2), flush=True)
    path = ROOT / "benchmarks" / "results" / "model_cards.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # the cards of models not made this time stay as they were
    kept = [c for c in (json.loads(path.read_text()) if path.is_file() else []) if c["name"] not in {c["name"] for c in out}]
    path.write_text(json.dumps(sorted(kept + out, key=lambda c: c["name"]), indent=2))


if __name__ == "__main__":
    main()
