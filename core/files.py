"""Files vsd writes: created with the user's umask (as ``open`` would), written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's file-creation mask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_beside(path: Path, suffix: str | None = None) -> tuple[int, str]:
    """A temporary file in ``path``'s folder, for an atomic ``os.replace`` onto ``path``:
    ``(fd, name)``, with the mode a plain ``open(path, "w")`` would give (mkstemp's own is 0600,
    which would hide the final file from everyone but its owner)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` atomically, with the umask's mode (its own is 0600)."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
