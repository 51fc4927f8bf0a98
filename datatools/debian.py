"""Fetching Debian packages without installing them, and reading files out of a ``.deb``.

``fetch_deb`` runs ``apt-get download`` in a scratch folder (``apt-get update`` first only when
the package lists are missing) and keeps the ``.deb`` in a cache folder. ``extract_deb`` reads the
archive in Python (a ``.deb`` is an ``ar`` archive holding ``data.tar.{xz,gz,bz2}``), falling back
to ``dpkg-deb --fsys-tarfile`` for other compressions, and writes only the members asked for.
"""

from __future__ import annotations

import fnmatch
import io
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..core.errors import DataError


def _missing_tool_message(package: str, alternatives: str) -> str:
    return (
        f"`apt-get` is not available here, and it is needed to fetch the Debian package {package}. "
        f"Either copy {package}_*.deb (from `apt-get download {package}` on any Debian or Ubuntu machine) "
        f"into the cache folder named below, or {alternatives}"
    )


def fetch_deb(package: str, cache: Path, alternatives: str = "") -> Path:
    """The cached ``.deb`` of ``package`` in ``cache``, downloading it first if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None:
        raise DataError(_missing_tool_message(package, alternatives) + f" (cache folder: {cache})")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        result = _apt_download(package, Path(tmp))
        if result.returncode != 0 and _lists_missing(result.stderr):
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            result = _apt_download(package, Path(tmp))
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if result.returncode != 0 or not debs:
            raise DataError(
                f"`apt-get download {package}` failed: {result.stderr.strip() or result.stdout.strip()}. "
                f"Copy {package}_*.deb into {cache} by hand, or {alternatives}"
            )
        target = cache / debs[-1].name
        shutil.move(str(debs[-1]), target)
    return target


def _apt_download(package: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True, text=True)


def _lists_missing(stderr: str) -> bool:
    text = stderr.lower()
    return "unable to locate package" in text or "has no installation candidate" in text or "no packages found" in text


def _ar_members(data: bytes) -> dict[str, bytes]:
    """name -> content of the members of an ``ar`` archive."""
    if not data.startswith(b"!<arch>\n"):
        raise DataError("not a Debian package (no ar header)")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _data_tar(deb: Path) -> tarfile.TarFile:
    members = _ar_members(deb.read_bytes())
    for name, payload in members.items():
        if name.startswith("data.tar") and not name.endswith(".zst"):
            return tarfile.open(fileobj=io.BytesIO(payload), mode="r|*")
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"{deb}: data archive compressed in a way Python cannot read, and dpkg-deb is not available")
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r|")


def extract_deb(deb: Path, dest: Path, patterns: list[str]) -> list[Path]:
    """Write the regular files of ``deb`` whose path (without a leading ``./``) matches one of the
    shell ``patterns`` under ``dest``; returns the written paths."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        tar = _data_tar(deb)
    except (tarfile.TarError, OSError, ValueError) as e:
        raise DataError(f"cannot read Debian package {deb}: {e}") from None
    with tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not member.isfile() or not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            target = dest / name
            if dest.resolve() not in target.resolve().parents:
                continue  # a member path escaping dest
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(target)
    return written
