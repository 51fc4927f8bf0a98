"""Image metrics per frame: PSNR and SSIM always; LPIPS only where its weights exist locally."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1]: (..., 3, H, W) -> (...), one value per frame."""
    mse = ((pred.float() - target.float()) ** 2).flatten(-3).mean(-1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM (Gaussian window 11, sigma 1.5) of images in [0, 1]: (..., 3, H, W) -> (...)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    lead = pred.shape[:-3]
    p, t = pred.float().reshape(-1, *pred.shape[-3:]), target.float().reshape(-1, *target.shape[-3:])
    k = 11 if min(p.shape[-2:]) >= 11 else (min(p.shape[-2:]) // 2) * 2 - 1
    vals = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none", kernel_size=k)
    return vals.reshape(lead)
