"""Representation slot: turn the denoiser's 3D feature volume into something renderable.

A representation is the denoiser's output head. Its ``kind`` says which renderers can draw it:
``"field"`` (a radiance field queried at 3D points, drawn by volume renderers) or ``"mesh"``
(triangle meshes, drawn by rasterisers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..settings import Plugin


class Field:
    """A batch of B radiance fields inside the cube ``[-bound, bound]^3``.

    ``query(points)``: points (B, N, 3) world coordinates -> ``(sigma, rgb)`` with
    sigma: (B, N) >= 0 volume density and rgb: (B, N, 3) in [0, 1]. Points outside the cube
    have zero density.

    ``density_grid(resolution)`` (used for mesh export) needs ``batch_size`` (B) and ``device``;
    subclasses set them or override ``density_grid``.
    """

    bound: float
    batch_size: int
    device: torch.device

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def density_grid(self, resolution: int, chunk_points: int = 1 << 18) -> Tensor:
        """(B, R, R, R) densities at the centres of an R^3 grid over the cube.

        Indexed ``[b, k, j, i]`` = the point ``(x_i, y_j, z_k)`` with
        ``x_i = bound * ((2 i + 1) / R - 1)``: the feature-volume convention.
        """
        R = resolution
        c = self.bound * ((2 * torch.arange(R, device=self.device) + 1) / R - 1)
        z, y, x = torch.meshgrid(c, c, c, indexing="ij")
        points = torch.stack([x, y, z], -1).reshape(1, -1, 3).expand(self.batch_size, -1, -1)
        sigma = torch.cat([self.query(p)[0] for p in points.split(chunk_points, dim=1)], dim=1)
        return sigma.reshape(self.batch_size, R, R, R)


@dataclass
class Mesh:
    """One triangle mesh: the exchange object between mesh representations and rasterisers.

    vertices: (N, 3) float world coordinates; faces: (F, 3) long;
    vertex_colors: (N, 3) in [0, 1] or None; uv: (N, 2) in [0, 1] or None with
    texture: (3, Ht, Wt) in [0, 1] or None.
    """

    vertices: Tensor
    faces: Tensor
    vertex_colors: Tensor | None = None
    uv: Tensor | None = None
    texture: Tensor | None = None


class Representation(Plugin, nn.Module):
    """The denoiser's 3D output head.

    Constructed as ``cls(settings, in_channels=C, resolution=D, bound=b)``: the feature volume
    has C channels on a D^3 grid spanning ``[-b, b]^3``.

    ``forward(volume)``: volume (B, C, D, D, D) -> a :class:`Field` (kind ``"field"``) or a
    list of B :class:`Mesh` (kind ``"mesh"``).
    """

    kind: ClassVar[str] = "field"

    def __init__(self, settings, *, in_channels: int, resolution: int, bound: float):
        nn.Module.__init__(self)
        self.settings = settings
        self.in_channels = in_channels
        self.resolution = resolution
        self.bound = bound

    def forward(self, volume: Tensor):  # pragma: no cover - interface
        raise NotImplementedError

    def regulariser(self, volume: Tensor) -> Tensor | None:
        """An extra training loss on the feature volume (B, C, D, D, D) this head is built from,
        already weighted (a scalar), or None for none (the default). Added to the diffusion
        loss in training only."""
        return None
