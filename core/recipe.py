"""YAML recipes: which plugin fills each slot, with its settings, plus the engine's settings.

A recipe is a YAML mapping. Plugin slots (``data``, ``encoder``, ``aggregator``,
``representation``, ``renderer``) are a ``type`` (a registry name) beside that plugin's settings.
Engine sections (``model``, ``diffusion``, ``train``, ``sample``) are settings only. A recipe may
``extends:`` another (a path relative to it, or the name of a shipped recipe); command-line
overrides ``a.b.c=value`` (value parsed as YAML) apply last. Everything is validated against the
plugins' settings schemas before anything heavy runs.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from .errors import PluginError, RecipeError, clip, short
from .registry import Registry, get_registry
from .safe_yaml import YamlRefused, parse_yaml, read_yaml_file
from .settings import Seed, Settings

# recipe key -> registry slot
SLOT_KEYS = {
    "data": "dataset",
    "encoder": "encoder",
    "aggregator": "aggregator",
    "representation": "representation",
    "renderer": "renderer",
}

SHIPPED_RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"


class TrainSettings(Settings):
    steps: int = Field(1000, ge=0, description="number of optimiser steps")
    batch_size: int = Field(4, ge=1, description="viewsets per step, per process")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate")
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the gradient norm (null: off)")
    ema_decay: float = Field(0.995, ge=0, lt=1, description="EMA of the weights used for sampling")
    heldout_views: int = Field(
        1, ge=0, description="views of each item kept out of the denoiser's input and only rendered for the loss"
    )
    heldout_weight: float = Field(0.1, ge=0, description="loss weight of the held-out views")
    colour_augment: float = Field(
        0.0, ge=0, le=1,
        description="probability per training viewset of rotating all its views' colours by one random angle about the grey axis",
    )
    mirror_augment: float = Field(
        0.0, ge=0, le=1,
        description="probability per training viewset of mirroring it: every view flipped left-right and every camera "
        "reflected through the world plane normal to train.mirror_axis (a consistent viewset of the mirrored object)",
    )
    mirror_axis: Literal["x", "y", "z"] = Field(
        "y", description="the world axis normal to the plane the objects are symmetric about (TORCS cars: y; front +x, z up)"
    )
    clean_weight: float = Field(1.0, ge=0, description="loss weight of the clean input views (1: their weight at t = 0)")
    own_views_prob: float = Field(
        0.0, ge=0, le=1,
        description="probability, in a step that runs the self-conditioning pass, that the noisy input views are noised from "
        "the model's own estimate made at a higher noise level instead of from the truth, as they are while sampling",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: a constant learning rate, or a cosine decay to lr * min_lr_ratio at train.steps"
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate of the cosine schedule, as a fraction of lr")
    cond_probs: list[float] = Field(
        [0.2, 0.5, 0.3],
        min_length=1,
        max_length=1024,
        description="probability of 0, 1, 2, ... clean conditioning views in a training viewset",
    )
    deterministic: bool = Field(
        False,
        description="train without noise (the 'w/o diffusion' baseline): conditioning views clean, the others replaced by zeros at the last timestep",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast precision of the forward pass (fp16 adds gradient scaling)")
    grad_accum: int = Field(1, ge=1, description="split each process's batch into this many micro-batches (same result, less memory)")
    init_from: str | None = Field(
        None,
        description="start from another model's weights (a checkpoint, run directory, weights file or shipped model name): every tensor whose name and shape match is copied, the rest start fresh",
    )
    compile: bool = Field(False, description="torch.compile the denoiser (its per-view encoding and its decoding halves)")
    compile_backend: str = Field("inductor", description="torch.compile backend")
    nonfinite: Literal["skip", "stop"] = Field("skip", description="a NaN/Inf loss or gradient: skip that step, or stop the run")
    max_skipped_steps: int = Field(10, ge=0, description="stop after this many non-finite steps in a row")
    keep_checkpoints: int = Field(3, ge=1, description="newest step checkpoints kept in checkpoints/")
    max_minutes: float | None = Field(None, gt=0, description="stop (with a checkpoint) after this much wall time, even before train.steps")
    num_workers: int = Field(0, ge=0, le=256, description="data-loader worker processes")
    threads: int | None = Field(None, ge=1, le=4096, description="torch CPU threads (null: torch's default)")
    log_every: int = Field(10, ge=1, description="steps between progress/log lines")
    sample_every: int = Field(250, ge=1, description="steps between sample grids")
    checkpoint_every: int = Field(250, ge=1, description="steps between checkpoints")
    memory_limit_gb: float | None = Field(
        None,
        gt=0,
        description="memory (GiB) one training or sampling step may be estimated to need before the recipe is refused "
        "(null: the machine's physical memory, or the GPU's for device cuda)",
    )

    @field_validator("cond_probs")
    @classmethod
    def _probabilities(cls, v: list[float]) -> list[float]:
        bad = [p for p in v if not 0.0 <= p <= 1.0]
        if bad:
            raise ValueError(f"each probability must lie in [0, 1], got {short(bad[0])}")
        return v


class SampleSettings(Settings):
    num_samples: int = Field(4, ge=1, description="samples drawn per input")
    cond_views: int = Field(1, ge=0, description="clean conditioning views when sampling from the dataset")
    turntable_frames: int = Field(24, ge=2, description="frames in a turntable")
    turntable_elevation: float = Field(20.0, gt=-90, lt=90, description="camera elevation of turntables, degrees")
    render_size: int | None = Field(None, ge=8, description="pixel size of turntable frames (null: the data's)")


ENGINE_SECTIONS = ("model", "diffusion", "train", "sample")
# `paper`: the released network of the paper, described by the original experiment config's own
# `model`, `render` and `data` sections (vsd.core.paper); it replaces the plugin slots and `model`
PAPER_SECTION = "paper"
PAPER_REPLACES = ("encoder", "aggregator", "representation", "renderer", "model")
TOP_LEVEL = {"extends", "name", "seed", "device", *SLOT_KEYS, *ENGINE_SECTIONS, PAPER_SECTION}


class TopSettings(Settings):
    name: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the run's name (runs/<name>): letters, digits, '.', '_' and '-', not starting with '.' or '-'",
    )
    seed: Seed = Field(0, description="random seed, 0 <= seed < 2**63")
    device: Literal["auto", "cpu", "cuda"] | str = "auto"


def _engine_schemas() -> dict[str, type[Settings]]:
    from .denoiser import ModelSettings
    from .schedule import DiffusionSettings

    return {"model": ModelSettings, "diffusion": DiffusionSettings, "train": TrainSettings, "sample": SampleSettings}


@dataclass
class PluginSpec:
    """A slot filled by a plugin: its registry name, class and validated settings."""

    type: str
    cls: type
    settings: Settings
    provider: str

    def build(self, **context):
        return self.cls(self.settings, **context)


@dataclass
class Recipe:
    """A validated recipe. ``raw`` is the fully resolved mapping (extends and overrides applied).

    A paper recipe (one with a ``paper`` section) has no encoder, aggregator, representation,
    renderer or model settings (None): the ``paper`` mapping describes the whole network."""

    source: str
    raw: dict
    name: str
    seed: int
    device: str
    data: PluginSpec
    encoder: PluginSpec | None
    aggregator: PluginSpec | None
    representation: PluginSpec | None
    renderer: PluginSpec | None
    model: Settings | None
    diffusion: Settings
    train: TrainSettings
    sample: SampleSettings
    paper: dict | None = None

    @property
    def is_paper(self) -> bool:
        return self.paper is not None

    def dump(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


# ---- loading -------------------------------------------------------------------------------
def find_recipe(ref: str | Path) -> Path:
    """A recipe file: ``ref`` as a path, else a recipe shipped with vsd of that name."""
    p = Path(ref)
    if p.is_file():
        return p
    for cand in (SHIPPED_RECIPES / p.name, SHIPPED_RECIPES / f"{p.name}.yaml"):
        if cand.is_file():
            return cand
    shipped = ", ".join(shipped_recipes()) or "none"
    raise RecipeError(str(ref), None, f"no such file, and no shipped recipe of that name (shipped: {shipped})")


def shipped_recipes() -> list[str]:
    return sorted(p.name for p in SHIPPED_RECIPES.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    data = read_yaml_file(path, what="recipe", error=RecipeError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), None, f"expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` onto ``base``; nested mappings merge, a changed plugin ``type`` drops the old settings."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if "type" in v and v["type"] != out[k].get("type"):
                out[k] = copy.deepcopy(v)
            else:
                out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


MAX_EXTENDS = 32  # recipes in one extends chain


def resolve(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The recipe at ``path`` with its ``extends`` chain merged in."""
    path = path.resolve()
    if path in _seen:
        raise RecipeError(str(path), "extends", "recipes extend each other in a cycle: " + " -> ".join(map(str, _seen + (path,))))
    if len(_seen) >= MAX_EXTENDS:
        raise RecipeError(str(_seen[0]), "extends", f"the extends chain is more than {MAX_EXTENDS} recipes long (at {path})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(str(path), "extends", f"expected a recipe path or name, got {short(parent)}")
    try:
        cand = path.parent / parent
        base_path = cand if cand.is_file() else find_recipe(parent)
    except RecipeError as exc:
        raise RecipeError(str(path), "extends", f"{short(parent)}: {exc.detail}") from None
    except (OSError, ValueError) as exc:  # e.g. a name too long for the file system, or a NUL
        raise RecipeError(str(path), "extends", f"{short(parent)} cannot be a recipe path ({type(exc).__name__})") from None
    base = resolve(base_path, _seen + (path,))
    base.pop("name", None)  # a recipe's run is named after itself, not after the recipe it extends
    return deep_merge(base, data)


MAX_KEY_CHARS = 200  # of an override's key path


def shown_override(override: str) -> str:
    """An override as quoted in a message: cut short, and only printable text."""
    return clip(override.encode("utf-8", "backslashreplace").decode("utf-8"), 120)


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML, within the safe reader's limits;
    text that is not valid YAML is taken as a string)."""
    out = copy.deepcopy(data)
    for ov in overrides:
        key, sep, text = ov.partition("=")
        shown = shown_override(ov)
        if not sep or not key.strip():
            raise RecipeError(source, None, "expected an override of the form key.path=value", override=shown)
        try:
            ov.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on the command line
            raise RecipeError(source, None, "is not UTF-8 text", override=shown) from None
        key = key.strip()
        if len(key) > MAX_KEY_CHARS:
            raise RecipeError(source, None, f"the key path is {len(key):,} characters long; keys are at most {MAX_KEY_CHARS}", override=shown)
        parts = key.split(".")
        if not all(parts):
            raise RecipeError(source, clip(key), "expected dot-separated key names, e.g. train.steps=100", override=shown)
        try:
            value = parse_yaml(text) if text.strip() else None
        except YamlRefused as exc:
            raise RecipeError(source, key, f"the value {exc}", override=shown) from None
        except yaml.YAMLError:
            value = text
        except RecursionError:
            raise RecipeError(source, key, "the value nests too deeply to be read", override=shown) from None
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(source, ".".join(parts[: i + 1]), f"is {short(nxt)}, not a section, so `{key}` cannot be set", override=shown)
            node = nxt
        if parts[-1] == "type" and node.get("type") != value and len(parts) == 2:
            node.clear()  # switching plugin: the old plugin's settings do not apply
        node[parts[-1]] = value
    return out


def load_recipe(ref: str | Path, overrides: list[str] | None = None, registry: Registry | None = None) -> Recipe:
    """Find, resolve, override and validate a recipe."""
    path = find_recipe(ref)
    raw = apply_overrides(resolve(path), overrides or [], str(path))
    try:
        return validate(raw, str(path), registry or get_registry())
    except RecipeError as exc:
        ov = _override_of(exc.key, overrides or [], exc.detail)
        raise (exc.from_override(shown_override(ov)) if ov else exc) from None


def _override_of(key: str | None, overrides: list[str], detail: str = "") -> str | None:
    """The last override that set ``key`` (or a section holding it, or a key inside it), else
    the last that set the other value a value was checked against (``must exceed data.near (2.0)``)."""
    if not key:
        return None
    key = key.removeprefix("<top level>.")
    for ov in reversed(overrides):
        k = ov.partition("=")[0].strip()
        if k == key or key.startswith(k + ".") or k.startswith(key + "."):
            return ov
    for ov in reversed(overrides):
        k = ov.partition("=")[0].strip()
        if "." in k and re.search(r"(?<![\w.`])" + re.escape(k) + r" \(", detail):
            return ov
    return None


def _closest(name: str, choices, prefix: str = "") -> str:
    """`` (did you mean `prefix.x`?)`` for the nearest valid name, or nothing."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{prefix}{close[0]}`?)" if close else ""


def load_recipe_dict(
    raw: dict, source: str = "<recipe>", registry: Registry | None = None, *, budget: Literal["train", "sample"] | None = "train"
) -> Recipe:
    """Validate a recipe mapping (e.g. one embedded in a checkpoint). ``budget`` is what its
    memory is checked for: ``"train"`` (a training step and sampling), ``"sample"`` (sampling
    only: a model trained elsewhere may sample on a smaller machine) or None (not checked)."""
    return validate(copy.deepcopy(raw), source, registry or get_registry(), budget=budget)


# ---- validation ----------------------------------------------------------------------------
def _fmt_validation(source: str, section: str, exc: ValidationError, schema: type[Settings]) -> RecipeError:
    err = exc.errors()[0]
    loc = clip(".".join(str(p) for p in err["loc"]))
    key = (loc if section == "<top level>" else f"{section}.{loc}") if loc else section
    kind = err["type"]
    if kind == "extra_forbidden":
        known = ", ".join(schema.model_fields) or "none"
        msg = f"unknown key `{loc}`{_closest(loc.split('.')[0], schema.model_fields, section + '.' if section != '<top level>' else '')}; expected one of: {known}"
    elif kind == "missing":
        msg = f"missing required value ({_describe(schema, loc)})"
    else:
        msg = clip(err["msg"].removeprefix("Value error, ").rstrip("."), 240)
        if " got " not in msg:  # a validator's own message may say what it got
            msg += f"; got {short(err.get('input'))}"
        desc = _describe(schema, loc)
        if desc:
            msg += f" ({desc})"
    more = len(exc.errors()) - 1
    if more:
        msg += f" — and {more} more problem{'s' if more > 1 else ''} in `{section}`"
    return RecipeError(source, key, msg)


def _describe(schema: type[Settings], loc: str) -> str:
    f = schema.model_fields.get(loc.split(".")[0])
    return (f.description or "") if f else ""


def _settings(schema: type[Settings], values: dict, source: str, section: str) -> Settings:
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        raise _fmt_validation(source, section, exc, schema) from None


def _plugin(raw: dict, key: str, source: str, registry: Registry) -> PluginSpec:
    block = raw.get(key)
    if block is None:
        raise RecipeError(source, key, f"missing section; expected `{key}: {{type: <name>, ...settings}}` with a {SLOT_KEYS[key]} from: {registry.available(SLOT_KEYS[key])}")
    if not isinstance(block, dict):
        raise RecipeError(source, key, f"expected a mapping with a `type`, got {short(block)}")
    name = block.get("type")
    if not isinstance(name, str):
        raise RecipeError(source, f"{key}.type", f"missing or not a name (got {short(name)}); available: {registry.available(SLOT_KEYS[key])}")
    try:
        info = registry.get(SLOT_KEYS[key], name)
    except PluginError as exc:
        raise RecipeError(source, f"{key}.type", clip(str(exc), 400)) from None
    settings = _settings(info.cls.Settings, {k: v for k, v in block.items() if k != "type"}, source, key)
    return PluginSpec(name, info.cls, settings, info.provider)


def validate(raw: dict, source: str, registry: Registry, *, budget: Literal["train", "sample"] | None = "train") -> Recipe:
    """A :class:`Recipe` from a resolved mapping, or a RecipeError naming the first bad key;
    last, the estimated memory of ``budget`` (see :func:`vsd.core.budget.check_budget`)."""
    for key in raw:
        if key not in TOP_LEVEL:
            raise RecipeError(source, clip(str(key)), f"unknown section{_closest(clip(str(key)), TOP_LEVEL - {'extends'})}; expected one of: {', '.join(sorted(TOP_LEVEL - {'extends'}))}")
    top = _settings(TopSettings, {k: raw[k] for k in ("name", "seed", "device") if k in raw}, source, "<top level>")
    paper = raw.get(PAPER_SECTION)
    if paper is not None:
        return _validate_paper(raw, source, registry, top, budget)
    plugins = {key: _plugin(raw, key, source, registry) for key in SLOT_KEYS}
    engine = {}
    for sec, schema in _engine_schemas().items():
        block = raw.get(sec) or {}
        if not isinstance(block, dict):
            raise RecipeError(source, sec, f"expected a mapping of settings, got {short(block)}")
        engine[sec] = _settings(schema, block, source, sec)
    rep, ren = plugins["representation"], plugins["renderer"]
    if rep.cls.kind not in ren.cls.accepts:
        fits = [n for n, i in registry.plugins["renderer"].items() if rep.cls.kind in i.cls.accepts]
        raise RecipeError(
            source,
            "renderer.type",
            f"renderer {ren.type!r} draws {', '.join(ren.cls.accepts)} representations, but representation "
            f"{rep.type!r} is a {rep.cls.kind}; use one of: {', '.join(sorted(fits)) or 'none installed'}",
        )
    _check_cross(raw, source, plugins, engine)
    recipe = Recipe(source, raw, _run_name(top, source), top.seed, top.device, **plugins, **engine)
    if budget is not None:
        from .budget import check_budget

        check_budget(recipe, sampling_only=budget == "sample")
    return recipe


def _run_name(top: TopSettings, source: str) -> str:
    name = top.name or Path(source).stem
    return "recipe" if name in ("", ".", "..") else name  # a file named e.g. "...yaml" gives no run folder of its own


def _validate_paper(raw: dict, source: str, registry: Registry, top: TopSettings, budget) -> Recipe:
    """A paper recipe: the ``paper`` section (the original experiment config's ``model``, ``render``
    and ``data`` sections) instead of the plugin slots and ``model``; ``data``, ``diffusion``,
    ``train`` and ``sample`` as in any recipe, checked against it. (Memory is not estimated.)"""
    from .paper.recipe import check_paper_recipe

    for key in PAPER_REPLACES:
        if key in raw:
            raise RecipeError(source, key, f"does not apply to a paper recipe: its `{PAPER_SECTION}` section "
                              "describes the whole network (encoder, aggregation, 3D U-Net, voxel heads and renderer); remove it")
    paper = raw[PAPER_SECTION]
    if not isinstance(paper, dict):
        raise RecipeError(source, PAPER_SECTION, f"expected the original config's `model`, `render` and `data` sections as a mapping, got {short(paper)}")
    data = _plugin(raw, "data", source, registry)
    engine = {}
    for sec, schema in _engine_schemas().items():
        if sec == "model":
            continue
        block = raw.get(sec) or {}
        if not isinstance(block, dict):
            raise RecipeError(source, sec, f"expected a mapping of settings, got {short(block)}")
        engine[sec] = _settings(schema, block, source, sec)
    _check_cross(raw, source, {"data": data, "aggregator": None}, {**engine, "model": None})
    check_paper_recipe(paper, data, engine["diffusion"], source)
    return Recipe(source, raw, _run_name(top, source), top.seed, top.device, data, None, None, None, None, None, paper=paper, **engine)


def _check_cross(raw: dict, source: str, plugins: dict, engine: dict) -> None:
    train: TrainSettings = engine["train"]
    views = getattr(plugins["data"].settings, "views", None)
    if views is not None and views - train.heldout_views < 1:
        raise RecipeError(source, "data.views", f"must exceed train.heldout_views ({train.heldout_views}) so the denoiser sees at least one view; got {views}")
    if views is not None and len(train.cond_probs) > views - train.heldout_views:
        raise RecipeError(
            source,
            "train.cond_probs",
            f"gives probabilities for up to {len(train.cond_probs) - 1} clean views, but viewsets have only "
            f"{views - train.heldout_views} views (data.views - train.heldout_views) and at least one must be noisy",
        )
    heads = getattr(plugins["aggregator"].settings, "heads", None) if plugins["aggregator"] is not None else None
    if isinstance(heads, int) and heads > 1:
        model = engine["model"]
        widths = sorted({model.base_channels * m for m in model.channel_mult})
        bad = [w for w in widths if w % heads]
        if bad:
            raise RecipeError(
                source,
                "aggregator.heads",
                f"must divide the channels of every U-Net level (model.base_channels x model.channel_mult: "
                f"{', '.join(map(str, widths[:8]))}); {heads} does not divide {bad[0]}",
            )
    if train.batch_size % train.grad_accum:
        raise RecipeError(source, "train.grad_accum", f"must divide train.batch_size ({train.batch_size}); got {train.grad_accum}")
    if not abs(sum(train.cond_probs) - 1) <= 1e-6 or not min(train.cond_probs, default=0) >= 0:
        raise RecipeError(source, "train.cond_probs", f"expected non-negative probabilities summing to 1, got {short(train.cond_probs)}")
