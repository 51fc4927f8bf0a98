"""A small analytic renderer for textured oriented boxes (pure torch, vectorised over rays).

Each box carries, per face, an affine map from the face's local coordinates to texel coordinates
of a texture atlas, laid out like a Minecraft skin: a box of ``w x h x d`` texels (x, y, z
extents) whose UV origin is ``(u0, v0)`` unwraps into

    row v0     : [ d ][ top w ][ bottom w ]
    row v0 + d : [ right d ][ front w ][ left d ][ back w ]     (h rows)

as seen from outside the box, with "front" facing +z, "right" facing -x (the box's own right when
it faces +z), y up. Texels are looked up nearest-neighbour; anti-aliasing comes from supersampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.cameras import Cameras

# Face order used everywhere in this module: the outward normal of face f is
# sign * e_axis with axis = f // 2 and sign = +1 for even f.
FACES = ("+x", "-x", "+y", "-y", "+z", "-z")
FACE_NAMES = ("left", "right", "top", "bottom", "front", "back")


def box_uv_maps(u0: float, v0: float, w: int, h: int, d: int, mirror: bool = False) -> tuple[Tensor, Tensor]:
    """Per-face texel maps of a ``w x h x d`` box whose UV layout starts at ``(u0, v0)``.

    A point on face f with normalised local coordinates ``q in [-1, 1]^3`` has texel coordinates
    ``uv = maps[f, :, :3] @ q + maps[f, :, 3]``; ``bounds[f] = (u_lo, v_lo, u_hi, v_hi)`` is the
    face's texel rectangle. ``mirror`` reflects the box in x (so a left limb wears the right
    limb's texture mirrored, as Minecraft does).

    Returns maps (6, 2, 4) and bounds (6, 4).
    """
    side_v = (0.0, -h / 2, 0.0, v0 + d + h / 2)  # top row of the side strip is the box's top
    rows = {
        "+x": ((0.0, 0.0, -d / 2, u0 + d + w + d / 2), side_v, (u0 + d + w, v0 + d, u0 + 2 * d + w, v0 + d + h)),
        "-x": ((0.0, 0.0, d / 2, u0 + d / 2), side_v, (u0, v0 + d, u0 + d, v0 + d + h)),
        "+y": ((w / 2, 0.0, 0.0, u0 + d + w / 2), (0.0, 0.0, d / 2, v0 + d / 2), (u0 + d, v0, u0 + d + w, v0 + d)),
        "-y": (
            (w / 2, 0.0, 0.0, u0 + d + w + w / 2),
            (0.0, 0.0, -d / 2, v0 + d / 2),
            (u0 + d + w, v0, u0 + d + 2 * w, v0 + d),
        ),
        "+z": ((w / 2, 0.0, 0.0, u0 + d + w / 2), side_v, (u0 + d, v0 + d, u0 + d + w, v0 + d + h)),
        "-z": (
            (-w / 2, 0.0, 0.0, u0 + 2 * d + w + w / 2),
            side_v,
            (u0 + 2 * d + w, v0 + d, u0 + 2 * d + 2 * w, v0 + d + h),
        ),
    }
    maps = torch.tensor([[rows[f][0], rows[f][1]] for f in FACES])
    bounds = torch.tensor([rows[f][2] for f in FACES])
    if mirror:
        order = [1, 0, 2, 3, 4, 5]
        maps, bounds = maps[order].clone(), bounds[order]
        maps[..., 0] = -maps[..., 0]
    return maps, bounds


@dataclass
class Boxes:
    """N oriented textured boxes.

    centers: (N, 3) world positions; rotations: (N, 3, 3) box-to-world; half_sizes: (N, 3)
    uv_maps: (N, 6, 2, 4) and uv_bounds: (N, 6, 4), see :func:`box_uv_maps`.
    """

    centers: Tensor
    rotations: Tensor
    half_sizes: Tensor
    uv_maps: Tensor
    uv_bounds: Tensor

    def __len__(self) -> int:
        return self.centers.shape[0]

    def to_world(self, index: int, q: Tensor) -> Tensor:
        """World positions (..., 3) of normalised local points ``q (..., 3)`` of box ``index``."""
        return (self.rotations[index] @ (q * self.half_sizes[index])[..., None])[..., 0] + self.centers[index]


def intersect(boxes: Boxes, origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First hit of each ray ``(R, 3)`` with the boxes.

    Returns ``hit (R,) bool``, ``index (R,)`` of the box hit, ``face (R,)`` in :data:`FACES`
    order and ``q (R, 3)``, the hit point in the box's normalised local coordinates (zeros where
    nothing is hit).
    """
    R = boxes.rotations
    o_local = torch.einsum("rk,nkj->rnj", origins, R) - torch.einsum("nk,nkj->nj", boxes.centers, R)
    d_local = torch.einsum("rk,nkj->rnj", dirs, R)
    # Keep exact zeros away so the slab test never computes 0 / 0.
    d_local = torch.where(d_local.abs() < 1e-12, torch.full_like(d_local, 1e-12), d_local)
    h = boxes.half_sizes
    t1, t2 = (-h - o_local) / d_local, (h - o_local) / d_local
    t_near, axis = torch.minimum(t1, t2).max(-1)  # (R, N): entry distance and entry axis
    t_far = torch.maximum(t1, t2).min(-1).values
    t = torch.where((t_near <= t_far) & (t_near > 0), t_near, torch.full_like(t_near, float("inf")))
    t_best, index = t.min(-1)
    hit = torch.isfinite(t_best)
    t_best = torch.where(hit, t_best, torch.zeros_like(t_best))

    rows = torch.arange(len(origins), device=origins.device)
    o_b, d_b, axis_b = o_local[rows, index], d_local[rows, index], axis[rows, index]
    q = (o_b + t_best[:, None] * d_b) / h[index]
    q = torch.where(hit[:, None], q.clamp(-1, 1), torch.zeros_like(q))
    entering_negative = d_b.gather(1, axis_b[:, None])[:, 0] > 0  # ray enters through the -axis face
    face = 2 * axis_b + entering_negative.long()
    return hit, index, face, q


def sample_atlas(boxes: Boxes, atlas: Tensor, index: Tensor, face: Tensor, q: Tensor) -> Tensor:
    """Nearest-texel colours (R, C) of ``atlas (C, Ha, Wa)`` at hit points from :func:`intersect`."""
    maps, bounds = boxes.uv_maps[index, face], boxes.uv_bounds[index, face]  # (R, 2, 4), (R, 4)
    uv = (maps[..., :3] * q[:, None, :]).sum(-1) + maps[..., 3]
    lo, hi = bounds[:, :2], bounds[:, 2:] - 1
    texel = torch.minimum(torch.maximum(uv.floor(), lo), hi).long()
    return atlas[:, texel[:, 1], texel[:, 0]].T


def render_boxes(
    boxes: Boxes,
    atlas: Tensor,
    cameras: Cameras,
    *,
    supersample: int = 1,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    shading: float = 0.0,
    light: tuple[float, float, float] = (0.3, 1.0, 0.6),
    return_ids: bool = False,
) -> tuple[Tensor, ...]:
    """Render textured boxes seen by ``cameras`` (shape ``(...)``).

    atlas: (3, Ha, Wa) colours in [0, 1]. Each pixel averages ``supersample^2`` rays.
    shading: 0 gives flat texture colours; s scales a face by ``1 - s + s * max(n . light, 0)``
    (n the face's world normal), which depends on the object only, so views stay consistent.

    Returns rgb (..., 3, H, W) in [0, 1] composited over ``background`` and mask (..., 1, H, W) in
    [0, 1] (fraction of rays hitting a box); with ``return_ids`` also ids (..., H, W) long, the
    box seen at each pixel centre ray (-1 for background), only defined for ``supersample == 1``.
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    if return_ids and supersample != 1:
        raise ValueError("return_ids needs supersample == 1")
    lead, H, W, s = cameras.shape, cameras.height, cameras.width, supersample
    cams = cameras.reshape(-1).resized(H * s, W * s)
    origins, dirs = cams.rays()  # (N, Hs, Ws, 3)
    hit, index, face, q = intersect(boxes, origins.reshape(-1, 3), dirs.reshape(-1, 3))
    color = sample_atlas(boxes, atlas.to(origins), index, face, q)
    if shading:
        axis, sign = face // 2, 1.0 - 2.0 * (face % 2)
        normal = boxes.rotations[index, :, axis] * sign[:, None]
        lit = (normal @ F.normalize(torch.tensor(light).to(normal), dim=0)).clamp(min=0)
        color = color * (1 - shading + shading * lit)[:, None]
    bg = torch.tensor(background).to(color)
    mask = hit.to(color)[:, None]
    color = color * mask + bg * (1 - mask)

    def to_image(x: Tensor) -> Tensor:  # (N * Hs * Ws, C) -> (N, C, H, W), averaging subsamples
        x = x.reshape(-1, H * s, W * s, x.shape[-1]).permute(0, 3, 1, 2)
        return F.avg_pool2d(x, s) if s > 1 else x

    rgb = to_image(color).reshape(*lead, 3, H, W)
    coverage = to_image(mask).reshape(*lead, 1, H, W)
    if not return_ids:
        return rgb, coverage
    ids = torch.where(hit, index, torch.full_like(index, -1)).reshape(*lead, H, W)
    return rgb, coverage, ids
