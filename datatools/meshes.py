"""Render folders of textured meshes into SRN-layout viewsets (``vsd-run data render-meshes``).

Sources: OBJ / GLB / glTF / PLY / OFF / STL through trimesh (UV + texture image, or vertex /
face colours, or the material colour), and AC3D ``.ac`` / ``.acc`` through :mod:`.ac3d`. A
source becomes a list of :class:`MeshPart`, one per texture, each drawn by the pure-torch
:class:`~vsd.renderers.rasterizer.MeshRasterizer` and composited by depth.

World frame of the written data (the SRN-dataset defaults, ``up_axis: z``): **z up**, objects
centred at the origin with their largest bounding-box extent scaled to 1, so every object lies
in ``[-0.5, 0.5]^3`` (``bound: 0.5``). Sources are y-up by default (OBJ/glTF and TORCS models);
they are turned by +90 degrees about x, which keeps x, sends y to z and z to -y. A TORCS car
(x forward, y up) therefore faces +x, with its left side towards +y. ``up="z"`` leaves a source
as it is.

Cameras: ``views`` per object, looking at the origin from the upper hemisphere at ``radius``
(1.3, as the SRN cars) with a vertical field of view ``fov_deg`` (51.98), azimuth uniform and
sin(elevation) uniform between the elevation bounds (uniform over the spherical zone), drawn
from a seed derived from the object id: re-rendering an object reproduces it. Images are
upright with respect to z, RGB on white (no alpha), ``supersample^2`` rays per pixel.

Shading: ``shading = s`` scales colours by ``1 - s + s * (0.5 + 0.5 n . l)`` with n the surface
normal and l a fixed light in the object's frame, so it is the same from every view; 0 keeps the
flat texture colours.

Resuming: an object is rendered into a hidden scratch folder and moved into place when complete;
objects whose folder already holds ``views`` images, ``views`` poses and ``intrinsics.txt`` are
skipped.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..core.cameras import Cameras, spherical_to_cartesian
from ..core.contracts import Mesh
from ..core.errors import DataError
from ..core.progress import Progress
from .ac3d import read_ac3d

TRIMESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".off", ".stl")
AC3D_SUFFIXES = (".ac", ".acc")
MESH_SUFFIXES = TRIMESH_SUFFIXES + AC3D_SUFFIXES
SPLITS = ("train", "val", "test")
_Y_UP_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=np.float32)
_LIGHT = (0.3, 0.5, 1.0)  # object frame, z up: from above, slightly in front and to the left


@dataclass
class MeshPart:
    """Triangles sharing one texture, with unshared corners so that each keeps its own UV.

    mesh: a :class:`Mesh` (uv in the rasteriser's convention, v = 0 at the texture's top row);
    normals: (N, 3) per-vertex unit normals for shading, or None (face normals are used).
    """

    mesh: Mesh
    normals: Tensor | None = None


# ---- loading ------------------------------------------------------------------------------------
def load_texture(path: str | Path) -> Tensor:
    """(3, H, W) in [0, 1] from any image Pillow reads (PNG, JPEG, SGI .rgb, ...); alpha dropped."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    except OSError as e:
        raise DataError(f"cannot read texture {path}: {e}") from None


def _part(positions: np.ndarray, uvs=None, texture=None, colors=None, normals=None) -> MeshPart:
    """A part from per-corner arrays: positions (T, 3, 3), uvs (T, 3, 2) v up, colors (T, 3, 3)."""
    T = positions.shape[0]
    vertices = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.float32)).reshape(-1, 3)
    faces = torch.arange(3 * T).reshape(T, 3)
    mesh = Mesh(vertices, faces)
    if texture is not None:
        uv = np.asarray(uvs, dtype=np.float64)
        uv = uv - np.floor(uv.min(1, keepdims=True))  # a tiled face shown from its own tile
        uv[..., 1] = 1 - uv[..., 1]
        mesh.uv, mesh.texture = torch.from_numpy(uv.astype(np.float32)).reshape(-1, 2), texture
    else:
        mesh.vertex_colors = torch.from_numpy(np.asarray(colors, dtype=np.float32)).reshape(-1, 3).clamp(0, 1)
    n = None if normals is None else torch.from_numpy(np.asarray(normals, dtype=np.float32)).reshape(-1, 3)
    return MeshPart(mesh, n)


def load_ac3d_parts(path: str | Path, textures: dict[str, str | Path] | None = None) -> list[MeshPart]:
    """Parts of an AC3D file, one per texture. ``textures`` replaces texture files by name (a
    livery); other names resolve next to the model. Objects whose texture is missing keep
    their material colour (with a warning)."""
    path = Path(path)
    textures = textures or {}
    groups: dict[str | None, list] = {}
    for obj in read_ac3d(path):
        groups.setdefault(obj.texture, []).append(obj)
    parts, cache = [], {}
    for name, objs in groups.items():
        pos = np.concatenate([o.positions for o in objs])
        normals = None if any(o.normals is None for o in objs) else np.concatenate([o.normals for o in objs])
        tex_path = None if name is None else Path(textures.get(name, path.parent / name))
        if tex_path is not None and not tex_path.is_file():
            warnings.warn(f"{path}: texture {tex_path} not found; using material colours", stacklevel=2)
            tex_path = None
        if tex_path is not None:
            if tex_path not in cache:
                cache[tex_path] = load_texture(tex_path)
            tex = cache[tex_path]
            parts.append(_part(pos, uvs=np.concatenate([o.uvs for o in objs]), texture=tex, normals=normals))
        else:
            colors = np.concatenate([np.repeat(o.colors[:, None], 3, 1) for o in objs])
            parts.append(_part(pos, colors=colors, normals=normals))
    return parts


def _trimesh_part(geom) -> MeshPart | None:
    import trimesh

    if len(geom.faces) == 0:
        return None
    faces = np.asarray(geom.faces)
    pos = np.asarray(geom.vertices)[faces]
    normals = np.asarray(geom.vertex_normals)[faces]
    vis = geom.visual
    if isinstance(vis, trimesh.visual.TextureVisuals):
        mat = vis.material
        image = getattr(mat, "image", None) or getattr(mat, "baseColorTexture", None)
        if image is not None and vis.uv is not None and len(vis.uv) == len(geom.vertices):
            tex = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            return _part(pos, uvs=np.asarray(vis.uv)[faces], texture=tex, normals=normals)
        colour = np.asarray(getattr(mat, "main_color", [128, 128, 128, 255]), dtype=np.float32)[:3] / 255
        return _part(pos, colors=np.broadcast_to(colour, pos.shape), normals=normals)
    colors = np.asarray(vis.vertex_colors, dtype=np.float32)[faces][..., :3] / 255
    return _part(pos, colors=colors, normals=normals)


def load_trimesh_parts(path: str | Path) -> list[MeshPart]:
    """Parts of any mesh trimesh reads, scene graph transforms applied."""
    import trimesh

    try:
        scene = trimesh.load(str(path), force="scene", process=False)
    except Exception as e:  # trimesh raises many kinds of errors on bad files
        raise DataError(f"cannot read mesh {path}: {e}") from None
    parts = [p for g in scene.dump() if (p := _trimesh_part(g)) is not None]
    if not parts:
        raise DataError(f"mesh {path} has no triangles")
    return parts


def load_parts(path: str | Path, textures: dict[str, str | Path] | None = None) -> list[MeshPart]:
    """Parts of a mesh file in its own frame (see :data:`MESH_SUFFIXES`)."""
    suffix = Path(path).suffix.lower()
    if suffix in AC3D_SUFFIXES:
        return load_ac3d_parts(path, textures)
    if suffix in TRIMESH_SUFFIXES:
        return load_trimesh_parts(path)
    raise DataError(f"{path}: unsupported mesh format {suffix!r}; expected one of {', '.join(MESH_SUFFIXES)}")


def canonicalise(parts: list[MeshPart], up: str = "y") -> list[MeshPart]:
    """Parts turned to z up (from a ``up``-axis source) and scaled into ``[-0.5, 0.5]^3``:
    bounding box centred at the origin, largest extent 1."""
    if up not in ("y", "z"):
        raise ValueError(f"up must be 'y' or 'z', got {up!r}")
    R = torch.from_numpy(_Y_UP_TO_Z_UP) if up == "y" else torch.eye(3)
    allv = torch.cat([p.mesh.vertices for p in parts]) @ R.T
    lo, hi = allv.min(0).values, allv.max(0).values
    centre, scale = (lo + hi) / 2, 1.0 / float((hi - lo).max().clamp_min(1e-12))
    out = []
    for p in parts:
        mesh = replace(p.mesh, vertices=(p.mesh.vertices @ R.T - centre) * scale)
        out.append(MeshPart(mesh, None if p.normals is None else p.normals @ R.T))
    return out


# ---- cameras and rendering ----------------------------------------------------------------------
def hemisphere_cameras(
    n: int, radius: float, fov_deg: float, size: int, seed: int, elevation: tuple[float, float] = (0.0, 90.0)
) -> Cameras:
    """``n`` cameras (n,) on the upper (z > 0) hemisphere looking at the origin, upright in z."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    lo, hi = (math.sin(math.radians(e)) for e in elevation)
    el = torch.asin(lo + u[:, 1] * (hi - lo))
    eye = spherical_to_cartesian(u[:, 0] * 2 * math.pi, el, radius, "z").float()
    return Cameras.look_at(eye, up=(0.0, 0.0, 1.0), fov_deg=fov_deg, height=size, width=size)


def _shade_mesh(part: MeshPart, strength: float) -> Mesh:
    """The part's geometry with vertex colours = the shading factor."""
    m = part.mesh
    if part.normals is not None:
        n = F.normalize(part.normals, dim=-1)
    else:
        tri = m.vertices[m.faces]
        n = F.normalize(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1)
        n = n.repeat_interleave(3, 0)
    light = F.normalize(torch.tensor(_LIGHT), dim=0)
    factor = 1 - strength + strength * (0.5 + 0.5 * (n @ light))
    return Mesh(m.vertices, m.faces, vertex_colors=factor[:, None].expand(-1, 3).contiguous())


def render_parts(
    parts: list[MeshPart],
    cameras: Cameras,
    *,
    supersample: int = 2,
    shading: float = 0.0,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """rgb (V, 3, H, W) in [0, 1] over ``background`` and coverage mask (V, 1, H, W) of the parts
    seen by ``cameras`` (V,)."""
    from ..renderers.rasterizer import MeshRasterizer

    rast = MeshRasterizer(MeshRasterizer.Settings(supersample=1, softness=0.0, implementation="torch"))
    s, H, W = supersample, cameras.height, cameras.width
    cams = cameras.resized(H * s, W * s).reshape(1, -1)
    V = cams.shape[1]
    black = torch.zeros(3)

    def draw(mesh: Mesh) -> tuple[Tensor, Tensor, Tensor]:  # premultiplied rgb, depth, opacity
        out = rast([mesh], cams, black)
        return out["rgb"][0], out["depth"][0], out["opacity"][0]

    colour = torch.tensor(background).view(1, 3, 1, 1).expand(V, 3, H * s, W * s).clone()
    nearest = torch.full((V, 1, H * s, W * s), float("inf"))
    with torch.no_grad():
        for part in parts:
            rgb, depth, opacity = draw(part.mesh)
            if shading > 0:
                rgb = rgb * draw(_shade_mesh(part, shading))[0]
            hit = opacity > 0.5  # hard coverage: softness is off
            dist = torch.where(hit, depth / opacity.clamp_min(1e-6), torch.full_like(depth, float("inf")))
            closer = dist < nearest
            colour = torch.where(closer, rgb / opacity.clamp_min(1e-6), colour)
            nearest = torch.minimum(nearest, dist)
    mask = torch.isfinite(nearest).float()
    if s > 1:
        colour, mask = F.avg_pool2d(colour, s), F.avg_pool2d(mask, s)
    return colour.clamp(0, 1), mask


# ---- jobs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderConfig:
    """How every object is rendered (see the module docstring)."""

    views: int = 50
    size: int = 128
    radius: float = 1.3
    fov_deg: float = 51.98
    elevation: tuple[float, float] = (0.0, 90.0)
    supersample: int = 2
    shading: float = 0.0
    up: str = "y"
    prefix: str = "cars"
    seed: int = 0
    views_per_batch: int = 10


@dataclass(frozen=True)
class RenderJob:
    """One object: a mesh file, its split, and texture replacements (file name -> path)."""

    object_id: str
    split: str
    source: str
    textures: tuple[tuple[str, str], ...] = ()


def object_folder(out: str | Path, job: RenderJob, config: RenderConfig) -> Path:
    return Path(out) / f"{config.prefix}_{job.split}" / job.object_id


def object_complete(folder: Path, views: int) -> bool:
    """Whether an SRN object folder holds ``views`` images, ``views`` poses and its intrinsics."""
    if not (folder / "intrinsics.txt").is_file():
        return False
    rgb = {p.stem for p in (folder / "rgb").glob("*.png")}
    pose = {p.stem for p in (folder / "pose").glob("*.txt")}
    return len(rgb) == views and rgb == pose


def render_job(job: RenderJob, out: str | Path, config: RenderConfig) -> int:
    """Render one object into ``out`` (SRN layout); returns the number of views written."""
    from ..plugins.datasets.srn import write_srn_object

    parts = canonicalise(load_parts(job.source, dict(job.textures)), config.up)
    seed = zlib.crc32(f"{config.seed}/{job.object_id}".encode())
    cams = hemisphere_cameras(config.views, config.radius, config.fov_deg, config.size, seed, config.elevation)
    images = []
    for start in range(0, config.views, config.views_per_batch):
        chunk = cams[start : start + config.views_per_batch]
        images.append(render_parts(parts, chunk, supersample=config.supersample, shading=config.shading)[0])
    scratch = Path(out) / ".partial" / uuid.uuid4().hex
    written = write_srn_object(
        scratch, job.split, job.object_id, torch.cat(images), cams.c2w, cams.K[0], (config.size, config.size),
        prefix=config.prefix,
    )  # fmt: skip
    final = object_folder(out, job, config)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(written, final)
    shutil.rmtree(scratch, ignore_errors=True)
    return config.views


def _worker_init() -> None:
    torch.set_num_threads(1)  # one process per core does better than threads inside each


def _run(args: tuple[RenderJob, str, RenderConfig]) -> tuple[str, int, float]:
    job, out, config = args
    start = time.perf_counter()
    n = render_job(job, out, config)
    return job.object_id, n, time.perf_counter() - start


def render_jobs(
    jobs: list[RenderJob], out: str | Path, config: RenderConfig, *, workers: int = 1, progress: bool = True
) -> dict:
    """Render every job not already complete in ``out``, ``workers`` processes at a time,
    showing the objects done (``progress=False``: not).

    Returns ``{"rendered": n objects, "skipped": n, "views_rendered": n,
    "seconds": wall time, "render_seconds": summed per-object time}``.
    """
    out = Path(out)
    todo = [j for j in jobs if not object_complete(object_folder(out, j, config), config.views)]
    stats = {"rendered": 0, "skipped": len(jobs) - len(todo), "views_rendered": 0, "seconds": 0.0, "render_seconds": 0.0}
    start = time.perf_counter()
    with Progress(f"rendering into {out}", len(jobs), unit="objects", done=stats["skipped"], quiet=not progress) as bar:
        args = [(j, str(out), config) for j in todo]
        if workers <= 1 or len(todo) <= 1:
            results = map(_run, args)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(min(workers, len(todo)), initializer=_worker_init)
            results = pool.imap_unordered(_run, args)
        try:
            for _, n, seconds in results:
                stats["rendered"] += 1
                stats["views_rendered"] += n
                stats["render_seconds"] += seconds
                rate = stats["views_rendered"] / max(time.perf_counter() - start, 1e-9)
                bar.advance(**{"views/s": round(rate, 1)})
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    shutil.rmtree(out / ".partial", ignore_errors=True)
    stats["seconds"] = time.perf_counter() - start
    return stats


def find_mesh_jobs(folder: str | Path, *, split: str = "train", split_by_name: bool = False) -> list[RenderJob]:
    """A job per mesh file under ``folder`` (recursively), object id = its relative path without
    suffix, ``/`` replaced by ``__``. With ``split_by_name`` the split is the name of the mesh's
    first folder under ``folder`` (``train/``, ``val/`` or ``test/``) and that folder is left out
    of the id; otherwise every mesh goes to ``split``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"mesh folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in MESH_SUFFIXES and p.is_file())
    jobs = []
    for p in files:
        rel = p.relative_to(folder).with_suffix("")
        s = split
        if split_by_name:
            if len(rel.parts) < 2 or rel.parts[0] not in SPLITS:
                raise DataError(f"{p}: with --split-by-name every mesh must lie under {folder}/train, val or test")
            s, rel = rel.parts[0], Path(*rel.parts[1:])
        jobs.append(RenderJob("__".join(rel.parts), s, str(p)))
    if not jobs:
        raise DataError(f"no meshes ({', '.join(MESH_SUFFIXES)}) under {folder}")
    return jobs
