"""Aggregator slot: fuse per-view 3D feature volumes into one volume.

The denoiser calls an aggregator at every skip connection of its 3D U-Net and at the bottleneck,
always with the same signature, for any number of views V >= 1.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..settings import Plugin


class Aggregator(Plugin, nn.Module):
    """Fuse V per-view feature volumes.

    Constructed as ``cls(settings, channels=C, resolution=D)``.

    ``forward(feats, query=None)``:
        feats: (B, V, C, D, D, D) — one feature volume per view.
        query: (B, C, D, D, D) or None — the decoder's feature at this scale; None at the
               bottleneck (an aggregator that needs a query uses a learned one there).
        returns (B, C, D, D, D). Must be invariant to the order of the V views.
    """

    def __init__(self, settings, *, channels: int, resolution: int):
        nn.Module.__init__(self)
        self.settings = settings
        self.channels = channels
        self.resolution = resolution

    def forward(self, feats: Tensor, query: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError
