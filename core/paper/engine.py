"""The paper's network as a vsd model: a recipe with a ``paper`` section builds
:class:`PaperViewsetDiffusion`, which trains with vsd's training loop and loss, and samples with the
original's DDIM loop (:func:`~vsd.core.paper.sampling.sample_paper`), so that sampling, evaluation,
turntables, meshes and the Python API work on the released weights as on any vsd model."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..cameras import Cameras
from ..contracts import SceneInfo
from ..contracts.representation import Field
from ..engine import Prediction, ViewsetDiffusion
from ..errors import RecipeError
from ..recipe import Recipe
from ..schedule import NoiseSchedule
from .geometry import PaperVolume
from .model import PaperDenoiser
from .recipe import paper_settings
from .render import DENSITY_SHIFT, color_activation, inside_volume, render_paper, sample_volume
from .sampling import PaperDiffusion, sample_paper


class PaperScene(Field):
    """The raw voxel volumes of a batch of paper-model reconstructions, ``density: (B, 1, R, R, R)``
    and ``color: (B, 3, R, R, R)``, as a vsd :class:`Field` (for meshes): density
    ``softplus(raw * gain - 6)`` and colour ``sigmoid(raw) * 1.002 - 0.001`` as the renderer
    activates them; zero density outside the scene box."""

    def __init__(self, density: Tensor, color: Tensor, volume: PaperVolume, gain: float):
        self.density, self.color, self.volume, self.gain = density, color, volume, gain
        side = density.shape[-1]
        self.bound = float((volume.half_size(side) + torch.tensor(volume.offsets).abs()).max())
        self.batch_size, self.device = density.shape[0], density.device

    def __getitem__(self, index: int) -> "PaperScene":
        return PaperScene(self.density[index : index + 1], self.color[index : index + 1], self.volume, self.gain)

    def query(self, points: Tensor) -> tuple[Tensor, Tensor]:
        local = self.volume.to_local(points, self.density.shape[-1])
        sigma = F.softplus(sample_volume(self.density, local)[..., 0] * self.gain - DENSITY_SHIFT) * inside_volume(local)
        rgb = color_activation(sample_volume(self.color, local)).clamp(0, 1)
        return sigma, rgb


class PaperViewsetDiffusion(ViewsetDiffusion):
    """The released network (:class:`PaperDenoiser`) with vsd's training and the original's sampling.

    Training is vsd's (:meth:`ViewsetDiffusion.training_loss`: the recipe's clean-view counts,
    held-out views, self-conditioning and loss weights), on the original's noise schedule. Sampling
    is the original's loop, so imported checkpoints sample as they did in the original code.
    """

    def __init__(self, recipe: Recipe, info: SceneInfo):
        nn.Module.__init__(self)
        self.recipe, self.info = recipe, info
        self.paper_config, self.paper_diffusion = paper_settings(recipe.paper, recipe.source)
        fov = self.paper_config.fov_deg
        if fov is not None and not math.isclose(info.fov_deg, fov, rel_tol=1e-3):
            raise RecipeError(recipe.source, "paper.render.fov", f"is {fov} degrees, but the data's cameras have a "
                              f"field of view of {info.fov_deg} degrees; the original always renders at render.fov")
        self.denoiser = PaperDenoiser(self.paper_config)
        d = recipe.diffusion
        self.schedule = NoiseSchedule(kind=d.schedule, num_train_timesteps=d.timesteps)

    def scene(self, density: Tensor, color: Tensor) -> PaperScene:
        return PaperScene(density, color, self.paper_config.volume, self.paper_config.render.gain)

    def background(self, batch: int, device) -> Tensor:
        """The original's background (white for SRN and Minens, CO3D's ``data.white_background``)."""
        return torch.full((batch, 3), float(self.paper_config.background), device=device)

    def regulariser(self, volume: Tensor):
        return None

    def predict(self, images: Tensor, cameras: Cameras, timesteps: Tensor, self_cond: Tensor | None,
                render_cameras: Cameras | None = None, background: Tensor | None = None) -> Prediction:
        # (without self-conditioning the network has no channel for it; a missing input is zeros)
        sc = self_cond if self.paper_config.self_condition else None
        density, color = self.denoiser.reconstruct(images, cameras, timesteps, sc)
        scene = self.scene(density, color)
        out = self.render(scene, cameras if render_cameras is None else render_cameras, background)
        return Prediction(out["rgb"] * 2 - 1, out, scene, torch.cat([density, color], 1))

    def render(self, scene: PaperScene, cameras: Cameras, background: Tensor | None = None) -> dict:
        """``rgb`` in [0, 1] (composited), ``opacity`` and ``depth`` of ``scene`` at ``cameras (B, V)``."""
        bg = self.background(cameras.shape[0], cameras.device) if background is None else background
        c = self.paper_config
        r = render_paper(scene.density, scene.color, self.denoiser.paper_cameras(cameras), c.volume, c.render,
                         cameras.height, background=bg[:, None, :, None, None], training=self.training)
        return {"rgb": (r.rgb + 1) / 2, "opacity": r.opacity, "depth": r.depth}

    @torch.no_grad()
    def sample(self, cameras: Cameras, cond_images: Tensor | None = None, *, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None, progress=None,
               cache_conditioning: bool = True, fit_steps: int | None = None) -> Prediction:
        """Draw viewsets at ``cameras (B, V)`` with the original's DDIM loop; the first k views are
        the clean ``cond_images (B, k, 3, H, W)``. ``fit_steps`` must be 0 or None (the original's
        loop has no input fit); ``cache_conditioning`` is ignored (the loop re-encodes every view)."""
        if fit_steps:
            raise ValueError(f"fit_steps={fit_steps}: a paper model samples with the original's loop, which does not "
                             "fit the volume to its input views (use 0)")
        d = self.recipe.diffusion
        n = steps or d.sampling_steps
        diffusion = PaperDiffusion(self.paper_diffusion.timesteps, self.paper_diffusion.beta_schedule, n, d.eta)
        w = d.guidance if guidance is None else guidance
        out = sample_paper(self.denoiser, cond_images, cameras, n, w, generator, diffusion=diffusion,
                           original_render_order=False, progress=progress)
        scene = self.scene(out.density, out.color)
        return Prediction(out.renders, {"rgb": (out.renders + 1) / 2}, scene, torch.cat([out.density, out.color], 1))


__all__ = ["PaperScene", "PaperViewsetDiffusion"]
