"""SRN-layout car viewsets from the TORCS racing game's cars (``vsd-run data cars ROOT``).

The Debian package ``torcs-data`` (fetched, never installed; the ``.deb`` and the extracted car
files are cached in ``ROOT/.cache``) holds 17 car bodies, ``cars/<car>/<car>.acc`` (AC3D) with
their textures ``<car>.rgb`` (SGI images), and 59 further liveries of some of them,
``drivers/<driver>/<n>/<car>.rgb``. Every (body, livery) pair is one object, named
``<car>__stock`` or ``<car>__<driver>-<n>``: 76 objects.

Splits are made **by body**, so that no car shape appears in two splits: the bodies in
:data:`SPLIT_BODIES` go to val and test (two each: one with many liveries, one with none) and the
other 13 to train, which gives 59 / 8 / 9 objects.

Objects are rendered by :func:`.meshes.render_jobs` (see that module for the frame: z up, the
car's front towards +x, normalised into ``[-0.5, 0.5]^3``, cameras on the upper hemisphere at
radius 1.3 with fov 51.98, as the SRN cars). TORCS draws wheels separately from the body model,
so the cars have none.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..core.errors import DataError
from .debian import extract_deb, fetch_deb
from .meshes import RenderConfig, RenderJob, render_jobs

PACKAGE = "torcs-data"
GAME_DIR = "usr/share/games/torcs"
SPLIT_BODIES = {"val": ("car2-trb1", "buggy"), "test": ("car6-trb1", "acura-nsx-sz")}
ALTERNATIVES = (
    "point the recipe's data.root at an existing SRN-layout folder (for example the ShapeNet-SRN "
    "cars release), or render meshes of your own with `vsd-run data render-meshes --meshes DIR --out ROOT`."
)
_PATTERNS = [f"{GAME_DIR}/cars/*/*.acc", f"{GAME_DIR}/cars/*/*.rgb", f"{GAME_DIR}/drivers/*/*/*.rgb"]


def car_files(cache: Path) -> Path:
    """The extracted TORCS game folder in ``cache``, fetching and extracting the package once."""
    game = cache / "torcs-data" / GAME_DIR
    marker = cache / "torcs-data" / ".complete"
    if marker.is_file():
        return game
    deb = fetch_deb(PACKAGE, cache, ALTERNATIVES)
    shutil.rmtree(cache / "torcs-data", ignore_errors=True)
    extract_deb(deb, cache / "torcs-data", _PATTERNS)
    if not (game / "cars").is_dir():
        raise DataError(f"{deb}: no {GAME_DIR}/cars folder in the package")
    marker.write_text(deb.name + "\n")
    return game


def split_of(body: str) -> str:
    for split, bodies in SPLIT_BODIES.items():
        if body in bodies:
            return split
    return "train"


def car_jobs(game: Path) -> list[RenderJob]:
    """One job per (body, livery) found in the extracted game folder ``game``."""
    bodies = sorted(
        d.name for d in (game / "cars").iterdir() if (d / f"{d.name}.acc").is_file() and (d / f"{d.name}.rgb").is_file()
    )
    if not bodies:
        raise DataError(f"{game / 'cars'}: no car bodies (<car>/<car>.acc with <car>.rgb)")
    jobs = []
    for body in bodies:
        model = game / "cars" / body / f"{body}.acc"
        jobs.append(RenderJob(f"{body}__stock", split_of(body), str(model)))
        for livery in sorted((game / "drivers").glob(f"*/*/{body}.rgb")):
            driver, number = livery.parent.parent.name, livery.parent.name
            textures = ((f"{body}.rgb", str(livery)),)
            jobs.append(RenderJob(f"{body}__{driver}-{number}", split_of(body), str(model), textures))
    return jobs


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_cars(
    root: str | Path, config: RenderConfig | None = None, *, workers: int = 1, progress: bool = True
) -> dict:
    """Fetch, convert and render the TORCS cars into ``root`` (resumable).

    Returns the render statistics of :func:`.meshes.render_jobs` plus ``objects`` and ``views``
    (split -> count), ``seconds_per_view`` and ``bytes`` (the SRN folders on disk, cache excluded).
    """
    root = Path(root)
    config = config or RenderConfig(shading=0.4)
    start = time.perf_counter()
    game = car_files(root / ".cache")
    fetch_seconds = time.perf_counter() - start
    jobs = car_jobs(game)
    stats = render_jobs(jobs, root, config, workers=workers, progress=progress)
    stats["fetch_seconds"] = fetch_seconds
    stats["objects"] = {s: sum(j.split == s for j in jobs) for s in ("train", "val", "test")}
    stats["views"] = {s: n * config.views for s, n in stats["objects"].items()}
    stats["seconds_per_view"] = stats["render_seconds"] / stats["views_rendered"] if stats["views_rendered"] else None
    stats["bytes"] = sum(folder_size(root / f"{config.prefix}_{s}") for s in stats["objects"] if (root / f"{config.prefix}_{s}").is_dir())
    return stats
