"""Making a recipe's dataset on first use.

An ``srn`` data section may name a *preparer* with ``prepare: <name>``; when the section's
``root`` holds no split folder yet, :func:`ensure_dataset` runs that preparer on the root before
training builds the dataset. Preparers (the ``vsd-run data`` commands with their defaults):

- ``torcs-cars``: ``vsd-run data cars ROOT`` (TORCS cars, SRN-cars cameras);
- ``minens-character-creator``: ``vsd-run data minens ROOT`` (read it with ``prefix: minens``).

A root that exists with split folders is never touched, so a half-made dataset is finished by
running the ``vsd-run data`` command again (it resumes) rather than by training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..core.errors import RecipeError
from .check import split_folders


def _torcs_cars(root: Path) -> None:
    from .meshes import RenderConfig
    from .torcs import build_cars

    build_cars(root, RenderConfig(shading=0.4), workers=2)


def _minens(root: Path) -> None:
    from .character_creator import build_minens

    build_minens(root)


PREPARERS: dict[str, Callable[[Path], None]] = {
    "torcs-cars": _torcs_cars,
    "minens-character-creator": _minens,
}


def _data_section(recipe) -> tuple[str, dict]:
    raw = getattr(recipe, "raw", recipe)
    data = raw.get("data", {}) if isinstance(raw, dict) else {}
    return getattr(recipe, "source", "<recipe>"), data if isinstance(data, dict) else {}


def ensure_dataset(recipe) -> bool:
    """Run the data section's preparer when its root has no split folders; True if it ran.

    ``recipe`` is a validated :class:`~vsd.core.recipe.Recipe` (or its resolved mapping).
    """
    source, data = _data_section(recipe)
    name = data.get("prepare")
    if data.get("type") != "srn" or not name:
        return False
    if name not in PREPARERS:
        known = ", ".join(sorted(PREPARERS))
        raise RecipeError(source, "data.prepare", f"unknown preparer {name!r}; known: {known}")
    root = Path(str(data.get("root", "")))
    if split_folders(root):
        return False
    PREPARERS[name](root)
    return True
