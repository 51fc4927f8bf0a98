"""One training step (forward, backward, optimiser) of the reference recipe at 1x, 2x and 4x
volume and image size: viewsets/s, peak memory, achieved FLOP/s and utilisation.

    python -m benchmarks train-step [--scales 1 2 4] [--recipe voxel_minens.yaml] [key=value ...]

Scale f multiplies image size, volume size and samples per ray by f (32 px, 16^3, 32 samples at
f = 1). Self-conditioning is off so every step does the same work (one forward, one backward).
FLOPs are what torch.utils.flop_counter counts in one step (convolutions, matmuls, attention);
utilisation divides them per second by the FLOP/s of a large matmul / wide conv measured in the
same process.
"""

from __future__ import annotations

import torch

from .common import counted_flops, max_rss_mib, peak_flops, table, timeit


def build(recipe_ref: str, overrides: list[str], device, compile_backend: str | None = None):
    from vsd.core.engine import ViewsetDiffusion
    from vsd.core.recipe import load_recipe
    from vsd.apps.training import fixed_batch

    try:
        from vsd.apps.training import make_optimizer
    except ImportError:  # an older tree (benchmarks/against.py): its Trainer used plain Adam
        def make_optimizer(model, lr):
            return torch.optim.Adam(model.parameters(), lr=lr)

    recipe = load_recipe(recipe_ref, ["data.skins=procedural", "diffusion.self_condition_prob=0.0", *overrides])
    ds = recipe.data.build(split="train")
    torch.manual_seed(0)
    model = ViewsetDiffusion(recipe, ds.info).to(device)
    batch = fixed_batch(ds, recipe.train.batch_size, torch.device(device))
    if compile_backend:
        from vsd.apps.training import compile_denoiser

        compile_denoiser(model, compile_backend)
    opt = make_optimizer(model, recipe.train.lr)  # what training uses
    counter = iter(range(10**9))

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(batch, seed=next(counter))
        loss.backward()
        opt.step()

    return recipe, model, step


def scale_overrides(f: float, base: dict) -> list[str]:
    return [
        f"data.image_size={int(base['image'] * f)}",
        f"model.volume_size={int(base['volume'] * f)}",
        f"renderer.samples={int(base['samples'] * f)}",
    ]


def op_shares(step, n: int = 2, top: int = 8) -> list[dict]:
    """Share of a step's CPU time per operator (torch.profiler, self time), largest first."""
    from torch.profiler import profile

    step()
    with profile() as prof:
        for _ in range(n):
            step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "share": e.self_cpu_time_total / total} for e in events[:top]]


def conv_rate(device, channels: int, size: int, batch: int, repeats: int) -> float:
    """FLOP/s of one 3x3x3 conv forward + backward at the U-Net's own shapes."""
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(device)
    x = torch.randn(batch, channels, size, size, size, device=device, requires_grad=True)

    def f():
        conv(x).sum().backward()

    flops = counted_flops(f)
    return flops / timeit(f, repeats, 1, device)["median"]


def run(args) -> dict:
    peak = peak_flops(args.device)
    base = {"image": 32, "volume": 16, "samples": 32}
    rows = []
    for f in args.scales:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        recipe, model, step = build(args.recipe, [*scale_overrides(f, base), *args.overrides], args.device)
        flops = counted_flops(step)
        t = timeit(step, args.repeats, 1, args.device)
        mem = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else max_rss_mib()
        B = recipe.train.batch_size
        rows.append({
            "scale": f, "image": int(base["image"] * f), "volume": int(base["volume"] * f),
            "step_s": t["median"], "iqr_s": t["q3"] - t["q1"], "viewsets_per_s": B / t["median"],
            "peak_mem_mib": mem, "gflop_per_step": flops / 1e9, "achieved_gflops": flops / t["median"] / 1e9,
            "utilisation": flops / t["median"] / peak["peak_flops"],
        })
        print(rows[-1], flush=True)
        if f == args.scales[0] and args.device == "cpu":
            shares = op_shares(step)
        del model, step
    # the U-Net's convolutions alone, at its widths (12 view volumes: batch 4 x 3 views)
    convs = [{"channels": c, "size": d, "gflops": conv_rate(args.device, c, d, 12, args.repeats) / 1e9} for c, d in ((16, 16), (32, 8), (64, 4))]
    md = table(rows, ["scale", "image", "volume", "step_s", "viewsets_per_s", "peak_mem_mib", "gflop_per_step", "achieved_gflops", "utilisation"])
    md += f"\n\npeak (large matmul / wide conv3d): {peak['peak_flops'] / 1e9:.1f} GFLOP/s"
    md += "\n\n3x3x3 conv fwd+bwd at the U-Net's shapes: " + ", ".join(f"{c['channels']} ch {c['size']}^3: {c['gflops']:.1f} GFLOP/s" for c in convs)
    if args.device == "cpu":
        md += "\n\nstep time by operator (scale 1): " + ", ".join(f"{o['op']} {o['share']:.0%}" for o in shares)
    return {"peak": peak, "rows": rows, "convs": convs, "op_shares": shares if args.device == "cpu" else None, "markdown": md}


def add_arguments(p) -> None:
    p.add_argument("--scales", type=float, nargs="+", default=[1, 2, 4])
    p.add_argument("--recipe", default="voxel_minens.yaml")
    p.add_argument("overrides", nargs="*", default=[])
