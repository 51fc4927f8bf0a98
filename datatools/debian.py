"""Fetching Debian packages without installing them, and reading files out of a ``.deb``.

``fetch_deb`` runs ``apt-get download`` in a scratch folder (``apt-get update`` first only when
the package lists are missing), showing the bytes as they arrive, and keeps the ``.deb`` in a
cache folder (:func:`.storage.cache_dir`); ``deb_info`` tells its size beforehand. ``extract_deb`` reads the
archive in Python (a ``.deb`` is an ``ar`` archive holding ``data.tar.{xz,gz,bz2}``), falling back
to ``dpkg-deb --fsys-tarfile`` for other compressions, and writes only the members asked for.
"""

from __future__ import annotations

import fnmatch
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import DataError
from ..core.progress import Progress, format_bytes
from .storage import notice


def _missing_tool_message(package: str, alternatives: str) -> str:
    return (
        f"`apt-get` is not available here, and it is needed to fetch the Debian package {package}. "
        f"Either copy {package}_*.deb (from `apt-get download {package}` on any Debian or Ubuntu machine) "
        f"into the cache folder named below, or {alternatives}"
    )


@dataclass(frozen=True)
class DebInfo:
    """What ``apt-get download`` would fetch: the file name and its size in bytes."""

    filename: str
    size: int


def cached_deb(package: str, cache: Path) -> Path | None:
    """The newest ``.deb`` of ``package`` already in ``cache``, if any."""
    found = sorted(cache.glob(f"{package}_*.deb")) if cache.is_dir() else []
    return found[-1] if found else None


def deb_info(package: str) -> DebInfo | None:
    """The file name and size of ``package``'s ``.deb`` from the local package lists (nothing is
    downloaded; the lists are fetched first only when missing); None where apt cannot tell."""
    if shutil.which("apt-get") is None:
        return None
    result = _apt(["download", "--print-uris", package], None)
    if result.returncode != 0 and _lists_missing(result.stderr):
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = _apt(["download", "--print-uris", package], None)
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1].startswith(f"{package}_") and parts[2].isdigit():
            return DebInfo(parts[1], int(parts[2]))
    return None


def fetch_deb(package: str, cache: Path, alternatives: str = "", *, quiet: bool = False) -> Path:
    """The cached ``.deb`` of ``package`` in ``cache``, downloading it first if needed.

    The download goes to ``cache/.download-<package>/`` and is moved into ``cache`` once whole,
    so an interrupted download never passes for a package: the next call removes its remains and
    downloads again. The bytes received are shown as they arrive (``quiet``: not).
    """
    cached = cached_deb(package, cache)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        raise DataError(_missing_tool_message(package, alternatives) + f" (cache folder: {cache})")
    scratch = cache / f".download-{package}"
    if scratch.exists():
        notice(f"removing an interrupted download of {package} ({format_bytes(_folder_bytes(scratch))}) from {scratch}; downloading it again", quiet)
        shutil.rmtree(scratch)
    scratch.mkdir()
    try:
        info = deb_info(package)
        result = _download(package, scratch, info, quiet)
        debs = sorted(scratch.glob(f"{package}_*.deb"))
        if result.returncode != 0 or not debs:
            raise DataError(
                f"`apt-get download {package}` failed: {result.stderr.strip() or result.stdout.strip()}. "
                f"Copy {package}_*.deb into {cache} by hand, or {alternatives}"
            )
        if info is not None and debs[-1].stat().st_size != info.size:
            raise DataError(
                f"`apt-get download {package}` wrote {debs[-1].stat().st_size} bytes, the package lists say {info.size}; "
                f"run the command again, or copy {package}_*.deb into {cache} by hand"
            )
        target = cache / debs[-1].name
        os.replace(debs[-1], target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _download(package: str, folder: Path, info: DebInfo | None, quiet: bool) -> subprocess.CompletedProcess:
    result = _watched_download(package, folder, info, quiet)
    if result.returncode != 0 and _lists_missing(result.stderr):
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = _watched_download(package, folder, info, quiet)
    return result


def _apt(args: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", *args], cwd=cwd, capture_output=True, text=True)


def _watched_download(package: str, folder: Path, info: DebInfo | None, quiet: bool) -> subprocess.CompletedProcess:
    """``apt-get download package`` in ``folder``, showing the bytes arriving there."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(["apt-get", "download", package], cwd=folder, stdout=out, stderr=err, text=True)
        try:
            with Progress(f"downloading {package}", info.size if info else None, unit="bytes", quiet=quiet) as bar:
                while proc.poll() is None:
                    bar.update(_folder_bytes(folder))
                    time.sleep(0.25)
                bar.update(_folder_bytes(folder))
        finally:
            if proc.poll() is None:  # interrupted: apt-get must not go on writing into the cache
                proc.terminate()
                proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


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


def _data_tar(deb: Path) -> tuple[tarfile.TarFile, io.BytesIO]:
    """The package's data archive, read as a stream, and the buffer it reads from (whose
    position tells how far the reading has got)."""
    members = _ar_members(deb.read_bytes())
    for name, payload in members.items():
        if name.startswith("data.tar") and not name.endswith(".zst"):
            buf = io.BytesIO(payload)
            return tarfile.open(fileobj=buf, mode="r|*"), buf
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"{deb}: data archive compressed in a way Python cannot read, and dpkg-deb is not available")
    buf = io.BytesIO(subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout)
    return tarfile.open(fileobj=buf, mode="r|"), buf


def extract_deb(deb: Path, dest: Path, patterns: list[str], *, quiet: bool = True) -> list[Path]:
    """Write the regular files of ``deb`` whose path (without a leading ``./``) matches one of the
    shell ``patterns`` under ``dest``; returns the written paths. Unless ``quiet``, shows how
    much of the package has been read."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        tar, buf = _data_tar(deb)
    except (tarfile.TarError, OSError, ValueError) as e:
        raise DataError(f"cannot read Debian package {deb}: {e}") from None
    size = len(buf.getbuffer())
    with tar, Progress(f"extracting {deb.name}", size, unit="bytes", quiet=quiet) as bar:
        for member in tar:
            bar.update(buf.tell())
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
        bar.update(size)
    return written


def fetch_sentence(package: str, label: str, cache: Path, fallback_bytes: int) -> str:
    """What getting ``package`` will cost, for a notice before it happens: the cached file if
    there is one, else the download's size (from the package lists, else ``fallback_bytes``)."""
    from .storage import size_text

    deb = cached_deb(package, cache)
    if deb is not None:
        return f"using the {label} package {deb.name} cached in {cache}"
    info = deb_info(package)
    return (f"downloading the {label} package {package} ({size_text(info.size if info else fallback_bytes)}) "
            f"into {cache}, where it stays for later runs (VSD_CACHE_DIR sets another folder)")
