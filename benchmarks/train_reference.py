"""Train the reference recipe for a fixed wall-time budget, then measure single-view
reconstruction on held-out characters against trivial baselines.

    python benchmarks/train_reference.py --minutes 30 --out runs/bench_reference

Writes into --out: the run (checkpoints, samples, log.csv), ``loss.png`` (training loss curve)
and ``results.json`` with, on the first --objects test characters conditioned on view 0:
  - PSNR/SSIM of DDIM samples on the novel views (and of one-step x0-predictions),
  - the same for two baselines: the mean training image, and a copy of the input view,
  - MSE of the model's renders vs. MSE of predicting the conditioning view for every view.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from vsd.apps.metrics import psnr, ssim
from vsd.apps.training import Trainer, fixed_batch
from vsd.core.recipe import load_recipe


def mean_training_image(ds, n: int = 256) -> torch.Tensor:
    imgs = torch.stack([ds[i]["images"][0] for i in range(min(n, len(ds)))])
    return ((imgs + 1) / 2).mean(0)


@torch.no_grad()
def evaluate(model, test_set, train_set, objects: int, steps: int, seed: int) -> dict:
    model.eval()
    batch = fixed_batch(test_set, objects, next(model.parameters()).device)
    V = model.recipe.data.settings.views - model.recipe.train.heldout_views
    batch = batch.select_views(slice(0, V))
    gt = (batch.images + 1) / 2
    cond = batch.images[:, :1]
    gen = torch.Generator().manual_seed(seed)
    sampled = (model.sample(batch.cameras, cond, steps=steps, generator=gen).x0 + 1) / 2
    # one step: all unknown views at the last timestep, pure noise in
    T = model.recipe.diffusion.timesteps
    ts = torch.full(batch.images.shape[:2], T - 1, dtype=torch.long)
    ts[:, 0] = 0
    x_in = torch.randn(batch.images.shape, generator=gen)
    x_in[:, :1] = cond
    onestep = (model.predict(x_in, batch.cameras, ts, None).x0.clamp(-1, 1) + 1) / 2
    mean_img = mean_training_image(train_set).expand_as(gt)
    copy_in = gt[:, :1].expand_as(gt)
    novel = slice(1, V)
    out = {}
    for name, pred in [("ddim", sampled), ("one_step", onestep), ("mean_image", mean_img), ("copy_input", copy_in)]:
        out[name] = {
            "psnr": psnr(pred[:, novel], gt[:, novel]).mean().item(),
            "ssim": ssim(pred[:, novel], gt[:, novel]).mean().item(),
            "mse_all_views": ((pred * 2 - 1 - batch.images) ** 2).mean().item(),
        }
    return out


def plot_loss(log_csv: Path, out_png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; no loss plot", file=sys.stderr)
        return
    rows = list(csv.DictReader(open(log_csv)))
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["mse"]) for r in rows]
    k = max(1, len(loss) // 50)
    smooth = [sum(loss[max(0, i - k) : i + 1]) / len(loss[max(0, i - k) : i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, alpha=0.3, label="render MSE (input views)")
    ax.plot(steps, smooth, label="smoothed")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE in [-1, 1] units")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="voxel_minens.yaml")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_reference"))
    ap.add_argument("--objects", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps for evaluation")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    recipe = load_recipe(args.recipe, ["train.steps=1000000", f"train.max_minutes={args.minutes}", *args.overrides])
    t0 = time.time()
    trainer = Trainer(recipe, args.out, resume=args.resume)
    result = trainer.run()
    train_s = time.time() - t0
    test_set = recipe.data.build(split="test")
    metrics = evaluate(trainer.ema.model, test_set, trainer.train_set, args.objects, args.steps, recipe.seed)
    report = {
        "recipe": recipe.source,
        "steps": result["step"],
        "train_minutes": round(train_s / 60, 1),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "test_objects": args.objects,
        "metrics": metrics,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    plot_loss(args.out / "log.csv", args.out / "loss.png")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
