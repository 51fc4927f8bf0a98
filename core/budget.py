"""A rough memory estimate of one training step and of sampling, from a validated recipe.

The estimate adds up what grows with the recipe's sizes: the volume renderer's per-sample
tensors (rays x samples, more for fields decoded by an MLP), the 3D U-Net's per-view feature
volumes (views x channels x D^3), the 2D encoder's feature maps, the representation's own
tensors, procedural ground truth, the weights with their gradients and Adam moments, and a
fixed allowance for the interpreter and torch. Sampling renders in chunks without autograd.

It is meant to stay *below* the true peak, so that it refuses only recipes that certainly do
not fit (``data.image_size=100000`` is refused before anything is built), never one that does.
Its constants were measured (peak resident memory of two CPU fp32 training steps, or of
sampling with a turntable, in a fresh process) and set at 50-80 % of what each part cost; on
the shipped recipes and scaled variants of them the estimate came to 0.3-0.8 of the measured
peak, e.g. voxel_minens.yaml 387 MiB estimated / 529 MiB measured, triplane_cars.yaml 2.7 /
4.4 GiB, hash_grid_cars.yaml 3.3 / 4.5 GiB, voxel_minens.yaml with model.volume_size=48
2.1 / 2.9 GiB. Parts of third-party plugins are not known to it (an under-estimate again).

:func:`check_budget` compares the larger of the two estimates with the memory of the machine
(the GPU's for a CUDA device; the process's address-space or cgroup limit when lower), or with
``train.memory_limit_gb`` when the recipe gives it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .errors import RecipeError

GiB = 2**30
BIG = 10**30  # sizes are clamped here before any float arithmetic

# Bytes per element, from peak resident memory of CPU fp32 steps, set at 50-80 % of what was
# measured (figures in the module docstring).
RENDER_TRAIN = 80.0  # per ray sample in a training step (points, lookups, compositing, grads)
RENDER_EVAL = 60.0  # per ray sample of one rendered chunk, without autograd
FIELD_TRAIN = 0.8  # times 4 bytes per float a field's decoder keeps per sample, with autograd
FIELD_EVAL = 0.35  # the same, without autograd
VOLUME_TRAIN = 60.0  # per voxel-channel of a per-view U-Net level, per ResNet block
VOLUME_EVAL = 8.0  # per voxel-channel of a per-view U-Net level, without autograd
ENCODER_TRAIN = 24.0  # per pixel-channel of a 2D encoder map, per ResNet block
IMAGE = 12.0  # per pixel-channel of a batch's images and camera rays
BOXES = 40.0  # per supersampled pixel of procedural ground truth
PARAMETER = 16.0  # per weight: itself, its gradient, two Adam moments (EMA copy not counted)
BASELINE = 256 * 2**20  # the interpreter with torch and vsd imported (measured: about 320 MiB)
TURNTABLE_FRAMES_PER_CALL = 8  # turntable frames rendered at once


@dataclass
class Term:
    """One part of the estimate: its size in bytes and the recipe keys it grows with."""

    what: str
    bytes: float
    keys: dict[str, float] = field(default_factory=dict)  # key -> how far above a small recipe it is


@dataclass
class Estimate:
    """A memory estimate in bytes, and the parts it is made of."""

    what: str
    terms: list[Term]

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    def blame(self) -> tuple[str | None, Term | None]:
        """The key most responsible: the key of the largest part that is furthest above a small
        recipe's value (or, when none of that part's keys is, the furthest of any part)."""
        if not self.terms:
            return None, None
        top = max(self.terms, key=lambda t: t.bytes)
        if top.keys and max(top.keys.values()) > 1:
            return max(top.keys, key=lambda k: top.keys[k]), top
        every = {k: v for t in self.terms for k, v in t.keys.items()}
        if every and max(every.values()) > 1:
            return max(every, key=lambda k: every[k]), top
        return (next(iter(top.keys)) if top.keys else None), top


def _n(value, default: int = 0) -> int:
    """An integer setting, clamped to BIG (sizes may be absurd here; they are refused later)."""
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return max(0, min(v, BIG))


def _ratio(value: float, reference: float, power: float = 1.0) -> float:
    """How far ``value`` is above a generous ``reference`` (1: not above), as its part grows."""
    if value <= reference:
        return 1.0
    try:
        return (value / reference) ** power
    except OverflowError:
        return math.inf


def _get(settings, name: str, default=None):
    return getattr(settings, name, default)


@dataclass
class _Sizes:
    batch_key: str
    batch: int
    views: int
    views_in: int
    image: int
    samples: int
    volume: int
    chans: list[int]
    sides: list[int]
    res_blocks: int
    keys: dict[str, float]


def _sizes(recipe, batch: int, batch_key: str) -> _Sizes:
    """The sizes every part uses, and how far each of their keys is above a small recipe's."""
    d, m, tr = recipe.data.settings, recipe.model, recipe.train
    V = _n(_get(d, "views", 4), 4)
    H = _n(_get(d, "image_size", 64), 64)
    r = recipe.renderer.settings
    coarse, fine = _n(_get(r, "samples", 0)), _n(_get(r, "importance_samples", 0))
    S = coarse + fine
    D = _n(m.volume_size, 1)
    mult = [_n(c, 1) for c in m.channel_mult]
    base = _n(m.base_channels, 1)
    chans = [base * c for c in mult]
    sides = [max(1, D >> lv) if lv < 128 else 1 for lv in range(len(mult))]
    keys = {
        batch_key: _ratio(batch, 16 if batch_key == "sample.num_samples" else 8),
        "data.views": _ratio(V, 8),
        "data.image_size": _ratio(H, 64, 2),
        "renderer.samples": _ratio(coarse, 64),
        "renderer.importance_samples": _ratio(fine, 64),
        "model.num_res_blocks": _ratio(_n(m.num_res_blocks, 1), 4),
        "model.volume_size": _ratio(D, 32, 3),
        "model.base_channels": _ratio(base, 32),
        "model.channel_mult": _ratio(max(mult), 8),
    }
    return _Sizes(batch_key, batch, V, max(1, V - _n(tr.heldout_views)), H, S, D, chans, sides, _n(m.num_res_blocks, 1), keys)


def _pick(z: _Sizes, *names: str) -> dict[str, float]:
    """The growth of ``names`` (``"batch"``: the batch's key) for one part."""
    names = tuple(z.batch_key if n == "batch" else n for n in names)
    return {k: z.keys[k] for k in names if k in z.keys}


def _field_floats(recipe) -> tuple[float, dict[str, float]]:
    """Floats per ray sample that a field's decoder MLP and feature lookups keep."""
    s = recipe.representation.settings
    hidden, layers = _n(_get(s, "hidden", 0)), _n(_get(s, "layers", 0))
    mlp = 2.0 * hidden * layers + hidden
    keys = {"representation.hidden": _ratio(hidden, 128), "representation.layers": _ratio(layers, 8)}
    if _get(s, "plane_channels") is not None:
        P = _n(s.plane_channels, 1)
        return 4.0 * P + mlp, {**keys, "representation.plane_channels": _ratio(P, 64)}
    if _get(s, "log2_table_size") is not None:
        L, F = _n(s.levels, 1), _n(s.features_per_level, 1)
        return 8.0 * L * F + mlp, {**keys, "representation.levels": _ratio(L, 16), "representation.features_per_level": _ratio(F, 8)}
    return 0.0, {}


def _render_term(recipe, z: _Sizes, rays: float, train: bool, what: str) -> Term | None:
    r = recipe.renderer.settings
    if _get(r, "samples") is not None:
        floats, fkeys = _field_floats(recipe)
        per = RENDER_TRAIN + FIELD_TRAIN * 4 * floats if train else RENDER_EVAL + FIELD_EVAL * 4 * floats
        keys = _pick(z, "batch", "data.views", "data.image_size", "renderer.samples", "renderer.importance_samples")
        return Term(what, float(rays) * z.samples * per, {**keys, **fkeys})
    ss = _get(r, "supersample")
    if ss is not None:  # a rasteriser: a few buffers per supersampled pixel
        ss = _n(ss, 1)
        return Term(what, float(rays) * ss * ss * 16.0, {**_pick(z, "batch", "data.views", "data.image_size"), "renderer.supersample": _ratio(ss, 4, 2)})
    return None


def _volume_voxels(z: _Sizes) -> float:
    """Voxel-channels of one view's U-Net levels (each level's channels x side^3)."""
    return float(sum(c * s**3 for c, s in zip(z.chans, z.sides)))


def _representation_term(recipe, z: _Sizes, batch: int, grad: bool) -> Term | None:
    s = recipe.representation.settings
    D = z.volume
    k = 4.0 if grad else 1.0
    if _get(s, "log2_table_size") is not None:  # hash grid: per-object tables (B, L, T, F)
        T = 2 ** min(_n(s.log2_table_size, 1), 64)
        L, F = _n(s.levels, 1), _n(s.features_per_level, 1)
        lo, hi = _n(s.min_resolution, 1), _n(s.max_resolution, 1)
        entries = 0.0
        for lv in range(min(L, 4096)):
            res = lo if L == 1 else lo * (hi / max(lo, 1)) ** (lv / (L - 1))
            entries += min(float(T), (res + 1.0) ** 3)
        entries *= max(1, L) / min(L, 4096) if L > 4096 else 1
        return Term("hash tables", batch * entries * F * 4.0 * k, {
            "representation.log2_table_size": _ratio(T, 2**16),
            "representation.levels": _ratio(L, 16),
            "representation.max_resolution": _ratio(hi, 128, 3),
            **_pick(z, "batch"),
        })
    if _get(s, "grid_resolution") is not None:  # tetrahedral grid: 6 N^3 tets, (N+1)^3 vertices
        N = _n(s.grid_resolution, 1)
        hidden = _n(_get(s, "hidden", 32), 32)
        size = batch * ((N + 1.0) ** 3 * (hidden + 8) * 4.0 * k + 6.0 * N**3 * 16.0)
        return Term("tetrahedral grid", size, {"representation.grid_resolution": _ratio(N, 64, 3), **_pick(z, "batch")})
    if _get(s, "plane_channels") is not None:  # triplane: three (P, D', D') planes
        up = _n(_get(s, "plane_upsample", 1), 1)
        P = _n(s.plane_channels, 1)
        return Term("triplanes", batch * 3.0 * P * (D * up) ** 2 * 4.0 * k, {
            "representation.plane_channels": _ratio(P, 64),
            **_pick(z, "model.volume_size"),
        })
    if _get(s, "hidden_channels") is not None:  # voxel grid: (hidden, D', D', D') trunk
        up = _n(_get(s, "upsample", 1), 1)
        width = _n(s.hidden_channels) or (z.chans[0] if z.chans else 1)
        return Term("voxel grid", batch * (width + 4.0) * (D * up) ** 3 * 4.0 * k, {
            "representation.hidden_channels": _ratio(width, 64),
            **_pick(z, "model.volume_size"),
            **_pick(z, "batch"),
        })
    return None


def _parameters(recipe, z: _Sizes) -> tuple[float, dict[str, float]]:
    """A lower bound on the number of weights: the U-Net's 3x3x3 convolutions, the aggregators'
    learned query volumes and the encoder's convolutions."""
    nrb = z.res_blocks
    unet = 0.0
    for lv, c in enumerate(z.chans):
        unet += 27.0 * c * c * 2 * nrb  # down level
        if lv < len(z.chans) - 1:
            unet += 27.0 * c * c * 3 * nrb  # up level (2C in)
    unet += 27.0 * z.chans[-1] ** 2 * 2 * nrb if z.chans else 0.0  # middle
    agg = recipe.aggregator.settings
    query = sum(c * s**3 for c, s in zip(z.chans, z.sides)) if _get(agg, "heads") is not None else 0.0
    e = recipe.encoder.settings
    ec, eo = _n(_get(e, "channels", 0)), _n(_get(e, "out_channels", 0))
    blocks = _n(_get(e, "blocks", 0))
    enc = 49.0 * 12 * ec + 9.0 * (ec * eo + eo * eo * max(0, 2 * blocks - 1))
    keys = {
        "model.base_channels": _ratio(z.chans[0] if z.chans else 1, 64, 2),
        "model.channel_mult": z.keys["model.channel_mult"] ** 2,
        "model.num_res_blocks": _ratio(nrb, 4),
        **_pick(z, "model.volume_size"),
        "encoder.channels": _ratio(ec, 128, 2),
        "encoder.out_channels": _ratio(eo, 128, 2),
        "encoder.blocks": _ratio(blocks, 8),
    }
    return unet + query + enc, keys


def _encoder_term(recipe, z: _Sizes, batch: int, per: float, what: str) -> Term:
    e = recipe.encoder.settings
    ec, eo = _n(_get(e, "channels", 32), 32), _n(_get(e, "out_channels", 32), 32)
    blocks = max(1, _n(_get(e, "blocks", 1), 1))
    h = (z.image + 1) // 2
    size = float(batch) * z.views_in * h * h * (ec + eo * blocks) * per
    return Term(what, size, {
        **_pick(z, "batch", "data.views", "data.image_size"),
        "encoder.channels": _ratio(ec, 128),
        "encoder.out_channels": _ratio(eo, 128),
        "encoder.blocks": _ratio(blocks, 8),
    })


def _data_term(recipe, z: _Sizes, batch: int) -> Term | None:
    d = recipe.data.settings
    ss = _get(d, "supersample")
    if ss is None:
        return None
    ss = _n(ss, 1)
    return Term("procedural ground truth", float(batch) * z.views * (z.image * ss) ** 2 * BOXES, {
        **_pick(z, "batch", "data.views", "data.image_size"),
        "data.supersample": _ratio(ss, 4, 2),
    })


def _aggregator_term(recipe, z: _Sizes, batch: int) -> Term | None:
    """A per-voxel scoring network's activations, for aggregators that have one."""
    hidden = _get(recipe.aggregator.settings, "hidden")
    if hidden is None:
        return None
    hidden = _n(hidden, 1)
    voxels = float(sum(s**3 for s in z.sides))
    return Term("aggregator scores", float(batch) * z.views_in * voxels * hidden * 12.0, {
        **_pick(z, "batch", "data.views", "model.volume_size"),
        "aggregator.hidden": _ratio(hidden, 128),
    })


def estimate_training(recipe) -> Estimate:
    """Memory of one training step (one micro-batch's activations, the weights and optimiser)."""
    tr = recipe.train
    b = max(1, _n(tr.batch_size, 1) // max(1, _n(tr.grad_accum, 1)))
    z = _sizes(recipe, b, "train.batch_size")
    rays = float(b) * z.views * z.image**2
    terms = [Term("the interpreter and torch", BASELINE)]
    weights, wkeys = _parameters(recipe, z)
    terms.append(Term("weights and optimiser state", weights * PARAMETER, wkeys))
    render = _render_term(recipe, z, rays, True, "ray samples")
    if render:
        terms.append(render)
    terms.append(Term("per-view feature volumes", float(b) * z.views_in * _volume_voxels(z) * VOLUME_TRAIN * z.res_blocks,
                      _pick(z, "batch", "data.views", "model.volume_size", "model.base_channels", "model.channel_mult",
                            "model.num_res_blocks")))
    terms.append(_encoder_term(recipe, z, b, ENCODER_TRAIN, "encoder feature maps"))
    terms.append(Term("images and rays", rays * 12 * IMAGE, _pick(z, "batch", "data.views", "data.image_size")))
    for t in (_representation_term(recipe, z, b, grad=True), _data_term(recipe, z, b), _aggregator_term(recipe, z, b)):
        if t:
            terms.append(t)
    if tr.precision != "fp32":  # autocast keeps many activations in 16 bits
        for t in terms[2:]:
            t.bytes *= 0.5
    return Estimate("one training step", terms)


def estimate_sampling(recipe) -> Estimate:
    """Memory of drawing ``sample.num_samples`` viewsets (no autograd; rays rendered in chunks)
    and of rendering their turntables."""
    s = recipe.sample
    b = _n(s.num_samples, 1)
    z = _sizes(recipe, b, "sample.num_samples")
    size = _n(s.render_size) or z.image
    frames = _n(s.turntable_frames, 1)
    r = recipe.renderer.settings
    chunk = _n(_get(r, "chunk_rays", 65536), 65536)
    rays = float(b) * z.views * z.image**2
    per_call = max(rays, float(b) * min(frames, TURNTABLE_FRAMES_PER_CALL) * size**2)  # rays handed to the renderer at once
    terms = [Term("the interpreter and torch", BASELINE)]
    weights, wkeys = _parameters(recipe, z)
    terms.append(Term("weights", weights * 8.0, wkeys))  # the model and its EMA copy
    chunked = min(per_call, float(chunk)) if _get(r, "samples") is not None else per_call
    render = _render_term(recipe, z, chunked, False, "ray samples")
    if render:
        if per_call > rays:
            render.keys["sample.render_size"] = _ratio(size, 256, 2)
        terms.append(render)
    terms.append(Term("per-view feature volumes", float(b) * z.views * _volume_voxels(z) * VOLUME_EVAL,
                      _pick(z, "batch", "data.views", "model.volume_size", "model.base_channels", "model.channel_mult")))
    terms.append(Term("images and rays", rays * 12 * IMAGE, _pick(z, "batch", "data.views", "data.image_size")))
    terms.append(Term("turntable frames", float(b) * frames * size**2 * 3 * 4.0, {
        **_pick(z, "batch"),
        "sample.turntable_frames": _ratio(frames, 120),
        "sample.render_size": _ratio(size, 256, 2),
    }))
    rep = _representation_term(recipe, z, b, grad=False)
    if rep:
        terms.append(rep)
    return Estimate("sampling", terms)


# ---- the limit ------------------------------------------------------------------------------
def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def _address_space_headroom() -> int | None:
    """Address space left under RLIMIT_AS, when the process has such a limit."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft in (resource.RLIM_INFINITY, -1) or soft <= 0:
        return None
    used = 0
    try:
        with open("/proc/self/statm") as fh:
            used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - used)


def _uses_cuda(device: str) -> bool:
    dev = str(device or "auto").strip().lower()
    if dev.startswith("cuda"):
        return True
    if dev == "auto":
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - no usable CUDA: the CPU's memory applies
            return False
    return False


def _gpu_memory(device: str) -> int | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        dev = str(device).strip().lower()
        index = int(dev.split(":", 1)[1]) if dev.startswith("cuda:") else 0
        if not 0 <= index < torch.cuda.device_count():
            index = 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    except Exception:  # noqa: BLE001 - a broken CUDA set-up is reported where the device is used
        return None


def machine_limit(device: str) -> tuple[float | None, str]:
    """The memory (bytes) a run on ``device`` can have, and where that figure comes from: the
    GPU's memory for CUDA, else the least of physical memory, the cgroup's limit and what the
    address-space limit leaves (plus the interpreter already loaded, which the estimate counts)."""
    if _uses_cuda(device):
        gpu = _gpu_memory(device)
        if gpu:
            return float(gpu), "the GPU's memory"
    headroom = _address_space_headroom()
    found = [(float(v), what) for v, what in (
        (_physical_memory(), "this machine's physical memory"),
        (_cgroup_limit(), "this container's memory limit"),
        (headroom + BASELINE if headroom is not None else None, "this process's address-space limit"),
    ) if v]
    if not found:
        return None, "unknown"
    return min(found)


def memory_limit(recipe) -> tuple[float | None, str]:
    """The memory (bytes) a step of ``recipe`` may be estimated to need, and where that figure
    comes from: ``train.memory_limit_gb`` when given, else :func:`machine_limit`."""
    given = recipe.train.memory_limit_gb
    if given is not None:
        return float(given) * GiB, "train.memory_limit_gb"
    return machine_limit(recipe.device)


def _gib(n: float) -> str:
    if n >= 1e6 * GiB:
        return f"{n / GiB:.3g} GiB"
    return f"{n / GiB:,.1f} GiB"


def check_budget(recipe, *, sampling_only: bool = False) -> None:
    """Refuse (RecipeError) a recipe whose estimated memory for a training step or for sampling
    (only sampling with ``sampling_only``) exceeds the limit (:func:`memory_limit`), naming the
    key most responsible. When the limit is the recipe's own ``train.memory_limit_gb`` and the
    machine could hold the estimate, the key named is ``train.memory_limit_gb``."""
    if getattr(recipe, "paper", None) is not None:
        return  # the paper network's memory is not modelled here
    limit, where = memory_limit(recipe)
    if limit is None:
        return
    estimates = [estimate_sampling(recipe)] if sampling_only else [estimate_training(recipe), estimate_sampling(recipe)]
    worst = max(estimates, key=lambda e: e.total)
    if worst.total <= limit:
        return
    key, term = worst.blame()
    need = f"{worst.what} is estimated to need at least {_gib(worst.total)}"
    if where == "train.memory_limit_gb":
        machine, _ = machine_limit(recipe.device)
        if machine is None or worst.total <= machine:
            cause = f", mostly {term.what} (see `{key}`)" if key and term else ""
            raise RecipeError(
                recipe.source,
                "train.memory_limit_gb",
                f"{need}{cause}, more than this limit of {_gib(limit)}; raise it, or make the recipe smaller",
            )
        limit_text, fix = f"train.memory_limit_gb ({_gib(limit)}) and the machine", "raise train.memory_limit_gb"
    else:
        limit_text, fix = f"{where} ({_gib(limit)})", "set train.memory_limit_gb (GiB) to use another limit"
    part = f" (mostly {term.what})" if term else ""
    raise RecipeError(
        recipe.source,
        key or "train.memory_limit_gb",
        f"{need}{part}, more than {limit_text}; make it smaller, or {fix}",
    )
