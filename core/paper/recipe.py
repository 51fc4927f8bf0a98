"""Checking a paper recipe: its ``paper`` section (the original experiment config's ``model``,
``render`` and ``data`` sections) against the recipe's ``data`` and ``diffusion`` sections, with
errors that name the recipe key (``paper.model.unet.attention_aggregation``, ``diffusion.timesteps``)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ..errors import RecipeError
from .convert import OriginalCheckpointError
from .model import PaperDenoiserConfig
from .sampling import PaperDiffusion

# the original's data.dataset_type -> the vsd dataset plugin that reads the same data
DATASET_PLUGINS = {"srn": "srn", "minens": "minens", "co3d": "co3d"}


def _key_of(err: OriginalCheckpointError) -> str | None:
    found = re.search(r"`([A-Za-z0-9_.]+)`", str(err))
    return found.group(1) if found else None


def paper_settings(paper: Mapping, source: str) -> tuple[PaperDenoiserConfig, PaperDiffusion]:
    """The network and diffusion a ``paper`` section describes; a RecipeError naming
    ``paper.<key>`` for anything vsd cannot reproduce."""
    try:
        return PaperDenoiserConfig.from_original(paper), PaperDiffusion.from_original(paper)
    except OriginalCheckpointError as err:
        key = _key_of(err)
        raise RecipeError(source, f"paper.{key}" if key else "paper", str(err).replace("original config", "the paper section")) from None


def check_paper_recipe(paper: Mapping, data, diffusion, source: str) -> None:
    """Refuse (RecipeError naming the key) a paper recipe whose other sections disagree with the
    network it describes: the data plugin and image size, the diffusion timesteps and schedule;
    and vsd's own sampler additions, which the original's loop does not have."""
    config, diff = paper_settings(paper, source)
    plugin = DATASET_PLUGINS[config.dataset_type]
    if data.type != plugin:
        raise RecipeError(source, "data.type", f"is {data.type!r}, but paper.data.dataset_type is {config.dataset_type!r}: "
                          f"use the {plugin!r} dataset")
    size = getattr(data.settings, "image_size", None)
    if size != config.image_size:
        raise RecipeError(source, "data.image_size", f"is {size}, but the paper network takes {config.image_size} px images "
                          "(paper.data.input_size)")
    fov = getattr(data.settings, "fov_deg", None)
    if config.fov_deg is not None and fov is not None and not math.isclose(fov, config.fov_deg, rel_tol=1e-3):
        raise RecipeError(source, "data.fov_deg", f"is {fov}, but the paper network renders at paper.render.fov = {config.fov_deg}")
    if diffusion.timesteps != diff.timesteps:
        raise RecipeError(source, "diffusion.timesteps", f"is {diffusion.timesteps}, but the paper network was set up for "
                          f"paper.model.diffuser.steps = {diff.timesteps}")
    if diffusion.schedule != diff.beta_schedule:
        raise RecipeError(source, "diffusion.schedule", f"is {diffusion.schedule!r}, but paper.model.diffuser.beta_schedule "
                          f"is {diff.beta_schedule!r}")
    if diffusion.sampler != "ddim":
        raise RecipeError(source, "diffusion.sampler", "must be 'ddim': a paper model samples with the original's DDIM loop")
    if not diffusion.clip_x0:
        raise RecipeError(source, "diffusion.clip_x0", "must be true: the original's loop always clips its x0 renders")
    if diffusion.input_fit_steps:
        raise RecipeError(source, "diffusion.input_fit_steps", "must be 0: a paper model samples with the original's loop, "
                          "which does not fit the volume to its input views")
    if diffusion.sampling_steps > diff.timesteps:
        raise RecipeError(source, "diffusion.sampling_steps", f"must be at most the {diff.timesteps} diffusion timesteps")
