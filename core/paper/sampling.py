"""The original's sampling loop (``ViewsetDiffusion.ddim_sample`` as ``evaluation/generator.py``
calls it) on a :class:`PaperDenoiser`.

What the original does, and so what :func:`sample_paper` does:

- **Schedule**: ``model.diffuser.steps`` training timesteps T (1000 in the released experiments),
  ``model.diffuser.beta_schedule`` (``cosine``: Nichol & Dhariwal with s = 0.008, betas clipped at
  0.999, in float64). The buffers the sampler reads (``abar``, ``sqrt(1 / abar)``,
  ``sqrt(1 / abar - 1)``) are computed in float64 and stored in float32.
- **Timesteps**: ``eval.sampling_timesteps`` S (250) steps over the pairs of
  ``int(linspace(-1, T - 1, S + 1))`` (float32 linspace, truncated), descending: with T = 1000,
  S = 250 the steps are 999, 995, ..., 3 and the last pair is (3, -1).
- **Noisy views** start from standard normal noise; the **clean views** enter every pass with
  timestep 0 and their own image as their self-conditioning input.
- Each step: the x0 renders of all views, **clipped** to [-1, 1]; the noise they imply,
  ``eps = (sqrt(1 / abar_t) x_t - x0) / sqrt(1 / abar_t - 1)``; with **guidance** ``w != 0`` a
  second pass without the clean views, ``eps = (1 + w) eps_cond - w eps_uncond``, x0 recomputed
  from it and clipped again, eps recomputed from that x0 (``w = 0``: reconstruction; ``w = -1``:
  unconditional, the released ``evaluation_qualitative.py`` values). The (guided) x0 becomes the
  noisy views' **self-conditioning** input of the next step. **DDIM** with ``eta`` (0 in the
  original): ``x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z``; ``z`` is
  drawn at every step even when ``sigma = 0``.
- **Last step** (``t' < 0``): no guidance; the x0 renders (clipped) of the viewset with its clean
  views, or without them when ``w = -1``, at the viewset's cameras and at the extra cameras
  (``render_spinning_volume=True``; the original renders each extra camera, for each batch
  element, in a pass of its own together with the viewset's cameras; with ``w = -1`` its pass
  for extra camera r also renders the extra cameras before r, because it appends them to the
  same camera dict in place: this changes which random numbers each render draws, so it is
  reproduced).

Why vsd's :mod:`vsd.core.schedule` is not used for the loop: its cosine betas are the same
(reused here), but its DDIM steps are "leading" spaced and offset by one (997, 993, ..., 1 for 250
of 1000) where the original's are 999, 995, ..., 3; it derives eps as
``(x_t - sqrt(abar) x0) / sqrt(1 - abar)`` in float32 and guides x0 in closed form, which equal
the original's float64-derived buffers and eps round trip only up to rounding; and it draws no
noise when ``eta = 0``, which would shift every later random draw (the renderer's importance
samples come from the same generator). The original's noise is ``torch.randn_like(x_t)``, and
from the second step on (without guidance) its x_t has the renderer's (H, W, 3) memory layout,
for which CPU torch draws other numbers than for a contiguous tensor; that is reproduced too.

Randomness: every draw (initial noise, importance samples of every render pass, the per-step
noise) comes from ``generator`` in the original's order, so that a CPU ``torch.Generator``
seeded with ``s`` reproduces the original run after ``torch.manual_seed(s)`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..cameras import Cameras
from ..schedule import _cosine_betas
from .convert import OriginalCheckpointError
from .geometry import PaperCameras
from .model import PaperDenoiser


@dataclass(frozen=True)
class PaperDiffusion:
    """The original's diffusion settings: ``timesteps`` T (``model.diffuser.steps``),
    ``beta_schedule`` (``model.diffuser.beta_schedule``: ``cosine`` or ``linear``),
    ``sampling_steps`` (``eval.sampling_timesteps``) and DDIM ``eta`` (0: the original never sets it)."""

    timesteps: int = 1000
    beta_schedule: str = "cosine"
    sampling_steps: int = 250
    eta: float = 0.0

    def __post_init__(self):
        if int(self.timesteps) < 1:
            raise ValueError(f"timesteps must be positive, got {self.timesteps}")
        if self.beta_schedule not in ("cosine", "linear"):
            raise ValueError(f"beta_schedule must be 'cosine' or 'linear', got {self.beta_schedule!r}")
        if not 1 <= int(self.sampling_steps) <= int(self.timesteps):
            raise ValueError(f"sampling_steps must lie in [1, {self.timesteps}], got {self.sampling_steps}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")

    @classmethod
    def from_original(cls, config: Mapping) -> "PaperDiffusion":
        """From an original experiment config (``model.diffuser`` and ``eval`` sections)."""
        def get(path: str, default=None):
            node = config
            for part in path.split("."):
                if not isinstance(node, Mapping) or part not in node:
                    if default is None:
                        raise OriginalCheckpointError(f"original config lacks `{path}`, which sampling needs")
                    return default
                node = node[part]
            return node

        steps = int(get("model.diffuser.steps"))
        if steps < 1:
            raise OriginalCheckpointError(f"original config key `model.diffuser.steps` = {steps} is not "
                                          "supported: expected a positive number of diffusion timesteps")
        schedule = get("model.diffuser.beta_schedule", "sigmoid")  # GaussianDiffusion's own default
        if schedule not in ("cosine", "linear"):
            raise OriginalCheckpointError(f"original config key `model.diffuser.beta_schedule` = {schedule!r} "
                                          "is not supported: expected 'cosine' or 'linear'")
        sampling = int(get("eval.sampling_timesteps", steps))
        if not 1 <= sampling <= steps:
            raise OriginalCheckpointError(f"original config key `eval.sampling_timesteps` = {sampling} is not "
                                          f"supported: expected 1 to model.diffuser.steps ({steps})")
        return cls(steps, schedule, sampling)

    def alphas_cumprod64(self) -> Tensor:
        """abar_t, t = 0 .. T-1, float64."""
        T = int(self.timesteps)
        if self.beta_schedule == "cosine":
            betas = _cosine_betas(T, 0.008)
        else:  # the original's linear schedule scales the DDPM betas by 1000 / T
            scale = 1000 / T
            betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)

    def time_pairs(self, steps: int | None = None) -> list[tuple[int, int]]:
        """The original's (t, t') pairs, descending, the last one (t, -1)."""
        n = int(self.sampling_steps if steps is None else steps)
        if not 1 <= n <= int(self.timesteps):
            raise ValueError(f"steps must lie in [1, {self.timesteps}] (the diffusion timesteps), got {n}")
        times = torch.linspace(-1, int(self.timesteps) - 1, steps=n + 1).int().tolist()[::-1]
        return list(zip(times[:-1], times[1:]))


@dataclass
class PaperSample:
    """What :func:`sample_paper` returns.

    - ``renders``: ``(B, V + R, 3, S, S)`` in [-1, 1]: the final x0 renders at the viewset's V
      cameras, then at the R extra cameras (the original returns ``(renders + 1) / 2``). With
      ``guidance = -1`` the original renders no clean view; their renders here come from the same
      volumes, drawn after the others.
    - ``density: (B, 1, N, N, N)``, ``color: (B, 3, N, N, N)``: the raw volumes of the last step.
    - ``timesteps``: the (t, t') pairs that were run.
    """

    renders: Tensor
    density: Tensor
    color: Tensor
    timesteps: list[tuple[int, int]]


def _cams_index(cams: PaperCameras, index) -> PaperCameras:
    return PaperCameras(*(getattr(cams, f.name)[index] for f in fields(PaperCameras)))


def _cams_cat(parts: list[PaperCameras]) -> PaperCameras:
    return PaperCameras(*(torch.cat([getattr(p, f.name) for p in parts], dim=1) for f in fields(PaperCameras)))


def _randn(shape, generator: torch.Generator | None, device) -> Tensor:
    # drawn on the generator's device (a CPU generator gives the same numbers whatever the model's device)
    where = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=where).to(device)


def _step_noise(shape, channels_last: bool, generator: torch.Generator | None, device) -> Tensor:
    """The DDIM step's noise, drawn as the original's ``torch.randn_like(x_t)``: on a CPU generator,
    torch fills a contiguous float tensor with its vectorised sampler but a strided one element by
    element from other draws, so the layout of the original's x_t decides which numbers every later
    draw (the next importance samples) gets, even when eta = 0 makes the noise itself irrelevant."""
    if not channels_last:
        return _randn(shape, generator, device)
    where = device if generator is None else generator.device
    b, v, c, h, w = shape
    noise = torch.empty((b, v, h, w, c), device=where).permute(0, 1, 4, 2, 3)
    return noise.normal_(generator=generator).to(device)


@torch.no_grad()
def sample_paper(denoiser: PaperDenoiser, images_clean: Tensor | None, cameras: Cameras | PaperCameras,
                 steps: int | None = None, guidance: float = 0.0, generator: torch.Generator | None = None, *,
                 diffusion: PaperDiffusion | None = None, render_cameras: Cameras | PaperCameras | None = None,
                 background: float | None = None, original_render_order: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> PaperSample:
    """Sample the views of a viewset as the original does (see the module's docstring).

    ``images_clean: (B, k, 3, S, S)`` in [-1, 1], the clean views, or None (k = 0: unconditional);
    ``cameras (B, V)``: the clean views' cameras first, then the V - k views to sample (k < V);
    ``steps``: DDIM steps (default ``diffusion.sampling_steps``); ``guidance`` w: 0 reconstructs,
    -1 samples unconditionally (with k = 0 the viewset has no clean view, the conditional and
    unconditional passes would see the same inputs, and a single pass is run); ``generator``: every
    random draw; ``diffusion``: the schedule (default: the released one, T = 1000 cosine);
    ``render_cameras (B, R)``: extra cameras for the final renders; ``background``: in [0, 1]
    (default the dataset's); ``original_render_order``: the final renders pass by pass as the
    original does them (one pass per extra camera and batch element, with the viewset's cameras:
    the original's random draws), else one pass for all (same distribution, fewer renders).
    ``progress(i, n)`` is called after each step. The denoiser runs in eval mode (restored after).
    """
    if not isinstance(denoiser, PaperDenoiser):
        raise TypeError(f"denoiser must be a PaperDenoiser, got {type(denoiser).__name__}")
    diffusion = PaperDiffusion() if diffusion is None else diffusion
    guidance = float(guidance)
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance}")
    if background is not None and not isinstance(background, (int, float)):
        raise TypeError("background must be a number in [0, 1] or None (the dataset's)")
    cams = denoiser.paper_cameras(cameras)
    if cams.T.dim() != 3:
        raise ValueError(f"cameras must have shape (B, V), got {tuple(cams.T.shape[:-1])}")
    B, V = cams.T.shape[:2]
    S = denoiser.config.image_size
    param = next(denoiser.parameters())
    device, dtype = param.device, param.dtype
    if images_clean is None:
        k = 0
        clean_images = torch.zeros(B, 0, 3, S, S, device=device, dtype=dtype)
    else:
        if images_clean.dim() != 5 or tuple(images_clean.shape[2:]) != (3, S, S) or images_clean.shape[0] != B:
            raise ValueError(f"images_clean must be (B, k, 3, {S}, {S}) with B = {B} (the cameras' batch), "
                             f"got {tuple(images_clean.shape)}")
        k = images_clean.shape[1]
        clean_images = images_clean.to(device=device, dtype=dtype)
    if k >= V:
        raise ValueError(f"{k} clean views leave no view to sample among the {V} cameras: "
                         "cameras must hold the k clean views' cameras and at least one more")
    extra = None
    if render_cameras is not None:
        extra = denoiser.paper_cameras(render_cameras)
        if extra.T.dim() != 3 or extra.T.shape[0] != B:
            raise ValueError(f"render_cameras must have shape (B, R) with B = {B}, got {tuple(extra.T.shape[:-1])}")
        extra = extra if extra.T.shape[1] else None
    pairs = diffusion.time_pairs(steps)

    abar64 = diffusion.alphas_cumprod64()
    abar = abar64.float().to(device)
    recip = (1.0 / abar64).sqrt().float().to(device)
    recipm1 = (1.0 / abar64 - 1.0).sqrt().float().to(device)

    n = V - k  # views to sample
    noisy_cams = _cams_index(cams, (slice(None), slice(k, None)))
    self_cond = denoiser.config.self_condition
    clean_mask = (torch.arange(V, device=device) < k)[None].expand(B, V)
    kw = dict(background=background, generator=generator)

    def viewset(x: Tensor, t: int, sc: Tensor | None, conditional: bool):
        """(images, cameras, timesteps, self-conditioning, clean mask) of one pass."""
        ts = torch.full((B, n), t, dtype=torch.long, device=device)
        if conditional and k:
            zeros = torch.zeros(B, k, dtype=torch.long, device=device)
            sc_all = None if sc is None else torch.cat([torch.zeros_like(clean_images), sc], 1)
            return torch.cat([clean_images, x], 1), cams, torch.cat([zeros, ts], 1), sc_all, clean_mask
        return x, noisy_cams, ts, sc, None

    def x0_of(x: Tensor, t: int, sc: Tensor | None, conditional: bool) -> Tensor:
        images, cs, ts, sc_all, clean = viewset(x, t, sc, conditional)
        return denoiser(images, cs, ts, sc_all, clean=clean, **kw).clamp(-1.0, 1.0)[:, -n:]

    was_training = denoiser.training
    denoiser.eval()
    try:
        x = _randn((B, n, 3, S, S), generator, device).to(dtype)
        sc = torch.zeros_like(x) if self_cond else None
        channels_last = False
        for i, (t, t_next) in enumerate(pairs):
            if t_next < 0:
                break
            x0 = x0_of(x, t, sc, True)
            eps = (recip[t] * x - x0) / recipm1[t]
            guided = guidance != 0.0 and k > 0
            if guided:
                x0_u = x0_of(x, t, sc, False)
                eps_u = (recip[t] * x - x0_u) / recipm1[t]
                eps = (1 + guidance) * eps - guidance * eps_u
                x0 = (recip[t] * x - recipm1[t] * eps).clamp(-1.0, 1.0)
                eps = (recip[t] * x - x0) / recipm1[t]
            if self_cond:
                sc = x0
            a, a_next = abar[t], abar[t_next]
            sigma = diffusion.eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
            c = (1 - a_next - sigma ** 2).sqrt()
            z = _step_noise(x.shape, channels_last, generator, device).to(dtype)
            x = x0 * a_next.sqrt() + c * eps + sigma * z
            # the original's x_t' keeps the memory layout of its x0: the renderer's (H, W, 3)
            # layout when x0 came straight from the model, contiguous when guidance rebuilt it
            channels_last = not guided
            if progress is not None:
                progress(i + 1, len(pairs))

        # the last step: x0 renders of the viewset (without its clean views when w = -1)
        t = pairs[-1][0]
        conditional = guidance != -1.0
        images, cs, ts, sc_all, clean = viewset(x, t, sc, conditional)
        density, color = denoiser.reconstruct(images, cs, ts, sc_all, clean)
        if extra is not None and original_render_order:
            per_camera = []
            for r in range(extra.T.shape[1]):
                # unconditional, the original's pass r renders the extra cameras 0..r (its camera
                # dict grows in place from pass to pass); else the extra camera r alone
                first = 0 if not conditional else r
                rows = []
                for b in range(B):
                    targets = _cams_cat([_cams_index(cs, slice(b, b + 1)),
                                         _cams_index(extra, (slice(b, b + 1), slice(first, r + 1)))])
                    rows.append(denoiser.render(density[b:b + 1], color[b:b + 1], targets, **kw).rgb)
                rendered = torch.cat(rows, 0)
                per_camera.append(rendered if r == 0 else rendered[:, -1:])
            renders = torch.cat(per_camera, 1)
        else:
            targets = cs if extra is None else _cams_cat([cs, extra])
            renders = denoiser.render(density, color, targets, **kw).rgb
        if not conditional and k:
            clean_renders = denoiser.render(density, color, _cams_index(cams, (slice(None), slice(0, k))), **kw).rgb
            renders = torch.cat([clean_renders, renders], 1)
        if progress is not None:
            progress(len(pairs), len(pairs))
        return PaperSample(renders.clamp(-1.0, 1.0), density, color, pairs)
    finally:
        denoiser.train(was_training)


__all__ = ["PaperDiffusion", "PaperSample", "sample_paper"]
