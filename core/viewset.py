"""The unit of data in vsd: a batch of viewsets (V posed images of each of B objects)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .cameras import Cameras


@dataclass
class Viewset:
    """A batch of viewsets.

    images: (B, V, 3, H, W) in [-1, 1]
    cameras: Cameras with shape (B, V)
    masks: optional (B, V, 1, H, W) in [0, 1], foreground coverage
    timesteps: optional (B, V) long, the diffusion timestep of each view (0 = clean)
    """

    images: Tensor
    cameras: Cameras
    masks: Tensor | None = None
    timesteps: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    @property
    def num_views(self) -> int:
        return self.images.shape[1]

    def to(self, device) -> "Viewset":
        return Viewset(
            self.images.to(device),
            self.cameras.to(device),
            None if self.masks is None else self.masks.to(device),
            None if self.timesteps is None else self.timesteps.to(device),
        )

    def select_views(self, idx: Tensor | list[int] | slice) -> "Viewset":
        """The same objects with only the views ``idx`` (indexing dim 1)."""
        return Viewset(
            self.images[:, idx],
            self.cameras[:, idx],
            None if self.masks is None else self.masks[:, idx],
            None if self.timesteps is None else self.timesteps[:, idx],
        )

    def with_(self, **changes) -> "Viewset":
        return replace(self, **changes)


def collate_viewsets(items: list[dict]) -> Viewset:
    """Collate dataset items into a :class:`Viewset`.

    Each item is a dict with ``images (V, 3, H, W)`` in [-1, 1], ``c2w (V, 4, 4)``, ``K (V, 4)``
    and optionally ``masks (V, 1, H, W)``.
    """
    images = torch.stack([it["images"] for it in items])
    H, W = images.shape[-2:]
    cams = Cameras(torch.stack([it["c2w"] for it in items]), torch.stack([it["K"] for it in items]), H, W)
    masks = torch.stack([it["masks"] for it in items]) if all("masks" in it for it in items) else None
    return Viewset(images, cams, masks)
