"""Checkpoints: one file holding model, EMA, optimiser, step, RNG and the resolved recipe.

Guarantees:
- written to a temporary file, flushed to disk and renamed, so a run killed mid-write keeps its
  previous checkpoint; a SHA-256 sidecar (``.sha256``) is renamed into place after the data, and a
  checkpoint whose checksum does not match is corrupt and never used (one whose sidecar is missing,
  killed between the two renames, is complete and is read);
- the newest ``keep`` checkpoints of a run are kept (``checkpoints/step_XXXXXXXX.pt``) and
  ``checkpoints/last.pt`` is a hard link to the newest;
- read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects, so opening
  a checkpoint never runs code from it;
- a file handed in fails closed: its keys and their types are checked on reading, weights holding
  NaN or Inf are refused, weights are compared with the model's tensor by tensor before they are
  loaded into it (:func:`load_state_checked`), and a run is resumed only with the recipe it was
  trained with, up to the settings listed in :data:`RESUME_MAY_CHANGE`. Every refusal is a
  :class:`~vsd.core.errors.DataError` (or a RecipeError) naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from .contracts import SceneInfo
from .errors import DataError, VsdNotice, short
from .files import temp_beside
from .state_checks import _first_line, _listed, _name, _recipe_yaml, check_info, check_state, check_tensors, describe, refuse_nonfinite

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


def load_checkpoint(path: str | Path, map_location="cpu", *, resume: bool = False) -> dict:
    """Read a checkpoint file, or the newest intact checkpoint of a run directory.

    The state is checked (:func:`check_state`); ``resume`` also requires the optimiser state.
    A corrupt or malformed newest checkpoint in a run directory is reported (a warning naming it)
    and the previous good one is used. Errors are DataErrors naming the file.
    """
    path = Path(path)
    if path.is_dir():
        candidates = run_checkpoints(path)[::-1] or [path / "checkpoints" / "last.pt"]
        errors = []
        for cand in candidates:
            try:
                return _load_file(cand, map_location, resume)
            except DataError as exc:
                errors.append(str(exc))
                warnings.warn(VsdNotice(f"{exc}; trying an older checkpoint"), stacklevel=2)
        raise DataError(f"no intact checkpoint in {path}: " + "; ".join(errors))
    return _load_file(path, map_location, resume)


def _load_file(path: Path, map_location, resume: bool = False) -> dict:
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist (give a .pt file or a run directory)")
    if path.suffix == ".safetensors":  # shipped weights: EMA weights + recipe, no optimiser state
        from .weights import load_weights

        state = load_weights(path)
        if resume:
            raise DataError(f"{describe(path)} holds shipped weights without optimiser state; a run is resumed from its run directory")
        return state
    data = _verify(path)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding non-tensor objects
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise DataError(f"checkpoint {path} cannot be read as a vsd checkpoint ({type(exc).__name__}: {first}); it is refused, nothing in it was run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"checkpoint {path} is not a vsd checkpoint (expected format {FORMAT!r})")
    check_state(state, path, resume=resume)
    state["path"] = str(path)
    return state


# Settings a resumed run may change: how long and how verbosely it trains, where it runs, how it
# samples. Everything else must be what the run was trained with (see check_resume_recipe).
RESUME_MAY_CHANGE = (
    "train.steps", "train.max_minutes", "train.log_every", "train.sample_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.threads", "train.num_workers", "train.nonfinite", "train.max_skipped_steps",
    "train.init_from", "train.memory_limit_gb", "sample", "device", "name",
)


def info_to_dict(info: SceneInfo) -> dict:
    return asdict(info)


def info_from_dict(d: dict, source=None) -> SceneInfo:
    check_info(d, describe(source) if source is not None else "checkpoint")
    return SceneInfo(**d)


def recipe_from_state(state: dict) -> dict:
    return _recipe_yaml(state.get("recipe"), state.get("path", "<checkpoint>"))


# ---- building a model from one --------------------------------------------------------------
def load_state_checked(module: torch.nn.Module, state_dict, source, label: str = "weights", against: str = "the model its recipe builds") -> None:
    """``module.load_state_dict(state_dict)`` once the state dict is known to fit: the same
    tensor names with the same shapes, all finite. Otherwise a DataError naming ``source``, the
    first few mismatching tensors (both shapes) and how many others there are."""
    where = describe(source)
    check_tensors(state_dict, where, label)
    own = module.state_dict()
    wrong = [f"{_name(k)} is {tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the model"
             for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    missing = [_name(k) for k in own if k not in state_dict]
    unexpected = [_name(k) for k in state_dict if k not in own]
    parts = [f"{len(names)} tensor{'s' if len(names) > 1 else ''} {what}: {_listed(names)}" for what, names in (
        ("of the wrong shape", wrong), ("missing from the file", missing), ("the model does not have", unexpected)) if names]
    if parts:
        raise DataError(
            f"{where}: its {label} do not fit {against} ({' / '.join(parts)}); "
            "the weights were trained with other model or plugin settings than that recipe's"
        )
    refuse_nonfinite(state_dict, where, label)
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DataError(f"{where}: its {label} cannot be loaded into {against} ({_first_line(exc)})") from None


def model_from_state(state: dict, ema: bool = True):
    """The :class:`~vsd.core.engine.ViewsetDiffusion` a checkpoint state describes (its embedded
    recipe and scene geometry), holding its EMA (or raw) weights; in train mode, on the CPU."""
    from .models import build_model
    from .recipe import load_recipe_dict

    path = state.get("path", "<checkpoint>")
    recipe = load_recipe_dict(recipe_from_state(state), source=f"{path} (embedded recipe)", budget="sample")
    info = info_from_dict(state.get("info"), path)
    try:
        model = build_model(recipe, info)
    except (ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{describe(path)}: its embedded recipe does not build a model ({type(exc).__name__}: {_first_line(exc)})") from None
    key = "ema" if ema else "model"
    label = "weights" if state.get("model") is state.get("ema") else f"`{key}` weights"
    load_state_checked(model, state.get(key), path, label, against="the model its embedded recipe builds")
    return model


# ---- resuming a run -------------------------------------------------------------------------
class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _flatten(values: dict, prefix: str, out: dict) -> None:
    for k, v in values.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and v:
            _flatten(v, key, out)
        else:
            out[key] = v


def recipe_settings(recipe) -> dict:
    """A validated recipe as flat ``section.key`` -> value, defaults filled in, so that a value
    written out and the same value left to its default compare equal."""
    from .recipe import ENGINE_SECTIONS, SLOT_KEYS

    flat = {"name": recipe.raw.get("name"), "seed": recipe.seed, "device": recipe.device}
    for slot in SLOT_KEYS:
        spec = getattr(recipe, slot)
        if spec is None:  # a paper recipe's network is its `paper` section
            continue
        flat[f"{slot}.type"] = spec.type
        _flatten(spec.settings.model_dump(), slot, flat)
    for sec in ENGINE_SECTIONS:
        if getattr(recipe, sec) is not None:
            _flatten(getattr(recipe, sec).model_dump(), sec, flat)
    if getattr(recipe, "paper", None) is not None:
        _flatten(recipe.paper, "paper", flat)
    return flat


def recipe_changes(old, new) -> list[tuple[str, object, object]]:
    """``(key, old value, new value)`` for each setting in which two validated recipes differ,
    leaving out those in :data:`RESUME_MAY_CHANGE`."""
    a, b = recipe_settings(old), recipe_settings(new)
    out = []
    for key in [*a, *(k for k in b if k not in a)]:
        if any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE):
            continue
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va is not vb and va != vb:
            out.append((key, va, vb))
    return out


def check_resume_recipe(state: dict, recipe, run_dir) -> None:
    """Refuse to resume the run of ``state`` with a ``recipe`` that differs from the one it was
    trained with (its embedded recipe) in anything but :data:`RESUME_MAY_CHANGE`."""
    from .errors import RecipeError
    from .recipe import load_recipe_dict

    path = state.get("path", "<checkpoint>")
    saved = load_recipe_dict(recipe_from_state(state), source=f"{path} (embedded recipe)", budget=None)
    changes = recipe_changes(saved, recipe)
    if not changes:
        return
    shown = "; ".join(f"{k}: {short(va, 40)} in the run, {short(vb, 40)} now" for k, va, vb in changes[:5])
    more = f"; and {len(changes) - 5} more" if len(changes) > 5 else ""
    may = ", ".join(p if "." in p or p in ("device", "name") else f"{p}.*" for p in RESUME_MAY_CHANGE)
    raise RecipeError(
        recipe.source, None,
        f"differs from the recipe the run in {run_dir} was trained with ({describe(path)}) in "
        f"{len(changes)} setting{'s' if len(changes) > 1 else ''} ({shown}{more}); only {may} may change "
        f"when resuming. Resume with {Path(run_dir) / 'recipe.yaml'}, changing only those, or train into another --out",
    )
