"""Checkpoints: one file holding model, EMA, optimiser, step, RNG and the resolved recipe.

Files are written atomically (temporary file + rename), so a run killed mid-write keeps its
previous checkpoint. They are read with ``torch.load(weights_only=True)``, which refuses
arbitrary pickled objects, so opening a checkpoint never runs code from it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from ..plugins.datasets.base import SceneInfo
from .errors import DataError

FORMAT = "vsd-checkpoint/1"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT, **state}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; DataError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist (give a .pt file or a run directory)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding non-tensor objects
        raise DataError(f"checkpoint {path} cannot be read as a vsd checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"checkpoint {path} is not a vsd checkpoint (expected format {FORMAT!r})")
    state["path"] = str(path)
    return state


def info_to_dict(info: SceneInfo) -> dict:
    return asdict(info)


def info_from_dict(d: dict) -> SceneInfo:
    return SceneInfo(**d)


def recipe_from_state(state: dict) -> dict:
    return yaml.safe_load(state["recipe"])
