"""Diffusion maths: the noise schedule, DDIM/DDPM samplers and classifier-free guidance.

Nothing here knows about the denoiser. Names follow the ``diffusers`` library so that readers
(and the parity tests) can line the two up.

Timesteps. ``t`` is an index into the schedule, ``t = 0 .. T-1``, where ``t = 0`` is the *first
noising step* (``alphas_cumprod[0] = 1 - betas[0]``, slightly below 1), as in diffusers. A ``t``
may be a Python int, a 0-d tensor, or a tensor whose shape is a prefix of the data's shape, e.g.
``(B,)`` or ``(B, V)`` (one timestep per view) against images ``(B, V, 3, H, W)``.

Clean views. Conditioning views are shown to the network with timestep 0 and are *never* noised
or stepped: the caller keeps their pixels and overwrites whatever a sampler step returns for
them. This module only indexes the schedule; ``make_scheduler`` offsets the sampling steps by
one so that a noisy view is never fed at t = 0 as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from .settings import Settings

Timestep = int | Tensor
PredictionType = Literal["sample", "epsilon"]


class NoiseSchedule:
    """The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    betas, alphas_cumprod: (T,) float32, computed in float64.
    """

    def __init__(
        self,
        kind: Literal["cosine", "linear"] = "cosine",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
        cosine_s: float = 0.008,
    ):
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        if kind == "cosine":
            betas = _cosine_betas(num_train_timesteps, cosine_s)
        elif kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"schedule kind must be 'cosine' or 'linear', got {kind!r}")
        self.kind = kind
        self.num_train_timesteps = num_train_timesteps
        abar = torch.cumprod(1.0 - betas, dim=0)
        self.betas = betas.float()
        self.alphas_cumprod = abar.float()
        # From float64: in float32, 1 - abar near t = 0 keeps only ~3 significant digits.
        self._snr = (abar / (1.0 - abar)).float()

    def to(self, device) -> "NoiseSchedule":
        """Moves the buffers to ``device`` (in place) and returns self."""
        self.betas = self.betas.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        self._snr = self._snr.to(device)
        return self

    def alpha_bar(self, t: Timestep, like: Tensor | None = None) -> Tensor:
        """abar_t, shaped to broadcast against ``like`` (trailing singleton dims added).

        like: optional tensor whose leading dims ``t``'s shape must match, e.g. t (B, V) against
        x (B, V, 3, H, W) gives (B, V, 1, 1, 1). Without ``like``, the result has t's shape.
        """
        device = self.alphas_cumprod.device if like is None else like.device
        t = _as_index(t, device, self.num_train_timesteps)
        abar = self.alphas_cumprod.to(device)[t]
        if like is None:
            return abar
        return _broadcast_to(abar, like, "t").to(like.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Timestep) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise: (B, V, 3, H, W) or any."""
        abar = self.alpha_bar(t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def snr(self, t: Timestep) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t), shaped like t."""
        return self._snr[_as_index(t, self._snr.device, self.num_train_timesteps)]

    def min_snr_weight(self, t: Timestep, gamma: float | None = 5.0) -> Tensor:
        """Per-sample loss weight min(SNR_t, gamma) for an x0-prediction L2 loss, shaped like t.

        Min-SNR-gamma weights the epsilon loss by min(SNR, gamma) / SNR. Since
        eps - eps_hat = sqrt(SNR) (x0_hat - x0), the epsilon loss equals SNR times the x0 loss,
        so the same objective on x0 is weighted by min(SNR, gamma). ``gamma=None`` gives ones.
        """
        snr = self.snr(t)
        if gamma is None:
            return torch.ones_like(snr)
        return snr.clamp(max=gamma)

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Timestep) -> Tensor:
        """The noise implied by x_t and an x0 prediction."""
        abar = self.alpha_bar(t, x_t)
        return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Timestep) -> Tensor:
        """The clean image implied by x_t and a noise prediction."""
        abar = self.alpha_bar(t, x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def guided_x0(x_t: Tensor, t: Timestep, x0_cond: Tensor, x0_uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance on x0 predictions: the x0 implied by
    eps = (1 + w) eps_cond - w eps_uncond, eps_* = (x_t - sqrt(abar_t) x0_*) / sqrt(1 - abar_t).

    w = 0 gives x0_cond, w = -1 gives x0_uncond. Both predictions share x_t and t, and x0 -> eps
    is affine in x0 with the same offset for both, so the guided x0 is exactly
    (1 + w) x0_cond - w x0_uncond whatever the schedule: x_t and t cancel. The closed form is used
    because the round trip through eps divides by sqrt(abar_t), which amplifies rounding error
    near t = T-1.
    """
    if x0_cond.shape != x0_uncond.shape or x0_cond.shape != x_t.shape:
        raise ValueError(
            f"x_t {tuple(x_t.shape)}, x0_cond {tuple(x0_cond.shape)} and x0_uncond "
            f"{tuple(x0_uncond.shape)} must have the same shape"
        )
    return (1.0 + w) * x0_cond - w * x0_uncond


def _cosine_betas(num_steps: int, s: float) -> Tensor:
    """Nichol & Dhariwal (2021): abar(u) = f(u) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2),
    beta_t = 1 - abar((t + 1) / T) / abar(t / T), clipped at 0.999 (abar -> 0 as u -> 1)."""
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1.0 - f[1:] / f[:-1]).clamp(max=0.999)


def _as_index(t: Timestep, device, num_steps: int) -> Tensor:
    t = torch.as_tensor(t, device=device)
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"timesteps t must be integers, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and (t.min() < 0 or t.max() >= num_steps):
        raise IndexError(
            f"timesteps t must lie in [0, {num_steps - 1}], got values in "
            f"[{int(t.min())}, {int(t.max())}]"
        )
    return t


def _broadcast_to(values: Tensor, like: Tensor, name: str) -> Tensor:
    """values shaped like t, reshaped so that t's dims are the leading dims of ``like``."""
    lead = like.shape[: values.dim()]
    if values.dim() > like.dim() or any(a not in (1, b) for a, b in zip(values.shape, lead)):
        raise ValueError(
            f"{name} of shape {tuple(values.shape)} does not match the leading dims of data "
            f"of shape {tuple(like.shape)}"
        )
    return values.reshape(values.shape + (1,) * (like.dim() - values.dim()))


@dataclass
class StepOutput:
    """prev_sample: x_{t_prev}; pred_original_sample: the (clipped) x0 used for the step."""

    prev_sample: Tensor
    pred_original_sample: Tensor


class _Sampler:
    """Shared timestep bookkeeping of the samplers.

    steps_offset: added to every inference timestep, as diffusers' option of that name. 0 (the
    diffusers default) ends the chain on t = 0; 1 keeps noisy views off t = 0, the timestep that
    marks clean conditioning views (``make_scheduler`` uses 1).
    """

    def __init__(self, schedule: NoiseSchedule, steps_offset: int = 0):
        T = schedule.num_train_timesteps
        if not 0 <= steps_offset < T:
            raise ValueError(f"steps_offset must lie in [0, {T - 1}], got {steps_offset}")
        self.schedule = schedule
        self.steps_offset = steps_offset
        self.set_timesteps(T - steps_offset)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """``timesteps``: descending LongTensor (N,), "leading" spacing as in diffusers.

        With r = T // N the steps are (N-1) r, ..., r, 0 plus ``steps_offset``; each step goes
        from t to t - r, and a t - r below 0 means "fully clean", so the last step returns x0.
        """
        T, offset = self.schedule.num_train_timesteps, self.steps_offset
        n_max = T - offset  # r = 1 then, and the first step (n_max - 1) + offset is T - 1
        if not 1 <= num_inference_steps <= n_max:
            raise ValueError(
                f"num_inference_steps must lie in [1, {n_max}] (num_train_timesteps {T}, "
                f"steps_offset {offset}), got {num_inference_steps}"
            )
        self.num_inference_steps = num_inference_steps
        self.step_ratio = T // num_inference_steps
        steps = torch.arange(num_inference_steps) * self.step_ratio + offset
        self.timesteps = steps.flip(0)

    def _alpha_bars(self, t: Timestep, sample: Tensor, final: float) -> tuple[Tensor, ...]:
        """t as a tensor, abar_t and abar_{t - r} (``final`` where t - r < 0), shaped for sample."""
        t = _as_index(t, sample.device, self.schedule.num_train_timesteps)
        prev = t - self.step_ratio
        abar = self.schedule.alpha_bar(t, sample)
        abar_prev = self.schedule.alpha_bar(prev.clamp(min=0), sample)
        is_last = _broadcast_to(prev < 0, sample, "t")
        abar_prev = torch.where(is_last, torch.full_like(abar_prev, final), abar_prev)
        return t, abar, abar_prev

    @staticmethod
    def _raw_x0(model_output, sample, abar, prediction_type: str) -> Tensor:
        """The unclipped x0 a model output stands for."""
        if prediction_type == "sample":
            return model_output
        if prediction_type == "epsilon":
            return (sample - (1.0 - abar).sqrt() * model_output) / abar.sqrt()
        raise ValueError(f"prediction_type must be 'sample' or 'epsilon', got {prediction_type!r}")


def _randn_like(sample: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's device so that a CPU generator reproduces across devices.
    device = sample.device if generator is None else generator.device
    noise = torch.randn(sample.shape, generator=generator, device=device, dtype=sample.dtype)
    return noise.to(sample.device)


class DDIMScheduler(_Sampler):
    """DDIM (Song et al. 2021): x_{t'} = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps
    + sigma z, with sigma = eta * sqrt((1 - abar_t') / (1 - abar_t) * (1 - abar_t / abar_t')).

    set_alpha_to_one: abar after the last step is 1 (the chain ends exactly at x0), as diffusers'
    default; otherwise abar_0.
    """

    def __init__(
        self, schedule: NoiseSchedule, steps_offset: int = 0, set_alpha_to_one: bool = True
    ):
        super().__init__(schedule, steps_offset)
        self.set_alpha_to_one = set_alpha_to_one

    def step(
        self,
        model_output: Tensor,
        t: Timestep,
        sample: Tensor,
        *,
        prediction_type: PredictionType = "sample",
        eta: float = 0.0,
        clip_sample: bool = True,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """One step from x_t to x_{t - r}.

        model_output, sample: (B, V, 3, H, W) (or any shape); t: int or (B,) / (B, V) tensor.
        use_clipped_model_output: derive eps from the clipped x0 rather than from the raw
        model output (diffusers' default is False, kept here for parity).
        """
        final = 1.0 if self.set_alpha_to_one else float(self.schedule.alphas_cumprod[0])
        _, abar, abar_prev = self._alpha_bars(t, sample, final)
        x0_raw = self._raw_x0(model_output, sample, abar, prediction_type)
        x0 = x0_raw.clamp(-1.0, 1.0) if clip_sample else x0_raw
        if use_clipped_model_output or prediction_type == "sample":
            x0_for_eps = x0 if use_clipped_model_output else x0_raw
            eps = (sample - abar.sqrt() * x0_for_eps) / (1.0 - abar).sqrt()
        else:
            eps = model_output
        variance = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
        sigma = eta * variance.sqrt()
        # sigma^2 <= 1 - abar_t' for eta <= 1; the clamp only absorbs rounding at eta = 1
        direction = (1.0 - abar_prev - sigma**2).clamp(min=0.0).sqrt()
        prev = abar_prev.sqrt() * x0 + direction * eps
        if eta > 0:
            prev = prev + sigma * _randn_like(model_output, generator)
        return StepOutput(prev, x0)


class DDPMScheduler(_Sampler):
    """Ancestral sampling from the posterior q(x_{t'} | x_t, x0) with the "fixed_small"
    variance beta~ = (1 - abar_t') / (1 - abar_t) * (1 - abar_t / abar_t'), t' = t - r."""

    def step(
        self,
        model_output: Tensor,
        t: Timestep,
        sample: Tensor,
        *,
        prediction_type: PredictionType = "sample",
        eta: float = 0.0,
        clip_sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """One step from x_t to x_{t - r}; model_output, sample (B, V, 3, H, W), t int or tensor.

        eta: accepted so that both samplers share one call; DDPM's noise is fixed, so only 0.
        """
        if eta != 0.0:
            raise ValueError(f"eta={eta} applies only to DDIM; DDPM's variance is fixed_small")
        t, abar, abar_prev = self._alpha_bars(t, sample, 1.0)
        x0 = self._raw_x0(model_output, sample, abar, prediction_type)
        x0 = x0.clamp(-1.0, 1.0) if clip_sample else x0
        mean = self.posterior_mean(sample, x0, abar, abar_prev)
        if not bool((t > 0).any()):
            return StepOutput(mean, x0)
        alpha = abar / abar_prev
        variance = ((1.0 - abar_prev) / (1.0 - abar) * (1.0 - alpha)).clamp(min=1e-20)
        noisy = _broadcast_to(t > 0, sample, "t")
        noise = _randn_like(model_output, generator)
        return StepOutput(torch.where(noisy, mean + variance.sqrt() * noise, mean), x0)

    @staticmethod
    def posterior_mean(x_t: Tensor, x0: Tensor, abar: Tensor, abar_prev: Tensor) -> Tensor:
        """Mean of q(x_{t'} | x_t, x0) for t' < t (abar, abar_prev broadcastable to x_t)."""
        alpha = abar / abar_prev  # the product of (1 - beta) from t' + 1 to t
        c0 = abar_prev.sqrt() * (1.0 - alpha) / (1.0 - abar)
        ct = alpha.sqrt() * (1.0 - abar_prev) / (1.0 - abar)
        return c0 * x0 + ct * x_t


class DiffusionSettings(Settings):
    """The recipe's ``diffusion:`` block."""

    schedule: Literal["cosine", "linear"] = Field(
        "cosine", description="Noise schedule: cosine (Nichol & Dhariwal) or linear betas."
    )
    timesteps: int = Field(1000, gt=0, le=1_000_000, description="Number of training timesteps T.")
    min_snr_gamma: float | None = Field(
        5.0, gt=0, description="Min-SNR loss weight cap gamma; null for uniform weights."
    )
    self_condition_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="Probability of a self-conditioning pass in training."
    )
    sampler: Literal["ddim", "ddpm"] = Field("ddim", description="Sampler used at inference.")
    sampling_steps: int = Field(
        50, gt=0, description="Number of sampler steps (< timesteps: t = 0 marks clean views)."
    )
    eta: float = Field(
        0.0, ge=0.0, le=1.0, description="DDIM stochasticity: 0 deterministic, 1 DDPM-like."
    )
    guidance: float = Field(
        0.0,
        ge=-1.0,
        description="Classifier-free guidance weight w: 0 conditional only, -1 unconditional.",
    )
    clip_x0: bool = Field(True, description="Clip x0 predictions to [-1, 1] when sampling.")
    input_fit_steps: int = Field(
        0,
        ge=0,
        le=1000,
        description="Sampling with conditioning views: Adam steps per sampler step that fit the "
        "predicted feature volume to the clean views' pixels before the generated views are "
        "rendered from it (0: off).",
    )
    input_fit_lr: float = Field(0.05, gt=0, description="Learning rate of those fitting steps.")

    @model_validator(mode="after")
    def _check(self) -> "DiffusionSettings":
        if self.sampling_steps >= self.timesteps:
            raise ValueError(
                f"sampling_steps ({self.sampling_steps}) must be below timesteps "
                f"({self.timesteps}): t = 0 is reserved for clean views"
            )
        if self.sampler == "ddpm" and self.eta != 0.0:
            raise ValueError(f"eta ({self.eta}) applies only to sampler 'ddim', not 'ddpm'")
        return self


def make_schedule(settings: DiffusionSettings) -> NoiseSchedule:
    """The NoiseSchedule a DiffusionSettings describes."""
    return NoiseSchedule(settings.schedule, settings.timesteps)


def make_scheduler(
    settings: DiffusionSettings, schedule: NoiseSchedule
) -> DDIMScheduler | DDPMScheduler:
    """The sampler of ``settings``, with ``set_timesteps(settings.sampling_steps)`` done.

    Its timesteps are offset by 1 ((N-1) r + 1, ..., r + 1, 1) because the engine feeds clean
    conditioning views at t = 0: a noisy view must never share that timestep.
    """
    cls = DDIMScheduler if settings.sampler == "ddim" else DDPMScheduler
    sampler = cls(schedule, steps_offset=1)
    sampler.set_timesteps(settings.sampling_steps)
    return sampler
