"""Triangle-mesh rasteriser, pure torch (nvdiffrast or kaolin optional on CUDA).

Each of the B meshes is drawn at its V cameras (OpenCV pinholes) at ``supersample`` times the
output resolution, then box-filtered down, which anti-aliases edges.

Visibility (no gradient). Vertices are projected to sub-pixel coordinates; every face lists the
pixel centres inside its screen bounding box as *fragments*. A fragment is inside the face when
its screen-space barycentrics are all >= 0; the z-buffer keeps, per pixel, the inside fragment
with the largest interpolated 1/z (1/z is affine in screen space, so this is the exact nearest
surface). Faces are processed ``faces_per_chunk`` at a time and the chunks' z-buffers merged, so
work and memory are O(sum of the faces' bounding-box areas in sub-pixels) rather than
O(pixels x faces): a few thousand small faces at 64-128 px make well under a million fragments
per view. Faces with a vertex behind the camera (z <= 1e-3) are dropped, not clipped; both sides
of every face are drawn.

Shading (differentiable). For each covered pixel the barycentrics of its face are recomputed
from the (differentiable) projected vertices and made perspective-correct,
``b_k = (l_k / z_k) / sum_j (l_j / z_j)``; they interpolate vertex colours or UVs (then a bilinear
texture lookup with ``grid_sample``) and the camera-space point, whose norm is the distance along
the ray. Meshes with neither colours nor a texture are drawn mid grey. UV convention: ``u`` runs
along the texture's width and ``v`` along its height with ``v = 0`` at row 0 of the
``(3, Ht, Wt)`` tensor (as in nvdiffrast); OBJ-style UVs (v up) need ``v -> 1 - v``.

Gradients w.r.t. vertex positions: a soft coverage term for the nearest face, used
straight-through. Hard coverage is piecewise constant in the vertex positions, so
``opacity = hard + soft - soft.detach()``: its value is the exact supersampled coverage and its
gradient is that of ``soft``. Each empty sub-pixel within ``5 * softness`` output pixels of the
silhouette takes the face of its nearest covered sub-pixel (a few 3x3 max-pool steps of the face
map) and ``soft = 2 sigmoid(d / softness)``, with ``d < 0`` the signed screen distance from the
pixel centre to that face (SoftRas' edge term for one face; the factor 2 makes the gradient of
the covered area unbiased for a straight edge). These pixels also take that face's colour at the
nearest barycentric point, so ``d rgb / d opacity = colour - background``: moving an edge
outward paints the face's colour over the background. Covered pixels get no soft term: inside a
closed silhouette, moving shared edges does not change coverage, and the SoftRas aggregate over
all faces would both cost O(faces near each pixel) and dip along interior edges. The cost is
O(silhouette pixels). ``softness = 0`` turns it off (interpolation still passes gradients).

Outputs follow :class:`~vsd.core.contracts.RenderOutput` with the volume renderer's meanings:
rgb composited over the background, ``opacity`` the coverage, and ``depth = opacity * distance``
(0 where empty, ``depth / opacity`` the distance of the surface).

Backends (``implementation``), used only for CUDA tensors, with one notice when falling back:
``nvdiffrast`` draws the whole image (dr.rasterize / interpolate / texture / antialias; position
gradients then come from nvdiffrast's analytic anti-aliasing instead of the soft term);
``kaolin`` replaces only the visibility pass (kaolin.render.mesh.rasterize face indices);
shading and the soft term stay in torch.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import Tensor

from ..core.cameras import Cameras
from ..core.settings import Settings as BaseSettings
from ..core.contracts import Mesh, Renderer, RenderOutput

try:
    import nvdiffrast.torch as dr
except ImportError:  # optional CUDA backend (non-commercial licence)
    dr = None
try:
    import kaolin
    import kaolin.render.mesh
except ImportError:  # optional CUDA backend
    kaolin = None

Z_MIN = 1e-3  # camera-space depth below which a vertex counts as behind the camera
SOFT_REACH = 5.0  # soft term cut-off in units of softness: sigmoid(-5) = 0.0067
GREY = 0.5
_GL_NEAR, _GL_FAR = 1e-2, 1e2  # clip range of the nvdiffrast depth buffer, world units
_NOTICES: set[str] = set()


def _notice_once(message: str) -> None:
    if message not in _NOTICES:
        _NOTICES.add(message)
        warnings.warn(message, stacklevel=3)


# ---- screen-space geometry ----------------------------------------------------------------------
def _cross(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def barycentrics(tri: Tensor, p: Tensor) -> Tensor:
    """Screen-space barycentrics (..., 3) of points p (..., 2) in triangles tri (..., 3, 2)."""
    q0, q1, q2 = tri.unbind(-2)
    area = _cross(q1 - q0, q2 - q0)
    area = torch.where(area.abs() < 1e-12, torch.full_like(area, 1e-12), area)
    l0 = _cross(q2 - q1, p - q1)
    l1 = _cross(q0 - q2, p - q2)
    return torch.stack([l0, l1, area - l0 - l1], -1) / area[..., None]


def signed_distance(tri: Tensor, p: Tensor) -> Tensor:
    """Distance (...) from p (..., 2) to the triangle's boundary, positive inside."""
    a = tri
    e = tri.roll(-1, dims=-2) - a  # edges q0->q1, q1->q2, q2->q0: (..., 3, 2)
    ap = p[..., None, :] - a
    length2 = (e * e).sum(-1).clamp_min(1e-12)
    orient = torch.sign(_cross(e[..., 0, :], -e[..., 2, :]))[..., None]
    line = orient * _cross(e, ap) / length2.sqrt()  # >= 0 on the inner side of each edge
    t = ((ap * e).sum(-1) / length2).clamp(0, 1)
    seg = ((ap - t[..., None] * e).square().sum(-1) + 1e-12).sqrt()
    inside = (line >= 0).all(-1)
    return torch.where(inside, line.amin(-1), -seg.amin(-1))


def _pixel_centres(pix: Tensor, height: int, width: int) -> Tensor:
    """(M, 2) x, y centres of flat pixel ids over (views, height, width)."""
    local = pix % (height * width)
    return torch.stack([local % width, local // width], -1).float() + 0.5


def _fragments(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All integer (x, y) in the boxes [lo, hi] (n, 2), inclusive: (owner, x, y), each (M,)."""
    size = (hi - lo + 1).clamp_min(0)
    count = size[:, 0] * size[:, 1]
    owner = torch.repeat_interleave(torch.arange(len(count), device=lo.device), count)
    local = torch.arange(len(owner), device=lo.device) - (torch.cumsum(count, 0) - count)[owner]
    w = size[owner, 0]
    return owner, lo[owner, 0] + local % w, lo[owner, 1] + local // w


def _scatter_argmax(values: Tensor, index: Tensor, ids: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per slot of ``index``: the largest value (-inf if none) and the largest id attaining it."""
    best = values.new_full((n,), -torch.inf).scatter_reduce(0, index, values, "amax")
    hit = values == best[index]
    arg = ids.new_full((n,), -1).scatter_reduce(0, index[hit], ids[hit], "amax")
    return best, arg


def _merge(best: Tensor, arg: Tensor, new_best: Tensor, new_arg: Tensor) -> tuple[Tensor, Tensor]:
    better = new_best > best
    return torch.where(better, new_best, best), torch.where(better, new_arg, arg)


def _face_fragments(q_flat: Tensor, chunk: Tensor, height: int, width: int, n_faces: int):
    """Pixel centres inside the screen bounding boxes of view-faces ``chunk``.

    Returns view-face ids (M,), flat pixel ids (M,) over (views, height, width), centres (M, 2).
    """
    tri = q_flat[chunk]
    limit = torch.tensor([width - 1, height - 1], device=tri.device)
    lo = torch.ceil(tri.amin(1) - 0.5).long().clamp_min(0)
    hi = torch.minimum(torch.floor(tri.amax(1) - 0.5).long(), limit)
    owner, x, y = _fragments(lo, hi)
    fid = chunk[owner]
    pix = (fid // n_faces) * (height * width) + y * width + x
    return fid, pix, torch.stack([x, y], -1).to(tri) + 0.5


def visibility(q_tri: Tensor, inv_z: Tensor, valid: Tensor, height: int, width: int, faces_per_chunk: int) -> Tensor:
    """Z-buffer: the visible view-face id (view * F + f) of every flat pixel, -1 where empty, (n,).

    q_tri: (V, F, 3, 2) sub-pixel vertex positions; inv_z: (V, F, 3) inverse camera depths;
    valid: (V, F) faces to draw.
    """
    V, Fn = valid.shape
    n = V * height * width
    q_flat, iz_flat = q_tri.reshape(-1, 3, 2), inv_z.reshape(-1, 3)
    ids = torch.nonzero(valid.reshape(-1))[:, 0]
    zbest, face = q_tri.new_full((n,), -torch.inf), ids.new_full((n,), -1)
    for chunk in ids.split(faces_per_chunk):
        fid, pix, p = _face_fragments(q_flat, chunk, height, width, Fn)
        lam = barycentrics(q_flat[fid], p)
        inside = (lam >= 0).all(-1)
        iz = (lam * iz_flat[fid]).sum(-1)
        zbest, face = _merge(zbest, face, *_scatter_argmax(iz[inside], pix[inside], fid[inside], n))
    return face


def nearest_faces(face: Tensor, steps: int) -> Tensor:
    """Grow a face-id map (V, h, w) (-1 = empty) outward by ``steps`` pixels: every empty pixel
    within that (Chebyshev) distance of coverage gets the id of a covered pixel nearest to it."""
    ids = face.to(torch.float64)[:, None]  # ids are exact in float64; max_pool2d spreads them
    for _ in range(steps):
        ids = torch.where(ids >= 0, ids, F.max_pool2d(ids, 3, stride=1, padding=1))
    return ids[:, 0].long()


def soft_edge(q_flat: Tensor, nearest: Tensor, covered: Tensor, sigma: float, height: int, width: int) -> Tensor:
    """(n,) soft coverage of the empty pixels next to the silhouette, differentiable in q_flat.

    ``2 sigmoid(d / sigma)`` with d < 0 the signed distance of the pixel to its nearest face
    (``nearest`` (n,), -1 for none); 0 elsewhere. The factor 2 makes the gradient unbiased for a
    straight edge: summed over the empty side, d/de sigmoid((x - e) / sigma) integrates to 1/2.
    """
    pix = torch.nonzero(~covered & (nearest >= 0))[:, 0]
    sd = signed_distance(q_flat[nearest[pix]], _pixel_centres(pix, height, width).to(q_flat))
    return q_flat.new_zeros(covered.shape).index_put((pix,), 2 * torch.sigmoid(sd / sigma))


def project(mesh: Mesh, cams: Cameras) -> tuple[Tensor, Tensor]:
    """Camera-space vertices (V, N, 3) and their pixel positions (V, N, 2) for cameras (V,)."""
    w2c = torch.linalg.inv(cams.c2w)
    p = torch.einsum("vij,nj->vni", w2c[:, :3, :3], mesh.vertices) + w2c[:, None, :3, 3]
    z = p[..., 2:].clamp_min(Z_MIN)
    K = cams.K[:, None, :]
    q = torch.stack([K[..., 0] * p[..., 0], K[..., 1] * p[..., 1]], -1) / z + K[..., 2:]
    return p, q


def _vertex_features(mesh: Mesh) -> tuple[Tensor, str]:
    """Per-vertex attributes to interpolate (N, C) and what they are: "uv", "color" or "grey"."""
    if mesh.uv is not None and mesh.texture is not None:
        return mesh.uv, "uv"
    if mesh.vertex_colors is not None:
        return mesh.vertex_colors, "color"
    return mesh.vertices.new_full((mesh.vertices.shape[0], 3), GREY), "grey"


def _sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup of texture (3, Ht, Wt) at uv (M, 2) in [0, 1] -> (M, 3)."""
    grid = (uv * 2 - 1).reshape(1, 1, -1, 2)
    out = F.grid_sample(texture[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].t()


def shade(mesh: Mesh, p_cam: Tensor, q: Tensor, face: Tensor, covered: Tensor, height: int, width: int):
    """Colour (M, 3) and ray distance (M,) at the flat pixels where ``face`` (n,) >= 0.

    Uncovered pixels use barycentrics clamped to the triangle (its nearest point, roughly).
    Returns the pixel ids (M,) with them.
    """
    pix = torch.nonzero(face >= 0)[:, 0]
    fid = face[pix]
    Fn = max(mesh.faces.shape[0], 1)
    view, f = fid // Fn, fid % Fn
    verts = mesh.faces[f]  # (M, 3)
    lam = barycentrics(q[view[:, None], verts], _pixel_centres(pix, height, width).to(q))
    clamped = lam.clamp_min(0)
    clamped = clamped / clamped.sum(-1, keepdim=True).clamp_min(1e-12)
    lam = torch.where(covered[pix, None], lam, clamped)
    pv = p_cam[view[:, None], verts]  # (M, 3, 3)
    w = lam / pv[..., 2].clamp_min(Z_MIN)
    b = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    dist = (b[..., None] * pv).sum(1).norm(dim=-1)
    feats, kind = _vertex_features(mesh)
    attr = (b[..., None] * feats[verts]).sum(1)
    colour = _sample_texture(mesh.texture, attr) if kind == "uv" else attr
    return pix, colour, dist


class MeshRasterizer(Renderer):
    """Rasteriser for ``"mesh"`` representations; see the module docstring.

    Constructed as ``MeshRasterizer(settings)``;
    ``forward(meshes: list of B Mesh, cameras (B, V), background (B, 3) | (3,)) -> RenderOutput``
    with rgb (B, V, 3, H, W) in [0, 1], depth (B, V, 1, H, W), opacity (B, V, 1, H, W).
    """

    accepts = ("mesh",)

    class Settings(BaseSettings):
        supersample: int = 2  # render at this many times the resolution, then box-filter
        softness: float = 0.5  # output pixels; width of the soft coverage edge (0: off)
        faces_per_chunk: int = 4096
        implementation: Literal["auto", "torch", "nvdiffrast", "kaolin"] = "auto"

        @field_validator("supersample", "faces_per_chunk")
        @classmethod
        def _positive(cls, v: int) -> int:
            if v < 1:
                raise ValueError(f"must be >= 1, got {v}")
            return v

        @field_validator("softness")
        @classmethod
        def _non_negative(cls, v: float) -> float:
            if v < 0:
                raise ValueError(f"must be >= 0, got {v}")
            return v

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self._contexts: dict[torch.device, object] = {}

    def backend(self, device: torch.device) -> Literal["torch", "nvdiffrast", "kaolin"]:
        """Which implementation serves tensors on ``device``."""
        impl = self.settings.implementation
        if impl == "torch":
            return "torch"
        available = {"nvdiffrast": dr is not None, "kaolin": kaolin is not None}
        wanted = [impl] if impl != "auto" else ["nvdiffrast", "kaolin"]
        if device.type == "cuda":
            for name in wanted:
                if available[name]:
                    return name
        if impl != "auto":
            why = "tensors are not on CUDA" if available[impl] else f"{impl} is not importable"
            _notice_once(f"MeshRasterizer: implementation '{impl}' requested but {why}; using torch.")
        elif device.type == "cuda":
            _notice_once("MeshRasterizer: neither nvdiffrast nor kaolin is importable; using torch.")
        return "torch"

    def forward(self, scene: list[Mesh], cameras: Cameras, background: Tensor) -> RenderOutput:
        B, V = cameras.shape
        if len(scene) != B:
            raise ValueError(f"MeshRasterizer: {len(scene)} meshes for cameras of batch size {B}")
        s = self.settings.supersample
        H, W = cameras.height, cameras.width
        cams = cameras.resized(H * s, W * s)
        backend = self.backend(cameras.device)
        outs = [self.render_mesh(mesh, cams[b], backend) for b, mesh in enumerate(scene)]
        rgb, depth, opacity = (F.avg_pool2d(torch.stack(x).flatten(0, 1), s).unflatten(0, (B, V)) for x in zip(*outs))
        bg = background.to(rgb).expand(B, 3)[:, None, :, None, None]
        return RenderOutput(rgb=rgb + (1 - opacity) * bg, depth=depth, opacity=opacity)

    def render_mesh(self, mesh: Mesh, cams: Cameras, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        """One mesh at cameras (V,): premultiplied rgb (V, 3, h, w), depth and opacity (V, 1, h, w)."""
        if backend == "nvdiffrast":
            return self._render_nvdiffrast(mesh, cams)
        V, h, w = cams.shape[0], cams.height, cams.width
        p_cam, q = project(mesh, cams)
        q_tri, z_tri = q[:, mesh.faces], p_cam[:, mesh.faces, 2]  # (V, F, 3, 2), (V, F, 3)
        valid = (z_tri > Z_MIN).all(-1) & torch.isfinite(q_tri).all(-1).all(-1)
        sigma = self.settings.softness * self.settings.supersample
        soft_on = sigma > 0 and torch.is_grad_enabled() and mesh.vertices.requires_grad
        with torch.no_grad():
            if backend == "kaolin":
                face = self._kaolin_visibility(q_tri.detach(), z_tri.detach(), valid, h, w)
            else:
                iz = 1 / z_tri.detach().clamp_min(Z_MIN)
                face = visibility(q_tri.detach(), iz, valid, h, w, self.settings.faces_per_chunk)
        covered = face >= 0
        opacity = covered.to(q)
        if soft_on:
            nearest = nearest_faces(face.reshape(V, h, w), math.ceil(SOFT_REACH * sigma)).reshape(-1)
            soft = soft_edge(q_tri.reshape(-1, 3, 2), nearest, covered, sigma, h, w)
            opacity = opacity + soft - soft.detach()
            face = nearest
        pix, colour, dist = shade(mesh, p_cam, q, face, covered, h, w)
        n = V * h * w
        rgb = q.new_zeros(n, 3).index_put((pix,), colour * opacity[pix, None])
        depth = q.new_zeros(n).index_put((pix,), dist * opacity[pix])

        def image(x: Tensor) -> Tensor:  # (n, C) -> (V, C, h, w)
            return x.reshape(V, h, w, -1).permute(0, 3, 1, 2)

        return image(rgb), image(depth[:, None]), image(opacity[:, None])

    # ---- optional CUDA backends -----------------------------------------------------------------
    def _kaolin_visibility(self, q_tri: Tensor, z_tri: Tensor, valid: Tensor, h: int, w: int) -> Tensor:
        """Visible view-face ids (V * h * w,) from kaolin's rasteriser (CUDA only), -1 where empty.

        kaolin keeps the largest interpolated z per pixel; passing -1/z makes that the nearest
        surface exactly, since 1/z is affine in screen space. Its image y axis points up.
        """
        V, Fn = valid.shape
        image = torch.stack([2 * q_tri[..., 0] / w - 1, 1 - 2 * q_tri[..., 1] / h], -1)
        feats = torch.zeros(V, Fn, 3, 1, device=q_tri.device, dtype=q_tri.dtype)
        _, face_idx = kaolin.render.mesh.rasterize(
            h, w, -1 / z_tri.clamp_min(Z_MIN), image.contiguous(), feats, valid_faces=valid
        )
        views = torch.arange(V, device=q_tri.device)[:, None, None]
        return torch.where(face_idx >= 0, views * Fn + face_idx, -1).reshape(-1)

    def _render_nvdiffrast(self, mesh: Mesh, cams: Cameras) -> tuple[Tensor, Tensor, Tensor]:
        """The whole image with nvdiffrast (CUDA only); gradients from its analytic anti-aliasing."""
        h, w = cams.height, cams.width
        p_cam, _ = project(mesh, cams)
        clip = _opencv_to_clip(p_cam, cams.K, h, w).contiguous()
        tri = mesh.faces.int().contiguous()
        if p_cam.device not in self._contexts:  # creating a context is slow: one per device
            self._contexts[p_cam.device] = dr.RasterizeCudaContext(device=p_cam.device)
        ctx = self._contexts[p_cam.device]
        rast, _ = dr.rasterize(ctx, clip, tri, resolution=(h, w))
        feats, kind = _vertex_features(mesh)
        attrs = torch.cat([p_cam, feats.expand(p_cam.shape[0], -1, -1)], -1).contiguous()
        out, _ = dr.interpolate(attrs, rast, tri)
        covered = (rast[..., 3:] > 0).to(out)
        dist = out[..., :3].norm(dim=-1, keepdim=True)
        colour = out[..., 3:]
        if kind == "uv":
            tex = mesh.texture.permute(1, 2, 0)[None].contiguous()
            colour = dr.texture(tex, colour.contiguous(), filter_mode="linear", boundary_mode="clamp")
        image = torch.cat([colour * covered, covered, dist * covered], -1).contiguous()
        image = dr.antialias(image, rast, clip, tri).permute(0, 3, 1, 2)
        return image[:, :3], image[:, 4:5], image[:, 3:4]


def _opencv_to_clip(p_cam: Tensor, K: Tensor, h: int, w: int) -> Tensor:
    """Clip coordinates (V, N, 4) whose NDC (x, y) = 2 (u, v) / (w, h) - 1 for OpenCV pixels (u, v);
    row 0 of nvdiffrast's output is NDC y = -1, i.e. the top row of the OpenCV image."""
    fx, fy, cx, cy = (K[:, None, i] for i in range(4))
    x, y, z = p_cam.unbind(-1)
    n, f = _GL_NEAR, _GL_FAR
    return torch.stack(
        [
            2 * fx / w * x + (2 * cx / w - 1) * z,
            2 * fy / h * y + (2 * cy / h - 1) * z,
            (f + n) / (f - n) * z - 2 * f * n / (f - n),
            z,
        ],
        -1,
    )
