"""A tetrahedral grid over the cube ``[-bound, bound]^3``, generated in code.

The cube is split into N^3 cells and each cell into the six tetrahedra around its main diagonal
(the Freudenthal / Kuhn subdivision): for every order (a, b, c) of the three axes, the tet
``corner, corner + e_a, corner + e_a + e_b, corner + e_a + e_b + e_c``. Every cell is cut the same
way, so the diagonal of each shared cell face is the same seen from both cells and neighbouring
tets meet face to face: the grid is a conforming tetrahedral mesh. All tets are positively
oriented (``det[v1 - v0, v2 - v0, v3 - v0] > 0``), which the marching-tetrahedra triangle table
relies on for outward normals.

Vertices are the (N + 1)^3 lattice points, index ``i + (N + 1) * (j + (N + 1) * k)`` for the
point ``(x_i, y_j, z_k)`` with ``x_i = bound * (2 i / N - 1)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class TetGrid:
    """vertices: (M, 3) float world positions; tets: (K, 4) long, positively oriented;
    edges: (E, 2) long unique tet edges (a < b); boundary: (M,) bool, vertices on the cube's
    surface."""

    vertices: Tensor
    tets: Tensor
    edges: Tensor
    boundary: Tensor
    resolution: int
    bound: float

    @property
    def cell(self) -> float:
        """The side of one cubic cell in world units."""
        return 2 * self.bound / self.resolution


def _cell_tets() -> Tensor:
    """(6, 4) corner ids (bit 0 = +x, bit 1 = +y, bit 2 = +z) of the tets of one unit cell."""
    tets = []
    for order in itertools.permutations(range(3)):
        path, corner = [0], 0
        for axis in order:
            corner |= 1 << axis
            path.append(corner)
        tets.append(path)
    return torch.tensor(tets)


def _orient(vertices: Tensor, tets: Tensor) -> Tensor:
    """Swap the last two corners of negatively oriented tets."""
    p = vertices[tets]
    det = torch.linalg.det(p[:, 1:] - p[:, :1])
    flip = det < 0
    out = tets.clone()
    out[flip, 2], out[flip, 3] = tets[flip, 3], tets[flip, 2]
    return out


def unique_edges(tets: Tensor) -> Tensor:
    """(E, 2) the distinct edges (a < b) of tets (K, 4)."""
    pairs = tets[:, [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]].reshape(-1, 2).sort(-1).values
    m = int(tets.max()) + 1 if tets.numel() else 1
    key = torch.unique(pairs[:, 0] * m + pairs[:, 1])  # one integer per edge: much faster than dim=0
    return torch.stack([key // m, key % m], -1)


@lru_cache(maxsize=16)
def _build(resolution: int, bound: float) -> TetGrid:
    n = resolution
    s = n + 1
    lattice = torch.arange(s)
    k, j, i = torch.meshgrid(lattice, lattice, lattice, indexing="ij")
    ijk = torch.stack([i, j, k], -1).reshape(-1, 3)  # vertex id = i + s * (j + s * k)
    vertices = bound * (2 * ijk.double() / n - 1)

    cells = ijk[(ijk < n).all(-1)]  # (n^3, 3) lower corners
    base = cells[:, 0] + s * (cells[:, 1] + s * cells[:, 2])
    bits = torch.arange(8)
    corner_offset = (bits & 1) + s * ((bits >> 1) & 1) + s * s * ((bits >> 2) & 1)  # (8,)
    tets = (base[:, None, None] + corner_offset[_cell_tets()][None]).reshape(-1, 4)
    tets = _orient(vertices, tets)
    boundary = ((ijk == 0) | (ijk == n)).any(-1)
    return TetGrid(vertices.float(), tets, unique_edges(tets), boundary, n, bound)


def tet_grid(resolution: int, bound: float = 1.0, device: torch.device | str | None = None) -> TetGrid:
    """The tetrahedral grid of ``resolution``^3 cells over ``[-bound, bound]^3`` (cached).

    ``resolution`` N gives (N + 1)^3 vertices and 6 N^3 tets.
    """
    if resolution < 1:
        raise ValueError(f"tet_grid: resolution must be >= 1, got {resolution}")
    if bound <= 0:
        raise ValueError(f"tet_grid: bound must be > 0, got {bound}")
    grid = _build(int(resolution), float(bound))
    if device is None or torch.device(device) == grid.vertices.device:
        return grid
    return _on_device(int(resolution), float(bound), str(torch.device(device)))


@lru_cache(maxsize=16)
def _on_device(resolution: int, bound: float, device: str) -> TetGrid:
    g = _build(resolution, bound)
    move = lambda t: t.to(device)  # noqa: E731
    return TetGrid(move(g.vertices), move(g.tets), move(g.edges), move(g.boundary), resolution, bound)
