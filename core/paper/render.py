"""The original's renderer without pytorch3d: ``PostActivatedVolumeRenderer`` (NDC ray grid,
stratified coarse samples, importance samples from the coarse weights, post-activation, NeRF-style
emission-absorption) and the compositing over the background done in ``VoxelReconstructor``.

Ray lengths are view-space depths (pytorch3d's ray directions have unit view z, not unit length),
so the samples of every ray lie between the planes ``z = min_depth`` and ``z = max_depth``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from ..cameras import Cameras

from .geometry import PaperCameras, PaperVolume, as_paper_cameras, ndc_pixel_grid

# Bias of the density activation: softplus(sigma * gain - 6), so a zero raw density is nearly empty.
DENSITY_SHIFT = 6.0
# The importance sampler's weights add this to the transmittance (the original's constant).
FINE_WEIGHTS_EPS = 1e-5
# The final ray marcher's (pytorch3d's EmissionAbsorptionRaymarcher default).
MARCH_EPS = 1e-10


@dataclass(frozen=True)
class PaperRenderSettings:
    """The original's ``render`` config: ``min_depth``, ``max_depth``, ``n_pts_per_ray``,
    ``n_pts_per_ray_fine``, ``stratified_sampling`` (used in training only), ``raw_noise_std``
    (training only). The defaults are SRN cars'."""

    min_depth: float = 0.8
    max_depth: float = 1.8
    n_pts_per_ray: int = 64
    n_pts_per_ray_fine: int = 64
    stratified_sampling: bool = True
    raw_noise_std: float = 0.0

    def __post_init__(self):
        if not 0 <= self.min_depth < self.max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {self.min_depth}, {self.max_depth}")
        if self.n_pts_per_ray < 2 or self.n_pts_per_ray_fine < 0:
            raise ValueError("need n_pts_per_ray >= 2 and n_pts_per_ray_fine >= 0")

    @property
    def gain(self) -> float:
        """Samples per unit depth of the coarse pass; scales the raw density and is the length
        given to each ray's last sample."""
        return self.n_pts_per_ray / (self.max_depth - self.min_depth)


@dataclass
class PaperRender:
    """``rgb: (B, V, 3, H, W)`` in [-1, 1], composited over the background; ``opacity`` and
    ``depth: (B, V, 1, H, W)`` (depth = sum of weights x view-space depth, not background-filled;
    the original does not compute it); ``lengths: (B, V, H, W, n)`` the samples' depths."""

    rgb: Tensor
    opacity: Tensor
    depth: Tensor
    lengths: Tensor


def coarse_lengths(shape: tuple[int, ...], settings: PaperRenderSettings, stratified: bool,
                   generator: torch.Generator | None = None, device=None) -> Tensor:
    """``(*shape, n_pts_per_ray)`` depths: evenly spaced from min to max depth inclusive; when
    stratified, each moves uniformly within the interval between its neighbours' midpoints (the
    first and last stay on the near and far side of their own points)."""
    n = settings.n_pts_per_ray
    lengths = torch.linspace(settings.min_depth, settings.max_depth, n, device=device).expand(*shape, n)
    if not stratified:
        return lengths
    mids = (lengths[..., 1:] + lengths[..., :-1]) / 2
    upper = torch.cat([mids, lengths[..., -1:]], -1)
    lower = torch.cat([lengths[..., :1], mids], -1)
    u = torch.rand(lengths.shape, generator=generator, device=device)
    return lower + (upper - lower) * u


def sample_pdf(bins: Tensor, weights: Tensor, n_samples: int, det: bool = False, eps: float = 1e-5,
               generator: torch.Generator | None = None) -> Tensor:
    """Inverse-CDF samples ``(..., n_samples)`` of the piecewise-constant density with bin edges
    ``bins: (..., n_bins + 1)`` and bin weights ``weights: (..., n_bins)``; ``eps`` is added to every
    weight (so an empty ray samples uniformly). ``det`` takes u = linspace(0, 1) instead of U(0, 1).
    The formula of pytorch3d's ``sample_pdf_python`` (NeRF's ``sample_pdf``); not differentiable."""
    if bins.shape[-1] != weights.shape[-1] + 1 or bins.shape[:-1] != weights.shape[:-1]:
        raise ValueError(f"bins {tuple(bins.shape)} need one more edge than weights {tuple(weights.shape)}")
    pdf = (weights + eps) / (weights + eps).sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, -1)], -1)
    shape = (*cdf.shape[:-1], n_samples)
    if det:
        u = torch.linspace(0.0, 1.0, n_samples, device=bins.device, dtype=cdf.dtype).expand(shape)
    else:
        u = torch.rand(shape, generator=generator, device=bins.device, dtype=cdf.dtype)
    u = u.contiguous()
    idx = torch.searchsorted(cdf.contiguous(), u, right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
    bin_lo, bin_hi = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_hi - cdf_lo
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    return bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)


def density_to_alpha(raw_density: Tensor, lengths: Tensor, gain: float) -> Tensor:
    """Post-activation: ``alpha = 1 - exp(-softplus(raw * gain - 6) * delta)``, ``delta`` the gap to
    the next sample (``1 / gain`` for the last). ``raw_density, lengths: (..., n)``."""
    gaps = lengths[..., 1:] - lengths[..., :-1]
    gaps = torch.cat([gaps, torch.full_like(gaps[..., :1], 1.0 / gain)], -1)
    return 1.0 - torch.exp(-F.softplus(raw_density * gain - DENSITY_SHIFT) * gaps)


def ea_weights(alpha: Tensor, eps: float = MARCH_EPS) -> Tensor:
    """Emission-absorption weights ``alpha_i * prod_{j<i} (1 + eps - alpha_j)``, ``(..., n)``."""
    transmittance = torch.cumprod(1.0 + eps - alpha, -1)
    transmittance = torch.cat([torch.ones_like(transmittance[..., :1]), transmittance[..., :-1]], -1)
    return alpha * transmittance


def color_activation(raw_color: Tensor) -> Tensor:
    """``sigmoid * 1.002 - 0.001``: the original's colours can just reach 0 and 1."""
    return torch.sigmoid(raw_color) * 1.002 - 0.001


def sample_volume(volume: Tensor, local_points: Tensor) -> Tensor:
    """Trilinear samples of ``volume: (B, C, R, R, R)`` at ``local_points: (B, ..., 3)`` (local x, y,
    z; voxel centres at -1 and +1, ``align_corners=True``; zeros outside) -> ``(B, ..., C)``."""
    b, c = volume.shape[:2]
    flat = local_points.reshape(b, -1, 1, 1, 3).to(volume.dtype)
    out = F.grid_sample(volume, flat, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(b, c, -1).transpose(1, 2).reshape(*local_points.shape[:-1], c)


def inside_volume(local_points: Tensor) -> Tensor:
    """``(...,)`` whether each local point lies within the outermost voxel centres (|x|,|y|,|z| <= 1)."""
    return (local_points.abs() <= 1).all(-1)


def _rays(cams: PaperCameras, size: int) -> tuple[Tensor, Tensor]:
    """Origins ``(B, V, 1, 1, 3)`` and directions ``(B, V, H, W, 3)`` (unit view z) of every pixel."""
    xy = ndc_pixel_grid(size, device=cams.T.device, dtype=cams.T.dtype).reshape(-1, 2)
    xy = xy.expand(*cams.T.shape[:-1], *xy.shape)
    dirs = cams.ray_directions(xy).reshape(*cams.T.shape[:-1], size, size, 3)
    return cams.origins[..., None, None, :], dirs


def _raw_along_rays(density: Tensor, color: Tensor | None, origins: Tensor, dirs: Tensor,
                    lengths: Tensor, volume: PaperVolume, settings: PaperRenderSettings, training: bool,
                    generator: torch.Generator | None):
    """Raw density ``(B, V, H, W, n)`` (zero outside the volume) and, when ``color`` is given, raw
    colour ``(B, V, H, W, n, 3)`` at the ray samples."""
    points = origins[..., None, :] + lengths[..., None] * dirs[..., None, :]
    local = volume.to_local(points, density.shape[-1])
    raw = sample_volume(density, local)[..., 0]
    if training and settings.raw_noise_std > 0:
        raw = raw + torch.randn(raw.shape, generator=generator, device=raw.device) * settings.raw_noise_std
    inside = inside_volume(local)
    raw_color = sample_volume(color, local) if color is not None else None
    return raw, inside, raw_color


def render_paper(density: Tensor, color: Tensor, cameras: Cameras | PaperCameras, volume: PaperVolume,
                 settings: PaperRenderSettings, image_size: int, background: Tensor | float = 1.0,
                 training: bool = False, generator: torch.Generator | None = None,
                 det_fine: bool = False) -> PaperRender:
    """Render raw volumes as the original does (``PostActivatedVolumeRenderer`` + compositing).

    ``density: (B, 1, R, R, R)`` and ``color: (B, 3, R, R, R)`` raw (pre-activation, as the paper's
    network outputs them), indexed ``[d, h, w]`` = local ``(z, y, x)``; ``cameras`` of shape
    ``(B, V)``; ``background`` in [0, 1], broadcastable to ``(B, V, 3, H, W)`` (the original's SRN
    background is white). ``training`` turns on stratified coarse samples (when configured) and raw
    density noise. The importance samples are random (as in the original, even at evaluation);
    ``det_fine`` takes them deterministically instead. Gradients flow to ``density`` and ``color``
    through the final pass; the sample positions are not differentiated, as in the original.
    """
    cams = as_paper_cameras(cameras)
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    b, v = cams.T.shape[:-1]
    if density.shape[0] != b or color.shape[0] != b:
        raise ValueError(f"volumes of batch {density.shape[0]} for cameras of batch {b}")
    origins, dirs = _rays(cams, image_size)
    stratified = training and settings.stratified_sampling
    lengths = coarse_lengths(dirs.shape[:-1], settings, stratified, generator, dirs.device).to(dirs.dtype)

    if settings.n_pts_per_ray_fine > 0:
        with torch.no_grad():
            raw, inside, _ = _raw_along_rays(density, None, origins, dirs, lengths, volume, settings,
                                             training, generator)
            alpha = density_to_alpha(raw, lengths, settings.gain) * inside
            weights = ea_weights(alpha, FINE_WEIGHTS_EPS)
            # bin edges: the first and last samples and the midpoints between samples
            mids = (lengths[..., 1:] + lengths[..., :-1]) / 2
            bins = torch.cat([lengths[..., :1], mids, lengths[..., -1:]], -1)
            fine = sample_pdf(bins, weights, settings.n_pts_per_ray_fine, det=det_fine, generator=generator)
            lengths, _ = torch.sort(torch.cat([lengths, fine.to(lengths.dtype)], -1), -1)

    raw, inside, raw_color = _raw_along_rays(density, color, origins, dirs, lengths, volume, settings,
                                             training, generator)
    alpha = density_to_alpha(raw, lengths, settings.gain) * inside
    weights = ea_weights(alpha, MARCH_EPS)
    rgb = (weights[..., None] * color_activation(raw_color)).sum(-2)  # (B, V, H, W, 3)
    opacity = weights.sum(-1, keepdim=True)
    depth = (weights * lengths).sum(-1, keepdim=True)
    rgb, opacity, depth = (x.permute(0, 1, 4, 2, 3) for x in (rgb, opacity, depth))
    if not torch.is_tensor(background):
        background = torch.tensor(float(background), device=rgb.device, dtype=rgb.dtype)
    composited = rgb + background.to(rgb) * (1.0 - opacity)
    return PaperRender(composited * 2 - 1, opacity, depth, lengths)
