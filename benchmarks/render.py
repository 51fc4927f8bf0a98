"""Volume compositing, forward + backward, against nerfacc's batched path on identical inputs.

    python -m benchmarks render [--rays 4096 16384 65536] [--samples 32 64 128]

Both sides turn (N, S) densities, colours and intervals into colour, depth and opacity and back-
propagate a loss to densities and colours. vsd's side is ``renderers.volume.composite`` (torch);
nerfacc's is ``render_weight_from_density`` (batched, no packing) plus the same accumulation
(``composite(..., backend="nerfacc")``).
Checks that outputs and gradients agree to 1e-5 and reports the time ratio.

Then the other half of rendering a voxel grid: trilinear sampling of a (B, 4, 16^3) radiance
grid at the reference step's 4 x 131,072 ray samples, forward + backward, with
``representations.grid_sample.sample_volume`` against ``F.grid_sample`` (density zero-padded,
colour border-padded, as ``VoxelField`` needs).
"""

from __future__ import annotations

import torch

from .common import table, timeit_pair


def make_inputs(n: int, s: int, seed: int = 0, device="cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(n, s + 1, generator=g) * 2 + 0.5, dim=-1).values
    return {
        "sigmas": (torch.rand(n, s, generator=g) * 4).to(device),
        "rgbs": torch.rand(n, s, 3, generator=g).to(device),
        "t_starts": t[:, :-1].contiguous().to(device),
        "t_ends": t[:, 1:].contiguous().to(device),
        "background": torch.ones(n, 3, device=device),
    }


def vsd_composite(x: dict):
    from vsd.renderers.volume import composite

    color, depth, opacity, _ = composite(x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"])
    return color, depth, opacity


def nerfacc_composite(x: dict):
    from vsd.renderers.volume import composite

    color, depth, opacity, _ = composite(x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"], backend="nerfacc")
    return color, depth, opacity


def fwd_bwd(fn, base: dict):
    x = dict(base)
    x["sigmas"] = base["sigmas"].detach().requires_grad_()
    x["rgbs"] = base["rgbs"].detach().requires_grad_()
    color, depth, opacity = fn(x)
    (color.square().sum() + depth.sum() + opacity.sum()).backward()
    return (color, depth, opacity), (x["sigmas"].grad, x["rgbs"].grad)


def run(args) -> dict:
    try:
        import nerfacc  # noqa: F401
    except ImportError:
        return {"error": "nerfacc is not installed (pip install nerfacc); nothing to compare against"}
    rows = []
    for n in args.rays:
        for s in args.samples:
            x = make_inputs(n, s, device=args.device)
            (oa, ga), (ob, gb) = fwd_bwd(vsd_composite, x), fwd_bwd(nerfacc_composite, x)
            err = max((a - b).abs().max().item() for a, b in zip((*oa, *ga), (*ob, *gb)))
            tv, tn, ratio = timeit_pair(lambda: fwd_bwd(vsd_composite, x), lambda: fwd_bwd(nerfacc_composite, x), args.repeats, 1, args.device)
            rows.append({"rays": n, "samples": s, "vsd_ms": tv["median"] * 1e3, "nerfacc_ms": tn["median"] * 1e3,
                         "nerfacc/vsd": 1 / ratio, "max_abs_diff": err, "agree_1e-5": err <= 1e-5,
                         "vsd_iqr_ms": (tv["q3"] - tv["q1"]) * 1e3, "nerfacc_iqr_ms": (tn["q3"] - tn["q1"]) * 1e3})
    sampler = volume_sampling(args)
    md = table(rows, ["rays", "samples", "vsd_ms", "nerfacc_ms", "nerfacc/vsd", "max_abs_diff"])
    md += "\n\n" + table([sampler], ["points", "grid_sample_ms", "sample_volume_ms", "speedup", "max_abs_diff"])
    return {"rows": rows, "volume_sampling": sampler, "markdown": md}


def volume_sampling(args, batch: int = 4, points: int = 131072, side: int = 16) -> dict:
    import torch.nn.functional as F

    from vsd.representations.grid_sample import sample_volume

    g = torch.Generator().manual_seed(0)
    grid = torch.rand(batch, 4, side, side, side, generator=g).to(args.device).requires_grad_()
    pts = (torch.rand(batch, points, 3, generator=g) * 2 - 1).to(args.device)
    w = torch.rand(batch, 4, points, generator=g).to(args.device)

    def reference():
        c = pts[:, None, None]
        sigma = F.grid_sample(grid[:, :1], c, align_corners=False, padding_mode="zeros")
        rgb = F.grid_sample(grid[:, 1:], c, align_corners=False, padding_mode="border")
        return torch.cat([sigma, rgb], 1)[:, :, 0, 0]

    def ours():
        return torch.cat(sample_volume(grid, pts, 1.0, zero_channels=1), 1)

    def fwd_bwd_of(fn):
        return lambda: torch.autograd.grad((fn() * w).sum(), grid)

    err = (reference() - ours()).abs().max().item()
    ta, tb, ratio = timeit_pair(fwd_bwd_of(reference), fwd_bwd_of(ours), args.repeats, 1, args.device)
    return {"points": batch * points, "grid_sample_ms": ta["median"] * 1e3, "sample_volume_ms": tb["median"] * 1e3, "speedup": ratio, "max_abs_diff": err}


def add_arguments(p) -> None:
    p.add_argument("--rays", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--samples", type=int, nargs="+", default=[32, 64, 128])
