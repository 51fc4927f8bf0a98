"""Mesh via DMTet: an SDF and vertex offsets on a tetrahedral grid, turned into coloured meshes.

The denoiser's feature volume is sampled at the vertices of a tet grid (:mod:`.tetgrid`); a small
per-vertex MLP predicts the SDF (negative inside) and a bounded offset of the vertex; marching
tetrahedra (:mod:`.marching_tets`) extracts the zero level set as triangles, differentiably in
both; a second MLP colours the surface vertices from the features sampled where they landed.

Sphere prior. The SDF is ``sdf = bound * (|p| / bound - init_radius + sdf_scale * mlp(p))``: a
fixed sphere of radius ``init_radius * bound`` plus the network's residual, whose last layer
starts near zero. An untrained model therefore already yields a closed sphere-like surface that
the renderer's soft edges can move. Without it a random SDF is either one sign everywhere (no
surface, so no gradient ever reaches the geometry) or a froth of tiny components.
``init_radius = 0`` turns the prior off. The grid's outer shell is clamped to a small positive
SDF so that surfaces are always closed inside the cube.

Empty surfaces. When the SDF has one sign everywhere the mesh has no faces (vertices (0, 3),
faces (0, 3)); the rasteriser then draws the background with zero opacity and depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import Tensor, nn

from ..core.settings import Settings as BaseSettings
from ..core.contracts import Mesh, Representation
from .grid_sample import sample_features
from .marching_tets import marching_tets
from .tetgrid import TetGrid, tet_grid

SHELL_SDF = 1e-3  # in units of bound: the outer shell's minimum SDF, keeps surfaces closed
HEAD_INIT_STD = 1e-3  # last-layer weights of the SDF/offset head: the sphere prior dominates at init


@dataclass
class TetFields:
    """Per-vertex outputs on the tet grid for B objects: sdf (B, M) in world units, negative
    inside; vertices (B, M, 3) the offset grid vertices in world units."""

    sdf: Tensor
    vertices: Tensor
    grid: TetGrid


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, cout))


def sdf_sign_regulariser(sdf: Tensor, edges: Tensor) -> Tensor:
    """DMTet's sign-flip entropy: mean over grid edges whose endpoints differ in sign of the
    cross-entropy of ``sigmoid(s_a)`` against the sign of ``s_b`` and vice versa.

    sdf: (B, M); edges: (E, 2). Penalises SDF values that are large on both sides of the surface,
    which discourages spurious floating sheets and keeps the SDF well scaled near the surface.
    Returns a scalar (0 when no edge is crossed).
    """
    s_a, s_b = sdf[:, edges[:, 0]], sdf[:, edges[:, 1]]
    crossed = (s_a < 0) != (s_b < 0)
    if not crossed.any():
        return sdf.sum() * 0
    s_a, s_b = s_a[crossed], s_b[crossed]
    bce = F.binary_cross_entropy_with_logits
    return (bce(s_a, (s_b >= 0).to(s_a)) + bce(s_b, (s_a >= 0).to(s_b))) / 2


class DMTet(Representation):
    """SDF + vertex offsets on a tet grid -> a list of B coloured meshes (see the module docstring).

    Constructed as ``DMTet(settings, in_channels=C, resolution=D, bound=b)``.
    ``forward(volume: (B, C, D, D, D)) -> list`` of B :class:`Mesh` with ``vertex_colors`` in
    [0, 1]. ``fields(volume)`` gives the per-vertex SDF and moved vertices, for regularisers.
    """

    kind = "mesh"

    class Settings(BaseSettings):
        grid_resolution: int = 16  # cells per side of the tet grid: (N + 1)^3 vertices, 6 N^3 tets
        hidden: int = 32
        init_radius: float = 0.5  # sphere prior, a fraction of bound; 0: no prior
        offset_scale: float = 0.5  # largest vertex offset, in grid cells
        sdf_scale: float = 1.0  # the SDF head's output times this, in units of bound
        sdf_regulariser: float = 0.0  # weight of the SDF sign-flip regulariser in the training loss
        color: Literal["vertex"] = "vertex"  # colours: an MLP at each surface vertex
        implementation: Literal["auto", "torch", "kaolin"] = "auto"

        @field_validator("grid_resolution", "hidden")
        @classmethod
        def _positive(cls, v: int) -> int:
            if v < 1:
                raise ValueError(f"must be >= 1, got {v}")
            return v

        @field_validator("init_radius", "offset_scale", "sdf_scale", "sdf_regulariser")
        @classmethod
        def _non_negative(cls, v: float) -> float:
            if v < 0:
                raise ValueError(f"must be >= 0, got {v}")
            return v

    def __init__(self, settings: Settings, *, in_channels: int, resolution: int, bound: float):
        super().__init__(settings, in_channels=in_channels, resolution=resolution, bound=bound)
        # Both MLPs also see the point's position (over bound), so that a shape or colour shared
        # by all objects (the mean silhouette) needs no positional code in the feature volume.
        self.geometry = _mlp(in_channels + 3, settings.hidden, 4)  # sdf, offset xyz
        self.colour = _mlp(in_channels + 3, settings.hidden, 3)
        nn.init.normal_(self.geometry[-1].weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.geometry[-1].bias)

    def grid(self, device: torch.device) -> TetGrid:
        return tet_grid(self.settings.grid_resolution, self.bound, device)

    def fields(self, volume: Tensor) -> TetFields:
        """volume (B, C, D, D, D) -> the SDF (B, M) and the offset vertices (B, M, 3)."""
        self._check(volume)
        s, b = self.settings, self.bound
        g = self.grid(volume.device)
        base = g.vertices.to(volume.dtype).expand(volume.shape[0], -1, -1)
        raw = self.geometry(self._inputs(volume, base))  # (B, M, 4)
        prior = base.norm(dim=-1) - s.init_radius * b if s.init_radius > 0 else 0.0
        sdf = prior + s.sdf_scale * b * raw[..., 0]
        sdf = torch.where(g.boundary, sdf.clamp_min(SHELL_SDF * b), sdf)
        offsets = s.offset_scale * g.cell * torch.tanh(raw[..., 1:])
        return TetFields(sdf, base + offsets, g)

    def forward(self, volume: Tensor) -> list[Mesh]:
        """volume (B, C, D, D, D) -> B meshes (vertices (N_b, 3), faces (F_b, 3), colours (N_b, 3))."""
        f = self.fields(volume)
        meshes = []
        for b in range(volume.shape[0]):
            verts, faces = marching_tets(f.vertices[b], f.grid.tets, f.sdf[b], self.settings.implementation)
            colour = torch.sigmoid(self.colour(self._inputs(volume[b : b + 1], verts[None])[0]))
            meshes.append(Mesh(verts, faces, colour))
        return meshes

    def _inputs(self, volume: Tensor, points: Tensor) -> Tensor:
        """MLP inputs (B, N, C + 3): features at world points (B, N, 3) and the points / bound."""
        return torch.cat([sample_features(volume, points, self.bound), points / self.bound], -1)

    def sdf_regulariser(self, volume: Tensor) -> Tensor:
        """Scalar :func:`sdf_sign_regulariser` of this volume's SDF (unweighted)."""
        f = self.fields(volume)
        return sdf_sign_regulariser(f.sdf / self.bound, f.grid.edges)

    def regulariser(self, volume: Tensor) -> Tensor | None:
        """``sdf_regulariser`` (the setting) times :meth:`sdf_regulariser`, when the weight is set."""
        w = self.settings.sdf_regulariser
        return w * self.sdf_regulariser(volume) if w > 0 else None

    def _check(self, volume: Tensor) -> None:
        if volume.shape[1:] != (self.in_channels, *(self.resolution,) * 3):
            raise ValueError(
                f"DMTet expected a volume (B, {self.in_channels}, {self.resolution}, "
                f"{self.resolution}, {self.resolution}), got {tuple(volume.shape)}"
            )
