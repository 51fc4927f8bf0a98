"""Image metrics per frame: PSNR and SSIM always; LPIPS only where its weights exist locally."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1]: (..., 3, H, W) -> (...), one value per frame."""
    mse = ((pred.float() - target.float()) ** 2).flatten(-3).mean(-1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def _ssim_map(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel SSIM (Gaussian window 11, sigma 1.5; smaller for tiny images) of images in
    [0, 1], (..., 3, H, W) -> (N, 3, H, W) with N the flattened leading dimensions."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    p, t = pred.float().reshape(-1, *pred.shape[-3:]), target.float().reshape(-1, *target.shape[-3:])
    k = 11 if min(p.shape[-2:]) >= 11 else (min(p.shape[-2:]) // 2) * 2 - 1
    _, full = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none", kernel_size=k, return_full_image=True)
    return full


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM (Gaussian window 11, sigma 1.5) of images in [0, 1]: (..., 3, H, W) -> (...)."""
    return _ssim_map(pred, target).flatten(1).mean(1).reshape(pred.shape[:-3])


def masked_psnr(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """PSNR in dB over the pixels where ``mask`` (..., 1, H, W) is true: (..., 3, H, W) -> (...).
    An empty mask scores as a perfect match (100 dB, the clamp of :func:`psnr`)."""
    m = mask.float().expand_as(pred)
    err = ((pred.float() - target.float()) ** 2 * m).flatten(-3).sum(-1)
    mse = err / m.flatten(-3).sum(-1).clamp(min=1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def masked_ssim(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """SSIM (as :func:`ssim`) averaged over the pixels where ``mask`` (..., 1, H, W) is true;
    an empty mask scores 1."""
    full = _ssim_map(pred, target)
    m = mask.float().reshape(-1, 1, *mask.shape[-2:]).expand_as(full)
    count = m.flatten(1).sum(1)
    vals = torch.where(count > 0, (full * m).flatten(1).sum(1) / count.clamp(min=1), torch.ones_like(count))
    return vals.reshape(pred.shape[:-3])


def foreground_colour(images: Tensor, mask: Tensor) -> Tensor:
    """Mean colour (..., 3) over the pixels where ``mask`` (..., 1, H, W) is true, of images
    (..., 3, H, W); over all pixels where the mask is empty."""
    m = mask.float().expand_as(images)
    count = m.sum((-1, -2))
    mean = (images.float() * m).sum((-1, -2)) / count.clamp(min=1)
    return torch.where(count > 0, mean, images.float().mean((-1, -2)))
