"""Differentiable marching tetrahedra: the zero level set of an SDF on a tetrahedral mesh.

Sign convention: the SDF is **negative inside** the surface and positive outside; a vertex with
sdf < 0 is inside (sdf == 0 counts as outside). Faces are wound so that their normals
``(v1 - v0) x (v2 - v0)`` point towards positive SDF, i.e. outwards, provided the tets are
positively oriented (``det[v1 - v0, v2 - v0, v3 - v0] > 0``, as :mod:`.tetgrid` makes them).

Which tets the surface crosses and how they are triangulated is decided without gradient (it is
piecewise constant); the surface vertices, one per crossed edge (a, b), are the zero crossings of
the linear interpolant ``v = (v_a s_b - v_b s_a) / (s_b - s_a)``, differentiable in both the
tet-mesh vertex positions and the SDF values.

kaolin's ``kaolin.ops.conversions.marching_tetrahedra`` (CUDA tensors only) is an optional backend;
it triangulates the same cases with the same winding (its "occupied" side, sdf > 0, is where our
normals point), so it is called with the SDF as is.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

try:
    from kaolin.ops.conversions import marching_tetrahedra as _kaolin_marching_tetrahedra
except ImportError:  # optional CUDA backend
    _kaolin_marching_tetrahedra = None

TET_EDGES = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
_NOTICES: set[str] = set()


def _notice_once(message: str) -> None:
    if message not in _NOTICES:
        _NOTICES.add(message)
        warnings.warn(message, stacklevel=3)


def _edge_slot(a: int, b: int) -> int:
    return next(i for i, (p, q) in enumerate(TET_EDGES.tolist()) if {p, q} == {a, b})


def _triangle_table() -> tuple[Tensor, Tensor]:
    """(16, 6) edge slots of up to two triangles per sign case (-1 padded) and (16,) counts.

    Case bit i is set when tet vertex i is inside. Triangles are built on the edge midpoints of
    the unit right tet, a positively oriented tet, and wound so their normal points from the
    inside corners to the outside ones. Winding is invariant under orientation-preserving affine
    maps and under moving crossings along their edges, so it holds for every positive tet.
    """
    ref = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    table = torch.full((16, 6), -1, dtype=torch.long)
    counts = torch.zeros(16, dtype=torch.long)
    for case in range(16):
        inside = [i for i in range(4) if case >> i & 1]
        outside = [i for i in range(4) if not case >> i & 1]
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            cycle = [(lone, o) for o in others]
        elif len(inside) == 2:
            (a, b), (c, d) = inside, outside
            cycle = [(a, c), (a, d), (b, d), (b, c)]  # consecutive edges share a corner: a loop
        else:
            continue
        direction = ref[outside].mean(0) - ref[inside].mean(0)
        tris = [cycle[:3]] if len(cycle) == 3 else [cycle[:3], [cycle[0], cycle[2], cycle[3]]]
        slots = []
        for tri in tris:
            p = torch.stack([ref[list(e)].mean(0) for e in tri])
            if torch.dot(torch.linalg.cross(p[1] - p[0], p[2] - p[0]), direction) < 0:
                tri = [tri[0], tri[2], tri[1]]
            slots += [_edge_slot(*e) for e in tri]
        table[case, : len(slots)] = torch.tensor(slots)
        counts[case] = len(tris)
    return table, counts


TRIANGLE_TABLE, NUM_TRIANGLES = _triangle_table()


def marching_tets_torch(vertices: Tensor, tets: Tensor, sdf: Tensor) -> tuple[Tensor, Tensor]:
    """vertices (M, 3), tets (K, 4) long, sdf (M,) negative inside -> (verts (N, 3), faces (F, 3)).

    ``verts`` is differentiable in ``vertices`` and ``sdf``; no surface gives (0, 3) and (0, 3).
    """
    dev = vertices.device
    with torch.no_grad():
        inside = sdf < 0
        corner_in = inside[tets]  # (K, 4)
        n_in = corner_in.sum(-1)
        crossed_tets = (n_in > 0) & (n_in < 4)
        tv = tets[crossed_tets]
        edges = tv[:, TET_EDGES.to(dev)].sort(-1).values  # (Kc, 6, 2), a < b
        crossed = inside[edges[..., 0]] != inside[edges[..., 1]]
        key = edges[..., 0] * vertices.shape[0] + edges[..., 1]  # one integer per edge: fast unique
        uniq, inverse = torch.unique(key[crossed], return_inverse=True)
        slot_vertex = torch.full_like(key, -1)
        slot_vertex[crossed] = inverse
        a, b = uniq // vertices.shape[0], uniq % vertices.shape[0]
        case = (corner_in.long()[crossed_tets] << torch.arange(4, device=dev)).sum(-1)
        table, counts = TRIANGLE_TABLE.to(dev)[case], NUM_TRIANGLES.to(dev)[case]
        first = slot_vertex.gather(1, table[:, :3])
        second = slot_vertex[counts == 2].gather(1, table[counts == 2, 3:])
        faces = torch.cat([first, second])
    s_a, s_b = sdf[a, None], sdf[b, None]
    verts = (vertices[a] * s_b - vertices[b] * s_a) / (s_b - s_a)
    return verts, faces


def kaolin_available() -> bool:
    return _kaolin_marching_tetrahedra is not None


def marching_tets(
    vertices: Tensor,
    tets: Tensor,
    sdf: Tensor,
    implementation: Literal["auto", "torch", "kaolin"] = "auto",
) -> tuple[Tensor, Tensor]:
    """The zero level set of ``sdf`` (M,) on the tet mesh (vertices (M, 3), tets (K, 4)).

    Returns (verts (N, 3), faces (F, 3) long) with outward winding; see the module docstring.
    ``implementation``: "torch", "kaolin" (CUDA tensors only) or "auto" (kaolin when it can).
    """
    if sdf.shape != vertices.shape[:1]:
        raise ValueError(f"marching_tets: sdf must be ({vertices.shape[0]},), got {tuple(sdf.shape)}")
    if implementation == "torch":
        return marching_tets_torch(vertices, tets, sdf)
    if implementation not in ("auto", "kaolin"):
        raise ValueError(f"marching_tets: implementation must be auto, torch or kaolin, got {implementation!r}")
    on_cuda = vertices.device.type == "cuda"
    if on_cuda and kaolin_available():
        verts, faces = _kaolin_marching_tetrahedra(vertices[None], tets, sdf[None])
        return verts[0], faces[0]
    if implementation == "kaolin":
        why = "kaolin is not importable" if not kaolin_available() else "tensors are not on CUDA"
        _notice_once(f"marching_tets: implementation 'kaolin' requested but {why}; using torch.")
    elif on_cuda:
        _notice_once("marching_tets: kaolin is not importable; using the torch implementation.")
    return marching_tets_torch(vertices, tets, sdf)
