"""The paper's 2D feature extractor, run on each view before unprojection ("pass both")."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .blocks import GROUPS, Downsample, ResBlock, TimeEmbedding


class PaperFeatureExtractor2d(nn.Module):
    """Per view: a 7x7 stride-2 conv (no bias), GroupNorm(8), SiLU -> ``stem`` at H/2; then
    ``res_blocks`` time-conditioned ResNet blocks and a space-to-depth downsample to H/4, upsampled
    back to H/2 (nearest) and concatenated after the stem's features.

    ``forward(images: (B, V, in_channels, H, W), timesteps: (B, V)) -> (B, V, out_channels, H/2, W/2)``
    with H and W multiples of 4. ``out_channels`` is even: half stem, half deep features. The
    time embedding has a sinusoid of ``out_channels // 2`` and width ``4 * out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, res_blocks: int = 2):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"out_channels must be even (stem + deep halves), got {out_channels}")
        width = out_channels // 2
        time_dim = 4 * out_channels
        self.stem_conv = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.stem_norm = nn.GroupNorm(GROUPS, width)
        self.time_embed = TimeEmbedding(width, time_dim)
        self.blocks = nn.ModuleList(ResBlock(width, width, time_dim, dims=2) for _ in range(res_blocks))
        self.down = Downsample(width, width, dims=2)

    def forward(self, images: Tensor, timesteps: Tensor) -> Tensor:
        b, v = images.shape[:2]
        stem = F.silu(self.stem_norm(self.stem_conv(images.flatten(0, 1))))
        temb = self.time_embed(timesteps.reshape(b * v))
        deep = stem
        for block in self.blocks:
            deep = block(deep, temb)
        deep = F.interpolate(self.down(deep), size=stem.shape[2:], mode="nearest")
        features = torch.cat((stem, deep), dim=1)
        return features.reshape(b, v, *features.shape[1:])
