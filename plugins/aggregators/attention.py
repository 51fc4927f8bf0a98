"""The paper's aggregator: at every voxel a query attends over the V per-view features."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from ...core.settings import Settings as _Settings
from ...core.unet3d import group_norm
from ...core.contracts import Aggregator


class AttentionAggregator(Aggregator):
    """Per-voxel cross-attention from a query to the V views, with a residual and GroupNorm.

    The query is the decoder's feature at this scale, or, at the bottleneck (``query=None``), a
    learned ``(C, D, D, D)`` volume. With a given query the learned volume still enters the
    attention scores (a positional prior on which views to trust where) but not the residual
    path, so the decoder stream is the paper's while every parameter is used at every scale:
    distributed training then needs no search for unused parameters.

    ``forward(feats: (B, V, C, D, D, D), query: (B, C, D, D, D) | None) -> (B, C, D, D, D)``.
    All B * D^3 voxels are attended in one batched call; views carry no order, so the result is
    invariant to their permutation.
    """

    class Settings(_Settings):
        heads: int = Field(1, ge=1, description="Attention heads; must divide the channel count.")
        groups: int = Field(8, ge=1, description="GroupNorm groups after the residual.")

    def __init__(self, settings: Settings, *, channels: int, resolution: int):
        super().__init__(settings, channels=channels, resolution=resolution)
        if channels % settings.heads:
            raise ValueError(
                f"attention aggregator: heads={settings.heads} must divide channels={channels}"
            )
        self.heads = settings.heads
        D = resolution
        self.learned_query = nn.Parameter(torch.randn(channels, D, D, D))
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        self.norm = group_norm(channels, settings.groups)

    def forward(self, feats: Tensor, query: Tensor | None = None) -> Tensor:
        B, V, C, *spatial = feats.shape
        learned = self.learned_query.expand(B, -1, -1, -1, -1)
        residual = learned if query is None else query
        q_in = learned if query is None else query + learned
        heads, dh = self.heads, C // self.heads
        # Channels-first throughout: with one query and a handful of keys per voxel, a fused
        # attention kernel spends its time on setup, and moving channels last costs copies.
        N = math.prod(spatial)
        q = torch.bmm(self.to_q.weight.expand(B, -1, -1), q_in.reshape(B, C, N))  # (B, C, N)
        flat = feats.reshape(B * V, C, N)
        # two products rather than one sliced in two: a slice's backward zero-fills the whole
        k, v = (torch.bmm(lin.weight.expand(B * V, -1, -1), flat).view(B, V, C, N) for lin in (self.to_k, self.to_v))
        scores = (q[:, None] * k).reshape(B, V, heads, dh, N).sum(3) * dh**-0.5  # (B, V, heads, N)
        attn = scores.softmax(dim=1)
        out = (attn[:, :, :, None] * v.reshape(B, V, heads, dh, N)).sum(1).reshape(B, C, N)
        out = torch.baddbmm(self.to_out.bias[:, None], self.to_out.weight.expand(B, -1, -1), out)
        return self.norm(residual + out.reshape(B, C, *spatial))
