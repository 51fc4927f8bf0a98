"""SRN-layout car viewsets from the TORCS racing game's cars (``vsd-run data cars ROOT``).

The Debian package ``torcs-data`` (fetched, never installed: 318 MiB, kept in the download cache
:func:`.storage.cache_dir`; its car files, 48 MiB, are extracted there while the cars are rendered
and deleted afterwards) holds 17 car bodies, ``cars/<car>/<car>.acc`` (AC3D) with
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
from .debian import extract_deb, fetch_deb, fetch_sentence
from .meshes import RenderConfig, RenderJob, object_complete, object_folder, render_jobs
from .storage import adopt_legacy_cache, cache_dir, notice, remove_legacy_extracted, size_text, srn_bytes

PACKAGE = "torcs-data"
GAME_DIR = "usr/share/games/torcs"
SPLIT_BODIES = {"val": ("car2-trb1", "buggy"), "test": ("car6-trb1", "acura-nsx-sz")}
ALTERNATIVES = (
    "point the recipe's data.root at an existing SRN-layout folder (for example the ShapeNet-SRN "
    "cars release), or render meshes of your own with `vsd-run data render-meshes --meshes DIR --out ROOT`."
)
_PATTERNS = [f"{GAME_DIR}/cars/*/*.acc", f"{GAME_DIR}/cars/*/*.rgb", f"{GAME_DIR}/drivers/*/*/*.rgb"]
# measured on torcs-data 1.3.7+dfsg-5, for the notice before anything is fetched
PACKAGE_BYTES = 333_308_448  # when the package lists cannot tell
EXTRACTED_BYTES = 50_801_411
OBJECTS = 76
PNG_BYTES_PER_PIXEL = 0.34  # shaded cars, 128 px


def car_files(cache: Path, *, quiet: bool = True) -> Path:
    """The extracted TORCS game folder in ``cache``, fetching and extracting the package once."""
    game = cache / "torcs-data" / GAME_DIR
    marker = cache / "torcs-data" / ".complete"
    if marker.is_file():
        return game
    deb = fetch_deb(PACKAGE, cache, ALTERNATIVES, quiet=quiet)
    shutil.rmtree(cache / "torcs-data", ignore_errors=True)
    extract_deb(deb, cache / "torcs-data", _PATTERNS, quiet=quiet)
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


def announce(root: Path, cache: Path, config: RenderConfig, quiet: bool = False) -> None:
    """Say what preparing the cars will download and write, before any of it happens."""
    fetch = fetch_sentence(PACKAGE, "TORCS cars", cache, PACKAGE_BYTES)
    if not (cache / "torcs-data" / ".complete").is_file():
        fetch += f"; its car files ({size_text(EXTRACTED_BYTES)}) are extracted there and deleted once the cars are rendered"
    data = srn_bytes(OBJECTS, config.views, config.size, PNG_BYTES_PER_PIXEL)
    notice(f"{fetch}; the prepared data takes {size_text(data)} in {root} ({OBJECTS} objects x {config.views} views of {config.size} px)", quiet)


def build_cars(
    root: str | Path, config: RenderConfig | None = None, *, workers: int = 1, progress: bool = True,
    cache: str | Path | None = None,
) -> dict:  # fmt: skip
    """Fetch, convert and render the TORCS cars into ``root`` (resumable: the download, the
    extracted files and every rendered object are kept until all are done).

    ``cache``: where the package is kept (default :func:`.storage.cache_dir`); a package left in
    ``root/.cache`` by an earlier version is moved there. ``progress``: say beforehand what will be
    downloaded and written, and show the download, extraction and rendering as they go.
    Returns the render statistics of :func:`.meshes.render_jobs` plus ``objects`` and ``views``
    (split -> count), ``seconds_per_view``, ``bytes`` (the SRN folders on disk) and ``cache``.
    """
    root = Path(root)
    config = config or RenderConfig(shading=0.4)
    cache = Path(cache) if cache is not None else cache_dir()
    quiet = not progress
    adopt_legacy_cache(root, cache, f"{PACKAGE}_*.deb", quiet)
    remove_legacy_extracted(root, "torcs-data")
    announce(root, cache, config, quiet)
    start = time.perf_counter()
    game = car_files(cache, quiet=quiet)
    fetch_seconds = time.perf_counter() - start
    jobs = car_jobs(game)
    stats = render_jobs(jobs, root, config, workers=workers, progress=progress)
    if all(object_complete(object_folder(root, j, config), config.views) for j in jobs):
        shutil.rmtree(cache / "torcs-data", ignore_errors=True)  # extracted again from the package when needed
    stats["fetch_seconds"] = fetch_seconds
    stats["cache"] = cache
    stats["objects"] = {s: sum(j.split == s for j in jobs) for s in ("train", "val", "test")}
    stats["views"] = {s: n * config.views for s, n in stats["objects"].items()}
    stats["seconds_per_view"] = stats["render_seconds"] / stats["views_rendered"] if stats["views_rendered"] else None
    stats["bytes"] = sum(folder_size(root / f"{config.prefix}_{s}") for s in stats["objects"] if (root / f"{config.prefix}_{s}").is_dir())
    return stats
