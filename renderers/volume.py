"""Emission-absorption volume rendering of radiance fields, pure torch (nerfacc optional).

Each ray is clipped to the field's cube ``[-bound, bound]^3`` (and to ``near``/``far`` when
set), sampled at ``samples`` stratified points, optionally refined with ``importance_samples``
points drawn from the coarse weights, and composited front to back:

    alpha_i = 1 - exp(-sigma_i delta_i),  T_i = prod_{j<i} (1 - alpha_j),  w_i = T_i alpha_i
    rgb = sum_i w_i c_i + (1 - sum_i w_i) background,  opacity = sum_i w_i,  depth = sum_i w_i t_i

``depth`` is the expected distance along the unit ray direction with the background counted at
distance 0: it is 0 where the ray is empty, and ``depth / opacity`` is the expected distance of
the visible surface.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import pydantic
from pydantic import ValidationInfo, field_validator
from torch import Tensor

from ..core.cameras import Cameras
from ..core.settings import Settings as BaseSettings
from ..core.contracts import Field, Renderer, RenderOutput

try:
    import nerfacc
except ImportError:  # optional CUDA backend
    nerfacc = None

_NOTICES: set[str] = set()


def _notice_once(message: str) -> None:
    if message not in _NOTICES:
        _NOTICES.add(message)
        warnings.warn(message, stacklevel=3)


def _channels_first(rgbs: Tensor) -> bool:
    """Whether (..., S, 3) colours are stored channel by channel (a transposed view, as fields
    that sample all channels of a grid at once return them)."""
    return rgbs.stride(-1) != 1


def _over_samples(weights: Tensor, rgbs: Tensor) -> Tensor:
    """sum_s weights (..., S) * rgbs (..., S, 3) -> (..., 3), in the cheaper form for the layout:
    a batched contraction reads channel-last colours in place but copies channel-first ones."""
    if _channels_first(rgbs):
        return (weights[..., None] * rgbs).sum(-2)
    return torch.einsum("...s,...sc->...c", weights, rgbs)


def _over_channels(rgbs: Tensor, g: Tensor) -> Tensor:
    """sum_c rgbs (..., S, 3) * g (..., 3) -> (..., S), as :func:`_over_samples` chooses."""
    if _channels_first(rgbs):  # one multiply-add per channel plane
        out = rgbs[..., 0] * g[..., 0, None]
        for c in range(1, rgbs.shape[-1]):
            out = torch.addcmul(out, rgbs[..., c], g[..., c, None])
        return out
    return torch.einsum("...sc,...c->...s", rgbs, g)


def accumulate(weights: Tensor, rgbs: Tensor, t_samples: Tensor, background: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sample weights (..., S) -> colour over the background (..., 3), depth (...), opacity (...)."""
    opacity = weights.sum(-1)
    color = _over_samples(weights, rgbs) + (1.0 - opacity[..., None]) * background
    return color, (weights * t_samples).sum(-1), opacity


class _Composite(torch.autograd.Function):
    """Front-to-back compositing with a hand-written backward.

    With tau_i = sigma_i delta_i, T_i = exp(-sum_{j<i} tau_j) and w_i = T_i (1 - exp(-tau_i)),
    a loss L whose derivative in w_i is a_i gives
        dL/dtau_k = a_k T_k exp(-tau_k) - sum_{i>k} a_i w_i,
    one reverse cumulative sum. Autograd through the forward formula instead keeps and walks a
    graph of ~10 element-wise ops over every (ray, sample); this does the same in a few passes.
    """

    @staticmethod
    def forward(ctx, sigmas, rgbs, deltas, t_samples, background):
        tau = sigmas * deltas
        # T_i as the exp of an exclusive cumulative sum: same as the product of (1 - alpha) but
        # with a well-defined gradient where alpha reaches 1; w_i = T_i - T_{i+1}
        depth_in = torch.cumsum(tau, dim=-1)  # optical depth at each interval's end
        trans = torch.exp(tau - depth_in)
        trans_next = torch.exp(-depth_in)
        weights = trans - trans_next
        color, depth, opacity = accumulate(weights, rgbs, t_samples, background)
        ctx.set_materialize_grads(False)  # outputs the loss does not use (depth, ...) get None, not zeros
        ctx.save_for_backward(sigmas, rgbs, deltas, t_samples, background, trans_next, weights, opacity)
        return color, depth, opacity, weights

    @staticmethod
    def backward(ctx, g_color, g_depth, g_opacity, g_weights):
        sigmas, rgbs, deltas, t_samples, background, trans_next, weights, opacity = ctx.saved_tensors
        # a_i = dL/dw_i: colour (c_i - background), depth t_i, opacity 1, and weights directly
        terms = []
        if g_color is not None:
            terms.append(_over_channels(rgbs, g_color) - (g_color * background).sum(-1, keepdim=True))
        if g_depth is not None:
            terms.append(g_depth[..., None] * t_samples)
        if g_opacity is not None:
            terms.append(g_opacity[..., None])
        if g_weights is not None:
            terms.append(g_weights)
        if not terms:
            return None, None, None, None, None
        a = terms[0].expand_as(weights)
        for term in terms[1:]:
            a = a + term
        aw = a * weights
        after = aw.sum(-1, keepdim=True) - torch.cumsum(aw, dim=-1)  # sum over i > k
        g_tau = a * trans_next - after
        g_sigmas = g_tau * deltas if ctx.needs_input_grad[0] else None
        g_rgbs = None
        if ctx.needs_input_grad[1] and g_color is not None:
            # in the colours' own layout, so that the field's backward reads it contiguously
            g_rgbs = torch.mul(weights.unsqueeze(-1), g_color.unsqueeze(-2), out=torch.empty_like(rgbs))
        g_deltas = g_tau * sigmas if ctx.needs_input_grad[2] else None
        g_t = g_depth[..., None] * weights if ctx.needs_input_grad[3] and g_depth is not None else None
        g_bg = None
        if ctx.needs_input_grad[4] and g_color is not None:
            g_bg = (g_color * (1.0 - opacity[..., None])).sum_to_size(background.shape)
        return g_sigmas, g_rgbs, g_deltas, g_t, g_bg


def composite(
    sigmas: Tensor,
    rgbs: Tensor,
    t_starts: Tensor,
    t_ends: Tensor,
    background: Tensor,
    t_samples: Tensor | None = None,
    backend: Literal["torch", "nerfacc"] = "torch",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Composite samples along rays.

    sigmas: (..., S) >= 0 densities, each constant over the interval [t_starts, t_ends];
    rgbs: (..., S, 3); t_starts, t_ends: (..., S); background: (..., 3);
    t_samples: (..., S) distance credited to each sample for depth (default: interval middles).
    Returns rgb (..., 3), depth (...), opacity (...) and weights (..., S).
    """
    if t_samples is None:
        t_samples = 0.5 * (t_starts + t_ends)
    if backend == "nerfacc":
        S = sigmas.shape[-1]
        flat = [x.reshape(-1, S) for x in (t_starts, t_ends, sigmas)]
        weights = nerfacc.render_weight_from_density(*flat)[0].reshape(sigmas.shape)
        return (*accumulate(weights, rgbs, t_samples, background), weights)
    return _Composite.apply(sigmas, rgbs, t_ends - t_starts, t_samples, background)


def ray_box_intersect(origins: Tensor, dirs: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Entry and exit distances of rays (..., 3) through the cube [-bound, bound]^3 (slab test).

    Returns ``t_in, t_out`` (...); the ray misses where ``t_out <= t_in``.
    """
    tiny = torch.finfo(dirs.dtype).tiny ** 0.5
    d = torch.where(dirs.abs() < tiny, torch.full_like(dirs, tiny), dirs)  # no 0 * inf
    t0, t1 = (-bound - origins) / d, (bound - origins) / d
    return torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)


def _edges(t: Tensor, t_in: Tensor, t_out: Tensor) -> tuple[Tensor, Tensor]:
    """Intervals around sorted samples t (..., S): borders halfway between neighbours."""
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    return torch.cat([t_in[..., None], mids], -1), torch.cat([mids, t_out[..., None]], -1)


def sample_pdf(t_starts: Tensor, t_ends: Tensor, weights: Tensor, n: int, jitter: bool) -> Tensor:
    """n distances per ray (..., n) drawn by inverse CDF from piecewise-constant weights (..., S).

    Stratified in u (jittered when ``jitter``, midpoints otherwise); a small uniform floor keeps
    empty rays sampled evenly.
    """
    pdf = weights.detach() + 1e-5
    cdf = torch.cumsum(pdf / pdf.sum(-1, keepdim=True), -1).clamp(max=1.0)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], -1)  # (..., S + 1)
    offset = torch.rand(*weights.shape[:-1], n, device=weights.device) if jitter else 0.5
    u = (torch.arange(n, device=weights.device, dtype=weights.dtype) + offset) / n
    u = u.expand(*weights.shape[:-1], n).contiguous()
    S = weights.shape[-1]
    idx = (torch.searchsorted(cdf.contiguous(), u, right=True) - 1).clamp(0, S - 1)
    c0, c1 = cdf.gather(-1, idx), cdf.gather(-1, idx + 1)
    a, b = t_starts.gather(-1, idx), t_ends.gather(-1, idx)
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-12)).clamp(0.0, 1.0)
    return (a + frac * (b - a)).detach()


class VolumeRenderer(Renderer):
    """Volume renderer for ``"field"`` representations; see the module docstring.

    Constructed as ``VolumeRenderer(settings)``;
    ``forward(field, cameras (B, V), background (B, 3) | (3,)) -> RenderOutput`` with
    rgb (B, V, 3, H, W) in [0, 1], depth (B, V, 1, H, W), opacity (B, V, 1, H, W).
    """

    accepts = ("field",)

    class Settings(BaseSettings):
        samples: int = pydantic.Field(32, ge=1)  # stratified samples per ray: jittered in training, midpoints in eval
        importance_samples: int = pydantic.Field(0, ge=0)  # extra samples from the coarse weights (inverse CDF)
        near: float | None = pydantic.Field(None, ge=0)  # optional clip of the ray range (distance along the ray)
        far: float | None = None
        chunk_rays: int = pydantic.Field(65536, ge=1)  # rays rendered at once, over the whole batch
        implementation: Literal["auto", "torch", "nerfacc"] = "auto"

        @field_validator("far")
        @classmethod
        def _far(cls, v: float | None, info: ValidationInfo) -> float | None:
            if v is None:
                return v
            near = info.data.get("near")
            if not v > (near or 0.0):
                raise ValueError(f"must be > 0 and exceed renderer.near ({near}), got {v}" if near else f"must be > 0 (or null), got {v}")
            return v

    def __init__(self, settings: Settings):
        super().__init__(settings)

    def backend(self, device: torch.device) -> Literal["torch", "nerfacc"]:
        """Which compositing backend serves tensors on ``device``."""
        impl = self.settings.implementation
        if impl == "torch":
            return "torch"
        if nerfacc is not None and device.type == "cuda":
            return "nerfacc"
        if impl == "nerfacc":
            why = "nerfacc is not importable" if nerfacc is None else "tensors are not on CUDA"
            _notice_once(f"VolumeRenderer: implementation 'nerfacc' requested but {why}; using torch.")
        elif device.type == "cuda":
            _notice_once("VolumeRenderer: nerfacc is not importable; using the torch implementation.")
        return "torch"

    def forward(self, scene: Field, cameras: Cameras, background: Tensor) -> RenderOutput:
        B, V = cameras.shape
        H, W = cameras.height, cameras.width
        origins, dirs = cameras.rays()  # (B, V, H, W, 3)
        origins, dirs = origins.reshape(B, -1, 3), dirs.reshape(B, -1, 3)
        bg = background.to(origins).expand(B, 3)
        backend = self.backend(origins.device)
        step = max(1, self.settings.chunk_rays // B)
        outs = [
            self.render_rays(scene, o, d, bg, backend)
            for o, d in zip(origins.split(step, dim=1), dirs.split(step, dim=1))
        ]
        rgb, depth, opacity = (torch.cat(x, dim=1) for x in zip(*outs))

        def image(x: Tensor) -> Tensor:  # (B, V*H*W, C) -> (B, V, C, H, W)
            return x.reshape(B, V, H, W, -1).permute(0, 1, 4, 2, 3)

        return RenderOutput(rgb=image(rgb), depth=image(depth[..., None]), opacity=image(opacity[..., None]))

    def ray_range(self, origins: Tensor, dirs: Tensor, bound: float) -> tuple[Tensor, Tensor]:
        """Clipped (t_in, t_out), each (B, R); rays that miss get t_in = t_out = 0."""
        t_in, t_out = ray_box_intersect(origins, dirs, bound)
        t_in = t_in.clamp_min(0.0 if self.settings.near is None else max(self.settings.near, 0.0))
        if self.settings.far is not None:
            t_out = t_out.clamp_max(self.settings.far)
        hit = t_out > t_in
        return torch.where(hit, t_in, 0.0), torch.where(hit, t_out, 0.0)

    def render_rays(
        self, field: Field, origins: Tensor, dirs: Tensor, background: Tensor, backend: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """origins, dirs: (B, R, 3); background: (B, 3) -> rgb (B, R, 3), depth, opacity (B, R)."""
        B, R, _ = origins.shape
        S, N = self.settings.samples, self.settings.importance_samples
        t_in, t_out = self.ray_range(origins, dirs, field.bound)
        bg = background[:, None].expand(B, R, 3)

        steps = torch.arange(S, device=dirs.device, dtype=dirs.dtype)
        if self.training:
            u = torch.rand(B, R, S, device=dirs.device, dtype=dirs.dtype).add_(steps).div_(S)
        else:
            u = (steps + 0.5) / S
        t = torch.addcmul(t_in[..., None], u, (t_out - t_in)[..., None])  # (B, R, S), sorted
        sigma, rgb = self.query(field, origins, dirs, t)
        starts, ends = _edges(t, t_in, t_out)
        if N > 0:
            weights = composite(sigma, rgb, starts, ends, bg, t, backend)[3]
            t_fine = sample_pdf(starts, ends, weights, N, jitter=self.training)
            sigma_f, rgb_f = self.query(field, origins, dirs, t_fine)
            t, order = torch.sort(torch.cat([t, t_fine], -1), dim=-1)
            sigma = torch.cat([sigma, sigma_f], -1).gather(-1, order)
            rgb = torch.cat([rgb, rgb_f], -2).gather(-2, order[..., None].expand(-1, -1, -1, 3))
            starts, ends = _edges(t, t_in, t_out)
        color, depth, opacity, _ = composite(sigma, rgb, starts, ends, bg, t, backend)
        return color, depth, opacity

    @staticmethod
    def query(field: Field, origins: Tensor, dirs: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Field at distances t (B, R, S) along the rays -> sigma (B, R, S), rgb (B, R, S, 3)."""
        B, R, S = t.shape
        # stored coordinate-major ((3, B, R, S) memory seen as (B, R*S, 3)): fields that work per
        # axis read contiguous rows, and nothing loops over an inner dimension of 3
        points = t.new_empty(3, B, R, S)
        for k in range(3):
            torch.addcmul(origins[..., k, None], t, dirs[..., k, None], out=points[k])
        sigma, rgb = field.query(points.permute(1, 2, 3, 0).reshape(B, R * S, 3))
        return sigma.reshape(B, R, S), rgb.reshape(B, R, S, 3)
