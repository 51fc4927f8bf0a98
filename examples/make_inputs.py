"""Write the example input images of ``examples/inputs/`` from the shipped models' held-out views.

    python examples/make_inputs.py [--out examples/inputs] [--per-model 2]

Each shipped model (``pretrained/<name>/``) holds 8 test-split viewsets in ``heldout.safetensors``.
``vsd-run sample --input IMG`` (and ``Pipeline.reconstruct`` without cameras) takes an image as
seen from the front: azimuth 0, elevation 0, at the training data's camera radius and field of
view. No held-out view is exactly there, so this picks, for each model, the views whose viewing
direction is nearest to that front camera's (one per object), and writes each as a PNG at the
model's own resolution with its true camera beside it in a JSON file:

    {"model": ..., "source": ..., "width": W, "height": H,
     "c2w": 4x4 camera-to-world (OpenCV: x right, y down, z forward),
     "K": 3x3 intrinsics in pixels, "degrees_from_front": angle to the front camera's direction}

The output is the same on every run (the held-out files are fixed).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import vsd
import vsd.api
from vsd.apps.media import save_image

PREFIX = {"minens-voxel": "minens", "cars-voxel": "car"}  # shipped model -> file name prefix


def front_views(name: str, count: int) -> list[dict]:
    """The ``count`` held-out views of model ``name`` nearest to its front camera, nearest first,
    at most one per object: ``image`` (3, H, W) in [0, 1], ``c2w`` (4, 4), ``K`` (fx, fy, cx, cy)."""
    held = vsd.api.heldout(name)
    images, cams = held["images"], held["cameras"]
    front = vsd.load(name, device="cpu").orbit(1, size=cams.height).c2w[0, :3, 2]  # its viewing direction
    cos = (cams.c2w[..., :3, 2] @ front).clamp(-1, 1)  # (N, V)
    best = cos.argmax(dim=1)
    objects = sorted(range(images.shape[0]), key=lambda i: -cos[i, best[i]].item())[:count]
    return [
        {
            "object": i,
            "view": int(best[i]),
            "image": images[i, best[i]],
            "c2w": cams.c2w[i, best[i]],
            "K": cams.K[i, best[i]],
            "size": (cams.height, cams.width),
            "degrees": math.degrees(math.acos(cos[i, best[i]].item())),
        }
        for i in objects
    ]


def camera_json(name: str, view: dict) -> dict:
    fx, fy, cx, cy = (round(float(v), 6) for v in view["K"])
    return {
        "model": name,
        "source": f"pretrained/{name}/heldout.safetensors: test viewset {view['object']}, view {view['view']}",
        "width": view["size"][1],
        "height": view["size"][0],
        "c2w": [[round(float(v), 6) for v in row] for row in view["c2w"]],
        "K": [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]],
        "degrees_from_front": round(view["degrees"], 1),
    }


def dump(record: dict) -> str:
    """JSON with one line per key and per matrix row."""
    def value(v):
        if isinstance(v, list) and v and isinstance(v[0], list):
            return "[\n" + ",\n".join(f"    {json.dumps(row)}" for row in v) + "\n  ]"
        return json.dumps(v)

    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {value(v)}" for k, v in record.items()) + "\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "inputs")
    ap.add_argument("--per-model", type=int, default=2, help="images per shipped model")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, prefix in PREFIX.items():
        for j, view in enumerate(front_views(name, args.per_model)):
            png = save_image(view["image"], args.out / f"{prefix}_{j}.png")
            png.with_suffix(".json").write_text(dump(camera_json(name, view)))
            print(f"{png}: {name} test viewset {view['object']} view {view['view']}, {view['degrees']:.0f} degrees from the front")


if __name__ == "__main__":
    main()
