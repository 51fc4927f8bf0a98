"""Building blocks of the denoiser's 3D U-Net (and the 2D encoder's ResNet blocks).

Every block that sees the diffusion timestep takes its embedding ``temb: (N, time_dim)`` and
applies it as FiLM (a per-channel scale and shift after the second normalisation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def pointwise(weight: Tensor, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """A 1x1(x1) convolution of x (N, C_in, *spatial) with weight (C_out, C_in, 1, ...) as one
    batched matrix product over the flattened positions -> (N, C_out, *spatial).

    Same result as the convolution; on CPU oneDNN's direct kernel reaches only ~25 GFLOP/s at
    the denoiser's shapes, the product about twice that.
    """
    n, c = x.shape[:2]
    w = weight.reshape(1, -1, c).expand(n, -1, -1)
    flat = x.reshape(n, c, -1)
    y = torch.bmm(w, flat) if bias is None else torch.baddbmm(bias[:, None], w, flat)
    return y.view(n, -1, *x.shape[2:])


class _Pointwise:
    """A convolution module with kernel size 1 computed by :func:`pointwise`."""

    def forward(self, x: Tensor) -> Tensor:
        return pointwise(self.weight, x, self.bias)


class PointwiseConv3d(_Pointwise, nn.Conv3d):
    """``nn.Conv3d(in_channels, out_channels, 1)``: ``(N, C_in, D, H, W) -> (N, C_out, D, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        nn.Conv3d.__init__(self, in_channels, out_channels, 1, bias=bias)


class PointwiseConv2d(_Pointwise, nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)``: ``(N, C_in, H, W) -> (N, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        nn.Conv2d.__init__(self, in_channels, out_channels, 1, bias=bias)


_POINTWISE = {2: PointwiseConv2d, 3: PointwiseConv3d}


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``.

    Taking the gcd lets small reference-scale channel counts work with the default of 8 groups.
    """
    return nn.GroupNorm(math.gcd(channels, groups), channels)


class ResBlock(nn.Module):
    """Time-conditioned residual block: GroupNorm, SiLU, conv, GroupNorm + FiLM, SiLU, conv.

    ``forward(x: (N, in_channels, *spatial), temb: (N, time_dim)) -> (N, out_channels, *spatial)``
    with ``len(spatial) == dims`` (2 or 3).
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int = 8, dims: int = 3):
        super().__init__()
        conv = _CONV[dims]
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_channels))
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else _POINTWISE[dims](in_channels, out_channels)
        self.dims = dims

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(temb)[(...,) + (None,) * self.dims].chunk(2, dim=1)
        # (1 + scale) keeps the block close to plain normalisation while the FiLM layer is small.
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        return self.skip(x) + self.conv2(F.silu(h))


class ResBlock3d(ResBlock):
    """:class:`ResBlock` on volumes ``(N, C, D, D, D)``."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int = 8):
        super().__init__(in_channels, out_channels, time_dim, groups, dims=3)


class Downsample3d(nn.Module):
    """Halve the side of a volume with a strided 3x3x3 conv: ``(N, C, D, D, D) -> (N, C, D/2, ...)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Double the side (nearest neighbour, then a 3x3x3 conv that also changes the channel count).

    Nearest + conv avoids the checkerboard artefacts of transposed convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LinearAttention3d(nn.Module):
    """Residual linear (softmax-kernel) self-attention over all voxels of a volume.

    Cost is linear in the number of voxels, so it is affordable at the coarse U-Net levels where
    global context helps most. ``forward(x: (N, C, D, D, D)) -> (N, C, D, D, D)``.
    """

    def __init__(self, channels: int, heads: int = 4, dim_head: int = 32, groups: int = 8):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        hidden = heads * dim_head
        self.norm = group_norm(channels, groups)
        self.to_qkv = PointwiseConv3d(channels, 3 * hidden, bias=False)
        self.to_out = nn.Sequential(PointwiseConv3d(hidden, channels), group_norm(channels, groups))

    def forward(self, x: Tensor) -> Tensor:
        n, _, *spatial = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(n, 3, self.heads, self.dim_head, -1).unbind(1)
        q = q.softmax(dim=-2) * self.dim_head**-0.5
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return x + self.to_out(out.reshape(n, -1, *spatial))
