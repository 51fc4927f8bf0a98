"""The paper's aggregator: at every voxel a query attends over the V per-view features."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from ...core.settings import Settings as _Settings
from ...core.unet3d import group_norm
from .base import Aggregator


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
        q = self.to_q(q_in.flatten(2).transpose(1, 2))  # (B, N, C)
        kv = feats.flatten(3).permute(0, 3, 1, 2)  # (B, N, V, C)
        k, v = self.to_k(kv), self.to_v(kv)
        N = q.shape[1]
        q = q.reshape(B * N, 1, heads, dh).transpose(1, 2)  # (B*N, heads, 1, dh)
        k = k.reshape(B * N, V, heads, dh).transpose(1, 2)  # (B*N, heads, V, dh)
        v = v.reshape(B * N, V, heads, dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B*N, heads, 1, dh)
        out = self.to_out(out.transpose(1, 2).reshape(B, N, C))
        return self.norm(residual + out.transpose(1, 2).reshape(B, C, *spatial))
