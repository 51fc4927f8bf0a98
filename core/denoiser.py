"""The Viewset Diffusion denoiser network: views -> per-view volumes -> one fused feature volume.

Per view: RGB, ray origin, ray direction and self-conditioning RGB go through a 2D encoder, are
unprojected into a volume and run through the encoder half of a 3D U-Net with that view's own
timestep. The views meet only in the aggregators, at every skip connection and at the
bottleneck; the decoder half runs once per object. The output is the feature volume handed to
the 3D representation.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Annotated, Callable

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from .cameras import Cameras
from .contracts import Aggregator, Encoder
from .embeddings import TimestepEmbedding
from .settings import Settings
from .unet3d import Downsample3d, LinearAttention3d, PointwiseConv3d, ResBlock3d, Upsample3d, group_norm, pointwise
from .unproject import unproject

IN_CHANNELS = 12  # RGB, ray origin, ray direction, self-conditioning RGB


class ModelSettings(Settings):
    """The recipe's ``model:`` block: sizes of the denoiser network."""

    volume_size: int = Field(16, ge=1, description="Side D of the feature volume (D^3 voxels).")
    base_channels: int = Field(16, ge=1, description="Channels of the 3D U-Net at its finest level.")
    channel_mult: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (1, 2, 4), min_length=1, max_length=16, description="Per-level channel multipliers; each level halves the side."
    )
    num_res_blocks: int = Field(1, ge=1, description="ResNet blocks per U-Net level (encoder and decoder).")
    attention_levels: tuple[int, ...] = Field(
        (), description="U-Net levels (0 = finest) that get linear self-attention."
    )
    time_dim: int = Field(64, ge=2, description="Width of the timestep embedding.")
    out_channels: int = Field(16, ge=1, description="Feature channels handed to the representation.")
    groups: int = Field(8, ge=1, description="GroupNorm groups (reduced to a divisor of the channels).")

    @model_validator(mode="after")
    def _check_sizes(self) -> "ModelSettings":
        levels = len(self.channel_mult)
        if self.volume_size % 2 ** (levels - 1):
            raise ValueError(
                f"volume_size={self.volume_size} must be divisible by 2**(len(channel_mult)-1)="
                f"{2 ** (levels - 1)} (channel_mult={self.channel_mult})"
            )
        bad = [lv for lv in self.attention_levels if not 0 <= lv < levels]
        if bad:
            raise ValueError(
                f"attention_levels {bad} out of range 0..{levels - 1} for channel_mult={self.channel_mult}"
            )
        return self


class _Level(nn.Module):
    """ResNet blocks at one U-Net level, with optional linear attention after them."""

    def __init__(
        self, in_ch: int, out_ch: int, n_blocks: int, time_dim: int, groups: int, attention: bool
    ):
        super().__init__()
        widths = [in_ch] + [out_ch] * n_blocks
        self.blocks = nn.ModuleList(
            ResBlock3d(a, b, time_dim, groups) for a, b in zip(widths[:-1], widths[1:])
        )
        self.attn = LinearAttention3d(out_ch, groups=groups) if attention else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, temb)
        return self.attn(x)


@dataclass
class ViewFeatures:
    """Per-view features: skips[l] (B, V, C_l, D_l, D_l, D_l) per U-Net level; temb (B, V, T)."""

    skips: list[Tensor]
    temb: Tensor

    @staticmethod
    def cat(parts: list["ViewFeatures"]) -> "ViewFeatures":
        """Join along the view axis (aggregation is symmetric in the views, so order is free)."""
        skips = [torch.cat([p.skips[lv] for p in parts], 1) for lv in range(len(parts[0].skips))]
        return ViewFeatures(skips, torch.cat([p.temb for p in parts], 1))


class Denoiser(nn.Module):
    """Viewset denoiser producing a ``(B, out_channels, D, D, D)`` feature volume.

    make_encoder: called positionally as ``make_encoder(in_channels=12, time_dim)``.
    make_aggregator: called positionally as ``make_aggregator(channels, resolution)`` once per
        U-Net level (skip connections and, at the coarsest level, the bottleneck).
    bound: the volume spans [-bound, bound]^3 in world space.
    """

    def __init__(
        self,
        settings: ModelSettings,
        make_encoder: Callable[[int, int], Encoder],
        make_aggregator: Callable[[int, int], Aggregator],
        bound: float,
    ):
        super().__init__()
        s = self.settings = settings
        self.bound = bound
        chans = [s.base_channels * m for m in s.channel_mult]
        sides = [s.volume_size // 2**lv for lv in range(len(chans))]
        attn = set(s.attention_levels)
        self.time_embed = TimestepEmbedding(s.time_dim)
        self.encoder = make_encoder(IN_CHANNELS, s.time_dim)
        self.lift = PointwiseConv3d(self.encoder.out_channels, s.base_channels)

        def level(a: int, b: int, lv: int) -> _Level:
            return _Level(a, b, s.num_res_blocks, s.time_dim, s.groups, lv in attn)

        ins = [chans[0]] + chans[:-1]
        self.down_levels = nn.ModuleList(level(a, b, lv) for lv, (a, b) in enumerate(zip(ins, chans)))
        self.downsamples = nn.ModuleList(Downsample3d(c) for c in chans[:-1])
        # One aggregator per scale: the skips of levels 0..L-2 and the bottleneck at level L-1.
        self.aggregators = nn.ModuleList(
            make_aggregator(c, d) for c, d in zip(chans, sides)
        )
        self.mid = level(chans[-1], chans[-1], len(chans) - 1)
        self.upsamples = nn.ModuleList(Upsample3d(b, a) for a, b in zip(chans[:-1], chans[1:]))
        self.up_levels = nn.ModuleList(level(2 * c, c, lv) for lv, c in enumerate(chans[:-1]))
        self.out = nn.Sequential(
            group_norm(chans[0], s.groups), nn.SiLU(), PointwiseConv3d(chans[0], s.out_channels)
        )

    def forward(
        self, images: Tensor, cameras: Cameras, timesteps: Tensor, self_cond: Tensor | None = None
    ) -> Tensor:
        """images: (B, V, 3, H, W) in [-1, 1]; cameras: (B, V); timesteps: (B, V) long;
        self_cond: (B, V, 3, H, W) in [-1, 1] or None (zeros). Returns (B, out_channels, D, D, D).
        """
        return self.decode(self.encode_views(images, cameras, timesteps, self_cond))

    def encode_views(
        self, images: Tensor, cameras: Cameras, timesteps: Tensor, self_cond: Tensor | None = None
    ) -> "ViewFeatures":
        """The per-view half of the network (2D encoder, unprojection, 3D U-Net encoder), which
        depends on nothing but the view itself: features of views whose input does not change
        (clean conditioning views while sampling) can be computed once and reused."""
        B, V = images.shape[:2]
        temb = self.time_embed(timesteps.reshape(B * V))  # (B*V, T)
        feats = self._view_volumes(images, cameras, temb, self_cond)  # (B*V, base, D, D, D)
        skips = []
        for lv, block in enumerate(self.down_levels):
            feats = block(feats, temb)
            skips.append(feats.reshape(B, V, *feats.shape[1:]))
            if lv < len(self.downsamples):
                feats = self.downsamples[lv](feats)
        return ViewFeatures(skips, temb.reshape(B, V, -1))

    def decode(self, views: "ViewFeatures") -> Tensor:
        """Aggregate across views at every scale and decode one volume per object."""
        skips = views.skips
        # Views' timesteps differ (clean vs noisy); an elementwise max is symmetric in the views
        # and defined for any V, as the decoder runs once per object.
        temb_dec = views.temb.amax(dim=1)
        h = self.mid(self.aggregators[-1](skips[-1], None), temb_dec)
        for lv in reversed(range(len(self.up_levels))):
            h = self.upsamples[lv](h)
            fused = self.aggregators[lv](skips[lv], h)
            h = self.up_levels[lv](torch.cat([h, fused], dim=1), temb_dec)
        return self.out(h)

    def _view_volumes(
        self, images: Tensor, cameras: Cameras, temb: Tensor, self_cond: Tensor | None
    ) -> Tensor:
        """Encode each view and unproject it: (B*V, base_channels, D, D, D)."""
        B, V, _, H, W = images.shape
        if (H, W) != (cameras.height, cameras.width):
            raise ValueError(f"images are {H}x{W} but cameras are for {cameras.height}x{cameras.width}")
        origins, dirs = cameras.rays()  # (B, V, H, W, 3) each
        self_cond = torch.zeros_like(images) if self_cond is None else self_cond
        x = torch.cat([images, origins.movedim(-1, 2), dirs.movedim(-1, 2), self_cond], dim=2)
        f = self.encoder(x.reshape(B * V, IN_CHANNELS, H, W).to(images.dtype), temb)
        # The 1x1 lift commutes with unprojection (a linear map per pixel vs per voxel; masked
        # voxels get the bias alone either way), so it runs on the h x w map instead of D^3
        # voxels and fewer channels are sampled.
        f = pointwise(self.lift.weight, f)
        vol = unproject(f.reshape(B, V, *f.shape[1:]), cameras, self.settings.volume_size, self.bound)
        return vol.flatten(0, 1) + self.lift.bias[:, None, None, None]
