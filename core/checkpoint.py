"""Checkpoints: one file holding model, EMA, optimiser, step, RNG and the resolved recipe.

Guarantees:
- written to a temporary file, flushed to disk and renamed, so a run killed mid-write keeps its
  previous checkpoint; a SHA-256 sidecar (``.sha256``) is renamed into place after the data, and a
  checkpoint whose checksum does not match is corrupt and never used (one whose sidecar is missing,
  killed between the two renames, is complete and is read);
- the newest ``keep`` checkpoints of a run are kept (``checkpoints/step_XXXXXXXX.pt``) and
  ``checkpoints/last.pt`` is a hard link to the newest;
- read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects, so opening
  a checkpoint never runs code from it.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from .contracts import SceneInfo
from .errors import DataError
from .files import temp_beside

FORMAT = "vsd-checkpoint/1"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = temp_beside(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically, with its checksum beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    data = buf.getvalue()
    _atomic_write(path, data)
    _atomic_write(_sidecar(path), hashlib.sha256(data).hexdigest().encode())
    return path


def save_run_checkpoint(run_dir: str | Path, state: dict, keep: int = 3) -> Path:
    """``checkpoints/step_N.pt`` + ``last.pt`` (hard link, or copy where links are unsupported),
    dropping all but the newest ``keep``."""
    ckdir = Path(run_dir) / "checkpoints"
    path = save_checkpoint(ckdir / f"step_{int(state['step']):08d}.pt", state)
    last = ckdir / "last.pt"
    for src, dst in ((path, last), (_sidecar(path), _sidecar(last))):
        tmp = dst.with_name(f".{dst.name}.link")
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)
    for old in run_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        _sidecar(old).unlink(missing_ok=True)
    return path


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's step checkpoints, oldest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verify(path: Path) -> bytes:
    side = _sidecar(path)
    data = path.read_bytes()
    if side.exists():
        want = side.read_text().strip()
        if hashlib.sha256(data).hexdigest() != want:
            raise DataError(f"checkpoint {path} is corrupt or incomplete: its SHA-256 does not match {side.name}")
    return data


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint file, or the newest intact checkpoint of a run directory.

    A corrupt newest checkpoint in a run directory is reported (a warning naming it) and the
    previous good one is used. Errors are DataErrors naming the file.
    """
    path = Path(path)
    if path.is_dir():
        candidates = run_checkpoints(path)[::-1] or [path / "checkpoints" / "last.pt"]
        errors = []
        for cand in candidates:
            try:
                return _load_file(cand, map_location)
            except DataError as exc:
                errors.append(str(exc))
                warnings.warn(f"{exc}; trying an older checkpoint", stacklevel=2)
        raise DataError(f"no intact checkpoint in {path}: " + "; ".join(errors))
    return _load_file(path, map_location)


def _load_file(path: Path, map_location) -> dict:
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist (give a .pt file or a run directory)")
    if path.suffix == ".safetensors":  # shipped weights: EMA weights + recipe, no optimiser state
        from .weights import load_weights

        return load_weights(path)
    data = _verify(path)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding non-tensor objects
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise DataError(f"checkpoint {path} cannot be read as a vsd checkpoint ({type(exc).__name__}: {first}); it is refused, nothing in it was run") from None
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
