"""The paper's 3D U-Net: per-view encoder, attention over views at every skip and the bottleneck,
one decoder per viewset, and the voxel heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .aggregation import ViewCrossAttention
from .blocks import Downsample, LinearAttention, ResBlock, TimeEmbedding, Upsample
from .config import PaperNetworkConfig


class DownLevel(nn.Module):
    """``blocks_per_res`` ResNet blocks at width ``channels``, linear attention after the last one
    when ``attention``, then a downsample to ``out_channels`` (a 3x3x3 conv at the coarsest level).

    ``forward(x: (N, C, s, s, s), temb: (N, T)) -> (x', skips)``: one skip per block.
    """

    def __init__(self, channels: int, out_channels: int, time_dim: int, blocks: int, attention: bool, last: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(channels, channels, time_dim) for _ in range(blocks))
        self.attn = LinearAttention(channels) if attention else None
        self.resample = nn.Conv3d(channels, out_channels, 3, padding=1) if last else Downsample(channels, out_channels)

    def forward(self, x: Tensor, temb: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(x, temb)
            if self.attn is not None and i == len(self.blocks) - 1:
                x = self.attn(x)
            skips.append(x)
        return self.resample(x), skips


class UpLevel(nn.Module):
    """For each block: aggregate the level's next skip (per view) with the decoder volume as the
    query, concatenate, ResNet block; then linear attention and an upsample to ``out_channels``
    (a 3x3x3 conv at the finest level).

    ``forward(x: (B, C, s, s, s), skips, temb: (B, T)) -> (B, out_channels, s', s', s')``; pops
    ``blocks`` entries ``(B, V, skip_channels, s, s, s)`` off the end of ``skips``.
    """

    def __init__(self, channels: int, skip_channels: int, out_channels: int, time_dim: int, blocks: int,
                 heads: int, last: bool):
        super().__init__()
        self.merges = nn.ModuleList(ViewCrossAttention(skip_channels, channels, heads) for _ in range(blocks))
        self.blocks = nn.ModuleList(ResBlock(channels + skip_channels, channels, time_dim) for _ in range(blocks))
        self.attn = LinearAttention(channels)
        self.resample = nn.Conv3d(channels, out_channels, 3, padding=1) if last else Upsample(channels, out_channels)

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor) -> Tensor:
        for merge, block in zip(self.merges, self.blocks):
            x = block(torch.cat((x, merge(skips.pop(), x)), dim=1), temb)
        return self.resample(self.attn(x))


class PaperUNet3d(nn.Module):
    """``forward(volumes: (B, V, feature_channels, D, D, D), timesteps: (B, V))`` ->
    ``(density: (B, 1, R, R, R), color: (B, 3, R, R, R))``, both raw (before the renderer's
    activations), with ``D = volume_size`` and ``R = render_volume_size``.

    The encoder runs on each view with its own timestep's embedding; the decoder's embedding is
    the element-wise max over the views' embeddings. Timesteps are integer diffusion steps.
    """

    def __init__(self, config: PaperNetworkConfig):
        super().__init__()
        self.config = config
        dim, heads = config.model_channels, config.heads
        time_dim = 4 * dim
        widths, sides = config.widths, config.sides
        n = len(config.channel_mult)
        self.stem = nn.Conv3d(config.feature_channels, dim, 7, padding=3)
        self.time_embed = TimeEmbedding(dim, time_dim)
        self.down_levels = nn.ModuleList(
            DownLevel(widths[i], widths[i + 1], time_dim, config.blocks_per_res,
                      sides[i] in config.attn_resolutions, last=i == n - 1)
            for i in range(n))
        mid = widths[-1]
        self.mid_block1 = ResBlock(mid, mid, time_dim)
        self.mid_attn = LinearAttention(mid)
        self.mid_block2 = ResBlock(mid, mid, time_dim)
        self.bottleneck_query = nn.Parameter(torch.rand(mid, sides[-1], sides[-1], sides[-1]))
        self.bottleneck_merge = ViewCrossAttention(mid, mid, heads)
        self.up_levels = nn.ModuleList(
            UpLevel(widths[i + 1], widths[i], widths[i], time_dim, config.blocks_per_res, heads, last=i == 0)
            for i in reversed(range(n)))
        self.final_merge = ViewCrossAttention(dim, dim, heads)
        self.final_block = ResBlock(2 * dim, dim, time_dim)
        upsample = config.render_volume_size != config.volume_size
        self.upsampler = nn.ModuleList(ResBlock(dim, dim, None) for _ in range(2)) if upsample else None
        self.color_head = nn.Conv3d(dim, 3, 1)
        self.density_head = nn.Conv3d(dim, 1, 1)
        if config.density_init_gain is not None:
            nn.init.xavier_uniform_(self.density_head.weight, config.density_init_gain)
            nn.init.constant_(self.density_head.bias, 4.0 * config.density_init_gain)

    def forward(self, volumes: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        b, v = volumes.shape[:2]
        temb = self.time_embed(timesteps.reshape(b * v))
        decoder_temb = temb.reshape(b, v, -1).max(dim=1).values
        x = self.stem(volumes.flatten(0, 1))
        first = x.reshape(b, v, *x.shape[1:])
        skips = []
        for level in self.down_levels:
            x, level_skips = level(x, temb)
            skips += [s.reshape(b, v, *s.shape[1:]) for s in level_skips]
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, temb)), temb)
        x = self.bottleneck_merge(x.reshape(b, v, *x.shape[1:]), self.bottleneck_query)
        for level in self.up_levels:
            x = level(x, skips, decoder_temb)
        x = self.final_block(torch.cat((x, self.final_merge(first, x)), dim=1), decoder_temb)
        if self.upsampler is not None:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            for block in self.upsampler:
                x = block(x)
        return self.density_head(x), self.color_head(x)
