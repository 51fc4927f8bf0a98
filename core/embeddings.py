"""Timestep embeddings shared by the 2D encoder and the 3D U-Net."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0, reach_max_period: bool = False) -> Tensor:
    """Transformer-style sinusoidal features of ``timesteps: (N,)`` -> ``(N, dim)``.

    Frequencies are geometric from 1 down towards ``1 / max_period`` so that both neighbouring and
    distant timesteps are told apart; ``reach_max_period`` makes the last one exactly
    ``1 / max_period`` (spacing over ``dim // 2 - 1`` steps, as the original Viewset Diffusion network).
    """
    half = dim // 2
    span = half - 1 if reach_max_period else half
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / max(span, 1))
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer MLP: long ``timesteps: (N,)`` -> ``(N, dim)``."""

    def __init__(self, dim: int, hidden_mult: int = 4):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * hidden_mult), nn.SiLU(), nn.Linear(dim * hidden_mult, dim)
        )

    def forward(self, timesteps: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(timesteps, self.dim))
