"""Shipped-model weights: a checkpoint's EMA weights and resolved recipe as one safetensors file.

The header's metadata holds the resolved recipe (YAML), the dataset's scene geometry (JSON), the
training step and the format tag. No pickle is involved, so opening a weights file never runs code
from it. :mod:`vsd.core.checkpoint` reads these files like checkpoints; the shipped models
themselves (``pretrained/<name>/``, loadable by name) are :mod:`vsd.apps.pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import DataError, short
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
    ``recipe`` (YAML), ``info``, ``step`` and ``path``. The metadata and the weights are checked
    as a checkpoint's are; errors are DataErrors naming the file and the metadata key."""
    from safetensors import safe_open

    from .state_checks import _recipe_yaml, check_info, check_state, describe

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # truncated, or not a safetensors file
        raise DataError(f"weights file {path} cannot be read as safetensors ({type(exc).__name__}: {str(exc)[:200]})") from None
    if meta.get("format") != WEIGHTS_FORMAT:
        raise DataError(f"weights file {path} is not a vsd weights file (expected metadata format {WEIGHTS_FORMAT!r} with recipe, info and step)")
    where = describe(path)
    missing = [k for k in ("recipe", "info", "step") if k not in meta]
    if missing:
        raise DataError(f"{where} lacks metadata {', '.join(f'`{k}`' for k in missing)} (a vsd weights file holds recipe, info and step); the file is refused")
    _recipe_yaml(meta["recipe"], path, "metadata `recipe`")
    try:
        info = json.loads(meta["info"])
    except (ValueError, TypeError, RecursionError) as exc:
        why = f"{exc.msg} at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise DataError(f"{where}: metadata `info` is not JSON ({why}): {short(meta['info'])}; the file is refused") from None
    check_info(info, where, "metadata `info`")
    step = meta["step"]
    if not (isinstance(step, str) and step.isascii() and step.isdigit()):
        raise DataError(f"{where}: metadata `step` is {short(step)}, not a non-negative integer; the file is refused")
    state = {
        "format": WEIGHTS_FORMAT,
        "ema": tensors,
        "model": tensors,
        "recipe": meta["recipe"],
        "info": info,
        "step": int(step),
        "path": str(path),
    }
    check_state(state, path)
    return state
