"""Where data preparation keeps its downloads, and how much it writes.

Downloads (Debian packages) and the files extracted from them live in one cache folder outside
any project: ``$VSD_CACHE_DIR``, else ``$XDG_CACHE_HOME/vsd``, else ``~/.cache/vsd``. Earlier
versions of vsd kept them in ``ROOT/.cache`` beside the data; :func:`adopt_legacy_cache` moves
such a folder's packages into the cache instead of downloading them again.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

from ..core.progress import format_bytes

CACHE_ENV = "VSD_CACHE_DIR"
LEGACY_CACHE = ".cache"  # ROOT/.cache, where earlier versions kept downloads
_BLOCK = 4096  # file-system block: many small files take more room than their bytes


def cache_dir() -> Path:
    """The folder downloads are kept in (see the module docstring)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vsd"


def notice(message: str, quiet: bool = False) -> None:
    """One line about what data preparation is about to do, on stderr."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _on_disk(nbytes: float) -> int:
    return max(1, math.ceil(nbytes / _BLOCK)) * _BLOCK


def srn_bytes(objects: int, views: int, size: int, png_bytes_per_pixel: float, extra_files: int = 0) -> int:
    """Room on disk of an SRN folder of ``objects`` x ``views`` PNGs of ``size`` px: a PNG and a
    pose file per view, three folders, ``intrinsics.txt`` and ``extra_files`` small files per
    object, each rounded up to whole file-system blocks. ``png_bytes_per_pixel`` is measured on
    the data at hand (shaded cars at 128 px: 0.34; Minens characters at 48 px: 0.8)."""
    png = _on_disk(300 + png_bytes_per_pixel * size * size)
    return objects * (views * (png + _BLOCK) + (4 + extra_files) * _BLOCK)


def size_text(nbytes: int) -> str:
    """``~318 MiB``: an estimate's size, in whole units from 10 up."""
    number, unit = format_bytes(nbytes).split(" ")
    return f"~{float(number):.0f} {unit}" if float(number) >= 10 else f"~{number} {unit}"


def adopt_legacy_cache(root: Path, cache: Path, pattern: str, quiet: bool = False) -> list[Path]:
    """Move the downloads matching ``pattern`` from ``root/.cache`` (where earlier versions kept
    them) into ``cache``; the files extracted there are deleted, and the folder when empty."""
    legacy = Path(root) / LEGACY_CACHE
    if not legacy.is_dir() or legacy.resolve() == Path(cache).resolve():
        return []
    moved = []
    for old in sorted(legacy.glob(pattern)):
        cache.mkdir(parents=True, exist_ok=True)
        new = cache / old.name
        if new.exists():
            old.unlink()
        else:
            notice(f"moving the earlier download {old} ({format_bytes(old.stat().st_size)}) into the cache {cache}", quiet)
            shutil.move(str(old), str(new))
        moved.append(new)
    return moved


def remove_legacy_extracted(root: Path, name: str) -> None:
    """Delete ``root/.cache/<name>`` (files an earlier version extracted beside the data), and
    ``root/.cache`` itself when that leaves it empty."""
    legacy = Path(root) / LEGACY_CACHE
    shutil.rmtree(legacy / name, ignore_errors=True)
    try:
        legacy.rmdir()
    except OSError:  # absent, or it holds something else
        pass
