"""Validation of SRN-layout dataset folders (``vsd-run data check ROOT``).

Checked, for every split folder (``<prefix>_train``, ``_val``, ``_test`` or plain ``train``, ...)
and every object in it, by the same checks the SRN reader applies to every file it reads
(:mod:`vsd.plugins.datasets.srn_checks`), so that a file rejected here fails training with the
same message:

- ``intrinsics.txt``: UTF-8 text, first line ``f cx cy ...`` with f positive and finite and the
  principal point inside the image, last line ``H W`` (positive integers);
- every ``rgb/*.png`` has a ``pose/*.txt`` and every pose an image;
- poses: UTF-8 text, 16 finite numbers forming a rigid transform (rotation orthonormal to 1e-3,
  determinant +1, last row ``0 0 0 1``);
- images: readable to the end, of the size ``H W`` named by the intrinsics; and, across the
  dataset, all of one size.

Each problem names the file and what is wrong.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..plugins.datasets.srn_checks import (
    ROTATION_TOLERANCE,
    BadFile,
    check_image_size,
    read_intrinsics_file,
    read_pose_file,
    unreadable_image,
    view_files,
)

SPLITS = ("train", "val", "test")
__all__ = ["ROTATION_TOLERANCE", "CheckReport", "Problem", "check_srn", "image_size", "pose_problem", "split_folders"]


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
    try:
        k = read_intrinsics_file(path)
    except BadFile as e:
        report.problems.append(Problem(e.path, e.problem))
        return None
    return k.H, k.W


def pose_problem(path: Path) -> str | None:
    """What is wrong with a pose file, or None."""
    try:
        read_pose_file(path)
    except BadFile as e:
        return e.problem
    return None


def image_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((H, W), None) for a fully readable image, else (None, why)."""
    try:
        with Image.open(path) as im:
            im.load()
            return (im.height, im.width), None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on corrupt files
        return None, unreadable_image(path, e).problem


def _check_object(obj: Path, split: str, report: CheckReport, sizes: dict[Path, tuple[int, int]]) -> None:
    hw = _intrinsics(obj / "intrinsics.txt", report)
    images, poses, layout = view_files(obj)
    report.problems += [Problem(e.path, e.problem) for e in layout]
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
        if hw is not None:
            try:
                check_image_size(images[name], size, hw)
            except BadFile as e:
                report.problems.append(Problem(e.path, e.problem))
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
