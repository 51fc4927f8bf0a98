"""Refining one sampled object into a free-standing, higher-resolution hash grid (``vsd-run refine``).

The denoiser's output is limited by its volume size. A sampled object can be rendered from many
cameras and those renders distilled into one object's own hash encoding + MLP, fitted with the
volume renderer, at a resolution the denoiser never had; the result is written as a turntable
and a mesh.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from ..core.cameras import Cameras
from ..core.contracts import Field
from ..core.engine import ViewsetDiffusion
from ..core.progress import Progress
from ..core.settings import Settings
from ..renderers.volume import VolumeRenderer
from ..representations.hash_grid import density_from_raw, free_hash_encoding
from ..representations.triplane import mlp
from .export import export_mesh, field_to_mesh
from .media import save_grid, save_video


class RefineSettings(Settings):
    """How one object is refitted: the free hash grid's sizes, the target views, the optimiser."""

    levels: int = 16
    features_per_level: int = 2
    log2_table_size: int = 15
    min_resolution: int = 16
    max_resolution: int = 128
    hidden: int = 64
    layers: int = 2
    density_bias: float = -6.0  # fine cells are many: start nearly transparent across the cube
    views: int = 24  # target views, split evenly over the elevations
    elevations: tuple[float, ...] = (0.0, 30.0)
    size: int = 64  # target render size (pixels)
    samples: int = 64  # volume-renderer samples per ray while fitting and rendering
    steps: int = 300
    rays_per_step: int = 4096
    lr: float = 1e-2
    opacity_weight: float = 0.1  # opacity is supervised too: it separates white objects from a white background
    implementation: Literal["auto", "torch", "tcnn"] = "auto"


class FreeHashField(nn.Module, Field):
    """One object's radiance field: a learnable hash encoding + MLP (batch size 1).

    ``query(points (1, N, 3)) -> sigma (1, N), rgb (1, N, 3)``; density follows the
    representations' convention with the finest level's cell as the unit. With
    ``implementation`` tcnn (CUDA) only the encoding runs on tiny-cuda-nn; the small decoder
    stays a torch MLP, so both paths share everything but the table lookup.
    """

    batch_size = 1

    def __init__(self, settings: RefineSettings, bound: float, device: torch.device):
        nn.Module.__init__(self)
        s = settings
        self.bound = bound
        self.encoding = free_hash_encoding(
            s.implementation, device, levels=s.levels, features_per_level=s.features_per_level,
            log2_table_size=s.log2_table_size, min_resolution=s.min_resolution,
            max_resolution=s.max_resolution, bound=bound,
        )
        self.decoder = mlp(self.encoding.out_features, s.hidden, s.layers, 4).to(device)
        with torch.no_grad():
            self.decoder[-1].bias[0] = s.density_bias
        self.density_unit = s.max_resolution / (2 * bound)

    @property
    def device(self) -> torch.device:
        return self.decoder[-1].weight.device

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        raw = self.decoder(self.encoding(points))
        inside = (points.abs() <= self.bound).all(-1)
        sigma = density_from_raw(raw[..., 0], "softplus", self.density_unit)
        return sigma * inside, torch.sigmoid(raw[..., 1:])


def target_cameras(model: ViewsetDiffusion, settings: RefineSettings) -> Cameras:
    """(1, V) ring cameras over the elevations; each ring is turned by half a step from the last."""
    E = len(settings.elevations)
    per = max(1, settings.views // E)
    from .pipeline import Pipeline

    pipe = Pipeline(model)
    rings = [pipe.orbit(per, azimuth0=i * 180.0 / (per * E), elevation=e, size=settings.size) for i, e in enumerate(settings.elevations)]
    dev = next(model.parameters()).device
    return Cameras(torch.cat([c.c2w for c in rings])[None].to(dev), torch.cat([c.K for c in rings])[None].to(dev), settings.size, settings.size)


@torch.no_grad()
def render_views(render: Callable, scene, cameras: Cameras, chunk: int = 8) -> dict:
    """``render(scene, cameras)`` a few views at a time -> rgb (B, V, 3, H, W), opacity (B, V, 1, H, W)."""
    outs = [render(scene, cameras[:, i : i + chunk]) for i in range(0, cameras.shape[1], chunk)]
    return {k: torch.cat([o[k] for o in outs], 1) for k in ("rgb", "opacity")}


@dataclass
class RefineResult:
    field: FreeHashField
    targets: dict  # rgb (1, V, 3, H, W), opacity (1, V, 1, H, W) of the sampled object
    cameras: Cameras
    loss_before: float  # photometric MSE over all target pixels
    loss_after: float
    history: list[float] = dc_field(default_factory=list)  # the training loss per step


def photometric_loss(renderer: VolumeRenderer, field: Field, cameras: Cameras, targets: dict, background: Tensor) -> float:
    """Mean squared RGB error of ``field`` rendered (deterministically) at all target views."""
    was = renderer.training
    renderer.eval()
    out = render_views(lambda s, c: renderer(s, c, background), field, cameras)
    renderer.train(was)
    return float(((out["rgb"] - targets["rgb"]) ** 2).mean())


def refine_scene(
    model: ViewsetDiffusion,
    scene,
    settings: RefineSettings | None = None,
    *,
    index: int = 0,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RefineResult:
    """Fit a free hash grid to object ``index`` of ``scene`` (a representation's output) rendered
    by ``model`` at :func:`target_cameras`, for ``settings.steps`` Adam steps on random rays."""
    s = settings or RefineSettings()
    dev = next(model.parameters()).device
    gen = generator or torch.Generator().manual_seed(0)
    cams = target_cameras(model, s)
    one = _select(scene, index)
    bg = model.background(1, dev)
    targets = render_views(lambda sc, c: model.render(sc, c, bg), one, cams)

    field = FreeHashField(s, model.info.bound, dev)
    renderer = VolumeRenderer(VolumeRenderer.Settings(samples=s.samples, implementation="torch")).to(dev)
    origins, dirs = (x.reshape(1, -1, 3) for x in cams.rays())
    rgb_t = targets["rgb"].permute(0, 1, 3, 4, 2).reshape(1, -1, 3)
    op_t = targets["opacity"].reshape(1, -1)
    before = photometric_loss(renderer, field, cams, targets, bg)

    opt = torch.optim.Adam(field.parameters(), lr=s.lr, betas=(0.9, 0.99), eps=1e-15)
    renderer.train()
    history = []
    for step in range(s.steps):
        idx = torch.randint(0, origins.shape[1], (min(s.rays_per_step, origins.shape[1]),), generator=gen).to(dev)
        rgb, _, opacity = renderer.render_rays(field, origins[:, idx], dirs[:, idx], bg, "torch")
        loss = ((rgb - rgb_t[:, idx]) ** 2).mean() + s.opacity_weight * ((opacity - op_t[:, idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if progress is not None:
            progress(step + 1, s.steps)
    after = photometric_loss(renderer, field, cams, targets, bg)
    return RefineResult(field, targets, cams, before, after, history)


def _select(scene, index: int):
    """Object ``index`` of a representation's output, as a batch of one."""
    if isinstance(scene, (list, tuple)):
        return [scene[index]]
    if scene.batch_size == 1:
        return scene
    return _OneOf(scene, index)


class _OneOf(Field):
    """Object ``index`` of a batched field, seen as a field of batch size 1."""

    batch_size = 1

    def __init__(self, field: Field, index: int):
        self.field, self.index = field, index
        self.bound, self.device = field.bound, field.device

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        B = self.field.batch_size
        sigma, rgb = self.field.query(points.expand(B, -1, -1).contiguous())
        return sigma[self.index : self.index + 1], rgb[self.index : self.index + 1]


@torch.no_grad()
def field_turntable(model: ViewsetDiffusion, field: Field, renderer: VolumeRenderer, frames: int, size: int) -> Tensor:
    """(F, 3, S, S) renders of a one-object field from the model's turntable circle."""
    s, info = model.recipe.sample, model.info
    cams = Cameras.orbit(frames, info.camera_radius, s.turntable_elevation, fov_deg=info.fov_deg, height=size, width=size, up_axis=info.up_axis)
    cams = cams.reshape(1, frames).to(field.device)
    bg = model.background(1, field.device)
    renderer.eval()
    return render_views(lambda sc, c: renderer(sc, c, bg), field, cams)["rgb"][0].cpu()


def refine_to_files(
    model: ViewsetDiffusion,
    out_dir: str | Path,
    settings: RefineSettings | None = None,
    *,
    input_image: str | Path | None = None,
    camera: str | Path | None = None,
    seed: int = 0,
    sample_steps: int | None = None,
    guidance: float | None = None,
    mesh_format: str = "glb",
    mesh_resolution: int = 128,
    threshold: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    quiet: bool = False,
) -> dict:
    """Sample one object (conditioned on ``input_image``, seen from the JSON ``camera`` file or
    else from the front, or not), refine it, and write
    views.png (targets above refined renders), turntable.gif and a mesh. Returns the files and
    the photometric loss before and after. The sampling and the refinement show their progress
    on stderr unless ``quiet``; ``progress(i, n)`` is called after each refinement step too."""
    s = settings or RefineSettings()
    out = Path(out_dir)
    from .sampling import sample

    pred = sample(model, input_image=input_image, camera=camera, num_samples=1, seed=seed, steps=sample_steps, guidance=guidance, progress=not quiet)
    with Progress("refine", s.steps, quiet=quiet) as bar:
        def step_done(i: int, n: int) -> None:
            bar.update(i, total=n)
            if progress is not None:
                progress(i, n)

        result = refine_scene(model, pred.scene, s, generator=torch.Generator().manual_seed(seed), progress=step_done)
    renderer = VolumeRenderer(VolumeRenderer.Settings(samples=s.samples, implementation="torch")).to(result.field.device).eval()
    bg = model.background(1, result.field.device)
    shown = result.cameras[:, : min(8, result.cameras.shape[1])]
    refined = render_views(lambda sc, c: renderer(sc, c, bg), result.field, shown)["rgb"]
    rows = torch.cat([result.targets["rgb"][:, : shown.shape[1]], refined]).cpu()
    files = {"views": save_grid(rows, out / "views.png", upscale=2)}
    frames = field_turntable(model, result.field, renderer, model.recipe.sample.turntable_frames, s.size)
    files["turntable"] = save_video(frames, out / "turntable.gif", upscale=2)
    mesh = field_to_mesh(result.field, 0, mesh_resolution, threshold, min_component_ratio=0.02)
    files["mesh"] = export_mesh(mesh, out / f"refined.{mesh_format}", mesh_format)
    return {"files": files, "loss_before": result.loss_before, "loss_after": result.loss_after}
