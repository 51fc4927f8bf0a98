"""Dataset slot: posed multi-view images of objects."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..settings import Plugin


SPLITS = ("train", "val", "test")

# per-split seed streams, so splits never share objects or views
SPLIT_SEEDS = {split: i for i, split in enumerate(SPLITS)}


@dataclass(frozen=True)
class SceneInfo:
    """What the engine needs to know about a dataset's scenes.

    bound: objects lie inside ``[-bound, bound]^3`` (the denoiser's volume spans this cube).
    camera_radius / fov_deg / up_axis: where novel-view cameras (turntables) are placed.
    near / far: ray range for volume rendering.
    background: "white", "black" or "random" (a random colour per viewset in training).
    """

    bound: float
    camera_radius: float
    fov_deg: float
    near: float
    far: float
    up_axis: str = "y"
    background: str = "white"


class ViewsetDataset(Plugin, Dataset):
    """A dataset of viewsets.

    Constructed as ``cls(settings, split=...)`` with split one of "train", "val", "test".
    ``settings`` always has ``image_size`` (int, pixels) and ``views`` (int, V per item).

    ``__getitem__(i)`` returns a dict:
        images: (V, 3, H, W) float in [-1, 1]
        c2w: (V, 4, 4) camera-to-world, OpenCV convention
        K: (V, 4) fx, fy, cx, cy in pixels
        masks: (V, 1, H, W) in [0, 1] (optional)
    ``info`` is a :class:`SceneInfo`.
    """

    info: SceneInfo

    def __init__(self, settings, *, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.settings = settings
        self.split = split

    def random_views(self, i: int, n: int, views: int) -> list[int]:
        """``views`` of item ``i``'s ``n`` view positions: fresh random ones in training, fixed
        per (settings.seed, split, i) otherwise; repeats only when there are too few views."""
        gen = None
        if self.split != "train":
            seed = getattr(self.settings, "seed", 0)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + SPLIT_SEEDS[self.split] * 65_537 + i)
        if n >= views:
            return torch.randperm(n, generator=gen)[:views].tolist()
        return torch.randint(n, (views,), generator=gen).tolist()
