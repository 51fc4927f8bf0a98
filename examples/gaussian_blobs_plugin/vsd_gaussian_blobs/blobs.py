"""Gaussian blobs: a radiance field made of K coloured Gaussians, predicted per object.

The denoiser's feature volume (B, C, D, D, D) is read by K learned "selectors": each is a
softmax over the D^3 voxels (a 1x1x1 convolution gives one logit per blob and voxel), which
pools a feature vector and an expected position per blob. A small MLP turns these into the
blob's centre, size, density and colour. The result is a :class:`BlobField`, which the built-in
volume renderer draws like any other field.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field as Setting
from pydantic import model_validator
from torch import Tensor, nn

from vsd.core.contracts import Field, Representation
from vsd.core.settings import Settings as BaseSettings
from vsd.core.unproject import voxel_centres

_SQRT_2PI = math.sqrt(2 * math.pi)


class BlobField(Field):
    """B radiance fields, each a sum of K axis-aligned Gaussian blobs in ``[-bound, bound]^3``.

    centres: (B, K, 3) world positions; scales: (B, K, 3) standard deviations along x, y, z;
    amplitudes: (B, K) > 0 peak densities in 1/world-length; colours: (B, K, 3) in [0, 1].

        sigma(p) = sum_k a_k exp(-|(p - c_k) / s_k|^2 / 2)
        rgb(p)   = sum_k (density of blob k at p / sigma(p)) colour_k

    Colours are mixed in log space (a softmax over the blobs' log densities), so far from every
    blob the colour is the nearest blob's rather than 0/0.
    """

    def __init__(self, centres: Tensor, scales: Tensor, amplitudes: Tensor, colours: Tensor, bound: float):
        self.centres, self.scales, self.amplitudes, self.colours = centres, scales, amplitudes, colours
        self.bound = bound
        self.batch_size = centres.shape[0]
        self.device = centres.device

    def log_densities(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> log density of each blob at each point, (B, N, K)."""
        inv = self.scales.reciprocal().square()  # (B, K, 3)
        # |(p - c) / s|^2 expanded into matmuls: memory (B, N, K) instead of (B, N, K, 3), which
        # matters because the renderer queries every sample of every ray at once.
        dist2 = (
            points.square() @ inv.transpose(1, 2)
            - 2 * points @ (self.centres * inv).transpose(1, 2)
            + (self.centres.square() * inv).sum(-1)[:, None]
        )
        return self.amplitudes.log()[:, None] - 0.5 * dist2.clamp_min(0.0)

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points (B, N, 3) -> sigma (B, N) >= 0 (0 outside the cube), rgb (B, N, 3) in [0, 1]."""
        logd = self.log_densities(points)
        inside = (points.abs() <= self.bound).all(-1)
        sigma = logd.logsumexp(-1).exp() * inside
        rgb = torch.softmax(logd, dim=-1) @ self.colours
        return sigma, rgb


class GaussianBlobs(Representation):
    """K coloured Gaussian blobs per object, predicted from the denoiser's feature volume.

    Constructed as ``GaussianBlobs(settings, in_channels=C, resolution=D, bound=b)``;
    ``forward(volume (B, C, D, D, D)) -> BlobField`` with K = ``settings.blobs`` blobs.
    """

    kind = "field"

    class Settings(BaseSettings):
        blobs: int = Setting(16, ge=1, description="number of Gaussian blobs K per object")
        hidden: int = Setting(64, ge=1, description="width of the MLP that predicts each blob")
        min_scale: float = Setting(0.03, gt=0, description="smallest blob standard deviation, as a fraction of bound")
        max_scale: float = Setting(0.5, gt=0, description="largest blob standard deviation, as a fraction of bound")
        anisotropic: bool = Setting(False, description="one standard deviation per axis (axis-aligned ellipsoids)")

        @model_validator(mode="after")
        def _scales_ordered(self):
            if self.min_scale >= self.max_scale:
                raise ValueError(f"min_scale ({self.min_scale}) must be below max_scale ({self.max_scale})")
            return self

    # Initial optical depth through a blob's centre is softplus(-1) ~ 0.31: K overlapping blobs
    # start as a translucent cloud rather than an opaque ball or nothing.
    density_bias = -1.0

    def __init__(self, settings: Settings, *, in_channels: int, resolution: int, bound: float):
        super().__init__(settings, in_channels=in_channels, resolution=resolution, bound=bound)
        K, hidden = settings.blobs, settings.hidden
        self.n_scales = 3 if settings.anisotropic else 1
        self.select = nn.Conv3d(in_channels, K, kernel_size=1)
        self.identity = nn.Parameter(0.1 * torch.randn(K, hidden))  # tells otherwise alike blobs apart
        self.inp = nn.Linear(in_channels + 3, hidden)
        self.mlp = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 + self.n_scales + 1 + 3)
        )
        centres = voxel_centres(resolution, bound).reshape(-1, 3)  # (D^3, 3), volume.flatten order
        self.register_buffer("voxel_centres", centres, persistent=False)

    def forward(self, volume: Tensor) -> BlobField:
        """volume: (B, C, D, D, D) -> BlobField with K blobs per object."""
        if volume.shape[1:] != (self.in_channels, *(self.resolution,) * 3):
            raise ValueError(
                f"GaussianBlobs expected a volume (B, {self.in_channels}, {self.resolution}, "
                f"{self.resolution}, {self.resolution}), got {tuple(volume.shape)}"
            )
        s, b = self.settings, self.bound
        attn = torch.softmax(self.select(volume).flatten(2), dim=-1)  # (B, K, D^3)
        feats = attn @ volume.flatten(2).transpose(1, 2)  # (B, K, C)
        where = attn @ self.voxel_centres.to(volume.dtype)  # (B, K, 3), a convex mix of voxel centres
        out = self.mlp(self.inp(torch.cat([feats, where / b], -1)) + self.identity)
        offset, raw_scale, raw_density, raw_rgb = out.split([3, self.n_scales, 1, 3], dim=-1)
        # The pooled position is strictly inside the cube, so atanh is finite; tanh * bound keeps
        # the moved centre inside too.
        centres = b * torch.tanh(torch.atanh(where / b) + offset)
        scales = b * (s.min_scale + (s.max_scale - s.min_scale) * torch.sigmoid(raw_scale))
        scales = scales.expand(*scales.shape[:-1], 3)
        # The network predicts the optical depth through a blob's centre, which does not depend on
        # the blob's size; the peak density follows from it (integral of a Gaussian along a line).
        depth = F.softplus(raw_density[..., 0] + self.density_bias) + 1e-6
        amplitudes = depth / (_SQRT_2PI * scales.mean(-1))
        return BlobField(centres, scales, amplitudes, torch.sigmoid(raw_rgb), b)
