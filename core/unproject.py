"""Lift per-view 2D feature maps into per-view 3D feature volumes (no visibility reasoning)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .cameras import Cameras


def voxel_centres(resolution: int, bound: float, device=None, dtype=None) -> Tensor:
    """World positions of the voxel centres, ``(D, D, D, 3)`` indexed ``[k, j, i] = (x_i, y_j, z_k)``.

    ``x_i = bound * ((2 i + 1) / D - 1)``: the ``align_corners=False`` convention of ``grid_sample``.
    """
    c = bound * ((2 * torch.arange(resolution, device=device, dtype=dtype) + 1) / resolution - 1)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def unproject(features: Tensor, cameras: Cameras, resolution: int, bound: float) -> Tensor:
    """Sample each view's features at the projections of the voxel centres.

    features: (B, V, C, h, w) — per-view feature maps, possibly smaller than the images.
    cameras: Cameras (B, V) for the full-resolution images; rescaled here to ``h x w``.
    returns (B, V, C, D, D, D) with ``D = resolution`` over the cube [-bound, bound]^3; voxels
    behind a camera or projecting outside its image get zeros.
    """
    B, V, C, h, w = features.shape
    pts = voxel_centres(resolution, bound, features.device, features.dtype).reshape(1, 1, -1, 3)
    uv, depth = cameras.resized(h, w).to(features.dtype).project(pts.expand(B, V, -1, 3))  # (B, V, N, 2)
    size = torch.tensor([w, h], device=uv.device, dtype=uv.dtype)
    inside = ((uv >= 0) & (uv <= size)).all(-1) & (depth > 0)  # (B, V, N)
    # Pixel centres sit at +0.5, so pixel coordinate u maps to 2 u / w - 1 under align_corners=False.
    # Clamping to the outermost pixel centres keeps the image's last half-pixel at full strength
    # (border padding); voxels that miss the image are sent far outside, where zero padding
    # gives exactly 0 - no mask has to multiply the sampled features.
    half = torch.full_like(size, 0.5)
    grid = torch.where(inside[..., None], 2 * torch.minimum(uv.clamp_min(0.5), size - half) / size - 1, 3.0)
    sampled = F.grid_sample(
        features.reshape(B * V, C, h, w),
        grid.reshape(B * V, 1, -1, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (B*V, C, 1, N)
    return sampled.reshape(B, V, C, resolution, resolution, resolution)
