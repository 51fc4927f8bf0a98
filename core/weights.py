"""Shipped-model weights: a checkpoint's EMA weights and resolved recipe as one safetensors file.

The header's metadata holds the resolved recipe (YAML), the dataset's scene geometry (JSON), the
training step and the format tag. No pickle is involved, so opening a weights file never runs code
from it. :mod:`vsd.core.checkpoint` reads these files like checkpoints; the shipped models
themselves (``pretrained/<name>/``, loadable by name) are :mod:`vsd.apps.pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError
from .files import save_safetensors

WEIGHTS_FORMAT = "vsd-weights/1"


def save_weights(path: str | Path, state: dict, recipe_yaml: str) -> Path:
    """Write a checkpoint state's EMA weights and ``recipe_yaml`` as one safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state["ema"].items()}
    meta = {
        "format": WEIGHTS_FORMAT,
        "recipe": recipe_yaml,
        "info": json.dumps(state["info"]),
        "step": str(int(state["step"])),
    }
    save_safetensors(tensors, path, metadata=meta)
    return path


def load_weights(path: str | Path) -> dict:
    """A weights file as a checkpoint-like state: ``ema`` and ``model`` (the same weights),
    ``recipe`` (YAML), ``info``, ``step`` and ``path``. Errors are DataErrors naming the file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # truncated, or not a safetensors file
        raise DataError(f"weights file {path} cannot be read as safetensors ({type(exc).__name__}: {str(exc)[:200]})") from None
    if meta.get("format") != WEIGHTS_FORMAT or "recipe" not in meta or "info" not in meta:
        raise DataError(f"weights file {path} is not a vsd weights file (expected metadata format {WEIGHTS_FORMAT!r} with recipe and info)")
    return {
        "format": WEIGHTS_FORMAT,
        "ema": tensors,
        "model": tensors,
        "recipe": meta["recipe"],
        "info": json.loads(meta["info"]),
        "step": int(meta.get("step", 0)),
        "path": str(path),
    }
