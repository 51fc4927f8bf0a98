"""Images and videos a person looks at: sample grids (PNG) and turntables (GIF, MP4)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..core.files import temp_beside


def to_uint8(images: Tensor) -> np.ndarray:
    """(..., 3, H, W) in [0, 1] -> (..., H, W, 3) uint8."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def grid(images: Tensor, pad: int = 2, pad_value: float = 1.0) -> Tensor:
    """(R, C, 3, H, W) -> one (3, R*(H+pad)+pad, C*(W+pad)+pad) image, rows by columns."""
    R, C, _, H, W = images.shape
    out = torch.full((3, R * (H + pad) + pad, C * (W + pad) + pad), pad_value, dtype=images.dtype)
    for r in range(R):
        for c in range(C):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            out[:, y : y + H, x : x + W] = images[r, c].cpu()
    return out


def _atomic_path(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    os.close(fd)
    return Path(tmp)


def save_image(image: Tensor, path: str | Path, upscale: int = 1) -> Path:
    """Write a (3, H, W) image in [0, 1] as PNG (nearest-neighbour upscaled), atomically."""
    path = Path(path)
    img = Image.fromarray(to_uint8(image))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    tmp = _atomic_path(path)
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_grid(images: Tensor, path: str | Path, upscale: int = 1) -> Path:
    """(R, C, 3, H, W) in [0, 1] -> a PNG grid."""
    return save_image(grid(images), path, upscale)


def has_ffmpeg() -> bool:
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def save_video(frames: Tensor, path: str | Path, fps: int = 12, upscale: int = 1) -> list[Path]:
    """Write frames (F, 3, H, W) in [0, 1] as ``path`` (.gif) and, when imageio-ffmpeg is
    installed, an .mp4 beside it. Returns the files written."""
    import imageio.v2 as imageio

    path = Path(path).with_suffix(".gif")
    arr = to_uint8(frames)
    if upscale > 1:
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
    tmp = _atomic_path(path)
    imageio.mimsave(tmp, list(arr), format="GIF", duration=1000 / fps, loop=0)
    os.replace(tmp, path)
    written = [path]
    if has_ffmpeg():
        mp4 = path.with_suffix(".mp4")
        # H.264 wants even sizes; macro_block_size=1 keeps ours
        tmp = _atomic_path(mp4)
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, macro_block_size=1, codec="libx264", pixelformat="yuv420p") as w:
            for f in _even(arr):
                w.append_data(f)
        os.replace(tmp, mp4)
        written.append(mp4)
    return written


def _even(arr: np.ndarray) -> np.ndarray:
    H, W = arr.shape[1:3]
    return np.pad(arr, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")


def load_image(path: str | Path, size: int) -> Tensor:
    """An image file -> (3, size, size) in [-1, 1]; transparent pixels over white."""
    from ..core.errors import DataError

    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC if min(img.size) > size else Image.NEAREST)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    return x * 2 - 1
