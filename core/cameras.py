"""Pinhole cameras in the OpenCV convention (x right, y down, z forward), batched.

A :class:`Cameras` holds camera-to-world matrices ``c2w: (..., 4, 4)`` and pinhole intrinsics
``K: (..., 4)`` as ``(fx, fy, cx, cy)`` in pixels, for images of ``height x width`` pixels.
The leading ``...`` dimensions are free (typically ``(B, V)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# OpenGL / Blender / NeRF cameras look down -z with y up; OpenCV looks down +z with y down.
# The two differ by a flip of the camera's y and z axes.
_FLIP_YZ = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass
class Cameras:
    c2w: Tensor  # (..., 4, 4) camera-to-world, OpenCV convention
    K: Tensor  # (..., 4) fx, fy, cx, cy in pixels
    height: int
    width: int

    # ---- construction -------------------------------------------------------------------
    @staticmethod
    def intrinsics_from_fov(fov_deg: float, height: int, width: int) -> Tensor:
        """(4,) intrinsics for a vertical field of view ``fov_deg`` and square pixels."""
        f = 0.5 * height / math.tan(math.radians(fov_deg) / 2)
        return torch.tensor([f, f, width / 2, height / 2])

    @classmethod
    def from_opengl(cls, c2w_gl: Tensor, K: Tensor, height: int, width: int) -> "Cameras":
        """From OpenGL/Blender camera-to-world matrices (camera looks down -z, y up)."""
        return cls(c2w_gl @ _FLIP_YZ.to(c2w_gl), K, height, width)

    def to_opengl(self) -> Tensor:
        """(..., 4, 4) camera-to-world in the OpenGL/Blender convention."""
        return self.c2w @ _FLIP_YZ.to(self.c2w)

    @classmethod
    def look_at(
        cls,
        eye: Tensor,
        target: Tensor | None = None,
        up: tuple[float, float, float] = (0.0, 1.0, 0.0),
        *,
        fov_deg: float,
        height: int,
        width: int,
    ) -> "Cameras":
        """Cameras at ``eye: (..., 3)`` looking at ``target`` (default the origin).

        ``up`` is the world up direction; images are upright with respect to it.
        """
        eye = eye.float()
        target = torch.zeros_like(eye) if target is None else target.to(eye).expand_as(eye)
        up_t = torch.tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
        z = torch.nn.functional.normalize(target - eye, dim=-1)  # forward
        x = torch.nn.functional.normalize(torch.cross(z, up_t, dim=-1), dim=-1)  # right
        # Looking straight along `up`: pick any perpendicular right vector.
        bad = x.norm(dim=-1, keepdim=True) < 1e-6
        if bad.any():
            alt = torch.tensor([1.0, 0.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
            x = torch.where(bad, alt, x)
        y = torch.cross(z, x, dim=-1)  # down
        c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
        c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = x, y, z, eye
        c2w[..., 3, 3] = 1.0
        K = cls.intrinsics_from_fov(fov_deg, height, width).to(eye).expand(*eye.shape[:-1], 4)
        return cls(c2w, K.clone(), height, width)

    @classmethod
    def orbit(
        cls,
        n: int,
        radius: float,
        elevation_deg: float = 20.0,
        *,
        fov_deg: float,
        height: int,
        width: int,
        up_axis: str = "y",
    ) -> "Cameras":
        """``n`` cameras evenly spaced on a circle around the origin (a turntable), shape (n,)."""
        az = torch.linspace(0, 2 * math.pi, n + 1)[:-1]
        el = torch.full_like(az, math.radians(elevation_deg))
        return cls.look_at(
            spherical_to_cartesian(az, el, radius, up_axis),
            up=_UP[up_axis],
            fov_deg=fov_deg,
            height=height,
            width=width,
        )

    # ---- tensor-like helpers ------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.c2w.shape[:-2]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    def to(self, *args, **kwargs) -> "Cameras":
        return Cameras(self.c2w.to(*args, **kwargs), self.K.to(*args, **kwargs), self.height, self.width)

    def __getitem__(self, idx) -> "Cameras":
        return Cameras(self.c2w[idx], self.K[idx], self.height, self.width)

    def reshape(self, *shape: int) -> "Cameras":
        return Cameras(self.c2w.reshape(*shape, 4, 4), self.K.reshape(*shape, 4), self.height, self.width)

    def resized(self, height: int, width: int) -> "Cameras":
        """The same cameras for images resampled to ``height x width``."""
        scale = torch.tensor([width / self.width, height / self.height] * 2).to(self.K)
        return Cameras(self.c2w, self.K * scale, height, width)

    @staticmethod
    def cat(cams: list["Cameras"], dim: int = 0) -> "Cameras":
        c = cams[0]
        return Cameras(
            torch.cat([x.c2w for x in cams], dim), torch.cat([x.K for x in cams], dim), c.height, c.width
        )

    # ---- geometry -----------------------------------------------------------------------
    @property
    def origins(self) -> Tensor:
        """(..., 3) camera centres in world coordinates."""
        return self.c2w[..., :3, 3]

    def rays(self) -> tuple[Tensor, Tensor]:
        """Per-pixel rays through pixel centres.

        Returns ``origins, directions``, each ``(..., H, W, 3)`` in world space; directions are
        unit length.
        """
        H, W = self.height, self.width
        dev, dt = self.c2w.device, self.c2w.dtype
        v, u = torch.meshgrid(
            torch.arange(H, device=dev, dtype=dt) + 0.5,
            torch.arange(W, device=dev, dtype=dt) + 0.5,
            indexing="ij",
        )
        K = self.K[..., None, None, :]  # (..., 1, 1, 4)
        x, y = (u - K[..., 2]) / K[..., 0], (v - K[..., 3]) / K[..., 1]  # (..., H, W) each
        d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # (..., H, W, 3)
        R = self.c2w[..., None, None, :3, :3]
        d = torch.nn.functional.normalize((R @ d_cam[..., None])[..., 0], dim=-1)
        o = self.origins[..., None, None, :].expand_as(d)
        return o, d

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points ``(..., N, 3)`` to pixel coordinates.

        Returns ``uv: (..., N, 2)`` in pixels (x right, y down; pixel centres at +0.5) and
        ``depth: (..., N)`` along the camera's z axis.
        """
        w2c = torch.linalg.inv(self.c2w)
        # one (N, 3) x (3, 3) product per camera rather than N tiny ones
        p = points @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]
        z = p[..., 2]
        zc = z.clamp(min=1e-6)
        K = self.K[..., None, :]
        u = K[..., 0] * p[..., 0] / zc + K[..., 2]
        v = K[..., 1] * p[..., 1] / zc + K[..., 3]
        return torch.stack([u, v], -1), z


_UP = {"y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}


def spherical_to_cartesian(azimuth: Tensor, elevation: Tensor, radius: float | Tensor, up_axis: str = "y") -> Tensor:
    """Points at ``radius`` with azimuth/elevation in radians, (..., 3); ``up_axis`` y or z."""
    c = torch.cos(elevation)
    a, b, h = c * torch.sin(azimuth), c * torch.cos(azimuth), torch.sin(elevation)
    if up_axis == "y":
        p = torch.stack([a, h, b], -1)
    else:
        p = torch.stack([a, -b, h], -1)
    return p * radius
