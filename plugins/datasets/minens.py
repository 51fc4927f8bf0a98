"""Minens: articulated blocky characters with procedural (or loaded) skins, rendered on the fly.

A character is six textured boxes (head, body, arms, legs; 32 texels tall) posed by random joint
angles, centred at the origin with y up and facing +z. Cameras sit on a sphere of radius 5 around
it (fov 15 degrees), looking at the origin. Object ``i`` of a split is a pure function of
``(seed, split, i)``; training items draw fresh cameras on every access, evaluation items do not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from ...core.cameras import Cameras, spherical_to_cartesian
from ...core.settings import Seed, Settings as BaseSettings
from ...core.contracts import SPLIT_SEEDS, SceneInfo, ViewsetDataset
from .boxes import Boxes, box_uv_maps, render_boxes
from .skins import PARTS, flat_skin, load_skin, procedural_skin

CHARACTER_HEIGHT = 1.1  # world units for 32 texels: fills most of the frame at radius 5, fov 15
BOUND = 0.6  # the character fits in [-BOUND, BOUND]^3 in every pose
CAMERA_RADIUS = 5.0
FOV_DEG = 15.0
DEFAULT_SIZES = {"train": 10000, "val": 64, "test": 64}
BODY_PARTS = ("head", "body", "right_arm", "left_arm", "right_leg", "left_leg")


@dataclass(frozen=True)
class Pose:
    """Joint angles in degrees. Swings turn a limb about the x axis through its shoulder or hip
    (positive moves the hand or foot backwards); abduction lifts an arm sideways, away from the
    body. Positive head yaw turns the face towards +x (the character's left); positive pitch
    looks up."""

    head_yaw: float = 0.0
    head_pitch: float = 0.0
    right_arm_swing: float = 0.0
    left_arm_swing: float = 0.0
    right_arm_abduction: float = 0.0
    left_arm_abduction: float = 0.0
    right_leg_swing: float = 0.0
    left_leg_swing: float = 0.0

    @classmethod
    def random(cls, rng: np.random.Generator, max_swing: float = 45.0, max_head_yaw: float = 30.0) -> "Pose":
        s = rng.uniform(-max_swing, max_swing, 4)
        return cls(
            head_yaw=float(rng.uniform(-max_head_yaw, max_head_yaw)),
            head_pitch=float(rng.uniform(-15, 15)),
            right_arm_swing=float(s[0]),
            left_arm_swing=float(s[1]),
            right_arm_abduction=float(rng.uniform(0, 15)),
            left_arm_abduction=float(rng.uniform(0, 15)),
            right_leg_swing=float(s[2]),
            left_leg_swing=float(s[3]),
        )


def _rotation(axis: str, deg: float) -> Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    m = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]]}
    m["z"] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    return torch.tensor(m[axis], dtype=torch.float32)


def _joints(pose: Pose) -> dict[str, tuple[tuple[float, float, float], tuple[float, float, float], Tensor]]:
    """part -> (pivot, box centre relative to the pivot, rotation), in texels, y up, facing +z.

    The character spans y in [-16, 16]: legs [-16, -4], body [-4, 8], head [8, 16]; its right
    side is -x. Shoulders sit 2 texels below the top of the body, as in the player model.
    """
    p = pose

    def arm(abduction: float, swing: float) -> Tensor:
        return _rotation("z", abduction) @ _rotation("x", swing)

    return {
        "head": ((0, 8, 0), (0, 4, 0), _rotation("y", p.head_yaw) @ _rotation("x", -p.head_pitch)),
        "body": ((0, 2, 0), (0, 0, 0), torch.eye(3)),
        "right_arm": ((-5, 6, 0), (-1, -4, 0), arm(-p.right_arm_abduction, p.right_arm_swing)),
        "left_arm": ((5, 6, 0), (1, -4, 0), arm(p.left_arm_abduction, p.left_arm_swing)),
        "right_leg": ((-2, -4, 0), (0, -6, 0), _rotation("x", p.right_leg_swing)),
        "left_leg": ((2, -4, 0), (0, -6, 0), _rotation("x", p.left_leg_swing)),
    }


def character_boxes(pose: Pose, height: float = CHARACTER_HEIGHT) -> Boxes:
    """The six boxes of a character in ``pose``, in :data:`BODY_PARTS` order, ``height`` tall."""
    texel = height / 32
    centers, rotations, halves, maps, bounds = [], [], [], [], []
    for name, (pivot, offset, rot) in _joints(pose).items():
        u0, v0, (w, h, d) = PARTS[name.replace("left", "right")]
        m, b = box_uv_maps(u0, v0, w, h, d, mirror=name.startswith("left"))
        pivot_t, offset_t = torch.tensor(pivot, dtype=torch.float32), torch.tensor(offset, dtype=torch.float32)
        centers.append((pivot_t + rot @ offset_t) * texel)
        rotations.append(rot)
        halves.append(torch.tensor([w, h, d], dtype=torch.float32) * texel / 2)
        maps.append(m)
        bounds.append(b)
    stacked = (torch.stack(x) for x in (centers, rotations, halves, maps, bounds))
    return Boxes(*stacked)


def sample_cameras(
    n: int, generator: torch.Generator | None, elevation: tuple[float, float], image_size: int
) -> Cameras:
    """``n`` cameras at radius 5 with uniform azimuth and elevation (degrees), looking at 0."""
    u = torch.rand(n, 2, generator=generator)
    az = u[:, 0] * 2 * math.pi
    el = torch.deg2rad(elevation[0] + u[:, 1] * (elevation[1] - elevation[0]))
    eye = spherical_to_cartesian(az, el, CAMERA_RADIUS, "y")
    return Cameras.look_at(eye, fov_deg=FOV_DEG, height=image_size, width=image_size)


AUTO_SKINS = Path("data/minens_real/skins")
GENERATED_SKINS = {"procedural": procedural_skin, "flat": flat_skin}


def resolve_skins(skins: str) -> str:
    """``auto`` -> the real skins made by ``vsd-run data minens data/minens_real`` when present."""
    if skins != "auto":
        return skins
    return str(AUTO_SKINS) if (AUTO_SKINS / "train").is_dir() else "procedural"


class MinensDataset(ViewsetDataset):
    """Posed viewsets of procedurally skinned blocky characters on a white background.

    Constructed as ``MinensDataset(settings, split="train" | "val" | "test")``. Items follow
    :class:`ViewsetDataset`: images (V, 3, H, W) in [-1, 1], c2w (V, 4, 4), K (V, 4),
    masks (V, 1, H, W).
    """

    class Settings(BaseSettings):
        image_size: int = 32
        views: int = 3
        num_objects: int | None = Field(None, ge=1, le=2**40)  # None: train 10000, val 64, test 64
        seed: Seed = 0
        supersample: int = 2
        elevation: tuple[float, float] = (-20.0, 50.0)  # degrees
        # "procedural", "flat" (one flat colour per box: head, body, arms, legs; a fast benchmark of
        # whether a model learns each object's hues), a folder of 64x32 (or 64x64) PNG skins (with
        # train/val/test sub-folders, as `vsd-run data minens ROOT` writes to ROOT/skins), or
        # "auto": AUTO_SKINS when it exists (relative to the working folder), else procedural
        skins: str = "procedural"
        cache: bool = True  # keep rendered val/test items in memory
        max_swing: float = 45.0  # degrees, limbs swing in [-max_swing, max_swing]
        max_head_yaw: float = 30.0
        shading: float = Field(0.0, ge=0, le=1)  # 0: flat texture colours; see boxes.render_boxes

        @field_validator("image_size", "views", "supersample")
        @classmethod
        def _positive(cls, v: int) -> int:
            if v < 1:
                raise ValueError(f"must be >= 1, got {v}")
            return v

        @model_validator(mode="after")
        def _check(self):
            lo, hi = self.elevation
            if not -60.0 <= lo <= hi <= 60.0:
                raise ValueError(f"elevation must satisfy -60 <= low <= high <= 60, got {self.elevation}")
            if not 0.0 <= self.max_swing <= 90.0 or not 0.0 <= self.max_head_yaw <= 90.0:
                raise ValueError("max_swing and max_head_yaw must lie in [0, 90] degrees")
            if self.num_objects is not None and self.num_objects < 1:
                raise ValueError(f"num_objects must be >= 1, got {self.num_objects}")
            return self

    info = SceneInfo(
        bound=BOUND,
        camera_radius=CAMERA_RADIUS,
        fov_deg=FOV_DEG,
        near=round(CAMERA_RADIUS - math.sqrt(3) * BOUND, 2),  # rays cover the whole [-bound, bound]^3
        far=round(CAMERA_RADIUS + math.sqrt(3) * BOUND, 2),
        up_axis="y",
        background="white",
    )

    def __init__(self, settings: "MinensDataset.Settings", *, split: str = "train"):
        super().__init__(settings, split=split)
        self.num_objects = settings.num_objects or DEFAULT_SIZES[split]
        skins = resolve_skins(settings.skins)
        self.generate_skin = GENERATED_SKINS.get(skins)
        self.skin_files = None if self.generate_skin else self._skin_files(Path(skins), split)
        self._cache: dict[int, dict] = {}

    @staticmethod
    def _skin_files(folder: Path, split: str) -> list[Path]:
        """Skins of a folder, split 80/10/10 by sorted position (all of them if fewer than 10);
        a folder with a sub-folder named after the split uses that sub-folder's skins, all of them."""
        if not folder.is_dir():
            raise ValueError(f"skins must be 'procedural', 'flat', 'auto' or a folder of PNG skins; {folder} is not a folder")
        if (folder / split).is_dir():
            files = sorted((folder / split).glob("*.png"))
            if not files:
                raise ValueError(f"skins folder {folder / split} has no .png files")
            return files
        files = sorted(folder.glob("*.png"))
        if not files:
            raise ValueError(f"skins folder {folder} has no .png files")
        if len(files) < 10:
            return files
        keep = {"test": lambda k: k % 10 == 0, "val": lambda k: k % 10 == 1, "train": lambda k: k % 10 > 1}[split]
        return [f for k, f in enumerate(files) if keep(k)]

    def __len__(self) -> int:
        return self.num_objects

    @property
    def object_ids(self) -> list[str]:
        return [f"{self.split}-{i:06d}" for i in range(self.num_objects)]

    # ---- objects ----------------------------------------------------------------------------
    def _rng(self, i: int, stream: int) -> np.random.Generator:
        if not 0 <= i < self.num_objects:
            raise IndexError(f"object index {i} out of range for {self.num_objects} {self.split} objects")
        return np.random.default_rng([self.settings.seed, SPLIT_SEEDS[self.split], i, stream])

    def character(self, i: int) -> tuple[Tensor, dict, Pose]:
        """Skin (3, 32, 64), skin parameters and pose of object ``i``."""
        rng = self._rng(i, 0)
        if self.skin_files is None:
            skin, params = self.generate_skin(rng)
        else:
            path = self.skin_files[rng.integers(len(self.skin_files))]
            skin, params = load_skin(path), {"file": str(path)}
        pose = Pose.random(rng, self.settings.max_swing, self.settings.max_head_yaw)
        return skin, params, pose

    def describe(self, i: int) -> dict:
        """Skin parameters, pose (degrees) and whether the torso's back differs from its front."""
        skin, params, pose = self.character(i)
        u0, v0, (w, h, d) = PARTS["body"]
        front = skin[:, v0 + d : v0 + d + h, u0 + d : u0 + d + w].mean((1, 2))
        back = skin[:, v0 + d : v0 + d + h, u0 + 2 * d + w : u0 + 2 * d + 2 * w].mean((1, 2))
        clean = {k: (v.round(1).tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()}
        return {
            "id": self.object_ids[i],
            "skin": clean,
            "pose": asdict(pose),
            "back_differs": bool((front - back).abs().sum() > 0.15),
        }

    def render_object(self, i: int, cameras: Cameras) -> tuple[Tensor, Tensor]:
        """Ground truth of object ``i`` at ``cameras`` (shape (...)): rgb (..., 3, H, W) in [0, 1]
        on white, and mask (..., 1, H, W)."""
        skin, _, pose = self.character(i)
        return render_boxes(
            character_boxes(pose), skin, cameras, supersample=self.settings.supersample, shading=self.settings.shading
        )

    # ---- items ------------------------------------------------------------------------------
    def cameras(self, i: int) -> Cameras:
        """The V cameras of item ``i``: fixed per index for val/test, fresh draws for train."""
        s = self.settings
        if self.split == "train":
            generator = None  # torch's global generator, seeded per DataLoader worker
        else:
            generator = torch.Generator().manual_seed(int(self._rng(i, 1).integers(2**62)))
        return sample_cameras(s.views, generator, s.elevation, s.image_size)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += self.num_objects
        if i in self._cache:
            return {k: v.clone() for k, v in self._cache[i].items()}
        cams = self.cameras(i)
        rgb, mask = self.render_object(i, cams)
        item = {"images": rgb * 2 - 1, "c2w": cams.c2w, "K": cams.K, "masks": mask}
        if self.settings.cache and self.split != "train":
            self._cache[i] = item
            return {k: v.clone() for k, v in item.items()}
        return item
