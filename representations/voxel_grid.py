"""Voxel-grid representation: density and colour on a D^3 grid, queried trilinearly."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import pydantic
from torch import Tensor, nn

from ..core.settings import Settings as BaseSettings
from ..core.unet3d import PointwiseConv3d
from ..core.contracts import Field, Representation
from .grid_sample import sample_volume


class VoxelField(Field):
    """B radiance fields stored as a grid ``(B, 4, D, D, D)`` over ``[-bound, bound]^3``.

    Channel 0 is density in 1/world-length, channels 1-3 are RGB in [0, 1]; the grid follows
    the feature-volume convention (``grid[..., k, j, i]`` is the voxel centred at
    ``(x_i, y_j, z_k)``), so queries sample it as ``F.grid_sample(..., align_corners=False)`` would
    (:func:`~vsd.representations.grid_sample.sample_volume`, faster on CPU).
    """

    def __init__(self, grid: Tensor, bound: float):
        self.grid = grid
        self.bound = bound

    @property
    def batch_size(self) -> int:
        return self.grid.shape[0]

    @property
    def device(self) -> torch.device:
        return self.grid.device

    @property
    def resolution(self) -> int:
        return self.grid.shape[-1]

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points: (B, N, 3) world -> sigma (B, N) >= 0, rgb (B, N, 3) in [0, 1]."""
        # Colour is clamped at the border so that the last half voxel keeps its colour while
        # its density fades; density outside the cube is forced to exactly zero below.
        sigma, rgb = sample_volume(self.grid, points, self.bound, zero_channels=1)  # (B, 1 | 3, N)
        inside = points.abs().amax(-1) <= self.bound
        return sigma.squeeze(1) * inside, rgb.transpose(1, 2)

    def density_grid(self, resolution: int, chunk_points: int = 1 << 18) -> Tensor:
        """(B, R, R, R) densities at voxel centres; exact stored values when R == D."""
        if resolution == self.resolution:
            return self.grid[:, 0]
        return super().density_grid(resolution, chunk_points)


def _conv3(cin: int, cout: int) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel_size=3, padding=1)


class VoxelGrid(Representation):
    """Density + RGB heads on the denoiser's feature volume, optionally upsampled x2.

    Constructed as ``VoxelGrid(settings, in_channels=C, resolution=D, bound=b)``.
    ``forward(volume: (B, C, D, D, D)) -> VoxelField`` with a ``(B, 4, D', D', D')`` grid,
    ``D' = upsample * D``.
    """

    kind = "field"

    class Settings(BaseSettings):
        upsample: Literal[1, 2] = 1
        hidden_channels: int = pydantic.Field(32, ge=0)  # 0: the heads read the input volume directly
        density_activation: Literal["softplus", "exp"] = "softplus"
        density_scale: float = pydantic.Field(1.0, gt=0)
        density_bias: float = -3.0  # initial bias of the density head: mostly transparent, not 0

    def __init__(self, settings: Settings, *, in_channels: int, resolution: int, bound: float):
        super().__init__(settings, in_channels=in_channels, resolution=resolution, bound=bound)
        width = settings.hidden_channels or in_channels
        layers: list[nn.Module] = []
        if settings.hidden_channels:
            layers += [_conv3(in_channels, width), nn.SiLU()]
        if settings.upsample == 2:
            up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
            layers += [up, _conv3(width, width), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.density_head = PointwiseConv3d(width, 1)
        self.rgb_head = PointwiseConv3d(width, 3)
        nn.init.constant_(self.density_head.bias, settings.density_bias)
        self.out_resolution = resolution * settings.upsample

    def activate_density(self, raw: Tensor) -> Tensor:
        """Raw density-head output -> density in 1/world-length.

        The activated value is the optical depth of one voxel crossed along an axis, so the
        world density is that divided by the voxel side ``2 bound / D'``. This keeps the head's
        useful range (about 0.01 to 10) the same at any resolution or bound: a value near 3 is an
        opaque voxel, and an object of size ~bound spans ~D'/2 voxels.
        """
        act = F.softplus(raw) if self.settings.density_activation == "softplus" else torch.exp(raw)
        return act * (self.settings.density_scale * self.out_resolution / (2 * self.bound))

    def forward(self, volume: Tensor) -> VoxelField:
        """volume: (B, C, D, D, D) -> VoxelField over a (B, 4, D', D', D') grid."""
        if volume.shape[1:] != (self.in_channels, *(self.resolution,) * 3):
            raise ValueError(
                f"VoxelGrid expected a volume (B, {self.in_channels}, {self.resolution}, "
                f"{self.resolution}, {self.resolution}), got {tuple(volume.shape)}"
            )
        h = self.trunk(volume)
        sigma = self.activate_density(self.density_head(h))
        rgb = torch.sigmoid(self.rgb_head(h))
        return VoxelField(torch.cat([sigma, rgb], dim=1), self.bound)
