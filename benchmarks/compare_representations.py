"""The four representations trained for the same CPU budget, then scored the same way.

    python benchmarks/compare_representations.py --minutes 12 [--parallel 2] [--out runs/representations]

Each recipe (``{voxel,triplane,hash_grid,dmtet}_minens.yaml``, which differ only in their
representation block and, for DMTet, the renderer) trains for ``--minutes`` of wall time on one
thread with ``benchmarks/train_reference.py``, ``--parallel`` runs at a time, then reports
single-view novel-view PSNR on the first ``--objects`` test characters (DDIM ``--steps``)
against the mean training image. Writes ``OUT/results.md`` / ``results.json`` with the table and
``docs/images/representations_turntable_frames.png``: per representation, the reconstruction
of one held-out character (its input view on the left) from two new viewpoints.

Run it where ``data/minens_real`` exists to train on real skins (``vsd-run data minens
data/minens_real``; ``skins: auto`` in the recipes picks it up), as the README's table did.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
REPRESENTATIONS = ["voxel", "triplane", "hash_grid", "dmtet"]


def train(name: str, args) -> dict:
    out = args.out / name
    if not (out / "results.json").exists():
        cmd = [
            sys.executable, str(ROOT / "benchmarks" / "train_reference.py"), "--recipe", f"{name}_minens.yaml",
            "--minutes", str(args.minutes), "--objects", str(args.objects), "--steps", str(args.steps),
            "--out", str(out), "train.threads=1", "train.sample_every=100000000", *args.overrides,
        ]
        if (out / "checkpoints").exists():
            cmd.append("--resume")
        out.mkdir(parents=True, exist_ok=True)
        with (args.out / f"{name}.log").open("w") as log:
            t0 = time.time()
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
            print(f"{name}: trained and evaluated in {(time.time() - t0) / 60:.1f} min", flush=True)
    return json.loads((out / "results.json").read_text())


@torch.no_grad()
def frames(run: Path, obj: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input view (3, S, S), two new views (2, 3, S, S)) of test object ``obj``, in [0, 1]."""
    import vsd

    pipe = vsd.load(run, device="cpu")
    item = pipe.model.recipe.data.build(split="test")[obj]
    image = (item["images"][0] + 1) / 2
    result = pipe.reconstruct(image, num_samples=1, steps=25, seed=0)
    views = result.render(pipe.orbit(4, azimuth0=45.0, size=size))[0]  # (4, 3, S, S)
    up = torch.nn.functional.interpolate(image[None], size=(size, size), mode="nearest")[0]
    return up, views[[0, 1]]


def figure(runs: dict[str, Path], path: Path, obj: int = 0, size: int = 64) -> Path:
    from PIL import Image, ImageDraw

    tiles = {name: frames(run, obj, size) for name, run in runs.items()}
    pad, label = 4, 14
    width = len(tiles) * (3 * size + 2 * pad) + pad
    canvas = Image.new("RGB", (width, size + label + pad), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for name, (inp, views) in tiles.items():
        draw.text((x, 1), f"{name} (input, 2 new views)", fill="black")
        for j, img in enumerate([inp, *views]):
            arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            canvas.paste(Image.fromarray(arr), (x + j * size, label))
        x += 3 * size + 2 * pad
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--objects", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps for evaluation")
    ap.add_argument("--out", type=Path, default=Path("runs/representations"))
    ap.add_argument("--representations", nargs="+", default=REPRESENTATIONS, choices=REPRESENTATIONS)
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "representations_turntable_frames.png")
    ap.add_argument("overrides", nargs="*", default=[])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(args.representations, pool.map(lambda n: train(n, args), args.representations)))
    lines = [
        f"{args.minutes:g} minutes of one thread each ({args.parallel} runs at a time); single-view "
        f"novel-view PSNR on {args.objects} test characters, DDIM {args.steps}",
        "",
        "| recipe | steps | PSNR DDIM (dB) | PSNR one step | SSIM DDIM | mean-image PSNR |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r["metrics"]
        lines.append(
            f"| `{name}_minens.yaml` | {r['steps']:,} | {m['ddim']['psnr']:.2f} | {m['one_step']['psnr']:.2f} | "
            f"{m['ddim']['ssim']:.3f} | {m['mean_image']['psnr']:.2f} |"
        )
    md = "\n".join(lines)
    (args.out / "results.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps({"minutes": args.minutes, "results": results}, indent=2))
    print(md)
    print("figure:", figure({n: args.out / n for n in results}, args.figure))


if __name__ == "__main__":
    main()
