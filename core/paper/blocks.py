"""Layers of the paper's network, with the original's exact arithmetic.

These differ from :mod:`vsd.core.unet3d` on purpose: the norm comes after each convolution, the
attention is pre-normalised by a channel LayerNorm without bias, downsampling is a space-to-depth
reshape, and the sinusoid's frequencies divide by ``half - 1``. Released weights only reproduce
their outputs with the same arithmetic, so nothing here is "improved".

``dims`` is 2 (images ``(N, C, H, W)``) or 3 (volumes ``(N, C, D, H, W)``).
"""

from __future__ import annotations


import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..embeddings import sinusoidal_embedding

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
GROUPS = 8


class TimeEmbedding(nn.Module):
    """Sinusoid of width ``sinusoid_dim``, Linear, GELU, Linear: ``(N,) -> (N, out_dim)``."""

    def __init__(self, sinusoid_dim: int, out_dim: int):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.fc1 = nn.Linear(sinusoid_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, timesteps: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(sinusoidal_embedding(timesteps, self.sinusoid_dim, reach_max_period=True))))


class ResBlock(nn.Module):
    """conv3, GroupNorm(8), FiLM (``x * (1 + scale) + shift``, first half only), SiLU; conv3,
    GroupNorm(8), SiLU; plus the input (through a 1x1 conv when the width changes).

    ``forward(x: (N, in_channels, *spatial), temb: (N, time_dim) | None) -> (N, out_channels, *spatial)``.
    ``time_dim=None`` builds a block without FiLM (the render-volume upsampler's).
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int | None, dims: int = 3):
        super().__init__()
        conv = _CONV[dims]
        self.dims = dims
        self.film = nn.Linear(time_dim, 2 * out_channels) if time_dim is not None else None
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(GROUPS, out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(GROUPS, out_channels)
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.norm1(self.conv1(x))
        if self.film is not None and temb is not None:
            scale, shift = self.film(F.silu(temb))[(...,) + (None,) * self.dims].chunk(2, dim=1)
            h = h * (scale + 1) + shift
        h = F.silu(self.norm2(self.conv2(F.silu(h))))
        return h + self.skip(x)


class ChannelLayerNorm(nn.Module):
    """Normalise over channels at each position, times a learned per-channel gain (no bias).
    ``(N, C, *spatial) -> (N, C, *spatial)``; eps 1e-5 in float32, 1e-3 in lower precision."""

    def __init__(self, channels: int, dims: int = 3):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, *(1,) * dims))

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.gain


class LinearAttention(nn.Module):
    """Residual linear attention over all positions, pre-normalised by :class:`ChannelLayerNorm`
    and post-normalised likewise after the output projection. ``(N, C, *spatial) -> same``.

    The values are divided by the first two spatial sides only (``H * W`` of a ``D x H x W``
    volume), as in the released network: it is 2D code lifted to 3D, and its weights were trained
    with that scale.
    """

    def __init__(self, channels: int, dims: int = 3, heads: int = 4, dim_head: int = 32):
        super().__init__()
        conv = _CONV[dims]
        self.heads, self.dim_head = heads, dim_head
        hidden = heads * dim_head
        self.norm = ChannelLayerNorm(channels, dims)
        self.to_qkv = conv(channels, 3 * hidden, 1, bias=False)
        self.out_conv = conv(hidden, channels, 1)
        self.out_norm = ChannelLayerNorm(channels, dims)

    def forward(self, x: Tensor) -> Tensor:
        n, _, *spatial = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(n, 3, self.heads, self.dim_head, -1).unbind(1)
        q = q.softmax(dim=-2) * self.dim_head**-0.5
        k = k.softmax(dim=-1)
        v = v / (spatial[0] * spatial[1])
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(n, -1, *spatial)
        return x + self.out_norm(self.out_conv(out))


def space_to_depth(x: Tensor) -> Tensor:
    """``(N, C, 2a, 2b[, 2c]) -> (N, C * 2**dims, a, b[, c])``; the new channel index is
    ``c * 2**dims + offset``, the offsets ordered row-major over the spatial axes."""
    n, c, *spatial = x.shape
    dims = len(spatial)
    split = [n, c]
    for side in spatial:
        split += [side // 2, 2]
    x = x.reshape(split)
    order = [0, 1, *range(3, 3 + 2 * dims, 2), *range(2, 2 + 2 * dims, 2)]
    return x.permute(order).reshape(n, c * 2**dims, *(s // 2 for s in spatial))


class Downsample(nn.Module):
    """Halve every side: :func:`space_to_depth`, then a 1x1 conv to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, dims: int = 3):
        super().__init__()
        self.conv = _CONV[dims](in_channels * 2**dims, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(space_to_depth(x))


class Upsample(nn.Module):
    """Double every side (nearest), then a 3x3(x3) conv to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, dims: int = 3):
        super().__init__()
        self.conv = _CONV[dims](in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
