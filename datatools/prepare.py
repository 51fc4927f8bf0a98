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
from .storage import notice


def _torcs_cars(root: Path, quiet: bool = False) -> None:
    from .meshes import RenderConfig
    from .torcs import build_cars

    build_cars(root, RenderConfig(shading=0.4), workers=2, progress=not quiet)


def _minens(root: Path, quiet: bool = False) -> None:
    from .character_creator import build_minens

    build_minens(root, progress=not quiet)


# name -> preparer(root, quiet): ``quiet`` silences its notices and progress
PREPARERS: dict[str, Callable[..., None]] = {
    "torcs-cars": _torcs_cars,
    "minens-character-creator": _minens,
}


def _data_section(recipe) -> tuple[str, dict]:
    raw = getattr(recipe, "raw", recipe)
    data = raw.get("data", {}) if isinstance(raw, dict) else {}
    return getattr(recipe, "source", "<recipe>"), data if isinstance(data, dict) else {}


def ensure_dataset(recipe, quiet: bool = False) -> bool:
    """Run the data section's preparer when its root has no split folders; True if it ran.

    ``recipe`` is a validated :class:`~vsd.core.recipe.Recipe` (or its resolved mapping). The
    preparer first says what it will download and write, then shows its progress (``quiet``: not).
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
    notice(f"{source}: data.root {root} holds no split folders yet; preparing it with `{name}` first", quiet)
    PREPARERS[name](root, quiet=quiet)
    return True
