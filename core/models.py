"""Which model a recipe builds: vsd's :class:`~vsd.core.engine.ViewsetDiffusion` of its plugins, or
the released network of the paper (:class:`~vsd.core.paper.engine.PaperViewsetDiffusion`)."""

from __future__ import annotations

from .contracts import SceneInfo
from .engine import ViewsetDiffusion
from .recipe import Recipe


def build_model(recipe: Recipe, info: SceneInfo) -> ViewsetDiffusion:
    """The model a recipe describes: a :class:`ViewsetDiffusion` of its plugins, or for a paper
    recipe (one with a ``paper`` section) the released network (:mod:`vsd.core.paper.engine`)."""
    if recipe.is_paper:
        from .paper.engine import PaperViewsetDiffusion

        return PaperViewsetDiffusion(recipe, info)
    return ViewsetDiffusion(recipe, info)
