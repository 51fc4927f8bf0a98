"""Single-view reconstruction with DDIM: wall time and held-out PSNR against the number of
steps, the sampler's overhead over its denoiser passes, and the conditioning-feature cache.

    python -m benchmarks sampling [--model minens-voxel] [--steps 10 25 50 100 250] [--objects 8]

--model is a shipped model name (its held-out viewsets are used) or a run/checkpoint (its
dataset's test split). View 0 conditions; the other views are sampled at their true cameras.
"""

from __future__ import annotations

import torch

from .common import table, timeit, timeit_pair


def load(model_ref: str, objects: int, device):
    import vsd
    from vsd.apps import pretrained
    from vsd.core.cameras import Cameras
    from vsd.apps.training import fixed_batch

    pipe = vsd.load(model_ref, device=device)
    if model_ref in pretrained.names():
        held = pretrained.heldout(model_ref)
        images, cams = held["images"][:objects] * 2 - 1, held["cameras"][:objects]
    else:
        r = pipe.model.recipe
        batch = fixed_batch(r.data.build(split="test"), objects, torch.device("cpu"))
        V = r.data.settings.views - r.train.heldout_views
        images, cams = batch.images[:, :V], batch.cameras[:, :V]
    return pipe.model, images.to(device), Cameras(cams.c2w, cams.K, cams.height, cams.width).to(device)


def run(args) -> dict:
    from vsd.apps.metrics import psnr

    model, images, cams = load(args.model, args.objects, args.device)
    N, V = images.shape[:2]
    truth = (images[:, 1:] + 1) / 2

    def reconstruct(steps, i=None, cache=True, fit=None):
        sl = slice(None) if i is None else slice(i, i + 1)
        gen = torch.Generator().manual_seed(0)
        return model.sample(cams[sl], images[sl, :1], steps=steps, generator=gen, cache_conditioning=cache, fit_steps=fit).x0

    # one denoiser pass at the sampler's shapes (one object): the unit of sampling cost
    one = cams[:1]
    x = torch.randn(1, V, *images.shape[2:], device=args.device)
    ts = torch.full((1, V), 500, device=args.device)
    ts[:, 0] = 0
    with torch.no_grad():
        forward = timeit(lambda: model.predict(x, one, ts, x), args.repeats, 1, args.device)["median"]
    rows = []
    with torch.no_grad():
        for steps in args.steps:
            t = timeit(lambda: reconstruct(steps, 0), max(1, args.repeats // 2), 0, args.device)["median"]
            got = torch.cat([(reconstruct(steps, i)[:, 1:] + 1) / 2 for i in range(N)])
            rows.append({"steps": steps, "seconds": t, "psnr": psnr(got.clamp(0, 1).cpu(), truth.cpu()).mean().item(),
                         "overhead": t / (steps * forward)})
            print(rows[-1], flush=True)
        steps = args.cache_steps
        a, b = reconstruct(steps, 0, cache=False), reconstruct(steps, 0, cache=True)
        diff = (a - b).abs().max().item()
        t_off, t_on, ratio = timeit_pair(lambda: reconstruct(steps, 0, False), lambda: reconstruct(steps, 0, True), args.cache_repeats, 0, args.device)
        # fitting the volume to the clean view at every sampler step (diffusion.input_fit_steps)
        fit = []
        for n in args.fit_steps:
            t_plain, t_fit, fit_ratio = timeit_pair(lambda: reconstruct(steps, 0, fit=0), lambda: reconstruct(steps, 0, fit=n),
                                                    args.cache_repeats, 0, args.device)  # fmt: skip
            fit.append({"steps": steps, "fit_steps": n, "plain_s": t_plain["median"], "fit_s": t_fit["median"], "cost": 1 / fit_ratio})
    mean_img = ((images[:, 0] + 1) / 2).mean(0)  # a weak baseline: the mean conditioning image
    cache = {"steps": steps, "no_cache_s": t_off["median"], "cache_s": t_on["median"], "speedup": ratio, "max_abs_diff": diff}
    md = table(rows, ["steps", "seconds", "psnr", "overhead"])
    for f in fit:
        md += f"\n\ninput fit ({f['fit_steps']} Adam steps per sampler step) at {steps} steps: {f['plain_s']:.2f} s -> {f['fit_s']:.2f} s ({f['cost']:.2f}x the time)"
    md += f"\n\none denoiser forward: {forward * 1e3:.1f} ms; feature cache at {steps} steps: {t_off['median']:.2f} s -> {t_on['median']:.2f} s ({ratio:.2f}x), max |diff| {diff:.2e}"
    return {"model": args.model, "objects": N, "views": V, "forward_s": forward, "rows": rows, "cache": cache, "input_fit": fit,
            "mean_input_psnr": psnr(mean_img.expand_as(truth).cpu(), truth.cpu()).mean().item(), "markdown": md}


def add_arguments(p) -> None:
    p.add_argument("--model", default="minens-voxel")
    p.add_argument("--steps", type=int, nargs="*", default=[10, 25, 50, 100, 250], help="step counts of the speed/quality curve (none: only the cache comparison)")
    p.add_argument("--objects", type=int, default=8)
    p.add_argument("--cache-steps", type=int, default=50)
    p.add_argument("--fit-steps", type=int, nargs="*", default=[2, 5], help="input-fit steps per sampler step, each timed against none")
    p.add_argument("--cache-repeats", type=int, default=7, help="interleaved pairs timed for the cache comparison")
