"""The original's geometry without pytorch3d: its cameras, its voxel grid and its unprojection.

The original builds pytorch3d cameras and ``Volumes``; this module reproduces the maths they do
for it, in pytorch3d's conventions, and converts from vsd's :class:`~vsd.core.cameras.Cameras`.

Conventions (pytorch3d's, which the original uses throughout):

- **Camera** ``R: (..., 3, 3)``, ``T: (..., 3)`` act on row vectors: ``x_view = x_world @ R + T``.
  View space has +X left, +Y up, +Z forward: it is OpenCV's camera space turned 180 degrees
  about the optical axis.
- **NDC**: ``x_ndc = fx * x_view / z_view + px`` (same for y), +X left, +Y up, so the image's
  top-left corner is (+1, +1) and its bottom-right (-1, -1). ``FoVPerspectiveCameras`` with
  ``aspect_ratio = 1`` is the case ``fx = fy = 1 / tan(fov / 2)``, ``px = py = 0`` (its NDC depth
  differs, but nothing here uses NDC depth). Only square images are supported, as in the original.
- **Volume**: a cubic grid of ``side`` voxels per axis; voxel ``[d, h, w]`` has local coordinates
  ``(x, y, z) = linspace(-1, 1, side)[(w, h, d)]`` and world coordinates
  ``local * (side - 1) / 2 * voxel_size - translation`` with ``voxel_size = extent * mults / side``
  per axis (x, y, z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from ..cameras import Cameras

# OpenCV camera space -> pytorch3d view space: x and y change sign.
_CV_TO_VIEW = (-1.0, -1.0, 1.0)


@dataclass(frozen=True)
class PaperVolume:
    """The original's scene box (``render.volume_extent_world``, ``render.volume_size_mults``,
    ``render.volume_offsets``). The unprojection grid has ``model.volume_size`` voxels a side and the
    rendered one ``render.volume_size``; the world extent of each follows from its own side."""

    extent: float = 1.0
    size_mults: tuple[float, float, float] = (1.0, 1.0, 1.0)
    offsets: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        object.__setattr__(self, "size_mults", tuple(float(m) for m in self.size_mults))
        object.__setattr__(self, "offsets", tuple(float(o) for o in self.offsets))
        if len(self.size_mults) != 3 or len(self.offsets) != 3:
            raise ValueError("size_mults and offsets need three values each (x, y, z)")

    def voxel_size(self, side: int) -> Tensor:
        """(3,) voxel size in world units along x, y, z for a grid of ``side`` voxels."""
        return torch.tensor([self.extent * m / side for m in self.size_mults])

    def half_size(self, side: int) -> Tensor:
        """(3,) distance from the volume's centre to its outermost voxel centres (local +-1)."""
        return self.voxel_size(side) * (side - 1) / 2

    def to_local(self, points: Tensor, side: int) -> Tensor:
        """World points ``(..., 3)`` -> local coordinates in which the voxel centres span [-1, 1]."""
        offsets = torch.tensor(self.offsets).to(points)
        return (points + offsets) / self.half_size(side).to(points)

    def coord_grid(self, side: int) -> Tensor:
        """``(side, side, side, 3)`` world (x, y, z) of each voxel centre, indexed ``[d, h, w]``
        (pytorch3d's ``Volumes.get_coord_grid(world_coordinates=True)`` for a cubic grid)."""
        axis = torch.linspace(-1.0, 1.0, side)
        z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
        local = torch.stack([x, y, z], dim=-1)
        return local * self.half_size(side) - torch.tensor(self.offsets)


@dataclass
class PaperCameras:
    """Cameras as the original hands them to pytorch3d: ``R: (..., 3, 3)``, ``T: (..., 3)`` (row
    vectors, world to view), and NDC intrinsics ``focal: (..., 2)``, ``principal: (..., 2)``
    (``PerspectiveCameras`` in NDC; a FoV camera is ``focal = 1 / tan(fov / 2)``, principal 0)."""

    R: Tensor
    T: Tensor
    focal: Tensor
    principal: Tensor

    @classmethod
    def from_fov(cls, R: Tensor, T: Tensor, fov_deg: float) -> "PaperCameras":
        """``FoVPerspectiveCameras(R, T, fov=fov_deg, aspect_ratio=1)`` (SRN and Minens)."""
        f = 1.0 / math.tan(math.radians(fov_deg) / 2)
        focal = torch.full((*T.shape[:-1], 2), f, dtype=T.dtype, device=T.device)
        return cls(R, T, focal, torch.zeros_like(focal))

    @classmethod
    def from_cameras(cls, cameras: Cameras) -> "PaperCameras":
        """From vsd's OpenCV cameras (camera-to-world, pixel intrinsics) of square images."""
        size = _square_size(cameras.height, cameras.width)
        flip = torch.tensor(_CV_TO_VIEW).to(cameras.c2w)
        rot_c2w, origin = cameras.c2w[..., :3, :3], cameras.c2w[..., :3, 3]
        R = rot_c2w * flip  # scales columns: R = R_c2w @ diag(flip)
        T = -(R.transpose(-1, -2) @ origin[..., None])[..., 0]
        fx, fy, cx, cy = cameras.K.unbind(-1)
        focal = torch.stack([fx, fy], -1) * (2.0 / size)
        principal = 1.0 - torch.stack([cx, cy], -1) * (2.0 / size)
        return cls(R, T, focal, principal)

    def to_cameras(self, size: int) -> Cameras:
        """vsd's OpenCV cameras for ``size x size`` images (the inverse of :meth:`from_cameras`)."""
        flip = torch.tensor(_CV_TO_VIEW).to(self.R)
        rot_c2w = self.R * flip
        c2w = torch.zeros(*self.T.shape[:-1], 4, 4, dtype=self.T.dtype, device=self.T.device)
        c2w[..., :3, :3] = rot_c2w
        c2w[..., :3, 3] = self.origins
        c2w[..., 3, 3] = 1.0
        fxy = self.focal * (size / 2.0)
        cxy = (1.0 - self.principal) * (size / 2.0)
        return Cameras(c2w, torch.cat([fxy, cxy], -1), size, size)

    @property
    def origins(self) -> Tensor:
        """(..., 3) camera centres in world coordinates."""
        return -(self.R @ self.T[..., None])[..., 0]

    def to_view(self, points: Tensor) -> Tensor:
        """World points ``(..., N, 3)`` -> view space (+X left, +Y up, +Z forward)."""
        return points @ self.R + self.T[..., None, :]

    def project_ndc(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """World points ``(..., N, 3)`` -> ``(xy_ndc: (..., N, 2), depth: (..., N))``, depth being
        view-space z. As ``transform_points_ndc``: a plain division by z, no clamping."""
        view = self.to_view(points)
        depth = view[..., 2]
        xy = view[..., :2] / depth[..., None] * self.focal[..., None, :] + self.principal[..., None, :]
        return xy, depth

    def ray_directions(self, xy_ndc: Tensor) -> Tensor:
        """World directions ``(..., N, 3)`` of the rays through NDC points ``(..., N, 2)``, scaled to
        unit view-space depth (pytorch3d's ray sampler: not unit length, so ray lengths are depths)."""
        xy_view = (xy_ndc - self.principal[..., None, :]) / self.focal[..., None, :]
        view = torch.cat([xy_view, torch.ones_like(xy_view[..., :1])], -1)
        return view @ self.R.transpose(-1, -2)


def as_paper_cameras(cameras: Cameras | PaperCameras) -> PaperCameras:
    """``cameras`` in the original's convention (vsd cameras are converted, square images only)."""
    return cameras if isinstance(cameras, PaperCameras) else PaperCameras.from_cameras(cameras)


def _square_size(height: int, width: int) -> int:
    if height != width:
        raise ValueError(f"the original's cameras assume square images, got {height}x{width}")
    return height


def ndc_pixel_grid(size: int, device=None, dtype=torch.float32) -> Tensor:
    """``(size, size, 2)`` NDC (x, y) of each pixel centre, indexed ``[row, column]``: the grid of
    pytorch3d's ``NDCMultinomialRaysampler`` (row 0 at the top: y = 1 - 1/size; column 0 at the
    left: x = 1 - 1/size)."""
    half = 1.0 / size
    ys = torch.linspace(1.0 - half, -1.0 + half, size, device=device, dtype=dtype)
    xs = torch.linspace(1.0 - half, -1.0 + half, size, device=device, dtype=dtype)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y], dim=-1)


def pose_embedding(cameras: Cameras | PaperCameras, size: int, style: str, origin_scale: float = 1.0) -> Tensor:
    """The original's 6 pose channels of each input view, ``(..., 6, size, size)``: the camera
    centre divided by ``origin_scale`` (``data.normalize_pose``: 1.3 for SRN, 5 for Minens; CO3D
    never scales), then the world direction of each pixel's ray, unit length.

    ``style`` picks the dataset code's ray formula, reproduced as released:

    - ``"ndc"`` (CO3D): the true ray through each pixel centre, ``((x_ndc - px) / fx, (y_ndc - py) / fy, 1)``.
    - ``"srn"`` / ``"minens"`` (identical): ``((-u - size) / f, (-v - size) / f, 1)`` in view space, u and
      v the pixel centres (j + 0.5, i + 0.5) and f the focal length in pixels. This is not the pixel's
      ray (that would be ``-u + size / 2``), but it is what the released weights were trained on.
    """
    cams = as_paper_cameras(cameras)
    if style not in ("ndc", "srn", "minens"):
        raise ValueError(f"pose embedding style must be 'ndc', 'srn' or 'minens', got {style!r}")
    dev, dt = cams.T.device, cams.T.dtype
    centres = torch.arange(size, device=dev, dtype=dt) + 0.5
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    if style == "ndc":
        xy = torch.stack([1 - u * 2 / size, 1 - v * 2 / size], -1).reshape(-1, 2)
        xy = (xy - cams.principal[..., None, :]) / cams.focal[..., None, :]
    else:
        focal_px = cams.focal[..., None, :] * (size / 2)
        xy = torch.stack([-u - size, -v - size], -1).reshape(-1, 2) / focal_px
    view = torch.cat([xy, torch.ones_like(xy[..., :1])], -1)
    dirs = F.normalize(view, dim=-1) @ cams.R.transpose(-1, -2)  # (..., size*size, 3)
    dirs = dirs.transpose(-1, -2).reshape(*dirs.shape[:-2], 3, size, size)
    origins = (cams.origins / origin_scale)[..., None, None].expand(*dirs.shape)
    return torch.cat([origins, dirs], -3)


def voxel_sample_grid(cameras: Cameras | PaperCameras, volume: PaperVolume, side: int) -> Tensor:
    """Where the original samples each view's features for each voxel: ``(..., side**3, 2)`` in
    ``grid_sample``'s normalised coordinates (x right, y down; ``align_corners=False``, so -1 is
    the outer edge of the first pixel). It is minus the voxel centres' NDC x and y."""
    cams = as_paper_cameras(cameras)
    grid = volume.coord_grid(side).to(cams.T).reshape(-1, 3)
    xy, _ = cams.project_ndc(grid)
    return -xy


def unproject_paper(features: Tensor, cameras: Cameras | PaperCameras, volume: PaperVolume,
                    side: int) -> Tensor:
    """The original's ``ImageUnprojector``: every voxel centre of a ``side**3`` grid is projected
    into each view and that view's features are sampled there, bilinearly, clamped at the border,
    with no visibility test.

    ``features: (B, V, C, h, w)`` (any resolution: NDC does not depend on it), ``cameras`` of shape
    ``(B, V)`` -> ``(B, V, C, side, side, side)`` indexed ``[d, h, w]`` = local ``(z, y, x)``.
    """
    b, v, c, h, w = features.shape
    coords = voxel_sample_grid(cameras, volume, side)
    if coords.shape[:-2] != (b, v):
        raise ValueError(f"cameras of shape {tuple(coords.shape[:-2])} for features of {b} x {v} views")
    coords = coords.to(features.dtype).reshape(b * v, side, side * side, 2)
    sampled = F.grid_sample(features.reshape(b * v, c, h, w), coords, mode="bilinear",
                            padding_mode="border", align_corners=False)
    return sampled.reshape(b, v, c, side, side, side)
