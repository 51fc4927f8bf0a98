"""A learned, visibility-style weighting of the views, for ablations against attention."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ...core.settings import Settings as _Settings
from ...core.contracts import Aggregator


class WeightedMeanAggregator(Aggregator):
    """Softmax-weighted mean over views, each view scored by a small per-voxel MLP.

    The score of a view sees its feature, its deviation from the mean over views (how much it
    disagrees with the others, e.g. because it sees an occluder) and, with ``use_query``, the
    decoder's query (zeros at the bottleneck). Only symmetric statistics of the views enter, so
    the result is invariant to their order.

    ``forward(feats: (B, V, C, D, D, D), query: (B, C, D, D, D) | None) -> (B, C, D, D, D)``.
    """

    class Settings(_Settings):
        hidden: int = Field(32, ge=1, description="Width of the per-voxel scoring MLP.")
        use_query: bool = Field(True, description="Let the decoder's query take part in scoring.")

    def __init__(self, settings: Settings, *, channels: int, resolution: int):
        super().__init__(settings, channels=channels, resolution=resolution)
        n_in = (3 if settings.use_query else 2) * channels
        self.score = nn.Sequential(
            nn.Linear(n_in, settings.hidden), nn.SiLU(), nn.Linear(settings.hidden, 1)
        )

    def forward(self, feats: Tensor, query: Tensor | None = None) -> Tensor:
        f = feats.movedim(2, -1)  # (B, V, D, D, D, C)
        parts = [f, f - f.mean(dim=1, keepdim=True)]
        if self.settings.use_query:
            q = feats.new_zeros(feats[:, 0].shape) if query is None else query
            parts.append(q.movedim(1, -1)[:, None].expand_as(f))
        weights = self.score(torch.cat(parts, dim=-1)).softmax(dim=1)  # (B, V, D, D, D, 1)
        return (weights * f).sum(dim=1).movedim(-1, 1)

