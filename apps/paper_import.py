"""Bringing the original authors' released experiments into vsd (``vsd-run import``, and
``vsd.load`` on such a folder).

A released experiment is a folder with ``.hydra/config.yaml`` and ``model.pth``
(:func:`vsd.core.paper.importer.read_original_experiment` reads both without unpickling anything).
Its recipe is the shipped paper recipe of its dataset (``paper_srn_cars.yaml``,
``paper_minens.yaml`` or ``paper_co3d_hydrant.yaml``) with the experiment's own ``model``,
``render`` and ``data`` sections as the ``paper`` section, and the data, diffusion and sampling
settings that follow from them; its weights are the converted EMA weights. The result is a vsd
weights file (safetensors: weights, resolved recipe, scene geometry, the original's iteration) in
the user's models folder, loadable by name like a shipped model.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path

from ..core.contracts import SceneInfo
from ..core.errors import RecipeError
from ..core.paper.convert import OriginalCheckpointError, convert_original_state_dict
from ..core.paper.importer import OriginalExperiment, read_original_experiment
from ..core.recipe import SHIPPED_RECIPES, load_recipe_dict, resolve

# data.dataset_type -> the shipped paper recipe the import starts from
BASE_RECIPES = {"srn": "paper_srn_cars.yaml", "minens": "paper_minens.yaml", "co3d": "paper_co3d_hydrant.yaml"}
# the original's sections that describe the network (the recipe's `paper` section keeps them whole)
PAPER_SECTIONS = ("model", "render", "data")


def models_dir() -> Path:
    """Where imported models go: ``$VSD_MODELS_DIR``, else ``~/.cache/vsd/models``."""
    return Path(os.environ.get("VSD_MODELS_DIR") or Path.home() / ".cache" / "vsd" / "models").expanduser()


def is_original_experiment(path: str | Path) -> bool:
    """Whether ``path`` is a folder laid out as a released original experiment."""
    p = Path(path)
    return p.is_dir() and (p / ".hydra" / "config.yaml").is_file() and (p / "model.pth").is_file()


def _get(config: dict, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def original_recipe(exp: OriginalExperiment, name: str) -> dict:
    """The vsd recipe (a resolved mapping) of a released experiment; OriginalCheckpointError naming
    the config key when its dataset or settings have no vsd counterpart."""
    cfg = exp.config
    dataset = _get(cfg, "data.dataset_type")
    if dataset not in BASE_RECIPES:
        raise OriginalCheckpointError(f"{exp.folder / '.hydra' / 'config.yaml'}: key `data.dataset_type` = {dataset!r} is not "
                                      f"supported: expected one of {', '.join(BASE_RECIPES)}")
    raw = resolve(SHIPPED_RECIPES / BASE_RECIPES[dataset])
    raw["name"] = name
    raw["paper"] = {sec: copy.deepcopy(cfg[sec]) for sec in PAPER_SECTIONS if isinstance(cfg.get(sec), dict)}
    size = _get(cfg, "data.input_size")
    data = raw["data"]
    if isinstance(size, (list, tuple)) and size:
        data["image_size"] = int(size[0])
    render = cfg.get("render") or {}
    if dataset == "srn":
        data["prefix"] = str(_get(cfg, "data.category", data.get("prefix", "cars")))
        data["root"] = f"data/{data['prefix']}"
        for key, src in (("fov_deg", "fov"), ("near", "min_depth"), ("far", "max_depth")):
            if src in render:
                data[key] = float(render[src])
    elif dataset == "co3d" and _get(cfg, "data.category"):
        data["category"] = str(_get(cfg, "data.category"))
        data["background"] = "white" if _get(cfg, "data.white_background") else "black"
    diff = raw.setdefault("diffusion", {})
    diff["timesteps"] = int(_get(cfg, "model.diffuser.steps", diff.get("timesteps", 1000)))
    diff["schedule"] = _get(cfg, "model.diffuser.beta_schedule", diff.get("schedule"))
    diff["sampling_steps"] = int(_get(cfg, "eval.sampling_timesteps", diff.get("sampling_steps", 250)))
    raw.setdefault("sample", {})["render_size"] = data["image_size"]
    return raw


def scene_info(recipe, config: dict) -> SceneInfo:
    """The scene geometry of an imported model without its data on disk: the dataset's fixed
    geometry (Minens), the recipe's camera settings (SRN), else the original's render settings."""
    cls_info = getattr(recipe.data.cls, "info", None)
    if isinstance(cls_info, SceneInfo):
        return cls_info
    s = recipe.data.settings
    if all(hasattr(s, k) for k in ("bound", "camera_radius", "fov_deg", "near", "far")):
        return SceneInfo(s.bound, s.camera_radius, s.fov_deg, s.near, s.far, getattr(s, "up_axis", "y"), s.background)
    render = config.get("render") or {}
    near, far = float(render.get("min_depth", 0.1)), float(render.get("max_depth", 10.0))
    return SceneInfo(getattr(s, "bound", 1.0), (near + far) / 2, float(render.get("fov", 15.0)), near, far, "y",
                     getattr(s, "background", "white"))


def import_experiment(folder: str | Path, name: str):
    """``(model, state)``: the vsd model of a released experiment with its converted weights, and a
    checkpoint-like state (``ema``, ``recipe``, ``info``, ``step``) for :func:`save_weights`."""
    from ..core.models import build_model

    exp = read_original_experiment(folder)
    source = f"{Path(folder) / '.hydra' / 'config.yaml'} (as a vsd recipe)"
    try:
        recipe = load_recipe_dict(original_recipe(exp, name), source=source, budget=None)
    except RecipeError as err:
        key = err.key.removeprefix("paper.") if err.key and err.key.startswith("paper.") else None
        where = f"key `{key}`" if key else f"the recipe it makes ({err.key})"
        raise OriginalCheckpointError(f"{Path(folder) / '.hydra' / 'config.yaml'}: {where}: {err.detail}") from None
    info = scene_info(recipe, exp.config)
    model = build_model(recipe, info)
    try:
        converted = convert_original_state_dict(exp.state_dict, model.paper_config.network)
    except OriginalCheckpointError as err:
        raise OriginalCheckpointError(f"{Path(folder) / 'model.pth'}: {err}") from None
    model.denoiser.network.load_state_dict(converted, strict=True)
    state = {"ema": model.state_dict(), "info": asdict(info), "step": exp.iteration, "recipe": recipe.dump(),
             "path": str(folder)}
    state["model"] = state["ema"]
    return model.eval(), state


def import_to_models(folder: str | Path, name: str, root: Path | None = None, overwrite: bool = False) -> Path:
    """Import a released experiment as ``root/name/model.safetensors`` (default root:
    :func:`models_dir`) and return that path; an existing model of that name is kept unless
    ``overwrite``."""
    from ..core.weights import save_weights

    if not name or not all(c.isalnum() or c in "._-" for c in name) or name[0] in ".-":
        raise OriginalCheckpointError(f"model name {name!r}: use letters, digits, '.', '_' and '-', not starting with '.' or '-'")
    path = Path(root or models_dir()) / name / "model.safetensors"
    if path.exists() and not overwrite:
        raise OriginalCheckpointError(f"{path} already exists: a model named {name!r} was imported before; "
                                      "choose another name, or pass --overwrite to replace it")
    _, state = import_experiment(folder, name)
    return save_weights(path, state, state["recipe"])


__all__ = ["import_experiment", "import_to_models", "is_original_experiment", "models_dir", "original_recipe", "scene_info"]
