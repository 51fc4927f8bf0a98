"""What a checkpoint or weights file must hold, checked on reading: keys, kinds, scene geometry,
finite weights, and the embedded recipe parsed by the bounded YAML reader. Every refusal is a
:class:`~vsd.core.errors.DataError` naming the file and the key."""

from __future__ import annotations

import math
from dataclasses import MISSING, fields
from pathlib import Path

import torch
import yaml

from .contracts import SceneInfo
from .errors import DataError, clip, short

STATE_KEYS = ("model", "ema", "recipe", "info", "step")
SCENE_INFO_CHOICES = {"up_axis": ("y", "z"), "background": ("white", "black", "random")}
SHOWN = 3  # names an error lists before counting the rest

def describe(path) -> str:
    """How errors name a file: ``weights file P`` or ``checkpoint P``."""
    p = Path(str(path))
    return f"weights file {p}" if p.suffix == ".safetensors" else f"checkpoint {p}"


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:limit] if text else "") or type(exc).__name__


def _name(key) -> str:
    return clip(str(key), 80)


def _listed(items: list[str]) -> str:
    """The first few of ``items``, then how many others there are."""
    rest = len(items) - SHOWN
    return "; ".join(items[:SHOWN]) + (f"; and {rest} other{'s' if rest > 1 else ''}" if rest > 0 else "")


def _recipe_yaml(text, path, label: str = "`recipe`") -> dict:
    """The recipe embedded in the file at ``path`` (YAML text), parsed into a mapping by the
    bounded reader of :mod:`vsd.core.safe_yaml`.

    Every embedded recipe is read here. Errors are DataErrors naming the file and ``label``."""
    from .safe_yaml import YamlRefused, describe_yaml_error, parse_yaml

    where = describe(path)
    if not isinstance(text, str):
        raise DataError(f"{where}: {label} is of type {type(text).__name__}, not the recipe's YAML text; the file is refused")
    try:
        data = parse_yaml(text)
    except YamlRefused as exc:
        raise DataError(f"{where}: {label} is not accepted: {clip(str(exc), 200)}; the file is refused") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{where}: {label} is {describe_yaml_error(exc)}; the file is refused") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise DataError(f"{where}: {label} cannot be read as YAML ({type(exc).__name__}: {_first_line(exc)}); the file is refused") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: {label} is YAML of type {type(data).__name__} ({short(data)}), not a mapping of recipe sections; the file is refused")
    return data


def check_tensors(state_dict, where: str, label: str) -> None:
    """``state_dict`` is a mapping of names to tensors, or a DataError saying what it is."""
    if not isinstance(state_dict, dict):
        raise DataError(f"{where}: {label} is of type {type(state_dict).__name__}, not a state dict (a mapping of names to tensors); the file is refused")
    bad = [f"key {short(k, 40)} is not a name" if not isinstance(k, str) else f"{_name(k)} is of type {type(v).__name__}"
           for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"{where}: {label} is not a state dict of tensors ({_listed(bad)}); the file is refused")


def nonfinite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or an Inf."""
    return [k for k, v in state_dict.items()
            if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all())]


def refuse_nonfinite(state_dict: dict, where: str, label: str) -> None:
    bad = nonfinite_tensors(state_dict)
    if bad:
        raise DataError(
            f"{where}: {label} hold NaN or Inf in {len(bad)} tensor{'s' if len(bad) > 1 else ''} ({_listed([_name(k) for k in bad])}); "
            "a model with non-finite weights gives no meaningful samples or scores, so the file is refused"
        )


def check_info(info, where: str, label: str = "`info`") -> None:
    """``info`` is a mapping of :class:`SceneInfo` fields with values of the right kind."""
    known = {f.name: f for f in fields(SceneInfo)}
    if not isinstance(info, dict):
        raise DataError(f"{where}: {label} is of type {type(info).__name__} ({short(info)}), not a mapping of the scene geometry ({', '.join(known)})")
    missing = [n for n, f in known.items() if f.default is MISSING and n not in info]
    unknown = [_name(k) for k in info if k not in known]
    if missing or unknown:
        what = "; ".join(s for s in (f"lacks {', '.join(missing)}" if missing else "", f"has unknown {', '.join(unknown[:5])}" if unknown else "") if s)
        raise DataError(f"{where}: {label} {what} (scene geometry has {', '.join(known)})")
    for name, value in info.items():
        choices = SCENE_INFO_CHOICES.get(name)
        if choices is not None:
            if not isinstance(value, str) or value not in choices:
                raise DataError(f"{where}: {label} `{name}` is {short(value)}; expected one of {', '.join(choices)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{where}: {label} `{name}` is {short(value)}; expected a finite number")


def _check_optimizer(opt, where: str) -> None:
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise DataError(f"{where}: `optimizer` is not an optimiser state (a mapping with `state` and `param_groups`); the run cannot be resumed from it")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"]):
        raise DataError(f"{where}: `optimizer` has a parameter group that is not a mapping with a `params` list; the run cannot be resumed from it")
    tensors = {}
    for idx, entry in opt["state"].items():
        if not isinstance(entry, dict):
            raise DataError(f"{where}: `optimizer` state of parameter {_name(idx)} is of type {type(entry).__name__}, not a mapping; the run cannot be resumed from it")
        tensors.update({f"{idx}.{k}": v for k, v in entry.items() if isinstance(v, torch.Tensor)})
    refuse_nonfinite(tensors, where, "`optimizer` state tensors")


def check_state(state: dict, path, *, resume: bool = False) -> None:
    """A checkpoint's state holds what loading it needs, of the right kinds (``resume``: also
    the optimiser state). Errors are DataErrors naming the file and the key."""
    where = describe(path)
    need = STATE_KEYS + (("optimizer",) if resume else ())
    missing = [k for k in need if k not in state]
    if missing:
        what = "to resume a run from" if resume else "to load a model from"
        raise DataError(f"{where} lacks {', '.join(f'`{k}`' for k in missing)}, which a vsd checkpoint holds {what} ({', '.join(need)}); the file is refused")
    for key in ("model", "ema"):
        check_tensors(state[key], where, f"`{key}`")
    _recipe_yaml(state["recipe"], path)
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DataError(f"{where}: `step` is {short(step)}, not a non-negative integer; the file is refused")
    check_info(state["info"], where)
    if resume:
        _check_optimizer(state["optimizer"], where)
    refuse_nonfinite(state["ema"], where, "`ema` weights")
    if state["model"] is not state["ema"]:
        refuse_nonfinite(state["model"], where, "`model` weights")


