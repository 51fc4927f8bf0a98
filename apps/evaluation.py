"""Evaluation of a trained model on a dataset split (``vsd-run eval``).

Conditional (``cond_views`` k >= 1): every viewset of the split is conditioned on its first k
views and N samples are drawn. The denoiser sees the first ``V_in`` views (the views per training
viewset: ``data.views - train.heldout_views``, k clean and the rest noisy); each sampled 3D scene
is then rendered at **every** non-conditioning ("target") view of the viewset. Per frame: PSNR and
SSIM (and LPIPS when available). Per object:

- ``best_of[n]``: among the first n samples, the one with the highest PSNR averaged over the
  target views (the choice is made per object, by PSNR only); its PSNR, SSIM and LPIPS. n runs
  over 1, 5, 10, 20, 50, 100, ... up to N, N always included.
- ``mean_over_samples``: each metric averaged over all N samples.
- ``averaged_sample``: metrics of the pixel mean of the N samples' renders.
- ``diversity``: the mean over sample pairs of their squared pixel distance on the target views
  (``pairwise_mse``), its root (``pairwise_l2``, per pixel, images in [0, 1]) and
  ``pairwise_psnr`` = -10 log10(pairwise_mse) (high: samples alike). Computed exactly from
  running sums, so renders are never all kept in memory.

Deterministic checkpoints (``train.deterministic``, the 'w/o diffusion' baseline) have a single
output per input: they draw one 'sample'.

Ambiguity (datasets with ``describe(i)["back_differs"]``, i.e. Minens characters facing +z):
an object is **ambiguous** when its torso's back differs from its front *and* the conditioning
views show at most one of the two: a camera shows the front when it stands in front of the
character (camera z > 0), the back when behind it (z < 0). The hidden side then differs from
the visible one and cannot be inferred. All other objects are unambiguous. Summaries are
reported for all / ambiguous / unambiguous objects.

Unconditional (k = 0): N unconditional samples per viewset, rendered at all its views, against
the split's ground-truth images of the same viewsets, compared with the **kernel distance**
(KID: unbiased MMD^2 with the polynomial kernel (x.y/d + 1)^3) on two feature sets:
(a) a fixed, seeded, *randomly initialised* small conv network (no pretrained weights, nothing
downloaded; its values are comparable only between vsd evaluations, not with published KID/FID),
(b) pixel statistics (per-channel mean and std, and a 4x4 average-pooled thumbnail).

LPIPS (VGG) is computed only when the ``lpips`` package imports *and* VGG backbone weights exist
locally (``lpips_weights`` / the ``VSD_LPIPS_WEIGHTS`` environment variable); nothing is ever
downloaded. Otherwise every LPIPS field says "unavailable" with the reason.

Protocols (``EvalConfig.protocol``). ``default``: as above, on the views of each dataset item.
``paper``: the published evaluation's viewset, 1 clean + 3 noisy views, sampled with DDIM (eta 0)
in 250 steps unless ``steps`` is given, without guidance unless ``guidance`` is given; every view of
the object but the clean one is scored. Datasets with a ``paper_views = (source, noisy)`` attribute
(SRN: clean view 64, noisy views 90, 104 and 120, scoring the other 250 views of a 251-view test
object) name view positions read with ``load``; an object without one of those views is an error
(exit 2) naming the object and the view. Datasets without that convention (minens, co3d) take view
0 of each item as the clean view and views 1, 2, 3 as the noisy ones, and score views 1 .. V-1 of
the item (``run_eval`` builds items of at least 4 views). ``settings.protocol_views`` of
metrics.json records which.

Resuming: each object's result is appended to ``results.jsonl`` as soon as it is done; running
the same evaluation again into the same folder skips the objects already there.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cameras import Cameras
from ..core.errors import VsdError
from ..core.progress import Progress
from .metrics import foreground_colour, masked_psnr, masked_ssim, psnr, ssim

LPIPS_ENV = "VSD_LPIPS_WEIGHTS"
RESULTS = "results.jsonl"
FEATURE_SEED = 20230
FEATURE_SIZE = 64
RENDER_CHUNK = 8  # target views rendered at a time, bounds memory on datasets with many views
METRICS_VERSION = 2  # results files of an older set of metrics are not resumed into
IDENTITY_VIEWS = 4  # target views of each object used to match reconstructions against it
FOREGROUND_OPACITY = 0.5  # a rendered pixel is foreground where the render's opacity exceeds this
FOREGROUND_DIFFERENCE = 0.02  # without masks, a true pixel is foreground where it differs from the background by more
PROTOCOLS = ("default", "paper")
PAPER_STEPS = 250  # DDIM steps of the published evaluation
PAPER_GUIDANCE = 0.0  # the published evaluation samples without classifier-free guidance
PAPER_VIEWSET = 4  # 1 clean + 3 noisy views
PAPER_ITEM_NOISY = (1, 2, 3)  # noisy views of the items of datasets with no source-view convention


class ProtocolError(VsdError):
    """An evaluation protocol that cannot be applied to this model, dataset or object."""

    exit_code = 2


# ---- reductions of per-frame metrics -------------------------------------------------------
def best_of_counts(n: int) -> list[int]:
    """1, 5, 10, 20, 50, 100, 200, 500, ... below ``n``, then ``n`` itself."""
    counts, base = [1], 1
    while True:
        new = [c * base for c in (5, 10, 20) if c * base < n and c * base not in counts]
        counts += new
        if 20 * base >= n:
            break
        base *= 10
    return sorted(set(c for c in counts if c < n) | {n})


def best_of(per_frame: dict[str, Tensor], n: int) -> dict[str, float]:
    """Metrics of the best of the first ``n`` samples, best = highest PSNR averaged over views.

    per_frame: name -> (N, V) per sample and target view; must hold "psnr".
    """
    pick = int(per_frame["psnr"][:n].mean(1).argmax())
    return {k: float(v[pick].mean()) for k, v in per_frame.items()}


def mean_over_samples(per_frame: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in per_frame.items()}


def pairwise_distance(total: Tensor, total_sq: Tensor, n: int) -> Tensor | None:
    """Mean over the n(n-1)/2 sample pairs of their per-pixel squared distance, per view.

    total, total_sq: (V, ...) sums over samples of renders and of squared renders; uses
    sum_{i<j} |a_i - a_j|^2 = n sum_i |a_i|^2 - |sum_i a_i|^2. Returns (V,), None for n < 2.
    """
    if n < 2:
        return None
    pix = total[0].numel()
    between = n * total_sq.flatten(1).sum(1) - (total.flatten(1) ** 2).sum(1)
    return (between / (n * (n - 1) / 2) / pix).clamp(min=0)


def diversity(pair_mse: Tensor | None) -> dict | None:
    """Summaries of per-view mean pairwise MSE (V,): see the module docstring."""
    if pair_mse is None:
        return None
    return {
        "pairwise_mse": float(pair_mse.mean()),
        "pairwise_l2": float(pair_mse.sqrt().mean()),
        "pairwise_psnr": float((-10 * torch.log10(pair_mse.clamp(min=1e-10))).mean()),
    }


# ---- LPIPS ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_downloads():
    """Any attempt by torch.hub to fetch a file fails instead of reaching the network."""
    import torch.hub as hub

    def refuse(url, *a, **k):
        raise RuntimeError(f"refusing to download {url}: vsd evaluates with local weights only")

    saved = hub.download_url_to_file
    hub.download_url_to_file = refuse
    try:
        yield
    finally:
        hub.download_url_to_file = saved


def _vgg_slices_state(state: dict) -> dict:
    """torchvision ``vgg16`` weights (``features.i.*``) -> lpips' ``slice{1..5}.i.*`` names."""
    ends = (4, 9, 16, 23, 30)  # lpips cuts vgg16.features after relu1_2, 2_2, 3_3, 4_3, 5_3
    out = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        idx = int(key.split(".")[1])
        slice_no = next((s for s, end in enumerate(ends, 1) if idx < end), None)
        if slice_no is not None:
            out[f"slice{slice_no}.{key.split('.', 1)[1]}"] = value
    return out


def load_lpips(weights: str | os.PathLike | None = None, device="cpu") -> tuple[nn.Module | None, str]:
    """An LPIPS (VGG) module built from local files only, or None; and a status line.

    ``weights`` (default: $VSD_LPIPS_WEIGHTS) is either torchvision ``vgg16`` weights or a full
    LPIPS state dict (``net.slice1...`` and ``lin0...`` keys). The backbone is constructed
    randomly initialised (``pnet_rand=True``, so nothing is fetched) and then loaded from it.
    """
    weights = weights or os.environ.get(LPIPS_ENV) or None
    try:
        import lpips
    except Exception as exc:  # also torchvision missing underneath
        return None, f"unavailable: the lpips package does not import ({type(exc).__name__}: {exc})"
    if not weights:
        return None, f"unavailable: no local VGG weights (set {LPIPS_ENV} or --lpips-weights; weights are never downloaded)"
    path = Path(weights)
    if not path.is_file():
        return None, f"unavailable: LPIPS weights file {path} does not exist"
    try:
        with _no_downloads():
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False)
            if any(k.startswith("lin0") for k in state):
                model.load_state_dict(state)
            else:
                model.net.load_state_dict(_vgg_slices_state(state))
    except Exception as exc:
        return None, f"unavailable: could not build LPIPS from {path} ({type(exc).__name__}: {exc})"
    return model.eval().requires_grad_(False).to(device), f"available: lpips VGG, backbone weights from {path}"


# ---- kernel distance -----------------------------------------------------------------------
class RandomConvFeatures(nn.Module):
    """A fixed small conv network with seeded random weights: (N, 3, H, W) in [0, 1] -> (N, 256).

    Not trained and not pretrained: features of a random network still separate image
    distributions (colour, edges, layout), and need no download. Values are comparable only
    between vsd evaluations (same seed, same input size), never with published KID/FID numbers.
    """

    def __init__(self, seed: int = FEATURE_SEED, size: int = FEATURE_SIZE):
        super().__init__()
        self.size = size
        chans = (3, 32, 64, 128)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(chans, chans[1:]))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                conv.bias.zero_()
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images.float() * 2 - 1, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def pixel_features(images: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 54): per-channel mean and std, and a 4x4 thumbnail."""
    x = images.float()
    thumb = F.adaptive_avg_pool2d(x, 4).flatten(1)
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), thumb], 1)


def kernel_distance(x: Tensor, y: Tensor, degree: int = 3) -> float:
    """Unbiased MMD^2 between feature sets x (m, d) and y (n, d) with k(a, b) = (a.b/d + 1)^degree."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"the kernel distance needs at least 2 items per set, got {m} and {n}")
    x, y = x.double(), y.double()
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** degree for a, b in ((x, x), (y, y), (x, y)))
    off = lambda k, s: (k.sum() - k.diagonal().sum()) / (s * (s - 1))  # noqa: E731
    return float(off(kxx, m) + off(kyy, n) - 2 * kxy.mean())


# ---- ambiguity -----------------------------------------------------------------------------
def ambiguity(dataset, index: int, cond_c2w: Tensor) -> dict | None:
    """Whether object ``index`` is ambiguous given conditioning cameras (k, 4, 4); None when the
    dataset cannot say (no ``describe`` with ``back_differs``) or nothing is conditioned on."""
    describe = getattr(dataset, "describe", None)
    if describe is None or cond_c2w.shape[0] == 0:
        return None
    info = describe(index)
    if not isinstance(info, dict) or "back_differs" not in info:
        return None
    pos = cond_c2w[:, :3, 3].double().cpu()
    front, back = bool((pos[:, 2] > 0).any()), bool((pos[:, 2] < 0).any())
    return {
        "back_differs": bool(info["back_differs"]),
        "cond_azimuth_deg": [round(math.degrees(math.atan2(p[0], p[2])), 1) for p in pos.tolist()],
        "sees_front": front,
        "sees_back": back,
        "ambiguous": bool(info["back_differs"]) and not (front and back),
    }


# ---- the evaluation loop -------------------------------------------------------------------
@dataclass
class EvalConfig:
    """What ``vsd-run eval`` does; every field but ``objects`` must match to resume a folder."""

    split: str = "test"
    cond_views: int = 1
    samples: int = 20
    objects: int | None = None
    steps: int | None = None
    batch_size: int = 4
    seed: int = 0
    guidance: float | None = None
    fit_steps: int | None = None
    lpips_weights: str | None = None
    protocol: str = "default"  # see PROTOCOLS and the module docstring

    @property
    def paper(self) -> bool:
        return self.protocol == "paper"

    def sampler_steps(self) -> int | None:
        """Steps passed to the sampler (None: the recipe's)."""
        return self.steps or (PAPER_STEPS if self.paper else None)

    def sampler_guidance(self) -> float | None:
        """Guidance passed to the sampler (None: the recipe's)."""
        return PAPER_GUIDANCE if self.paper and self.guidance is None else self.guidance

    def check(self, model) -> None:
        """Refuse (exit 2) a protocol that cannot be applied to ``model``."""
        if self.protocol not in PROTOCOLS:
            raise ProtocolError(f"unknown evaluation protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if not self.paper:
            return
        if self.cond_views != 1:
            raise ProtocolError(f"--protocol paper conditions on 1 clean view; --cond-views {self.cond_views} does not apply")
        timesteps = model.recipe.diffusion.timesteps
        if not model.recipe.train.deterministic and self.sampler_steps() >= timesteps:
            raise ProtocolError(f"--protocol paper samples in {self.sampler_steps()} steps but this model has {timesteps} "
                                f"timesteps; pass --steps below {timesteps}")

    def fingerprint(self, model, checkpoint: dict) -> dict:
        keep = {k: v for k, v in asdict(self).items() if k not in ("objects", "lpips_weights")}
        out = {
            **keep,
            "metrics": METRICS_VERSION,
            "steps": self.sampler_steps() or model.recipe.diffusion.sampling_steps,
            "fit_steps": model.recipe.diffusion.input_fit_steps if self.fit_steps is None else self.fit_steps,
            "samples": 1 if model.recipe.train.deterministic else self.samples,
            "checkpoint": checkpoint,
        }
        if self.paper:
            out["guidance"] = self.sampler_guidance()
            out["sampler"] = "ddim, eta 0"
        return out


def _object_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919 + 17) % (2**63 - 1)


def _expand(cams: Cameras, b: int) -> Cameras:
    return Cameras(cams.c2w[None].expand(b, *cams.c2w.shape), cams.K[None].expand(b, *cams.K.shape), cams.height, cams.width)


class _Accumulator:
    """Per-frame metrics of every sample, plus running pixel sums for the averaged sample and
    the pairwise distances, for one object."""

    def __init__(self, gt: Tensor, lpips_net, truth_mask: Tensor | None = None):
        self.gt, self.lpips = gt, lpips_net  # gt: (Vt, 3, H, W) in [0, 1]
        self.truth_mask = torch.zeros_like(gt[:, :1], dtype=torch.bool) if truth_mask is None else truth_mask
        self.frames: dict[str, list[Tensor]] = {"psnr": [], "ssim": [], "fg_psnr": [], "fg_ssim": []}
        self.frames |= {"lpips": []} if lpips_net else {}
        self.colours: list[Tensor] = []
        self.total = torch.zeros(gt.shape, dtype=torch.float64, device=gt.device)
        self.total_sq = torch.zeros_like(self.total)
        self.total_opacity = torch.zeros(gt[:, :1].shape, dtype=torch.float64, device=gt.device)
        self.n = 0

    def _foreground(self, opacity: Tensor) -> Tensor:
        """Where the true or the predicted object is: (b, Vt, 1, H, W) bool."""
        return self.truth_mask | (opacity > FOREGROUND_OPACITY)

    def add(self, renders: Tensor, opacity: Tensor | None = None) -> None:
        """renders: (b, Vt, 3, H, W) in [0, 1]; opacity: (b, Vt, 1, H, W) in [0, 1]."""
        gt = self.gt.expand_as(renders)
        opacity = torch.zeros_like(renders[:, :, :1]) if opacity is None else opacity
        fg = self._foreground(opacity)
        self.frames["psnr"].append(psnr(renders, gt).cpu())
        self.frames["ssim"].append(ssim(renders, gt).cpu())
        self.frames["fg_psnr"].append(masked_psnr(renders, gt, fg).cpu())
        self.frames["fg_ssim"].append(masked_ssim(renders, gt, fg).cpu())
        if self.lpips is not None:
            self.frames["lpips"].append(lpips_frames(self.lpips, renders, gt).cpu())
        # the predicted object's mean colour over its own silhouette, all target views together
        pred_fg = (opacity > FOREGROUND_OPACITY).movedim(1, 2).flatten(-2)
        self.colours.append(foreground_colour(renders.movedim(1, 2).flatten(-2), pred_fg).cpu())
        r = renders.double()
        self.total += r.sum(0)
        self.total_sq += (r**2).sum(0)
        self.total_opacity += opacity.double().sum(0)
        self.n += renders.shape[0]

    def per_frame(self) -> dict[str, Tensor]:
        return {k: torch.cat(v) for k, v in self.frames.items()}

    def true_colour(self) -> list[float]:
        """The true object's mean colour over its silhouette in the target views."""
        return foreground_colour(self.gt.movedim(0, 1).flatten(-2), self.truth_mask.movedim(0, 1).flatten(-2)).tolist()

    def averaged(self) -> dict[str, float]:
        mean = (self.total / self.n).float()[None]
        fg = self._foreground((self.total_opacity / self.n).float()[None])
        out = {"psnr": float(psnr(mean, self.gt[None]).mean()), "ssim": float(ssim(mean, self.gt[None]).mean()),
               "fg_psnr": float(masked_psnr(mean, self.gt[None], fg).mean()), "fg_ssim": float(masked_ssim(mean, self.gt[None], fg).mean())}
        if self.lpips is not None:
            out["lpips"] = float(lpips_frames(self.lpips, mean, self.gt[None]).mean())
        return out


def truth_mask(images01: Tensor, masks: Tensor | None, background: Tensor) -> Tensor:
    """Where the true object is, (V, 1, H, W) bool: the dataset's masks when it has them, else
    the pixels that differ from the background colour (3,)."""
    if masks is not None:
        return masks > 0.5
    return ((images01 - background[:, None, None]).abs().amax(-3, keepdim=True) > FOREGROUND_DIFFERENCE)


@dataclass
class Gallery:
    """The first target views of every evaluated object, to match each reconstruction against
    (identity): cameras (1, N * n) object after object, truth (N * n, 3, H, W) in [0, 1] and its
    mask (N * n, 1, H, W), n views per object."""

    cameras: Cameras
    gt: Tensor
    mask: Tensor
    views: int


def build_gallery(dataset, n_obj: int, cfg: EvalConfig, model, background: Tensor, device) -> Gallery:
    """The first IDENTITY_VIEWS scored views of each of the first ``n_obj`` objects."""
    items = [object_views(dataset, j, cfg, model, gallery=True)[1] for j in range(n_obj)]
    n = min(it["images"].shape[0] for it in items)
    images = torch.cat([((it["images"][:n] + 1) / 2).clamp(0, 1) for it in items]).to(device)
    masks = None if any(it.get("masks") is None for it in items) else torch.cat([it["masks"][:n] for it in items]).to(device)
    c2w = torch.cat([it["c2w"][:n] for it in items]).to(device)
    K = torch.cat([it["K"][:n] for it in items]).to(device)
    cams = Cameras(c2w[None], K[None], images.shape[-2], images.shape[-1])
    return Gallery(cams, images, truth_mask(images, masks, background), n)


def identity_scores(model, scene, batch: int, gallery: Gallery) -> list[float]:
    """Foreground PSNR, per gallery object, of the first of a batch of ``batch`` scenes rendered at
    that object's views against its truth; the reconstruction is identified when the highest
    score is its own object's. (Scenes are opaque to the engine, so the whole batch is rendered
    and the first kept.)"""
    rgb, opacity = _render_targets(model, scene, _expand(gallery.cameras[0], batch))
    fg = gallery.mask | (opacity[0] > FOREGROUND_OPACITY)
    per_view = masked_psnr(rgb[0], gallery.gt, fg)
    return [round(float(x), 4) for x in per_view.reshape(-1, gallery.views).mean(1)]


def lpips_frames(net, pred: Tensor, target: Tensor) -> Tensor:
    """LPIPS of images in [0, 1]: (..., 3, H, W) -> (...)."""
    lead = pred.shape[:-3]
    p, t = (x.reshape(-1, *x.shape[-3:]).float() * 2 - 1 for x in (pred, target))
    return net(p, t).reshape(lead)


def _render_targets(model, scene, cams: Cameras) -> tuple[Tensor, Tensor]:
    """rgb (B, V, 3, H, W) and opacity (B, V, 1, H, W) of ``scene`` at ``cams``, in chunks of views."""
    parts = [model.render(scene, cams[:, i : i + RENDER_CHUNK]) for i in range(0, cams.shape[1], RENDER_CHUNK)]
    rgb = torch.cat([p["rgb"] for p in parts], 1).clamp(0, 1)
    return rgb, torch.cat([p["opacity"] for p in parts], 1).clamp(0, 1)


def _input_views(model, total_views: int, k: int) -> int:
    v_in = min(total_views, model.recipe.data.settings.views - model.recipe.train.heldout_views)
    if k >= v_in:
        raise VsdError(f"--cond-views {k} leaves no view to sample: the model takes {v_in} views per viewset")
    return v_in


# ---- which views an object is evaluated on -----------------------------------------------
@dataclass
class ViewPlan:
    """The views of one object an evaluation uses: ``clean`` (conditioning) and ``noisy`` views
    form the sampled viewset, in that order; ``targets`` are scored. ``positions``: the indices are
    view positions of the object (``dataset.load``), else views of the item ``dataset[i]``."""

    clean: list[int]
    noisy: list[int]
    targets: list[int]
    positions: bool = False

    @property
    def viewset(self) -> list[int]:
        return self.clean + self.noisy

    def record(self) -> dict:
        return {"clean": self.clean, "noisy": self.noisy, "scored": self.targets,
                "numbering": "object view positions" if self.positions else "views of the dataset item"}


def _object_name(dataset, index: int) -> str:
    ids = getattr(dataset, "object_ids", None)
    return f"object {ids[index]} (index {index})" if ids is not None else f"object {index}"


def protocol_views(dataset) -> dict:
    """What ``--protocol paper`` takes from this dataset (recorded in metrics.json settings)."""
    convention = getattr(dataset, "paper_views", None)
    if convention is not None:
        source, noisy = convention
        return {"clean": [int(source)], "noisy": [int(v) for v in noisy], "scored": f"every view of the object but view {source}",
                "numbering": "object view positions (sorted view files; SRN: the file number)",
                "source_view": f"the dataset's convention ({type(dataset).__name__}: view {source})"}
    return {"clean": [0], "noisy": list(PAPER_ITEM_NOISY), "scored": "every view of the item but view 0",
            "numbering": "views of the dataset item",
            "source_view": f"none defined by {type(dataset).__name__}: view 0 of each item is the clean view"}


def _paper_plan(dataset, index: int, item_views: int | None = None) -> ViewPlan:
    """``item_views``: V of the item ``dataset[index]``, for datasets without ``paper_views``."""
    convention = getattr(dataset, "paper_views", None)
    if convention is not None:
        source, noisy = int(convention[0]), [int(v) for v in convention[1]]
        n = dataset.num_views(index)
        missing = [v for v in [source, *noisy] if v >= n]
        if missing:
            raise ProtocolError(f"{_object_name(dataset, index)} has {n} views (0..{n - 1}), but --protocol paper takes view "
                                f"{source} as the clean (source) view and views {', '.join(map(str, noisy))} as the noisy "
                                f"ones: view {missing[0]} does not exist")
        return ViewPlan([source], noisy, [v for v in range(n) if v != source], positions=True)
    V = item_views
    if V < PAPER_VIEWSET:
        raise ProtocolError(f"{_object_name(dataset, index)} has {V} views per item (0..{V - 1}); --protocol paper takes view 0 "
                            f"clean and views {', '.join(map(str, PAPER_ITEM_NOISY))} noisy: view {PAPER_ITEM_NOISY[-1]} does "
                            f"not exist (data.views must be at least {PAPER_VIEWSET})")
    return ViewPlan([0], list(PAPER_ITEM_NOISY), list(range(1, V)))


def _default_plan(model, total_views: int, k: int) -> ViewPlan:
    v_in = _input_views(model, total_views, k)
    return ViewPlan(list(range(k)), list(range(k, v_in)), list(range(k, total_views)))


def object_views(dataset, index: int, cfg: EvalConfig, model, *, gallery: bool = False) -> tuple[ViewPlan, dict]:
    """The plan of object ``index`` and its views as an item dict: the viewset (clean, then noisy)
    followed by the scored views, or (``gallery``) only the first IDENTITY_VIEWS scored views."""
    full = None
    if cfg.paper and getattr(dataset, "paper_views", None) is not None:
        plan = _paper_plan(dataset, index)
    else:
        full = dataset[index]
        V = full["images"].shape[0]
        plan = _paper_plan(dataset, index, V) if cfg.paper else _default_plan(model, V, cfg.cond_views)
    views = plan.targets[:IDENTITY_VIEWS] if gallery else plan.viewset + plan.targets
    if full is None:
        return plan, dataset.load(index, views)
    return plan, {key: (v[views] if torch.is_tensor(v) else v) for key, v in full.items()}


@contextlib.contextmanager
def _protocol_sampler(model, cfg: EvalConfig):
    """Under ``--protocol paper`` the model samples with DDIM, eta 0 (restored afterwards)."""
    d = model.recipe.diffusion if cfg.paper else None
    if d is None or (d.sampler == "ddim" and d.eta == 0.0):
        yield
        return
    saved = model.recipe
    model.recipe = dataclasses.replace(saved, diffusion=d.model_copy(update={"sampler": "ddim", "eta": 0.0}))
    try:
        yield
    finally:
        model.recipe = saved


@torch.no_grad()
def evaluate_object(model, dataset, index: int, cfg: EvalConfig, *, features=None, lpips_net=None, gallery=None) -> dict:
    """Draw the samples of one viewset and return its result row (JSON-ready) and, in
    unconditional mode, its features under key ``"_features"``. ``gallery`` (conditional mode):
    the objects the first sample's reconstruction is matched against (identity)."""
    dev = next(model.parameters()).device
    plan, item = object_views(dataset, index, cfg, model)
    images = item["images"].to(dev)
    H, W = images.shape[-2], images.shape[-1]
    cams = Cameras(item["c2w"].to(dev), item["K"].to(dev), H, W)
    k, v_in = len(plan.clean), len(plan.viewset)
    target_cams = cams[v_in:]
    gt = ((images[v_in:] + 1) / 2).clamp(0, 1)
    masks = item.get("masks")
    mask = truth_mask(gt, None if masks is None else masks[v_in:].to(dev), model.background(1, dev)[0])
    n_total = 1 if model.recipe.train.deterministic else cfg.samples
    gen = torch.Generator().manual_seed(_object_seed(cfg.seed, index))
    acc = _Accumulator(gt, lpips_net, mask)
    gen_feats, input_psnr, identity = [], [], None
    done = 0
    while done < n_total:
        b = min(cfg.batch_size, n_total - done)
        cond = images[None, :k].expand(b, *images[:k].shape) if k else None
        pred = model.sample(_expand(cams[:v_in], b), cond, steps=cfg.sampler_steps(), guidance=cfg.sampler_guidance(),
                            generator=gen, fit_steps=cfg.fit_steps)
        renders, opacity = _render_targets(model, pred.scene, _expand(target_cams, b))
        acc.add(renders, opacity)
        if k:
            # the reconstruction seen from its own conditioning camera(s), against the input
            at_input, _ = _render_targets(model, pred.scene, _expand(cams[:k], b))
            input_psnr += psnr(at_input, ((cond + 1) / 2).clamp(0, 1)).mean(1).tolist()
            if gallery is not None and identity is None:
                identity = identity_scores(model, pred.scene, b, gallery)
        if features is not None:
            gen_feats.append(_features(features, renders.flatten(0, 1)))
        done += b
    row = _row(dataset, index, cams, k, acc)
    if cfg.paper:
        row["views"] = plan.record()
    if k:
        row["input_view_psnr"] = [round(x, 4) for x in input_psnr]
        row["colour"] = {"true": acc.true_colour(), "pred": torch.cat(acc.colours).tolist()}
        row["identity_psnr"] = identity
    if features is not None:
        row["_features"] = {"generated": torch.cat(gen_feats), "reference": _features(features, gt)}
    return row


def _features(nets: nn.Module, images: Tensor) -> Tensor:
    """Both feature sets side by side: (N, 256 + 54), random-conv first."""
    return torch.cat([nets(images).cpu(), pixel_features(images).cpu()], 1)


def _row(dataset, index: int, cams: Cameras, k: int, acc: _Accumulator) -> dict:
    frames = acc.per_frame()
    ids = getattr(dataset, "object_ids", None)
    row = {
        "index": index,
        "id": ids[index] if ids is not None else str(index),
        "target_views": int(acc.gt.shape[0]),
        "samples": acc.n,
        "diversity": diversity(pairwise_distance(acc.total, acc.total_sq, acc.n)),
        "ambiguity": ambiguity(dataset, index, cams.c2w[:k]),
    }
    if k:
        row["per_frame"] = {name: [[round(x, 5) for x in s] for s in v.tolist()] for name, v in frames.items()}
        row["averaged_sample"] = acc.averaged()
    return row


# ---- results files -------------------------------------------------------------------------
def read_results(path: Path) -> tuple[dict | None, dict[int, dict]]:
    """The settings header and finished rows of a results.jsonl (a torn last line is dropped)."""
    if not path.exists():
        return None, {}
    text = path.read_text()
    if text and not text.endswith("\n"):  # killed mid-write: keep whole lines only
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    header, rows = None, {}
    for line in text.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "settings" in rec:
            header = rec["settings"]
        else:
            rows[int(rec["index"])] = rec
    return header, rows


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _check_header(path: Path, header: dict | None, fingerprint: dict) -> None:
    if header is None:
        _append(path, {"settings": fingerprint})
        return
    stored = json.loads(json.dumps(fingerprint))
    header = {"protocol": "default", **header}  # results written before protocols existed
    diff = sorted(k for k in set(header) | set(stored) if header.get(k) != stored.get(k))
    if diff:
        what = ", ".join(f"{k}: {header.get(k)!r} there vs {stored.get(k)!r} now" for k in diff)
        raise VsdError(f"{path} holds results of a different evaluation ({what}); choose another --out or delete it")


def _save_features(out: Path, index: int, feats: dict) -> str:
    rel = Path("features") / f"{index:06d}.npz"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    tmp = out / rel.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v.numpy().astype(np.float32) for k, v in feats.items()})
    os.replace(tmp, out / rel)
    return str(rel)


def evaluate(model, dataset, out_dir: str | Path, cfg: EvalConfig, *, checkpoint: dict | None = None, quiet: bool = False) -> dict:
    """Evaluate ``model`` on ``dataset`` into ``out_dir`` (resuming what is there) and write
    metrics.json, metrics.csv and metrics.md. Returns the contents of metrics.json."""
    from ..core.runlock import RunLock

    with RunLock(out_dir, hint="wait for that evaluation to finish, or choose another --out", quiet=quiet):
        return _evaluate(model, dataset, Path(out_dir), cfg, checkpoint=checkpoint, quiet=quiet)


def _evaluate(model, dataset, out: Path, cfg: EvalConfig, *, checkpoint: dict | None, quiet: bool) -> dict:
    model.eval()
    cfg.check(model)
    dev = next(model.parameters()).device
    n_obj = len(dataset) if cfg.objects is None else min(cfg.objects, len(dataset))
    uncond = cfg.cond_views == 0
    lpips_net, lpips_status = (None, "not computed: unconditional evaluation") if uncond else load_lpips(cfg.lpips_weights, dev)
    fp = cfg.fingerprint(model, checkpoint or {}) | {"lpips": lpips_net is not None}
    if cfg.paper:
        fp["protocol_views"] = protocol_views(dataset)
        if getattr(dataset, "paper_views", None) is not None:
            for j in range(n_obj):  # every object has the protocol's views (listing files only), before anything is written
                _paper_plan(dataset, j)
    header, rows = read_results(out / RESULTS)
    _check_header(out / RESULTS, header, fp)
    features = RandomConvFeatures().to(dev) if uncond else None
    todo = [i for i in range(n_obj) if i not in rows]
    gallery = build_gallery(dataset, n_obj, cfg, model, model.background(1, dev)[0], dev) if todo and not uncond else None
    with _protocol_sampler(model, cfg), Progress("eval", n_obj, unit="objects", done=n_obj - len(todo), quiet=quiet or not todo) as bar:
        for i in todo:
            row = evaluate_object(model, dataset, i, cfg, features=features, lpips_net=lpips_net, gallery=gallery)
            if "_features" in row:
                row["features"] = _save_features(out, i, row.pop("_features"))
            row["lpips"] = lpips_status
            _append(out / RESULTS, row)
            rows[i] = row
            bar.advance()
    done = [rows[i] for i in range(n_obj)]
    summary = summarize(done, fp, lpips_status, out)
    write_outputs(out, summary, done)
    return summary


# ---- summaries -----------------------------------------------------------------------------
def object_metrics(row: dict) -> dict:
    """Per-object best-of-n / mean / averaged-sample metrics from a conditional result row."""
    frames = {k: torch.tensor(v) for k, v in row["per_frame"].items()}
    n = frames["psnr"].shape[0]
    return {
        "best_of": {str(c): best_of(frames, c) for c in best_of_counts(n)},
        "mean_over_samples": mean_over_samples(frames),
        "averaged_sample": row["averaged_sample"],
    }


def _mean_dicts(dicts: list[dict]) -> dict:
    """Key-wise mean of (nested) dicts of numbers; None values are left out of the mean."""
    out = {}
    for key in dicts[0]:
        vals = [d[key] for d in dicts if d.get(key) is not None]
        if not vals:
            out[key] = None
        elif isinstance(vals[0], dict):
            out[key] = _mean_dicts(vals)
        else:
            out[key] = float(np.mean(vals))
    return out


def fidelity(rows: list[dict]) -> dict | None:
    """Whether reconstructions reproduce *their* input (conditional rows; see FIDELITY_NOTE)."""
    rows = [r for r in rows if "colour" in r]
    if not rows:
        return None
    out: dict = {"input_view_psnr": float(np.mean([np.mean(r["input_view_psnr"]) for r in rows]))}
    scored = [r for r in rows if r.get("identity_psnr")]
    if scored:
        # candidates: the objects every row was matched against (a resumed evaluation with more
        # objects matched its earlier rows against fewer)
        m = min(len(r["identity_psnr"]) for r in scored)
        own = [r for r in scored if r["index"] < m]
        hits = [int(np.argmax(r["identity_psnr"][:m])) == r["index"] for r in own]
        out["identity"] = {"accuracy": float(np.mean(hits)) if hits else None, "chance": 1.0 / m, "objects": len(own), "candidates": m}
    true = np.array([r["colour"]["true"] for r in rows])
    pred = np.array([r["colour"]["pred"] for r in rows])  # (objects, samples, 3)
    spread_true = float(np.sqrt(true.var(0).mean()))
    spread_pred = float(np.sqrt(pred[:, 0].var(0).mean())) if len(rows) > 1 else 0.0
    out["colour"] = {
        "error": float(np.linalg.norm(pred - true[:, None], axis=-1).mean()),
        "spread_true": spread_true,
        "spread_pred": spread_pred,
        "spread_ratio": spread_pred / spread_true if spread_true > 0 else None,
    }
    return out


def _group_summary(rows: list[dict], conditional: bool) -> dict | None:
    if not rows:
        return None
    out = {"objects": len(rows)}
    if conditional:
        out |= _mean_dicts([object_metrics(r) for r in rows])
        out["fidelity"] = fidelity(rows)
    divs = [r["diversity"] for r in rows if r["diversity"] is not None]
    out["diversity"] = _mean_dicts(divs) if divs else None
    return out


def _groups(rows: list[dict]) -> dict:
    groups = {"all": rows}
    if rows and all(r["ambiguity"] is not None for r in rows):
        groups["ambiguous"] = [r for r in rows if r["ambiguity"]["ambiguous"]]
        groups["unambiguous"] = [r for r in rows if not r["ambiguity"]["ambiguous"]]
    return groups


def _kid(rows: list[dict], out: Path) -> dict:
    gen, ref = [], []
    for r in rows:
        with np.load(out / r["features"]) as f:
            gen.append(f["generated"])
            ref.append(f["reference"])
    gen_t, ref_t = torch.from_numpy(np.concatenate(gen)), torch.from_numpy(np.concatenate(ref))
    split = RandomConvFeatures().convs[-1].out_channels * 2
    res = {"generated_images": int(gen_t.shape[0]), "reference_images": int(ref_t.shape[0])}
    for name, sl in (("random_conv", slice(0, split)), ("pixel_stats", slice(split, None))):
        try:
            res[name] = kernel_distance(gen_t[:, sl], ref_t[:, sl])
        except ValueError as exc:
            res[name] = f"unavailable: {exc}"
    return res


KID_NOTE = (
    "KID = unbiased MMD^2, polynomial kernel (x.y/d + 1)^3, between renders of unconditional samples and "
    "ground-truth renders of the same viewsets. random_conv: features of a fixed, seeded, randomly initialised "
    "3-layer conv net (no pretrained weights); pixel_stats: channel mean/std + 4x4 thumbnail. Comparable only "
    "between vsd evaluations, not with published KID/FID."
)
AMBIGUITY_NOTE = (
    "the dataset says the torso's back differs from its front (describe()['back_differs']) and the "
    "conditioning views show at most one of the two (front: camera z > 0, the character faces +z; back: z < 0)"
)
FIDELITY_NOTE = (
    "input_view_psnr: the reconstruction rendered at its conditioning camera(s) against the input (mean over samples); "
    "fg_psnr / fg_ssim: scored only on pixels where the true or the predicted object is (render opacity > 0.5); "
    "identity: the first sample's reconstruction rendered at the first target views of every evaluated object and scored "
    "by foreground PSNR against each one's truth; identified when its own object scores best (chance = 1 / candidates); "
    "colour: mean colour over the object's silhouette in the target views; error = RGB distance to the truth's "
    "(mean over samples), spread = RMS over objects of its deviation from the mean colour (first sample; a model that "
    "paints every object alike has spread near 0; spread_ratio = predicted / true)"
)
def protocol_note(settings: dict) -> str:
    """One line saying what ``--protocol paper`` did (from metrics.json settings)."""
    pv = settings["protocol_views"]
    return (f"paper: 1 clean view ({pv['clean'][0]}) + {len(pv['noisy'])} noisy views ({', '.join(map(str, pv['noisy']))}), "
            f"{pv['numbering']}; scored: {pv['scored']}; source view: {pv['source_view']}; {settings['sampler']}, "
            f"{settings['steps']} steps, guidance {settings['guidance']}, {settings['samples']} samples per object")


BEST_OF_NOTE = "best of n = per object, the sample among the first n with the highest PSNR averaged over its target views"


def summarize(rows: list[dict], fingerprint: dict, lpips_status: str, out: Path) -> dict:
    conditional = fingerprint["cond_views"] > 0
    summary = {
        "kind": "conditional" if conditional else "unconditional",
        "settings": fingerprint,
        "lpips": lpips_status,
        "objects": len(rows),
        "groups": {name: _group_summary(g, conditional) for name, g in _groups(rows).items()},
    }
    if conditional:
        summary["notes"] = {"best_of": BEST_OF_NOTE, "averaged_sample": "metrics of the pixel mean of the samples' renders",
                            "diversity": "mean over sample pairs of squared pixel distance on the target views (psnr from it)",
                            "fidelity": FIDELITY_NOTE}
        if fingerprint.get("protocol") == "paper":
            summary["notes"]["protocol"] = protocol_note(fingerprint)
        if "ambiguous" in summary["groups"]:
            summary["notes"]["ambiguous"] = AMBIGUITY_NOTE
        else:
            summary["notes"]["ambiguous"] = "not available: the dataset does not describe which objects are ambiguous"
    else:
        summary["kid"] = _kid(rows, out) if rows else None
        summary["notes"] = {"kid": KID_NOTE}
    return summary


def _fmt(x, digits: int = 3) -> str:
    """Fixed-point with ``digits`` decimals; a float that would print as zero keeps 3 significant digits."""
    if not isinstance(x, float):
        return "" if x is None else str(x)
    fixed = f"{x:.{digits}f}"
    return f"{x:.3g}" if x != 0 and float(fixed) == 0 else fixed


def csv_rows(summary: dict, rows: list[dict]) -> list[dict]:
    """One flat dict per object for metrics.csv / the markdown table."""
    table = []
    has_lpips = summary["lpips"].startswith("available")
    for r in rows:
        flat = {"index": r["index"], "id": r["id"], "samples": r["samples"], "target_views": r["target_views"]}
        if r["ambiguity"] is not None:
            flat["ambiguous"] = r["ambiguity"]["ambiguous"]
            flat["cond_azimuth_deg"] = " ".join(map(str, r["ambiguity"]["cond_azimuth_deg"]))
        if "per_frame" in r:
            m = object_metrics(r)
            n = max(m["best_of"], key=int)
            for name in ("psnr", "ssim", "fg_psnr", "fg_ssim") + (("lpips",) if has_lpips else ()):
                flat[f"{name}_best_of_{n}"] = m["best_of"][n][name]
                flat[f"{name}_mean"] = m["mean_over_samples"][name]
                flat[f"{name}_averaged_sample"] = m["averaged_sample"][name]
            if not has_lpips:
                flat["lpips"] = "unavailable"
        if "input_view_psnr" in r:
            flat["input_view_psnr"] = float(np.mean(r["input_view_psnr"]))
            if r.get("identity_psnr"):
                flat["identified"] = int(np.argmax(r["identity_psnr"])) == r["index"]
            flat["colour_error"] = float(np.mean(np.linalg.norm(np.array(r["colour"]["pred"]) - np.array(r["colour"]["true"]), axis=-1)))
        if r["diversity"] is not None:
            flat["pairwise_mse"] = r["diversity"]["pairwise_mse"]
            flat["pairwise_psnr"] = r["diversity"]["pairwise_psnr"]
        table.append(flat)
    return table


def summary_table(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) tables of a metrics.json summary, for markdown and HTML."""
    tables = []
    if summary["kind"] == "unconditional":
        kid = summary.get("kid") or {}
        tables.append(("Kernel distance (unconditional)", ["features", "KID"], [[k, _fmt(kid.get(k), 5)] for k in ("random_conv", "pixel_stats")]))
        return tables
    header = ["group", "objects", "metric"]
    rows = []
    groups = {k: v for k, v in summary["groups"].items() if v}
    first = next(iter(groups.values()))
    counts = list(first["best_of"])
    header += [f"best of {c}" for c in counts] + ["mean", "averaged sample"]
    for gname, g in groups.items():
        for metric in ("psnr", "ssim", "fg_psnr", "fg_ssim", "lpips"):
            if metric == "lpips" and not summary["lpips"].startswith("available"):
                rows.append([gname, str(g["objects"]), "lpips"] + ["unavailable"] * (len(counts) + 2))
                continue
            vals = [g["best_of"][c][metric] for c in counts] + [g["mean_over_samples"][metric], g["averaged_sample"][metric]]
            rows.append([gname, str(g["objects"]), metric] + [_fmt(v) for v in vals])
    tables.append(("Reconstruction of target views", header, rows))
    fid = [[gname, str(g["objects"])] + fidelity_cells(g["fidelity"]) for gname, g in groups.items() if g.get("fidelity")]
    if fid:
        tables.append(("Fidelity to the input", FIDELITY_HEADER, fid))
    div = [[gname, str(g["objects"]), _fmt(g["diversity"]["pairwise_mse"], 5), _fmt(g["diversity"]["pairwise_psnr"], 2)]
           for gname, g in groups.items() if g.get("diversity")]
    if div:
        tables.append(("Diversity between samples (target views)", ["group", "objects", "pairwise MSE", "pairwise PSNR"], div))
    return tables


FIDELITY_HEADER = ["group", "objects", "input-view PSNR", "identity accuracy", "chance", "colour error", "colour spread (pred / true)"]


def fidelity_cells(f: dict) -> list[str]:
    ident = f.get("identity") or {}
    c = f["colour"]
    acc = ident.get("accuracy")
    return [_fmt(f["input_view_psnr"], 2), "" if acc is None else f"{acc:.2f} ({round(acc * ident['objects'])}/{ident['objects']})",
            _fmt(ident.get("chance"), 3), _fmt(c["error"], 3), f"{_fmt(c['spread_pred'], 3)} / {_fmt(c['spread_true'], 3)}"]


def markdown_table(header: list[str], rows: list[list]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(_fmt(c)) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: Path, summary: dict, rows: list[dict]) -> None:
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    flat = csv_rows(summary, rows)
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)
    parts = [f"# Evaluation ({summary['kind']}, split {summary['settings']['split']}, {summary['objects']} objects)", "",
             f"LPIPS: {summary['lpips']}", ""]
    if summary["settings"].get("protocol") == "paper":
        st = summary["settings"]
        parts += ["## Settings", ""] + [f"- {k}: {json.dumps(st[k])}" for k in
                                         ("protocol", "protocol_views", "steps", "sampler", "guidance", "samples", "cond_views", "seed") if k in st] + [""]
    parts += [f"- {k}: {v}" for k, v in summary["notes"].items()] + [""]
    for title, header, trows in summary_table(summary):
        parts += [f"## {title}", "", markdown_table(header, trows), ""]
    if flat:
        parts += ["## Per object", "", markdown_table(fields, [[r.get(f) for f in fields] for r in flat]), ""]
    (out / "metrics.md").write_text("\n".join(parts))


# ---- entry point ---------------------------------------------------------------------------
def default_out_dir(checkpoint: Path, split: str, cond_views: int, protocol: str = "default") -> Path:
    path = Path(checkpoint)
    tail = "paper" if protocol == "paper" else f"cond{cond_views}"
    if path.suffix == ".safetensors" and path.name == "model.safetensors":  # a shipped model
        return Path("runs") / "eval" / f"{path.parent.name}_{split}_{tail}"
    run = path if path.is_dir() else (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    return run / f"eval_{split}_{tail}"


def run_eval(checkpoint: str | Path, cfg: EvalConfig, out_dir: str | Path | None = None, *, device: str = "auto", quiet: bool = False) -> tuple[dict, Path]:
    """Load a checkpoint (EMA weights), build its recipe's dataset split and evaluate."""
    from ..core.checkpoint import load_checkpoint, model_from_state
    from ..core.distributed import select_device
    from .pretrained import resolve

    checkpoint = resolve(checkpoint)
    state = load_checkpoint(checkpoint)
    model = model_from_state(state)
    recipe = model.recipe
    model = model.to(select_device(device if device != "auto" else recipe.device)).eval()
    try:
        dataset = recipe.data.build(split=cfg.split)
        views = getattr(recipe.data.settings, "views", None)
        if cfg.paper and getattr(dataset, "paper_views", None) is None and views is not None and views < PAPER_VIEWSET:
            # the protocol's viewset needs 4 views of each item: view 0 clean, views 1, 2, 3 noisy
            dataset = recipe.data.cls(recipe.data.settings.model_copy(update={"views": PAPER_VIEWSET}), split=cfg.split)
    except ValueError as exc:
        raise VsdError(f"cannot build the {cfg.split!r} split of {recipe.data.type}: {exc}") from None
    out = Path(out_dir) if out_dir else default_out_dir(Path(checkpoint), cfg.split, cfg.cond_views, cfg.protocol)
    meta = {"path": str(Path(state["path"]).resolve()), "step": int(state["step"])}
    return evaluate(model, dataset, out, cfg, checkpoint=meta, quiet=quiet), out
