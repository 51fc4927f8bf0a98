"""ShapeNet-SRN folders (the layout of the SRN cars/chairs release used by pixelNeRF).

Layout, one folder per object::

    ROOT/<prefix>_<split>/<object_id>/rgb/NNNNNN.png     RGB or RGBA images
                                     /pose/NNNNNN.txt    16 numbers: 4x4 camera-to-world, OpenCV
                                     /intrinsics.txt     "f cx cy 0", ..., last line "H W"

A plain ``ROOT/<split>`` folder is accepted too. The intrinsics are in pixels of an ``H x W``
image (the cars release: f = 131.25, cx = cy = 64 at 128 x 128); they are rescaled with the images.
Folders are listed when first needed and files are read only for the views an item uses.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor

from ...core.errors import DataError
from ...core.settings import Seed, Settings as BaseSettings
from ...core.contracts import SceneInfo, ViewsetDataset
from .srn_checks import check_image_size, read_intrinsics_file, read_pose_file, unreadable_image, view_files

SRN_TEST_SOURCE_VIEW = 64  # the conditioning view of every test object in the published protocol
SRN_TEST_NOISY_VIEWS = (90, 104, 120)  # the published evaluation's 3 noisy views (1 clean + 3 noisy)
_BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
# RGB files carry no alpha: a pixel belongs to the object when a channel differs from the
# background by more than this (a little above PNG rounding).
_MASK_TOLERANCE = 2.5 / 255


# ---- writing ------------------------------------------------------------------------------------
def write_srn_object(
    root: str | Path,
    split: str,
    object_id: str,
    images: Tensor,
    c2w: Tensor,
    K: Tensor,
    size: tuple[int, int],
    *,
    prefix: str = "cars",
    masks: Tensor | None = None,
) -> Path:
    """Write one object in the SRN layout and return its folder.

    images: (V, 3, H, W) in [0, 1]; c2w: (V, 4, 4) camera-to-world, OpenCV;
    K: (4,) fx, fy, cx, cy in pixels of an image of ``size = (H, W)`` (SRN stores one focal
    length, so fx must equal fy); masks: optional (V, 1, H, W) in [0, 1], written as alpha.
    """
    fx, fy, cx, cy = (float(k) for k in K)
    if not math.isclose(fx, fy, rel_tol=1e-6):
        raise ValueError(f"SRN intrinsics hold a single focal length; got fx={fx}, fy={fy}")
    if images.shape[0] != c2w.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {c2w.shape[0]} poses")
    folder = Path(root) / f"{prefix}_{split}" / object_id
    (folder / "rgb").mkdir(parents=True, exist_ok=True)
    (folder / "pose").mkdir(parents=True, exist_ok=True)
    H, W = size
    (folder / "intrinsics.txt").write_text(f"{fx:.9g} {cx:.9g} {cy:.9g} 0.\n0. 0. 0.\n1.\n{H} {W}\n")
    pixels = images if masks is None else torch.cat([images, masks], 1)
    pixels = (pixels.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for v in range(pixels.shape[0]):
        Image.fromarray(pixels[v], "RGB" if masks is None else "RGBA").save(folder / "rgb" / f"{v:06d}.png")
        rows = [" ".join(f"{x:.9g}" for x in row) for row in c2w[v].detach().double().cpu().tolist()]
        (folder / "pose" / f"{v:06d}.txt").write_text("\n".join(rows) + "\n")
    return folder


# ---- reading single files -----------------------------------------------------------------------
# Every file is checked as it is read, by the checks `vsd-run data check` runs (srn_checks.py):
# a file that check rejects fails here with the same message.
def read_pose(path: Path) -> Tensor:
    """(4, 4) camera-to-world matrix from an SRN pose file (16 numbers, row-major, rigid)."""
    return torch.from_numpy(read_pose_file(path)).float()


def read_intrinsics(path: Path) -> tuple[Tensor, tuple[int, int]]:
    """``K (4,) = f, f, cx, cy`` and the ``(H, W)`` those pixels refer to, from intrinsics.txt."""
    k = read_intrinsics_file(path)
    return torch.tensor([k.f, k.f, k.cx, k.cy], dtype=torch.float32), (k.H, k.W)


def read_image(path: Path, background: tuple[float, float, float]) -> tuple[Tensor, Tensor]:
    """rgb (3, H, W) in [0, 1] over ``background`` and mask (1, H, W) from an RGB(A) PNG.

    The mask is the alpha channel when there is one, else "differs from the background colour".
    """
    try:
        with Image.open(path) as im:
            has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            pixels = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... on corrupt files
        raise unreadable_image(path, e) from None
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    bg = torch.tensor(background).view(3, 1, 1)
    if has_alpha:
        mask = x[3:]
        return x[:3] * mask + bg * (1 - mask), mask
    mask = ((x - bg).abs() > _MASK_TOLERANCE).any(0, keepdim=True).float()
    return x, mask


class SRNDataset(ViewsetDataset):
    """Viewsets from ShapeNet-SRN folders (see the module docstring for the layout).

    Constructed as ``SRNDataset(settings, split="train" | "val" | "test")``. Items follow
    :class:`ViewsetDataset`: images (V, 3, S, S) in [-1, 1] with S = ``image_size``,
    c2w (V, 4, 4), K (V, 4) rescaled to S, masks (V, 1, S, S).

    View choice: ``protocol="random"`` draws V distinct views, afresh on every call in the train
    split and from a per-index seed in val/test. ``protocol="srn-test"`` puts view 64 (or the
    last view of objects with fewer) first and fills the rest evenly from the remaining views in
    index order. :meth:`load` reads any views of an object, e.g. every target of the protocol.
    """

    class Settings(BaseSettings):
        root: str
        prefix: str = "cars"
        image_size: int = 64
        views: int = 4
        bound: float = Field(0.5, gt=0)
        camera_radius: float = Field(1.3, gt=0)
        fov_deg: float = Field(51.98, gt=0, lt=180)
        near: float = Field(0.8, gt=0)
        far: float = 1.8
        up_axis: Literal["y", "z"] = "z"  # world up of turntables; SRN cars stand on z = const
        background: Literal["white", "black"] = "white"
        protocol: Literal["random", "srn-test"] = "random"
        max_objects: int | None = None
        seed: Seed = 0  # of the per-index view choice in val/test
        # make the dataset on first use when `root` has no split folders (see datatools/prepare.py)
        prepare: Literal["torcs-cars", "minens-character-creator"] | None = None

        @field_validator("image_size", "views")
        @classmethod
        def _positive(cls, v: int) -> int:
            if v < 1:
                raise ValueError(f"must be >= 1, got {v}")
            return v

        @field_validator("max_objects")
        @classmethod
        def _positive_or_none(cls, v: int | None) -> int | None:
            if v is not None and v < 1:
                raise ValueError(f"must be >= 1 or null, got {v}")
            return v

        @field_validator("far")
        @classmethod
        def _beyond_near(cls, v: float, info: ValidationInfo) -> float:
            near = info.data.get("near")
            if near is not None and not v > near:
                raise ValueError(f"must exceed data.near ({near}), got {v}")
            return v

    # (clean view, noisy views) of the published evaluation, as view positions (`vsd-run eval --protocol paper`)
    paper_views = (SRN_TEST_SOURCE_VIEW, SRN_TEST_NOISY_VIEWS)

    def __init__(self, settings: "SRNDataset.Settings", *, split: str = "train"):
        super().__init__(settings, split=split)
        s = settings
        self.info = SceneInfo(
            bound=s.bound,
            camera_radius=s.camera_radius,
            fov_deg=s.fov_deg,
            near=s.near,
            far=s.far,
            up_axis=s.up_axis,
            background=s.background,
        )
        self.folder = self._split_folder(Path(s.root), s.prefix, split)
        self.objects = sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.objects:
            raise DataError(f"{self.folder}: no object folders (expected <object_id>/rgb, pose, intrinsics.txt)")
        if s.max_objects is not None:
            self.objects = self.objects[: s.max_objects]
        self._view_names: dict[int, list[str]] = {}

    @staticmethod
    def _split_folder(root: Path, prefix: str, split: str) -> Path:
        candidates = [root / f"{prefix}_{split}", root / split]
        for c in candidates:
            if c.is_dir():
                return c
        if not root.is_dir():
            raise DataError(f"SRN root {root} is not a folder")
        raise DataError(f"SRN root {root}: no split folder {candidates[0].name}/ or {candidates[1].name}/")

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def object_ids(self) -> list[str]:
        return [p.name for p in self.objects]

    # ---- listing --------------------------------------------------------------------------------
    def view_names(self, i: int) -> list[str]:
        """Sorted view stems ("000000", ...) of object ``i``, each with an image and a pose."""
        if i not in self._view_names:
            images, _, problems = view_files(self.objects[i])
            if problems:
                raise problems[0]
            self._view_names[i] = sorted(images)
        return self._view_names[i]

    def num_views(self, i: int) -> int:
        return len(self.view_names(i))

    def choose_views(self, i: int) -> list[int]:
        """Positions (into :meth:`view_names`) of the V views of item ``i``."""
        n, V = self.num_views(i), self.settings.views
        if self.settings.protocol == "srn-test":
            source = min(SRN_TEST_SOURCE_VIEW, n - 1)
            rest = [k for k in range(n) if k != source]
            if not rest:
                return [source] * V
            picks = np.linspace(0, len(rest) - 1, V - 1).round().astype(int) if V > 1 else []
            return [source] + [rest[k] for k in picks]
        return self.random_views(i, n, V)

    # ---- reading --------------------------------------------------------------------------------
    def load(self, i: int, views: list[int]) -> dict:
        """Item dict (see the class docstring) of object ``i`` with the given view positions."""
        obj, names, S = self.objects[i], self.view_names(i), self.settings.image_size
        K, (H, W) = read_intrinsics(obj / "intrinsics.txt")
        scale = torch.tensor([S / W, S / H, S / W, S / H])
        bg = _BACKGROUNDS[self.settings.background]
        rgbs, masks, poses = [], [], []
        for k in views:
            path = obj / "rgb" / f"{names[k]}.png"
            rgb, mask = read_image(path, bg)
            check_image_size(path, tuple(rgb.shape[-2:]), (H, W))  # else K would be rescaled wrongly
            rgbs.append(_resize(rgb, S))
            masks.append(_resize(mask, S))
            poses.append(read_pose(obj / "pose" / f"{names[k]}.txt"))
        images = torch.stack(rgbs).clamp(0, 1) * 2 - 1
        return {
            "images": images,
            "c2w": torch.stack(poses),
            "K": (K * scale).expand(len(views), 4).clone(),
            "masks": torch.stack(masks).clamp(0, 1),
        }

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"object index {i} out of range for {len(self)} {self.split} objects")
        return self.load(i, self.choose_views(i))


def _resize(x: Tensor, size: int) -> Tensor:
    """(C, h, w) -> (C, size, size); antialiased so that downsampling averages."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
