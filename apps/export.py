"""Meshes from any representation's output, written as GLB, PLY or OBJ (``vsd-run export``, via
:func:`vsd.apps.sampling.export_to_files`).

Fields are meshed by marching cubes on their density grid (PyMCubes), coloured by querying the
field at the vertices; mesh representations (a list of :class:`Mesh`) convert directly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.contracts import Field, Mesh
from ..core.errors import EmptyMeshError
from ..core.files import temp_beside
from ..core.progress import Progress

FORMATS = ("glb", "ply", "obj")


def default_threshold(bound: float) -> float:
    """Density (1/world-length) at which a slab 1/32 of the cube's side is 50 % opaque."""
    return math.log(2.0) * 32 / (2 * bound)


@torch.no_grad()
def field_colors(field: Field, index: int, points: Tensor, chunk: int = 1 << 16) -> Tensor:
    """RGB (N, 3) in [0, 1] of object ``index`` of ``field`` at world points (N, 3)."""
    B = field.batch_size
    out = []
    for p in points.split(chunk):
        # fields are queried for the whole batch at once; the other objects get the same points
        out.append(field.query(p[None].expand(B, -1, -1).contiguous())[1][index])
    return torch.cat(out) if out else points.new_zeros(0, 3)


def _drop_small_components(mesh, min_component_ratio: float):
    """Keep the connected components with at least ``ratio`` of the largest one's faces."""
    if min_component_ratio <= 0 or len(mesh.faces) == 0:
        return mesh
    import trimesh

    parts = mesh.split(only_watertight=False)
    if len(parts) <= 1:
        return mesh
    largest = max(len(p.faces) for p in parts)
    return trimesh.util.concatenate([p for p in parts if len(p.faces) >= min_component_ratio * largest])


@torch.no_grad()
def field_to_mesh(
    field: Field,
    index: int = 0,
    resolution: int = 64,
    threshold: float | None = None,
    min_component_ratio: float = 0.0,
    colors: bool = True,
):
    """Marching-cubes mesh of object ``index`` of ``field`` -> ``trimesh.Trimesh`` in world units.

    The density grid is sampled at the centres of a ``resolution``^3 grid over the cube and
    padded with one empty voxel on every side, so surfaces that reach the cube's faces close
    (on the faces: vertices are kept inside the cube).
    ``threshold``: the density level (1/world-length), default :func:`default_threshold`.
    ``min_component_ratio``: drop components with fewer faces than this share of the largest.
    Faces are oriented outwards; vertex colours come from the field's rgb at the vertices.
    """
    import mcubes
    import trimesh

    if not 0 <= index < field.batch_size:
        raise IndexError(f"field_to_mesh: object {index} out of a batch of {field.batch_size}")
    level = default_threshold(field.bound) if threshold is None else threshold
    grid = field.density_grid(resolution)[index].float().cpu().numpy()
    grid = np.pad(grid, 1, mode="constant", constant_values=0.0)
    verts, faces = mcubes.marching_cubes(grid, level)
    # array axes are (z, y, x); padded index n is the voxel centre n - 1
    xyz = verts[:, ::-1] - 1.0
    # the padding voxel's centre lies half a voxel outside the cube, where fields are empty anyway
    world = (field.bound * ((2 * xyz + 1) / resolution - 1)).clip(-field.bound, field.bound)
    mesh = trimesh.Trimesh(world, faces.astype(np.int64), process=False)
    if len(faces) and mesh.is_watertight and mesh.volume < 0:
        mesh.invert()
    mesh = _drop_small_components(mesh, min_component_ratio)
    if colors and len(mesh.vertices):
        pts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=field.device)
        rgb = field_colors(field, index, pts).clamp(0, 1).cpu().numpy()
        alpha = np.ones((len(rgb), 1))
        mesh.visual.vertex_colors = (np.concatenate([rgb, alpha], 1) * 255).round().astype(np.uint8)
    return mesh


def mesh_to_trimesh(mesh: Mesh):
    """A :class:`Mesh` -> ``trimesh.Trimesh`` with its vertex colours or texture.

    Mesh UVs have ``v = 0`` at the texture's first row; trimesh counts ``v`` from the bottom.
    """
    import trimesh
    from PIL import Image

    verts = mesh.vertices.detach().float().cpu().numpy()
    faces = mesh.faces.detach().long().cpu().numpy()
    out = trimesh.Trimesh(verts, faces, process=False)
    if mesh.uv is not None and mesh.texture is not None:
        uv = mesh.uv.detach().float().cpu().numpy().copy()
        uv[:, 1] = 1.0 - uv[:, 1]
        tex = (mesh.texture.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
        image = Image.fromarray(tex.astype(np.uint8))
        out.visual = trimesh.visual.TextureVisuals(uv=uv, material=trimesh.visual.material.SimpleMaterial(image=image))
    elif mesh.vertex_colors is not None:
        rgb = mesh.vertex_colors.detach().float().clamp(0, 1).cpu().numpy()
        out.visual.vertex_colors = (np.concatenate([rgb, np.ones((len(rgb), 1))], 1) * 255).round().astype(np.uint8)
    return out


def scene_to_meshes(scene, resolution: int = 64, threshold: float | None = None, min_component_ratio: float = 0.0, *,
                    progress: bool = False) -> list:  # fmt: skip
    """A representation's output (a Field of B objects, or a list of B Mesh) -> B trimesh meshes;
    ``progress``: show the fields meshed on stderr."""
    if isinstance(scene, Field):
        meshes = []
        with Progress(f"meshing ({resolution}^3 grid)", scene.batch_size, unit="objects", quiet=not progress) as bar:
            for b in range(scene.batch_size):
                meshes.append(field_to_mesh(scene, b, resolution, threshold, min_component_ratio))
                bar.advance()
        return meshes
    if isinstance(scene, (list, tuple)) and all(isinstance(m, Mesh) for m in scene):
        return [mesh_to_trimesh(m) for m in scene]
    raise TypeError(f"cannot export a {type(scene).__name__}: expected a Field or a list of Mesh")


def export_mesh(scene, path: str | Path, format: str | None = None, *, index: int = 0, resolution: int = 64, threshold: float | None = None) -> Path:
    """Write one mesh to ``path`` as glb, ply or obj (default: from the suffix) and return the path.

    ``scene``: a ``trimesh.Trimesh``, a :class:`Mesh`, or a Field (object ``index`` is meshed
    with :func:`field_to_mesh`). PLY keeps vertex colours only, so textures are baked into them.
    The file appears atomically: written under a temporary name, then renamed.
    """
    import trimesh

    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown mesh format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if isinstance(scene, Field):
        field, scene = scene, field_to_mesh(scene, index, resolution, threshold)
        if len(scene.faces) == 0:
            raise EmptyMeshError(no_surface(field, index, resolution, threshold, path))
    elif isinstance(scene, Mesh):
        scene = mesh_to_trimesh(scene)
    elif not isinstance(scene, trimesh.Trimesh):
        raise TypeError(f"cannot export a {type(scene).__name__}: expected a Trimesh, a Mesh or a Field")
    if len(scene.faces) == 0:
        raise EmptyMeshError(f"{path}: the mesh to export has no faces; nothing was written")
    if fmt == "ply" and isinstance(scene.visual, trimesh.visual.TextureVisuals):
        scene = scene.copy()
        scene.visual = scene.visual.to_color()
    path = path.with_suffix(f".{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "obj":
        # OBJ may come with a material and texture beside it; the resolver writes those next to it
        data = trimesh.exchange.obj.export_obj(scene, include_color=True, include_texture=True, mtl_name=f"{path.stem}.mtl", resolver=trimesh.resolvers.FilePathResolver(str(path)))
        _write_atomic(path, data.encode())
    else:
        _write_atomic(path, scene.export(file_type=fmt))
    return path


def no_surface(field: Field, index: int, resolution: int, threshold: float | None, path: Path) -> str:
    """Why a field gave no surface, with the density range found and a threshold to try."""
    level = default_threshold(field.bound) if threshold is None else threshold
    grid = field.density_grid(resolution)[index].float()
    lo, hi = float(grid.min()), float(grid.max())
    hint = (f"; try --threshold {hi / 2:.3g} (half the largest density), or a checkpoint trained longer" if hi > 0
            else "; the field is empty everywhere: is the checkpoint trained?")
    return (f"{path}: no surface at density threshold {level:.3g} — the object's densities range over "
            f"[{lo:.3g}, {hi:.3g}] (1/world-length, {resolution}^3 grid){hint}; nothing was written")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = temp_beside(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
