"""Reconstruct 3D objects from one image with the Python API.

    python examples/reconstruct.py                      # the shipped minens-voxel model
    python examples/reconstruct.py cars-voxel        # another shipped model
    python examples/reconstruct.py runs/voxel_minens examples/inputs/minens_1.png [--out reconstruct_out]

Without an image, a held-out test object is the input, with its known camera (shipped with a
shipped model, else from the model's dataset); an image given here is taken as seen from the
front (examples/inputs/ holds test views near the front of each shipped model's objects).
Writes the input, a grid of sampled views, a turntable (GIF, and MP4 with imageio-ffmpeg) and a
GLB mesh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import vsd
import vsd.api
from vsd.apps.media import save_image
from vsd.core.cameras import Cameras
from vsd.core.errors import EmptyMeshError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="minens-voxel", help="checkpoint file, run directory or shipped model name (default: minens-voxel)")
    ap.add_argument("image", nargs="?", help="input image (default: a test character)")
    ap.add_argument("--out", type=Path, default=Path("reconstruct_out"))
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()

    pipe = vsd.load(args.model)
    image, cameras = args.image, None  # an image of unknown pose is taken as seen from the front
    if image is None and args.model in vsd.api.pretrained_names():  # shipped held-out object, known camera
        held = vsd.api.heldout(args.model)
        image = save_image(held["images"][0, 0], args.out / "input.png")
        cameras = held["cameras"][0, :1]
    elif image is None:  # a test-split item of the model's own dataset, with its known camera
        item = pipe.model.recipe.data.build(split="test")[0]
        image = save_image((item["images"][0] + 1) / 2, args.out / "input.png")
        size = item["images"].shape[-1]
        cameras = Cameras(item["c2w"][:1], item["K"][:1], size, size)

    result = pipe.reconstruct(image, cameras, num_samples=args.samples, steps=args.steps, seed=0)
    print("views:", result.save_views(args.out / "samples.png"))
    print("turntable:", *result.turntable(args.out / "turntable.gif"))
    try:
        print("mesh:", result.export_mesh(args.out / "sample_0.glb"))
    except EmptyMeshError as exc:  # e.g. a barely trained model: say so, keep what was written
        print(f"no mesh: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
