"""Validation of SRN-layout dataset folders (``vsd-run data check ROOT``).

Checked, for every split folder (``<prefix>_train``, ``_val``, ``_test`` or plain ``train``, ...)
and every object in it:

- ``intrinsics.txt``: first line ``f cx cy ...`` with f > 0 and the principal point inside the
  image, last line ``H W`` (positive integers);
- every ``rgb/*.png`` has a ``pose/*.txt`` and every pose an image;
- poses: 16 finite numbers forming a rigid transform (rotation orthonormal to 1e-3, determinant
  +1, last row ``0 0 0 1``);
- images: readable to the end, of the size ``H W`` named by the intrinsics, and all of one size
  across the dataset.

Each problem names the file and what is wrong.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
ROTATION_TOLERANCE = 1e-3


@dataclass
class Problem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class CheckReport:
    """Problems found, objects and views per split, and the image size(s) seen."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    objects: dict[str, int] = field(default_factory=dict)
    views: dict[str, int] = field(default_factory=dict)
    image_sizes: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems


def split_folders(root: Path) -> dict[str, Path]:
    """split -> folder for the SRN split folders of ``root``."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = re.fullmatch(r"(?:.+_)?(train|val|test)", d.name)
        if m and m.group(1) not in found:
            found[m.group(1)] = d
    return found


def _intrinsics(path: Path, report: CheckReport) -> tuple[int, int] | None:
    bad = lambda msg: report.problems.append(Problem(path, msg))  # noqa: E731
    if not path.is_file():
        bad("missing (expected first line 'f cx cy 0' and last line 'H W')")
        return None
    lines = [ln.split() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        bad("expected a first line 'f cx cy 0' and a last line 'H W'")
        return None
    try:
        f, cx, cy = (float(x) for x in lines[0][:3])
        H, W = (float(x) for x in lines[-1])
    except ValueError:
        bad(f"not numbers where numbers are expected: first line {' '.join(lines[0])!r}, last {' '.join(lines[-1])!r}")
        return None
    if not (H.is_integer() and W.is_integer() and H > 0 and W > 0):
        bad(f"last line must be the image size 'H W' in positive integers, got {H:g} {W:g}")
        return None
    if not f > 0:
        bad(f"focal length must be positive, got {f:g}")
    if not (0 <= cx <= W and 0 <= cy <= H):
        bad(f"principal point ({cx:g}, {cy:g}) lies outside the {int(W)} x {int(H)} image")
    return int(H), int(W)


def pose_problem(path: Path) -> str | None:
    """What is wrong with a pose file, or None."""
    try:
        values = [float(x) for x in path.read_text(errors="replace").split()]
    except ValueError:
        return "not a list of numbers"
    if len(values) != 16:
        return f"expected 16 numbers (a 4x4 camera-to-world matrix), found {len(values)}"
    M = np.array(values).reshape(4, 4)
    if not np.isfinite(M).all():
        return "contains non-finite numbers"
    if not np.allclose(M[3], [0, 0, 0, 1], atol=1e-6):
        return f"last row must be 0 0 0 1, got {' '.join(f'{x:g}' for x in M[3])}"
    R = M[:3, :3]
    err = np.abs(R.T @ R - np.eye(3)).max()
    if err > ROTATION_TOLERANCE:
        return f"rotation part is not orthonormal (max |R^T R - I| = {err:.3g}): not a rigid transform"
    det = np.linalg.det(R)
    if det < 0:
        return f"rotation part has determinant {det:.3g} (a reflection): not a rigid transform"
    return None


def image_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((H, W), None) for a fully readable image, else (None, why)."""
    try:
        with Image.open(path) as im:
            im.load()
            return (im.height, im.width), None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on corrupt files
        return None, f"unreadable image ({type(e).__name__}: {e})"


def _check_object(obj: Path, split: str, report: CheckReport, sizes: dict[Path, tuple[int, int]]) -> None:
    hw = _intrinsics(obj / "intrinsics.txt", report)
    rgb_dir, pose_dir = obj / "rgb", obj / "pose"
    for d in (rgb_dir, pose_dir):
        if not d.is_dir():
            report.problems.append(Problem(d, "missing folder"))
    images = {p.stem: p for p in rgb_dir.glob("*.png")} if rgb_dir.is_dir() else {}
    poses = {p.stem: p for p in pose_dir.glob("*.txt")} if pose_dir.is_dir() else {}
    if rgb_dir.is_dir() and not images:
        report.problems.append(Problem(rgb_dir, "no .png images"))
    for name in sorted(images.keys() - poses.keys()):
        report.problems.append(Problem(pose_dir / f"{name}.txt", f"missing pose for image {images[name]}"))
    for name in sorted(poses.keys() - images.keys()):
        report.problems.append(Problem(rgb_dir / f"{name}.png", f"missing image for pose {poses[name]}"))
    for name in sorted(poses):
        why = pose_problem(poses[name])
        if why:
            report.problems.append(Problem(poses[name], why))
    for name in sorted(images):
        size, why = image_size(images[name])
        if why:
            report.problems.append(Problem(images[name], why))
            continue
        sizes[images[name]] = size
        report.image_sizes[size] += 1
        if hw is not None and size != hw:
            report.problems.append(
                Problem(images[name], f"image is {size[0]} x {size[1]} but intrinsics.txt says {hw[0]} x {hw[1]}")
            )
    report.objects[split] = report.objects.get(split, 0) + 1
    report.views[split] = report.views.get(split, 0) + len(images.keys() & poses.keys())


def check_srn(root: str | Path) -> CheckReport:
    """Validate the SRN folder ``root``; see the module docstring."""
    root = Path(root)
    report = CheckReport(root)
    folders = split_folders(root)
    if not folders:
        what = "does not exist" if not root.exists() else "has no split folders (<prefix>_train, _val, _test)"
        report.problems.append(Problem(root, what))
        return report
    sizes: dict[Path, tuple[int, int]] = {}
    for split, folder in folders.items():
        objects = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not objects:
            report.problems.append(Problem(folder, "no object folders"))
        for obj in objects:
            _check_object(obj, split, report, sizes)
    if len(report.image_sizes) > 1:
        common = report.image_sizes.most_common(1)[0][0]
        for path, size in sizes.items():
            if size != common:
                report.problems.append(
                    Problem(path, f"image is {size[0]} x {size[1]}; most images are {common[0]} x {common[1]}")
                )
    return report
