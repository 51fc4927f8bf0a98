"""Reading a released original experiment folder (szymanowiczs/viewset-diffusion), safely.

A released experiment is a folder holding

- ``.hydra/config.yaml``: the composed hydra/OmegaConf config of the training run (sections
  ``wandb``, ``general``, ``data``, ``eval``, ``model``, ``optimization``, ``render``); read with
  vsd's bounded safe YAML reader, so no Python tags are constructed;
- ``model.pth``: what the original's ``train.py`` writes every ``optimization.save_every``
  iterations, ``torch.save({"diffuser": ema.ema_model.state_dict(), "optimizer":
  optimizer.state_dict(), "iteration": iteration})`` (its ``model_<N>.pth`` snapshots lack the
  ``"optimizer"`` entry). ``"diffuser"`` is the EMA copy of the whole diffusion wrapper, its keys
  prefixed ``_module.module.`` by the training wrappers; ``"iteration"`` is the 0-based training
  iteration at which it was saved.

``model.pth`` is loaded with ``torch.load(weights_only=True)``: a file that needs any Python
object other than tensors and plain containers is refused without being unpickled. Every refusal
is an :class:`~vsd.core.paper.convert.OriginalCheckpointError` naming the file (and key).
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import clip
from ..safe_yaml import read_yaml_file
from .convert import OriginalCheckpointError

CONFIG_NAME = os.path.join(".hydra", "config.yaml")
WEIGHTS_NAME = "model.pth"
# top-level entries of model.pth besides "diffuser" and "iteration" that the original writes;
# they are checked to be plain data and then ignored
TOLERATED_EXTRA_KEYS = ("optimizer",)
_PLAIN_SCALARS = (str, int, float, bool, type(None))
_MAX_PLAIN_DEPTH = 16


@dataclass
class OriginalExperiment:
    """A released original experiment, read and checked by :func:`read_original_experiment`.

    ``config`` is ``.hydra/config.yaml`` as a dict; ``state_dict`` the ``"diffuser"`` entry of
    ``model.pth`` as saved (keys still carry ``_module.module.``; pass it to
    :meth:`PaperDenoiser.from_original_checkpoint <vsd.core.paper.PaperDenoiser.from_original_checkpoint>`
    together with ``config``); ``iteration`` the training iteration it was saved at."""

    folder: Path
    config: dict
    state_dict: dict[str, Tensor]
    iteration: int


def read_original_experiment(folder: str | os.PathLike) -> OriginalExperiment:
    """The config, EMA weights and iteration of the released experiment in ``folder``.

    ``folder/.hydra/config.yaml`` must be a YAML mapping (safe subset only: a ``!!python/...``
    tag is refused). ``folder/model.pth`` must be a torch file that loads with
    ``weights_only=True`` (anything pickled other than tensors and plain containers is refused,
    never unpickled) and hold a dict with

    - ``"diffuser"``: a mapping of str -> tensor, at least one entry, every floating tensor finite;
    - ``"iteration"``: an int >= 0;
    - optionally ``"optimizer"`` (the Adam state the original's ``model.pth`` carries): tolerated
      only if it is plain data (dicts, lists, tuples, str, int, float, bool, None and tensors,
      nested at most 16 deep), and ignored;

    and nothing else. Raises :class:`OriginalCheckpointError` naming the file (and key) and
    what was expected.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OriginalCheckpointError(
            f"original experiment folder {folder} {what}: expected the folder of a released "
            f"experiment, holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = _read_config(folder / CONFIG_NAME)
    checkpoint = _load_weights(folder / WEIGHTS_NAME)
    state_dict, iteration = _check_checkpoint(checkpoint, folder / WEIGHTS_NAME)
    return OriginalExperiment(folder=folder, config=config, state_dict=state_dict, iteration=iteration)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        what = "is not a file" if path.exists() else "is missing"
        raise OriginalCheckpointError(
            f"original experiment config {path} {what}: a released experiment folder holds the "
            f"training run's hydra config at {CONFIG_NAME}")
    config = read_yaml_file(path, what="original experiment config", error=OriginalCheckpointError)
    if not isinstance(config, dict):
        raise OriginalCheckpointError(
            f"original experiment config {path}: is a YAML {_kind(config)}, expected a mapping of "
            "sections (model, render, data, ...)")
    bad_keys = [k for k in config if not isinstance(k, str)]
    if bad_keys:
        raise OriginalCheckpointError(
            f"original experiment config {path}: has top-level keys that are not strings "
            f"({', '.join(clip(repr(k), 40) for k in bad_keys[:3])}); expected section names")
    return config


def _load_weights(path: Path):
    if not path.is_file():
        what = "is not a file" if path.exists() else "is missing"
        raise OriginalCheckpointError(
            f"original checkpoint {path} {what}: a released experiment folder holds the EMA "
            f"weights in {WEIGHTS_NAME} next to {CONFIG_NAME}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise OriginalCheckpointError(
            f"original checkpoint {path}: {_refusal(exc)}; torch's weights-only loader refused it "
            f"before constructing any such object, and it is not loaded otherwise. A released "
            f"{WEIGHTS_NAME} holds only tensors and plain data (a dict with \"diffuser\" and "
            "\"iteration\"), so this file is refused") from None
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            ImportError, IndexError, MemoryError, OverflowError, RecursionError,
            UnicodeDecodeError) as exc:
        text = (str(exc).strip().splitlines() or [""])[0]
        detail = f"{type(exc).__name__}: {clip(text, 160)}" if text else type(exc).__name__
        raise OriginalCheckpointError(
            f"original checkpoint {path}: cannot be read as a torch file ({detail}); expected the "
            f"{WEIGHTS_NAME} that the original's train.py writes with torch.save") from None


def _refusal(exc: BaseException) -> str:
    """What torch's weights-only loader objected to, without its advice to load unsafely."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"holds a pickled Python object (`{clip(found.group(1), 120)}`) other than tensors "
                "and plain containers")
    lines = [ln.strip() for ln in text.splitlines()]
    for line in lines:
        if re.match(r"(Unsupported|unsupported|Can only|Unexpected|Not a|Invalid)", line):
            return f"is not a weights-only torch file ({clip(line, 160)})"
    return "is not a weights-only torch file (it needs unpickling of Python objects other than tensors)"


def _check_checkpoint(checkpoint, path: Path) -> tuple[dict[str, Tensor], int]:
    if not isinstance(checkpoint, dict):
        raise OriginalCheckpointError(
            f"original checkpoint {path}: holds {_describe(checkpoint)}, expected a dict with "
            "\"diffuser\" (the EMA state dict) and \"iteration\"")
    missing = [k for k in ("diffuser", "iteration") if k not in checkpoint]
    if missing:
        raise OriginalCheckpointError(
            f"original checkpoint {path}: lacks the key{'s' if len(missing) > 1 else ''} "
            f"{', '.join(f'`{k}`' for k in missing)}; expected a dict with \"diffuser\" (the EMA "
            f"state dict) and \"iteration\" (an int), as the original's train.py saves "
            f"(it has: {_keys(checkpoint)})")
    extra = [k for k in checkpoint if k not in ("diffuser", "iteration", *TOLERATED_EXTRA_KEYS)]
    if extra:
        raise OriginalCheckpointError(
            f"original checkpoint {path}: has unexpected top-level key{'s' if len(extra) > 1 else ''} "
            f"{', '.join(f'`{clip(str(k), 60)}`' for k in extra[:5])}; expected only \"diffuser\", "
            f"\"iteration\" and optionally \"optimizer\"")
    for key in TOLERATED_EXTRA_KEYS:
        if key in checkpoint:
            problem = _not_plain(checkpoint[key])
            if problem:
                raise OriginalCheckpointError(
                    f"original checkpoint {path}, key `{key}`: {problem}; expected plain data "
                    "(dicts, lists, tuples, numbers, strings and tensors), as the optimizer's "
                    "state_dict the original saves")
    iteration = checkpoint["iteration"]
    if type(iteration) is not int or iteration < 0:
        raise OriginalCheckpointError(
            f"original checkpoint {path}, key `iteration`: is {_describe(iteration)}, expected an "
            "int >= 0 (the training iteration it was saved at)")
    return _check_state(checkpoint["diffuser"], path), iteration


def _check_state(state, path: Path) -> dict[str, Tensor]:
    where = f"original checkpoint {path}, key `diffuser`"
    if not isinstance(state, Mapping):
        raise OriginalCheckpointError(
            f"{where}: is {_describe(state)}, expected a mapping of parameter names to tensors "
            "(the EMA diffusion model's state_dict)")
    if not state:
        raise OriginalCheckpointError(f"{where}: is empty, expected the EMA diffusion model's state_dict")
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise OriginalCheckpointError(
                f"{where}: has a key {clip(repr(name), 60)} of type {type(name).__name__}, "
                "expected parameter names (str)")
        if not isinstance(value, Tensor):
            raise OriginalCheckpointError(
                f"{where}, entry `{clip(name, 160)}`: is {_describe(value)}, expected a tensor")
        if value.layout != torch.strided or value.is_quantized:
            raise OriginalCheckpointError(
                f"{where}, entry `{clip(name, 160)}`: is a {value.layout} "
                f"{'quantized ' if value.is_quantized else ''}tensor, expected a dense tensor")
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise OriginalCheckpointError(
                    f"{where}, entry `{clip(name, 160)}`: has {bad:,} non-finite value"
                    f"{'s' if bad > 1 else ''} (NaN or inf) of {value.numel():,}; expected finite "
                    "weights (a diverged or damaged checkpoint)")
        out[name] = value
    return out


def _not_plain(value) -> str | None:
    """Why ``value`` is not plain data (None if it is), checked without recursion."""
    stack = [(value, 0, "")]
    while stack:
        node, depth, at = stack.pop()
        where = f" at {clip(at, 80)}" if at else ""
        if depth > _MAX_PLAIN_DEPTH:
            return f"nests more than {_MAX_PLAIN_DEPTH} levels deep{where}"
        if isinstance(node, Tensor):
            continue
        if type(node) in _PLAIN_SCALARS:
            continue
        if type(node) in (dict, OrderedDict):
            for k, v in node.items():
                if type(k) not in (str, int):
                    return f"has a key of type {type(k).__name__}{where}"
                stack.append((v, depth + 1, f"{at}[{k!r}]"))
            continue
        if type(node) in (list, tuple):
            stack.extend((v, depth + 1, f"{at}[{i}]") for i, v in enumerate(node))
            continue
        return f"holds a {type(node).__module__}.{type(node).__qualname__}{where}"
    return None


def _kind(value) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    if value is None:
        return "null (empty document)"
    return type(value).__name__


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{clip(repr(value), 60)} (of type {type(value).__name__})"


def _keys(mapping: Mapping) -> str:
    keys = [f"`{clip(str(k), 40)}`" for k in list(mapping)[:6]]
    return ", ".join(keys) + (" and more" if len(mapping) > 6 else "") if keys else "no keys"


__all__ = ["OriginalExperiment", "read_original_experiment"]
