"""Loading a trained model and drawing samples from it (``vsd-run sample``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .cameras import Cameras, spherical_to_cartesian
from .checkpoint import info_from_dict, load_checkpoint, recipe_from_state
from .engine import Prediction, ViewsetDiffusion
from .media import load_image, save_grid, save_video
from .recipe import load_recipe_dict
from .training import render_turntable, select_device


def load_model(checkpoint: str | Path, device: str = "auto", ema: bool = True) -> ViewsetDiffusion:
    """The model of a checkpoint (its EMA weights by default), in eval mode."""
    state = load_checkpoint(checkpoint)
    recipe = load_recipe_dict(recipe_from_state(state), source=f"{state['path']} (embedded recipe)")
    model = ViewsetDiffusion(recipe, info_from_dict(state["info"]))
    model.load_state_dict(state["ema" if ema else "model"])
    return model.to(select_device(device if device != "auto" else recipe.device)).eval()


def ring_cameras(model: ViewsetDiffusion, n: int, batch: int, *, azimuth0: float = 0.0, elevation: float = 0.0, size: int | None = None) -> Cameras:
    """(batch, n) cameras evenly spaced in azimuth around the object, the first at ``azimuth0``
    (degrees; 0 looks at the object's front), at the dataset's radius and field of view."""
    info = model.info
    size = size or model.recipe.data.settings.image_size
    az = torch.deg2rad(torch.tensor(azimuth0)) + torch.arange(n) * (2 * math.pi / n)
    el = torch.full_like(az, math.radians(elevation))
    cams = Cameras.look_at(
        spherical_to_cartesian(az, el, info.camera_radius, info.up_axis),
        up=(0.0, 1.0, 0.0) if info.up_axis == "y" else (0.0, 0.0, 1.0),
        fov_deg=info.fov_deg, height=size, width=size,
    )
    dev = next(model.parameters()).device
    return Cameras(cams.c2w[None].expand(batch, n, 4, 4).to(dev), cams.K[None].expand(batch, n, 4).to(dev), size, size)


def sample_to_files(
    model: ViewsetDiffusion,
    out_dir: str | Path,
    *,
    input_image: str | Path | None = None,
    num_samples: int = 4,
    views: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    elevation: float = 0.0,
) -> dict:
    """Draw ``num_samples`` viewsets (conditioned on ``input_image`` seen from the front, or
    unconditional) and write their views as a PNG grid and their 3D objects as turntables."""
    out = Path(out_dir)
    V = views or (model.recipe.data.settings.views - model.recipe.train.heldout_views)
    cond = None
    if input_image is not None:
        V = max(V, 2)
        img = load_image(input_image, model.recipe.data.settings.image_size)
        cond = img[None, None].expand(num_samples, 1, *img.shape).to(next(model.parameters()).device)
    cams = ring_cameras(model, V, num_samples, elevation=elevation)
    gen = torch.Generator().manual_seed(seed)
    pred: Prediction = model.sample(cams, cond, steps=steps, guidance=guidance, generator=gen)
    files = {"views": save_grid(((pred.x0 + 1) / 2).cpu(), out / "samples.png", upscale=2)}
    frames = render_turntable(model, pred.scene, num_samples)
    files["turntable"] = save_video(torch.cat(list(frames), dim=-1), out / "turntable.gif", upscale=2)
    return files
