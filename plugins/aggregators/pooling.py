"""Parameter-free aggregators: the mean (as in pixelNeRF) and the maximum over views."""

from __future__ import annotations

from torch import Tensor

from ...core.settings import Settings as _Settings
from ...core.contracts import Aggregator


class MeanAggregator(Aggregator):
    """Average of the per-view features; the query is ignored.

    ``forward(feats: (B, V, C, D, D, D), query=None) -> (B, C, D, D, D)``.
    """

    class Settings(_Settings):
        pass

    def forward(self, feats: Tensor, query: Tensor | None = None) -> Tensor:
        return feats.mean(dim=1)


class MaxAggregator(Aggregator):
    """Per-channel maximum over views; the query is ignored.

    ``forward(feats: (B, V, C, D, D, D), query=None) -> (B, C, D, D, D)``.
    """

    class Settings(_Settings):
        pass

    def forward(self, feats: Tensor, query: Tensor | None = None) -> Tensor:
        return feats.amax(dim=1)
