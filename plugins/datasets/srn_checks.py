"""The checks of one SRN object's files, shared by the reader (:mod:`.srn`) and ``vsd-run data
check`` (:mod:`vsd.datatools.check`), so that both accept and reject the same files with the
same words.

Each check raises :class:`BadFile` (a :class:`DataError` whose text is ``"<file>: <problem>"``);
the reader lets it propagate, the folder check collects it and goes on.

- ``intrinsics.txt``: UTF-8 text, first line ``f cx cy ...`` with f positive and finite and the
  principal point inside the image, last line ``H W`` (positive integers);
- ``pose/*.txt``: UTF-8 text, 16 finite numbers, a rigid camera-to-world transform (rotation
  orthonormal to :data:`ROTATION_TOLERANCE`, determinant +1, last row ``0 0 0 1``);
- every ``rgb/*.png`` has a ``pose/*.txt`` and every pose an image;
- images: readable, of the size ``H W`` the intrinsics name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.errors import DataError

ROTATION_TOLERANCE = 1e-3
INTRINSICS_FORM = "a first line 'f cx cy 0' and a last line 'H W'"


class BadFile(DataError):
    """A file (or folder) of an SRN object that cannot be used: ``path`` and ``problem``."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


def read_text(path: Path, what: str) -> str:
    """The text of ``path``, decoded as UTF-8; ``what`` is said when the file is missing."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadFile(path, f"missing (expected {what})") from None
    except OSError as e:
        raise BadFile(path, f"cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); expected {what}") from None


def _floats(path: Path, tokens: list[str], where: str) -> list[float]:
    try:
        return [float(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _is_float(t))
        raise BadFile(path, f"{where}: {bad!r} is not a number") from None


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


# ---- intrinsics.txt -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Intrinsics:
    f: float
    cx: float
    cy: float
    H: int
    W: int


def parse_intrinsics(path: Path, text: str) -> Intrinsics:
    """The focal length, principal point and image size of an intrinsics.txt, checked."""
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise BadFile(path, f"expected {INTRINSICS_FORM}")
    first, last = lines[0], lines[-1]
    if len(first) < 3:
        raise BadFile(path, f"first line must be 'f cx cy 0', got {' '.join(first)!r}")
    f, cx, cy = _floats(path, first[:3], "first line")
    size = _floats(path, last, "last line") if len(last) == 2 else None
    if size is None or not all(math.isfinite(v) and v.is_integer() and v > 0 for v in size):
        raise BadFile(path, f"last line must be the image size 'H W' in positive integers, got {' '.join(last)!r}")
    H, W = int(size[0]), int(size[1])
    problems = []
    if not (math.isfinite(f) and f > 0):
        problems.append(f"focal length must be positive and finite, got {f:g}")
    if not (0 <= cx <= W and 0 <= cy <= H):
        problems.append(f"principal point ({cx:g}, {cy:g}) lies outside the {W} x {H} image")
    if problems:
        raise BadFile(path, "; ".join(problems))
    return Intrinsics(f, cx, cy, H, W)


def read_intrinsics_file(path: Path) -> Intrinsics:
    return parse_intrinsics(path, read_text(path, INTRINSICS_FORM))


# ---- pose/*.txt ---------------------------------------------------------------------------------
def parse_pose(path: Path, text: str) -> np.ndarray:
    """(4, 4) float64 camera-to-world matrix of a pose file, checked to be a rigid transform."""
    tokens = text.split()
    values = _floats(path, tokens, "expected 16 numbers (a 4x4 camera-to-world matrix)")
    if len(values) != 16:
        raise BadFile(path, f"expected 16 numbers (a 4x4 camera-to-world matrix), found {len(values)}")
    M = np.array(values, dtype=np.float64).reshape(4, 4)
    if not np.isfinite(M).all():
        raise BadFile(path, "contains non-finite numbers")
    if not np.allclose(M[3], [0, 0, 0, 1], atol=1e-6):
        raise BadFile(path, f"last row must be 0 0 0 1, got {' '.join(f'{x:g}' for x in M[3])}")
    R = M[:3, :3]
    err = np.abs(R.T @ R - np.eye(3)).max()
    if err > ROTATION_TOLERANCE:
        raise BadFile(path, f"rotation part is not orthonormal (max |R^T R - I| = {err:.3g}): not a rigid transform")
    det = np.linalg.det(R)
    if det < 0:
        raise BadFile(path, f"rotation part has determinant {det:.3g} (a reflection): not a rigid transform")
    return M


def read_pose_file(path: Path) -> np.ndarray:
    return parse_pose(path, read_text(path, "16 numbers (a 4x4 camera-to-world matrix)"))


# ---- pairing and images -------------------------------------------------------------------------
def view_files(obj: Path) -> tuple[dict[str, Path], dict[str, Path], list[BadFile]]:
    """stem -> image and stem -> pose file of object folder ``obj``, and what is wrong with
    its layout: a missing rgb/ or pose/ folder, no images, an image without a pose or a pose
    without an image (in that order)."""
    rgb, pose = obj / "rgb", obj / "pose"
    problems = [
        BadFile(obj, f"missing {d.name}/ (expected rgb/*.png and pose/*.txt)") for d in (rgb, pose) if not d.is_dir()
    ]
    images = {p.stem: p for p in rgb.glob("*.png")} if rgb.is_dir() else {}
    poses = {p.stem: p for p in pose.glob("*.txt")} if pose.is_dir() else {}
    if rgb.is_dir() and not images:
        problems.append(BadFile(rgb, "no .png images"))
    if rgb.is_dir() and pose.is_dir():
        for name in sorted(images.keys() - poses.keys()):
            problems.append(BadFile(pose / f"{name}.txt", f"missing pose for image {images[name]}"))
        for name in sorted(poses.keys() - images.keys()):
            problems.append(BadFile(rgb / f"{name}.png", f"missing image for pose {poses[name]}"))
    return images, poses, problems


def unreadable_image(path: Path, exc: BaseException) -> BadFile:
    """The problem of an image Pillow cannot decode (it raises OSError, SyntaxError, ValueError, ...)."""
    return BadFile(path, f"unreadable image ({type(exc).__name__}: {exc})")


def check_image_size(path: Path, size_hw: tuple[int, int], intrinsics_hw: tuple[int, int]) -> None:
    """An image must be of the size ``H W`` its object's intrinsics.txt names (its pixels are theirs)."""
    if tuple(size_hw) != tuple(intrinsics_hw):
        (h, w), (H, W) = size_hw, intrinsics_hw
        raise BadFile(path, f"image is {h} x {w} but intrinsics.txt says {H} x {W}")
