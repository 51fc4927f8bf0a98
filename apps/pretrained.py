"""Shipped models: safetensors weights with their resolved recipe, loadable by name.

A shipped model is a folder ``pretrained/<name>/`` inside the package holding

- ``model.safetensors``: the EMA weights (float32); the header's metadata holds the resolved
  recipe (YAML), the dataset's scene geometry (JSON), the training step and the format tag. No
  pickle is involved, so opening a weights file never runs code from it.
- ``heldout.safetensors``: a few test-split viewsets of the model's dataset, for checks and for
  ``examples/reconstruct.py`` on a machine without the data: ``images`` uint8 (N, V, 3, H, W),
  ``c2w`` (N, V, 4, 4), ``K`` (N, V, 4) and ``mean_image`` (3, H, W) in [0, 1], the mean training
  image (the trivial baseline a reconstruction must beat).

``vsd-run pack RUN NAME`` writes such a folder from a run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import DataError
from ..core.files import save_safetensors
from ..core.weights import WEIGHTS_FORMAT, load_weights, save_weights  # noqa: F401  (re-exported)

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


def names(root: Path = PRETRAINED_DIR) -> list[str]:
    """Names of the models shipped in ``root`` (``vsd.load(name)``)."""
    return sorted(p.parent.name for p in root.glob("*/model.safetensors")) if root.is_dir() else []


def imported_names() -> list[str]:
    """Names of the models imported with ``vsd-run import`` (in :func:`~vsd.apps.paper_import.models_dir`)."""
    from .paper_import import models_dir

    return names(models_dir())


def resolve(path_or_name: str | Path, root: Path = PRETRAINED_DIR) -> Path:
    """An existing checkpoint/run path as given, else the weights of the shipped model of that
    name, else those of the imported model of that name."""
    from .paper_import import models_dir

    p = Path(path_or_name)
    if p.exists():
        return p
    for folder in (root, models_dir()):
        weights = folder / p.name / "model.safetensors"
        if p.name and weights.is_file():
            return weights
    known = ", ".join(names(root)) or "none are shipped in this install"
    imported = ", ".join(imported_names()) or "none"
    raise DataError(f"{path_or_name} is neither a checkpoint file, a run directory nor a model name (shipped: {known}; "
                    f"imported with vsd-run import: {imported})")


def save_heldout(path: str | Path, test_set, train_set, objects: int, views: int, mean_over: int = 256) -> Path:
    """The first ``objects`` test viewsets (``views`` views each) and the mean training image."""

    items = [test_set[i] for i in range(min(objects, len(test_set)))]
    images = torch.stack([it["images"][:views] for it in items])  # (N, V, 3, H, W) in [-1, 1]
    train_imgs = torch.stack([train_set[i]["images"][0] for i in range(min(mean_over, len(train_set)))])
    tensors = {
        "images": ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8),
        "c2w": torch.stack([it["c2w"][:views] for it in items]).float(),
        "K": torch.stack([it["K"][:views] for it in items]).float(),
        "mean_image": ((train_imgs + 1) / 2).mean(0).float(),
    }
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, Path(path), metadata={"format": "vsd-heldout/1"})
    return Path(path)


def heldout(name: str, root: Path = PRETRAINED_DIR) -> dict:
    """The held-out viewsets shipped with a model: ``images`` (N, V, 3, H, W) float in [0, 1],
    ``cameras`` (N, V) :class:`~vsd.core.cameras.Cameras`, ``mean_image`` (3, H, W) in [0, 1]."""
    from safetensors.torch import load_file

    from ..core.cameras import Cameras

    path = root / name / "heldout.safetensors"
    if not path.is_file():
        raise DataError(f"no held-out examples for {name!r}: {path} does not exist (shipped: {', '.join(names(root)) or 'none'})")
    t = load_file(str(path))
    images = t["images"].float() / 255
    H, W = images.shape[-2:]
    return {"images": images, "cameras": Cameras(t["c2w"], t["K"], H, W), "mean_image": t["mean_image"]}


def pack(checkpoint: str | Path, name: str, root: Path = PRETRAINED_DIR, overrides: list[str] | None = None, objects: int = 8) -> Path:
    """Make ``root/name/`` from a run or checkpoint: weights with the recipe (``overrides``
    applied, e.g. to replace machine-specific data paths) and held-out test viewsets."""
    from ..core.checkpoint import load_checkpoint, recipe_from_state
    from ..core.recipe import apply_overrides, load_recipe_dict

    state = load_checkpoint(checkpoint)
    raw = apply_overrides(recipe_from_state(state), list(overrides or []), f"{state['path']} (embedded recipe)")
    recipe = load_recipe_dict(raw, source=f"{state['path']} (embedded recipe)", budget="sample")
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    views = recipe.data.settings.views - recipe.train.heldout_views
    save_heldout(out / "heldout.safetensors", recipe.data.build(split="test"), recipe.data.build(split="train"), objects, views)
    return save_weights(out / "model.safetensors", state, recipe.dump())


def heldout_psnr(pipe, name: str, objects: int = 4, steps: int | None = 20, seed: int = 0, root: Path = PRETRAINED_DIR) -> dict:
    """Single-view reconstruction of a shipped model's held-out viewsets: view 0 conditions, the
    other views are sampled at their true cameras. Returns mean PSNR (dB) over the novel views
    of the sample (``psnr``) and of the mean training image (``mean_image_psnr``)."""
    from .metrics import psnr

    data = heldout(name, root)
    images, cams = data["images"][:objects], data["cameras"][:objects]
    got, base = [], []
    for i in range(images.shape[0]):
        V = images.shape[1]
        result = pipe.reconstruct(images[i, :1], cams[i], num_samples=1, views=V, steps=steps, seed=seed + i, progress=False)
        truth = images[i, 1:]
        got.append(psnr(result.views[0, 1:], truth).mean().item())
        base.append(psnr(data["mean_image"].expand_as(truth), truth).mean().item())
    return {"psnr": sum(got) / len(got), "mean_image_psnr": sum(base) / len(base), "objects": len(got)}
