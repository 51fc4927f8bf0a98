"""Triplane representation: the feature volume reduced to three axis-aligned planes + an MLP.

The planes follow the feature-volume convention with one axis collapsed:
``xy[..., j, i]`` is at ``(x_i, y_j)``, ``xz[..., k, i]`` at ``(x_i, z_k)`` and ``yz[..., k, j]`` at
``(y_j, z_k)``, each texel centred as in ``F.grid_sample(..., align_corners=False)``.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
import pydantic
from torch import Tensor, nn

from ..core.settings import Settings as BaseSettings
from ..core.unet3d import PointwiseConv3d
from ..core.contracts import Field, Representation

# For each plane: the volume dimension it collapses (volume is (B, C, z, y, x)) and the two
# point coordinates that address it, in grid_sample's (width, height) order.
PLANES = {"xy": (2, (0, 1)), "xz": (3, (0, 2)), "yz": (4, (1, 2))}


def sample_planes(planes: tuple[Tensor, Tensor, Tensor], points: Tensor, bound: float) -> list[Tensor]:
    """Bilinear features of planes (xy, xz, yz), each (B, P, R, R), at points (B, N, 3) -> 3 x (B, N, P)."""
    coords = points / bound
    out = []
    for plane, (_, axes) in zip(planes, PLANES.values()):
        grid = coords[:, None, :, list(axes)]  # (B, 1, N, 2)
        feat = F.grid_sample(plane, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out.append(feat[:, :, 0].transpose(1, 2))
    return out


def combine_features(features: list[Tensor], how: str) -> Tensor:
    """Three (B, N, P) plane features -> (B, N, P) (sum, product) or (B, N, 3P) (concat)."""
    if how == "sum":
        return features[0] + features[1] + features[2]
    if how == "product":
        return features[0] * features[1] * features[2]
    return torch.cat(features, dim=-1)


class TriplaneField(Field):
    """B radiance fields stored as three feature planes, decoded per point.

    planes: (xy, xz, yz), each (B, P, R, R); ``decode(features (B, N, P')) -> (sigma (B, N),
    rgb (B, N, 3))`` turns combined plane features into density (1/world-length) and colour.
    """

    def __init__(self, planes: tuple[Tensor, Tensor, Tensor], decode: Callable, bound: float, combine: str):
        self.planes, self.decode, self.bound, self.combine = planes, decode, bound, combine
        self.batch_size = planes[0].shape[0]
        self.device = planes[0].device

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """points: (B, N, 3) world -> sigma (B, N) >= 0, rgb (B, N, 3) in [0, 1]."""
        features = combine_features(sample_planes(self.planes, points, self.bound), self.combine)
        sigma, rgb = self.decode(features)
        inside = (points.abs() <= self.bound).all(-1)
        return sigma * inside, rgb


class AxisReduction(nn.Module):
    """Collapse one axis of a (B, C, D, D, D) volume by learned softmax attention along it.

    Each voxel scores itself (a 1x1x1 conv) and a learned per-depth logit adds a positional
    preference; the softmax over the collapsed axis weights the features. Unlike a slice or a
    mean, the network can pick the surface along each line of sight and ignore empty space.
    """

    def __init__(self, channels: int, resolution: int, dim: int):
        super().__init__()
        self.dim = dim
        # no bias: the softmax ignores a constant shift, so it would never learn
        self.score = PointwiseConv3d(channels, 1, bias=False)
        self.position = nn.Parameter(torch.zeros(resolution))
        nn.init.zeros_(self.score.weight)  # starts as the plain mean; training moves it away

    def forward(self, volume: Tensor) -> Tensor:
        """volume (B, C, D, D, D) -> (B, C, D, D) with axis ``dim`` collapsed."""
        shape = [1] * 5
        shape[self.dim] = -1
        logits = self.score(volume) + self.position.view(shape)
        return (volume * torch.softmax(logits, dim=self.dim)).sum(self.dim)


def _conv2(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


def _plane_head(cin: int, cout: int, upsample: int) -> nn.Sequential:
    """2D convs from a reduced (B, C, D, D) map to a (B, P, upsample D, upsample D) plane; the
    last layer is linear so plane features take either sign."""
    layers: list[nn.Module] = [_conv2(cin, cout)]
    if upsample == 2:
        layers += [nn.SiLU(), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _conv2(cout, cout)]
    return nn.Sequential(*layers)


def mlp(cin: int, hidden: int, layers: int, cout: int) -> nn.Sequential:
    """``layers`` hidden SiLU layers of width ``hidden`` (0: a single linear map) to ``cout``."""
    mods: list[nn.Module] = []
    width = cin
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, cout))


class Triplane(Representation):
    """Learned reduction of the feature volume to XY/XZ/YZ planes, queried bilinearly + an MLP.

    Constructed as ``Triplane(settings, in_channels=C, resolution=D, bound=b)``.
    ``forward(volume: (B, C, D, D, D)) -> TriplaneField`` with planes (B, P, D', D'),
    ``P = plane_channels`` and ``D' = plane_upsample * D``.
    """

    kind = "field"

    class Settings(BaseSettings):
        plane_channels: int = pydantic.Field(16, ge=1)
        plane_upsample: Literal[1, 2] = 1
        combine: Literal["sum", "concat", "product"] = "sum"
        hidden: int = pydantic.Field(32, ge=1)  # width of the decoder MLP
        layers: int = pydantic.Field(2, ge=0)  # hidden layers of the decoder MLP (0: linear decoder)
        density_activation: Literal["softplus", "exp"] = "softplus"
        density_scale: float = pydantic.Field(1.0, gt=0)
        density_bias: float = -3.0  # initial bias of the density output: mostly transparent, not 0

    def __init__(self, settings: Settings, *, in_channels: int, resolution: int, bound: float):
        super().__init__(settings, in_channels=in_channels, resolution=resolution, bound=bound)
        s = settings
        self.reduce = nn.ModuleDict({n: AxisReduction(in_channels, resolution, dim) for n, (dim, _) in PLANES.items()})
        self.heads = nn.ModuleDict({n: _plane_head(in_channels, s.plane_channels, s.plane_upsample) for n in PLANES})
        width = s.plane_channels * (3 if s.combine == "concat" else 1)
        self.decoder = mlp(width, s.hidden, s.layers, 4)
        with torch.no_grad():
            self.decoder[-1].bias[0] = s.density_bias
        self.out_resolution = resolution * s.plane_upsample

    def activate_density(self, raw: Tensor) -> Tensor:
        """Raw decoder output -> density in 1/world-length: the activated value is the optical
        depth of one plane texel crossed along an axis (the VoxelGrid convention), divided by
        the texel side ``2 bound / D'``."""
        act = F.softplus(raw) if self.settings.density_activation == "softplus" else torch.exp(raw)
        return act * (self.settings.density_scale * self.out_resolution / (2 * self.bound))

    def decode(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, N, P') -> sigma (B, N) in 1/world-length, rgb (B, N, 3) in [0, 1]."""
        raw = self.decoder(features)
        return self.activate_density(raw[..., 0]), torch.sigmoid(raw[..., 1:])

    def planes(self, volume: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """volume (B, C, D, D, D) -> planes (xy, xz, yz), each (B, P, D', D')."""
        return tuple(self.heads[n](self.reduce[n](volume)) for n in PLANES)

    def forward(self, volume: Tensor) -> TriplaneField:
        """volume: (B, C, D, D, D) -> TriplaneField."""
        if volume.shape[1:] != (self.in_channels, *(self.resolution,) * 3):
            raise ValueError(
                f"Triplane expected a volume (B, {self.in_channels}, {self.resolution}, "
                f"{self.resolution}, {self.resolution}), got {tuple(volume.shape)}"
            )
        return TriplaneField(self.planes(volume), self.decode, self.bound, self.settings.combine)
