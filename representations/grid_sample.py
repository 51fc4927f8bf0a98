"""Trilinear sampling of small volumes at many points, through the 2D bilinear kernel.

On CPU, torch's ``grid_sample`` for volumes runs a generic scalar loop, while the 2D kernel is
vectorised: sampling a 16^3 grid at half a million ray samples costs several times more in 3D
than the same number of bilinear lookups in 2D. :func:`sample_volume` therefore lays the volume
out as one image and does the trilinear blend as one bilinear lookup plus a step in z:

* the volume is padded by one voxel (zeros, or edge values for "border" channels), so that
  coordinates clamped to the padded box give exactly ``grid_sample``'s ``zeros`` / ``border``
  padding without any special case at the faces;
* each z-slice is stacked, along the channels, with its difference to the slice above, and the
  slices are tiled into a near-square image; a point in cell ``z0`` reads both from tile ``z0``
  in one bilinear lookup and adds its fraction in z of the difference.

Tiles are square-ish so that pixel coordinates stay small (below ~100 for a 16^3 volume) and
the normalised float32 coordinates the 2D kernel takes keep ~1e-5 of a voxel of precision. The
backward is written out (one 2D ``grid_sampler_2d_backward`` call) so that autograd keeps no
large intermediate tensors for the split and the step in z.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_BILINEAR, _ZEROS = 0, 0  # grid_sampler_2d's interpolation and padding enums


class _SlabLookup(torch.autograd.Function):
    """image (B, 2C, Hi, Wi), grid (B, 1, N, 2) normalised, fz (B, 1, N), k
    -> channels (B, k, N) and (B, C - k, N).

    Two outputs rather than one sliced by the caller: autograd would otherwise zero-fill and
    copy a full-size gradient for each slice.
    """

    @staticmethod
    def forward(ctx, image: Tensor, grid: Tensor, fz: Tensor, k: int) -> tuple[Tensor, Tensor]:
        both = torch.grid_sampler_2d(image, grid, _BILINEAR, _ZEROS, True)[:, :, 0]  # (B, 2C, N)
        C = image.shape[1] // 2
        ctx.save_for_backward(image, grid, fz)
        ctx.k = k
        out = torch.addcmul(both[:, :C], both[:, C:], fz)  # slice + fz * (next slice - slice)
        return out[:, :k], out[:, k:]

    @staticmethod
    def backward(ctx, g_first: Tensor | None, g_rest: Tensor | None):
        image, grid, fz = ctx.saved_tensors
        B, C2, k = image.shape[0], image.shape[1], ctx.k
        C = C2 // 2
        # (B, 2C, 1, N): the gradient of the slice's channels, then of the differences'
        g_both = image.new_empty(B, C2, 1, grid.shape[2])
        for lo, hi, g in ((0, k, g_first), (k, C, g_rest)):
            if g is None:
                g_both[:, lo:hi].zero_()
                g_both[:, C + lo : C + hi].zero_()
            else:
                g_both[:, lo:hi, 0].copy_(g)
                torch.mul(g, fz, out=g_both[:, C + lo : C + hi, 0])
        g_image, _ = torch.ops.aten.grid_sampler_2d_backward(
            g_both, image, grid, _BILINEAR, _ZEROS, True, [ctx.needs_input_grad[0], False]
        )
        return g_image, None, None, None


def sample_volume(volume: Tensor, points: Tensor, bound: float = 1.0, zero_channels: int = 0) -> tuple[Tensor, Tensor]:
    """Trilinearly sample ``volume`` (B, C, D, H, W) spanning ``[-bound, bound]^3`` at ``points``
    (B, N, 3) -> the first ``zero_channels`` channels (B, k, N) and the others (B, C - k, N).

    Same result as ``F.grid_sample(volume, (points / bound)[:, None, None], align_corners=False)``
    with ``padding_mode="zeros"`` for the first ``zero_channels`` channels and ``"border"`` for
    the rest: points are (x, y, z), voxel centres at ``bound ((2 i + 1) / size - 1)``. Gradients
    flow to ``volume`` (not to ``points``).
    """
    B, C, D, H, W = volume.shape
    k = zero_channels
    pads = [F.pad(volume[:, :k], (1,) * 6)] if k else []
    pads += [F.pad(volume[:, k:], (1,) * 6, mode="replicate")] if k < C else []
    padded = torch.cat(pads, 1)  # (B, C, D+2, H+2, W+2)
    Dp, Hp, Wp = D + 2, H + 2, W + 2
    # beside each slice z, the step to slice z+1 (zero after the last one, which no point uses)
    step = F.pad(padded[:, :, 1:] - padded[:, :, :-1], (0, 0, 0, 0, 0, 1))
    slabs = torch.cat([padded, step], 1)  # (B, 2C, Dp, Hp, Wp)
    cols = math.ceil(math.sqrt(Dp * Hp / Wp))  # near-square image
    rows = math.ceil(Dp / cols)
    slabs = F.pad(slabs, (0, 0, 0, 0, 0, rows * cols - Dp))
    image = slabs.reshape(B, 2 * C, rows, cols, Hp, Wp).permute(0, 1, 2, 4, 3, 5).reshape(B, 2 * C, rows * Hp, cols * Wp)

    with torch.no_grad():
        # per axis, on (B, N) views: contiguous when points are stored coordinate-major (as the
        # volume renderer makes them), and no inner loop over 3 channels either way
        def to_index(c: Tensor, n: int) -> Tensor:  # padded voxel index (centre of i at i), clamped
            return c.mul(0.5 * n / bound).add_(0.5 * n + 0.5).clamp_(0, n + 1)

        x, y, z = points.unbind(-1)
        ix, iy, iz = to_index(x, W), to_index(y, H), to_index(z, D)
        z0 = iz.floor().clamp_max_(Dp - 2)
        fz = iz.sub_(z0)
        # normalised image coordinates: x and y scaled, plus the offset of tile z0
        sx, sy = 2 / (cols * Wp - 1), 2 / (rows * Hp - 1)
        tile = torch.arange(Dp - 1, device=points.device)
        ox = (tile % cols * Wp).to(points.dtype) * sx - 1
        oy = (tile // cols * Hp).to(points.dtype) * sy - 1
        z0 = z0.long().flatten()
        grid = points.new_empty(B, 1, points.shape[1], 2)  # written in place: no stacking pass
        torch.add(ox.index_select(0, z0).view_as(ix), ix, alpha=sx, out=grid[:, 0, :, 0])
        torch.add(oy.index_select(0, z0).view_as(iy), iy, alpha=sy, out=grid[:, 0, :, 1])
    return _SlabLookup.apply(image, grid, fz[:, None], zero_channels)


def sample_features(volume: Tensor, points: Tensor, bound: float = 1.0) -> Tensor:
    """Features (B, N, C) of ``volume`` (B, C, D, H, W) at world points (B, N, 3): trilinear,
    points outside the cube take the border value (:func:`sample_volume` with border padding)."""
    return sample_volume(volume, points, bound)[1].transpose(1, 2)
