"""The paper's aggregation of per-view volumes: at each voxel, one query attends over the views."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .blocks import GROUPS


class ViewCrossAttention(nn.Module):
    """Multi-head attention from a query volume to V per-view volumes, voxel by voxel, plus the
    query (residual), then GroupNorm(8).

    ``forward(views: (B, V, C, *S), query: (B, Cq, *S) or (Cq, *S)) -> (B, C, *S)``. A query
    without a batch axis (the learned bottleneck volume) is shared by the batch. When ``Cq != C`` a
    1x1x1 conv first maps the query to ``C`` channels; that mapped query is the residual too.
    The projections are packed like ``nn.MultiheadAttention``'s: ``in_proj`` is q, k, v stacked.
    """

    def __init__(self, channels: int, query_channels: int, heads: int = 1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.heads = heads
        self.query_adapter = nn.Conv3d(query_channels, channels, 1) if query_channels != channels else nn.Identity()
        self.in_proj = nn.Linear(channels, 3 * channels)
        self.out_proj = nn.Linear(channels, channels)
        self.norm = nn.GroupNorm(GROUPS, channels)

    def forward(self, views: Tensor, query: Tensor) -> Tensor:
        b = views.shape[0]
        if query.dim() == views.dim() - 2:
            query = query.unsqueeze(0).expand(b, *query.shape)
        query = self.query_adapter(query)
        attended = self._attend(views, query)
        return self.norm(attended + query)

    def _attend(self, views: Tensor, query: Tensor) -> Tensor:
        """``views: (B, V, C, *S)``, ``query: (B, C, *S)`` -> the attention output ``(B, C, *S)``."""
        b, v, c, *spatial = views.shape
        heads, dh = self.heads, c // self.heads
        w_q, w_k, w_v = self.in_proj.weight.chunk(3)
        b_q, b_k, b_v = self.in_proj.bias.chunk(3)
        q = F.linear(query.flatten(2).transpose(1, 2), w_q, b_q)  # (B, P, C)
        y = views.flatten(3).permute(0, 3, 1, 2)  # (B, P, V, C)
        k, val = F.linear(y, w_k, b_k), F.linear(y, w_v, b_v)
        q = q.reshape(b, -1, heads, dh)
        k, val = k.reshape(b, -1, v, heads, dh), val.reshape(b, -1, v, heads, dh)
        weights = (torch.einsum("bphd,bpvhd->bphv", q, k) * dh**-0.5).softmax(dim=-1)
        out = torch.einsum("bphv,bpvhd->bphd", weights, val).reshape(b, -1, c)
        return self.out_proj(out).transpose(1, 2).reshape(b, c, *spatial)
