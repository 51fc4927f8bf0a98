"""The 2D convolutional encoder of Viewset Diffusion: a strided stem and time-conditioned ResNet blocks."""

from __future__ import annotations

from pydantic import Field
import torch
from torch import Tensor, nn

from ...core.settings import Settings as _Settings
from ...core.unet3d import ResBlock
from ...core.contracts import Encoder


class ConvEncoder(Encoder):
    """7x7 stride-2 conv to ``channels``, then ``blocks`` time-conditioned 2D ResNet blocks.

    The first block maps ``channels`` to ``out_channels``; features come out at half resolution:
    ``forward(x: (N, in_channels, H, W), temb: (N, time_dim)) -> (N, C, H/2, W/2)`` with
    C = out_channels, or channels + out_channels with ``pass_both``.
    """

    class Settings(_Settings):
        channels: int = Field(32, ge=1, description="Channels after the 7x7 stride-2 stem conv.")
        out_channels: int = Field(32, ge=1, description="Channels of the features handed to unprojection.")
        blocks: int = Field(2, ge=1, description="Number of time-conditioned ResNet blocks.")
        groups: int = Field(8, ge=1, description="GroupNorm groups (reduced to a divisor of the channels).")
        pass_both: bool = Field(
            False,
            description="Hand unprojection the stem's features concatenated with the ResNet blocks' "
            "(channels + out_channels channels): the stem's low-level colour survives next to the deeper features.",
        )

    def __init__(self, settings: Settings, *, in_channels: int, time_dim: int):
        super().__init__(settings, in_channels=in_channels, time_dim=time_dim)
        s = settings
        self.out_channels = s.out_channels + (s.channels if s.pass_both else 0)
        self.pass_both = s.pass_both
        self.stride = 2
        self.stem = nn.Conv2d(in_channels, s.channels, 7, stride=2, padding=3)
        widths = [s.channels] + [s.out_channels] * s.blocks
        self.blocks = nn.ModuleList(
            ResBlock(a, b, time_dim, s.groups, dims=2) for a, b in zip(widths[:-1], widths[1:])
        )

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        stem = h = self.stem(x)
        for block in self.blocks:
            h = block(h, temb)
        return torch.cat([stem, h], 1) if self.pass_both else h
