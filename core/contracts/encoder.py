"""Encoder slot: a per-view 2D network conditioned on that view's timestep."""

from __future__ import annotations

from torch import Tensor, nn

from ..settings import Plugin


class Encoder(Plugin, nn.Module):
    """Per-view 2D encoder.

    Constructed as ``cls(settings, in_channels=..., time_dim=...)``.

    ``forward(x, temb)``:
        x: (N, in_channels, H, W) — per view: RGB in [-1, 1], ray origin (3), ray direction (3),
           self-conditioning RGB (3); N = B * V.
        temb: (N, time_dim) — embedding of that view's timestep.
        returns (N, out_channels, H / stride, W / stride).

    Attributes ``out_channels`` and ``stride`` are set by the constructor.
    """

    out_channels: int
    stride: int

    def __init__(self, settings, *, in_channels: int, time_dim: int):
        nn.Module.__init__(self)
        self.settings = settings
        self.in_channels = in_channels
        self.time_dim = time_dim

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError
