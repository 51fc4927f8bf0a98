"""The viewset diffusion model: denoiser -> representation -> renderer, trained and sampled.

The network never predicts pixels directly: it lifts the (partly noisy) views into a 3D
representation and renders that back at the viewset's cameras. Those renders are the
x0-prediction of the diffusion model, so every sample is 3D-consistent by construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .cameras import Cameras
from .contracts import SceneInfo
from .denoiser import Denoiser, ViewFeatures
from .recipe import Recipe
from .schedule import NoiseSchedule, guided_x0, make_scheduler
from .viewset import Viewset


@dataclass
class Prediction:
    """One denoiser pass: x0 renders (B, V, 3, H, W) in [-1, 1], the full render output, the
    scene, and the feature volume (B, C, D, D, D) the scene was built from."""

    x0: Tensor
    render: dict
    scene: object
    volume: Tensor


class _Draws:
    """Random draws for a batch of ``total`` rows, of which the caller keeps ``rows``."""

    def __init__(self, gen: torch.Generator | None, total: int, rows: slice, device):
        self.gen, self.total, self.rows, self.device = gen, total, rows, device

    def _keep(self, x: Tensor) -> Tensor:
        return x[self.rows].to(self.device)

    def scalar(self) -> float:
        return torch.rand((), generator=self.gen).item()

    def rand(self, *shape: int) -> Tensor:
        return self._keep(torch.rand(self.total, *shape, generator=self.gen))

    def randn(self, *shape: int) -> Tensor:
        return self._keep(torch.randn(self.total, *shape, generator=self.gen))

    def randint(self, low: int, high: int) -> Tensor:
        return self._keep(torch.randint(low, high, (self.total,), generator=self.gen))

    def multinomial(self, probs: Tensor) -> Tensor:
        return self._keep(torch.multinomial(probs.expand(self.total, -1), 1, generator=self.gen)[:, 0])


class ViewsetDiffusion(nn.Module):
    """Denoiser + representation + renderer, with the diffusion schedule of a recipe."""

    def __init__(self, recipe: Recipe, info: SceneInfo):
        super().__init__()
        self.recipe, self.info = recipe, info
        self.denoiser = Denoiser(
            recipe.model,
            make_encoder=lambda c, t: recipe.encoder.build(in_channels=c, time_dim=t),
            make_aggregator=lambda c, r: recipe.aggregator.build(channels=c, resolution=r),
            bound=info.bound,
        )
        self.representation = recipe.representation.build(
            in_channels=recipe.model.out_channels, resolution=recipe.model.volume_size, bound=info.bound
        )
        self.renderer = recipe.renderer.build()
        d = recipe.diffusion
        self.schedule = NoiseSchedule(kind=d.schedule, num_train_timesteps=d.timesteps)

    @property
    def T(self) -> int:
        return self.recipe.diffusion.timesteps

    def background(self, batch: int, device) -> Tensor:
        """(B, 3) background colour for rendering: the dataset's; "random" backgrounds (drawn
        per viewset in training) render over white."""
        value = 0.0 if self.info.background == "black" else 1.0
        return torch.full((batch, 3), value, device=device)

    # ---- one denoiser pass -----------------------------------------------------------------
    def predict(
        self,
        images: Tensor,
        cameras: Cameras,
        timesteps: Tensor,
        self_cond: Tensor | None,
        render_cameras: Cameras | None = None,
        background: Tensor | None = None,
    ) -> Prediction:
        """images (B, V, 3, H, W) in [-1, 1] at ``timesteps`` (B, V); renders at ``render_cameras``
        (B, V', default the input cameras) -> Prediction with x0 (B, V', 3, H, W) in [-1, 1]."""
        feats = self.denoiser.encode_views(images, cameras, timesteps, self_cond)
        return self.predict_from_features(feats, cameras if render_cameras is None else render_cameras, background)

    def predict_from_features(self, feats: ViewFeatures, render_cameras: Cameras, background: Tensor | None = None) -> Prediction:
        """The second half of :meth:`predict`, from per-view features (see Denoiser.encode_views)."""
        return self.predict_from_volume(self.denoiser.decode(feats), render_cameras, background)

    def predict_from_volume(self, volume: Tensor, render_cameras: Cameras, background: Tensor | None = None) -> Prediction:
        """The scene a feature volume (B, C, D, D, D) holds, rendered at ``render_cameras``."""
        scene = self.representation(volume)
        bg = self.background(render_cameras.shape[0], render_cameras.device) if background is None else background
        out = self.renderer(scene, render_cameras, bg)
        return Prediction(out["rgb"] * 2 - 1, out, scene, volume)

    def render(self, scene, cameras: Cameras, background: Tensor | None = None) -> dict:
        bg = self.background(cameras.shape[0], cameras.device) if background is None else background
        return self.renderer(scene, cameras, bg)

    # ---- training ------------------------------------------------------------------------------
    def training_loss(self, batch: Viewset, seed: int | None = None, rows: slice | None = None, total: int | None = None) -> tuple[Tensor, dict]:
        """The loss on one batch of viewsets (B, V + heldout views).

        The first ``V`` views form the denoiser's input: a random number of them (train.cond_probs)
        are clean at t=0, the rest share one noise level t per viewset. The renders of all views,
        the held-out ones included, are compared with the clean images.

        Randomness (clean-view counts, timesteps, noise, backgrounds) is drawn from ``seed`` for a
        batch of ``total`` viewsets, of which this call takes ``rows``. Processes of a distributed
        run, and micro-batches of gradient accumulation, thereby draw exactly what one process
        with the whole batch would.
        """
        tr, diff = self.recipe.train, self.recipe.diffusion
        dev = batch.images.device
        B, Vt = batch.images.shape[:2]
        V = Vt - tr.heldout_views
        total = total or B
        rows = rows or slice(0, B)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        draw = _Draws(gen, total, rows, dev)

        use_self_cond = not tr.deterministic and draw.scalar() < diff.self_condition_prob
        bg = draw.rand(3) if (self.info.background == "random" and self.training) else self.background(B, dev)
        if tr.colour_augment > 0:
            batch = self._rotate_hues(batch, draw, tr.colour_augment)
        if tr.mirror_augment > 0:
            batch = self._mirror(batch, draw, tr.mirror_augment, "xyz".index(tr.mirror_axis))
        target = self._composite(batch, bg)
        x0 = target[:, :V]
        probs = torch.tensor(tr.cond_probs, dtype=torch.float)
        k = draw.multinomial(probs)
        if tr.deterministic:
            k = k.clamp(min=1)
        clean = torch.arange(V, device=dev)[None] < k[:, None]  # (B, V)
        t = draw.randint(1, self.T)
        noise = draw.randn(*x0.shape[1:])
        if tr.deterministic:
            t = torch.full_like(t, self.T - 1)
            x_t = torch.zeros_like(x0)
        else:
            x_t = self.schedule.add_noise(x0, noise, t[:, None].expand(B, V))
        timesteps = torch.where(clean, 0, t[:, None])
        x_in = torch.where(clean[..., None, None, None], x0, x_t)

        # a clean view's self-conditioning input is the view itself (as in sampling); noisy
        # views get the model's own estimate half of the time, zeros otherwise
        clean5 = clean[..., None, None, None]
        # (the deterministic baseline has no self-conditioning at all)
        self_cond = None if tr.deterministic else torch.where(clean5, x0, torch.zeros_like(x0))
        if use_self_cond:
            own = tr.own_views_prob > 0 and draw.scalar() < tr.own_views_prob
            if own:
                # as while sampling: the noisy views hold what the model itself estimated at an
                # earlier, noisier step (t_hi in [t, T)), not the truth; the target stays the truth
                t_hi = t + (draw.rand(1)[:, 0] * (self.T - t)).long().clamp(max=self.T - 1 - t)
                x_hi = self.schedule.add_noise(x0, draw.randn(*x0.shape[1:]), t_hi[:, None].expand(B, V))
                est_in, est_t = torch.where(clean5, x0, x_hi), torch.where(clean, 0, t_hi[:, None])
            else:
                est_in, est_t = x_in, timesteps
            with torch.no_grad():
                estimate = self.predict(est_in, batch.cameras[:, :V], est_t, self_cond, background=bg).x0.detach()
            if own:
                x_in = torch.where(clean5, x0, self.schedule.add_noise(estimate.clamp(-1, 1), noise, t[:, None].expand(B, V)))
            self_cond = torch.where(clean5, x0, estimate)

        pred = self.predict(x_in, batch.cameras[:, :V], timesteps, self_cond, batch.cameras, bg)
        per_view = ((pred.x0 - target) ** 2).mean(dim=(2, 3, 4))  # (B, Vt)
        weights = self.view_weights(t, clean)
        norm = V + tr.heldout_weight * (Vt - V)  # a constant, so weights keep their relative scale
        loss = (per_view * weights).sum() / (B * norm)
        stats = {
            "mse": per_view[:, :V].mean().detach(),
            "mse_heldout": per_view[:, V:].mean().detach() if Vt > V else torch.zeros((), device=dev),
        }
        reg = self.regulariser(pred.volume)
        if reg is not None:
            loss = loss + reg
            stats["regulariser"] = reg.detach()
        return loss, {"loss": loss.detach(), **stats}

    def regulariser(self, volume: Tensor) -> Tensor | None:
        """The representation's regularising loss on a predicted feature volume, or None."""
        return self.representation.regulariser(volume)

    def view_weights(self, t: Tensor, clean: Tensor) -> Tensor:
        """Loss weight of every rendered view, (B, V + heldout), from the viewset's noise level t
        (B,) and its clean input views ``clean`` (B, V).

        A noisy input view at t weighs min(SNR_t, gamma) / gamma (diffusion.min_snr_gamma; 1 when
        null); a clean input view weighs ``train.clean_weight`` (1: its own t = 0, where the
        min-SNR weight is largest); held-out views weigh ``train.heldout_weight``, whatever t,
        since they are never part of the input and only a 3D reconstruction predicts them.
        """
        tr, diff = self.recipe.train, self.recipe.diffusion
        B, V = clean.shape
        if diff.min_snr_gamma is not None and not tr.deterministic:
            noisy_w = self.schedule.min_snr_weight(t, diff.min_snr_gamma) / diff.min_snr_gamma
        else:
            noisy_w = torch.ones(B, device=t.device)
        inputs = torch.where(clean, torch.full_like(noisy_w, tr.clean_weight)[:, None], noisy_w[:, None].expand(B, V))
        held = torch.full((B, tr.heldout_views), tr.heldout_weight, device=t.device)
        return torch.cat([inputs, held], 1)

    @staticmethod
    def _rotate_hues(batch: Viewset, draw: "_Draws", prob: float) -> Viewset:
        """With probability ``prob`` per viewset, rotate the colours of all its views by one
        random angle about the grey axis (train.colour_augment). Greys (a white or black
        background, shading) stay put and every view changes alike, so the object stays
        consistent; a model can then only get an object's colours right by reading them from
        its input views, never by remembering the training objects'."""
        B = batch.images.shape[0]
        angle = draw.rand(1)[:, 0] * 2 * math.pi
        on = draw.rand(1)[:, 0] < prob
        angle = torch.where(on, angle, torch.zeros_like(angle))
        axis = torch.full((3,), 1 / math.sqrt(3), device=angle.device)
        cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=angle.device) / math.sqrt(3)
        c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        rot = c * torch.eye(3, device=angle.device) + s * cross + (1 - c) * torch.outer(axis, axis)  # (B, 3, 3), Rodrigues
        images = torch.einsum("bij,bvjhw->bvihw", rot.to(batch.images.dtype), batch.images).clamp(-1, 1)
        return dataclasses.replace(batch, images=images)

    @staticmethod
    def _mirror(batch: Viewset, draw: "_Draws", prob: float, axis: int) -> Viewset:
        """With probability ``prob`` per viewset, mirror it (train.mirror_augment): every image
        flipped left-right, and every camera reflected through the world plane normal to ``axis``
        with its own x axis negated (so it stays a rotation) and its principal point mirrored.
        The pixel a mirrored camera sees at column u is what the original saw at column W - u of
        the reflected world, so the result is a consistent viewset of the mirrored object; with the
        plane a class is symmetric about, mirrored objects keep the canonical pose."""
        on = draw.rand(1)[:, 0] < prob  # (B,)
        cams = batch.cameras
        reflect = torch.ones(4, device=cams.c2w.device, dtype=cams.c2w.dtype)
        reflect[axis] = -1
        flip_x = torch.ones_like(reflect)
        flip_x[0] = -1
        c2w = reflect[:, None] * cams.c2w * flip_x  # diag(reflect) @ c2w @ diag(flip_x)
        K = torch.cat([cams.K[..., :2], cams.width - cams.K[..., 2:3], cams.K[..., 3:]], -1)
        sel = lambda x: on.view(-1, *[1] * (x.dim() - 1))  # noqa: E731
        mirrored = dataclasses.replace(
            cams, c2w=torch.where(sel(c2w), c2w, cams.c2w), K=torch.where(sel(K), K, cams.K)
        )
        flip = lambda x: None if x is None else torch.where(sel(x), x.flip(-1), x)  # noqa: E731
        return dataclasses.replace(batch, images=flip(batch.images), masks=flip(batch.masks), cameras=mirrored)

    @staticmethod
    def _composite(batch: Viewset, bg: Tensor) -> Tensor:
        """Images over the given background (where masks are known), in [-1, 1]."""
        if batch.masks is None:
            return batch.images
        rgb01 = (batch.images + 1) / 2
        m = batch.masks
        # images come composited over white; undo that, then composite over bg
        fg = rgb01 - (1 - m)  # premultiplied foreground
        out = fg + (1 - m) * bg[:, None, :, None, None]
        return (out * 2 - 1).clamp(-1, 1)

    # ---- sampling ------------------------------------------------------------------------------
    def fit_to_views(self, volume: Tensor, cameras: Cameras, images: Tensor, background: Tensor, steps: int) -> Tensor:
        """``steps`` Adam steps (at ``diffusion.input_fit_lr``) on the MSE of the feature volume's
        renders at ``cameras`` (B, k) against ``images`` (B, k, 3, H, W) in [-1, 1]; returns the
        fitted volume: a data-consistency step that keeps a sample faithful to its own inputs."""
        volume = volume.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([volume], lr=self.recipe.diffusion.input_fit_lr)
        target = (images + 1) / 2
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.mse_loss(self.renderer(self.representation(volume), cameras, background)["rgb"], target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return volume.detach()

    @torch.no_grad()
    def sample(
        self,
        cameras: Cameras,
        cond_images: Tensor | None = None,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        generator: torch.Generator | None = None,
        progress=None,
        cache_conditioning: bool = True,
        fit_steps: int | None = None,
    ) -> Prediction:
        """Draw viewsets at ``cameras`` (B, V); the first k views are clean when
        ``cond_images`` (B, k, 3, H, W) in [-1, 1] is given (k = 0..V-1).

        Returns the final Prediction (x0 renders at all V cameras and the 3D scene).
        ``cache_conditioning`` computes the clean views' per-view features once instead of at
        every step (same result; see Denoiser.encode_views). ``fit_steps`` (default
        ``diffusion.input_fit_steps``): Adam steps per sampler step that fit the predicted volume to
        the clean views (:meth:`fit_to_views`).
        """
        d = self.recipe.diffusion
        B, V = cameras.shape
        H, W = cameras.height, cameras.width
        dev = cameras.device
        k = 0 if cond_images is None else cond_images.shape[1]
        if k >= V:
            raise ValueError(f"{k} conditioning views leave no view to sample among {V}")
        clean = (torch.arange(V, device=dev) < k)[None].expand(B, V)
        cond = torch.zeros(B, V, 3, H, W, device=dev)
        if k:
            cond[:, :k] = cond_images
        bg = self.background(B, dev)

        if self.recipe.train.deterministic:
            ts = torch.where(clean, 0, self.T - 1)
            return self.predict(cond, cameras, ts, None, background=bg)

        w = d.guidance if guidance is None else guidance
        fit = d.input_fit_steps if fit_steps is None else fit_steps
        scheduler = make_scheduler(d, self.schedule)
        scheduler.set_timesteps(steps or d.sampling_steps)
        x = torch.randn(B, V, 3, H, W, generator=generator, device="cpu").to(dev)
        # a clean view's self-conditioning input is the view itself, so its input never changes
        # and (with cache_conditioning) its per-view features are computed once
        self_cond = cond.clone()
        zeros = torch.zeros(B, k, dtype=torch.long, device=dev)
        cached = self.denoiser.encode_views(cond[:, :k], cameras[:, :k], zeros, cond[:, :k]) if k and cache_conditioning else None
        pred = None
        for i, t in enumerate(scheduler.timesteps.tolist()):
            ts = torch.where(clean, 0, t)
            x_in = torch.where(clean[..., None, None, None], cond, x)
            if cached is not None:
                noisy = self.denoiser.encode_views(x_in[:, k:], cameras[:, k:], ts[:, k:], self_cond[:, k:])
                feats = ViewFeatures.cat([cached, noisy])
            else:
                noisy = None
                feats = self.denoiser.encode_views(x_in, cameras, ts, self_cond)
            volume = self.denoiser.decode(feats)
            if k and fit:  # rendered once, from the fitted volume
                volume = self.fit_to_views(volume, cameras[:, :k], cond[:, :k], bg, fit)
            pred = self.predict_from_volume(volume, cameras, bg)
            x0 = pred.x0.clamp(-1, 1) if d.clip_x0 else pred.x0
            if k and w != 0:
                if noisy is None:
                    noisy = self.denoiser.encode_views(x_in[:, k:], cameras[:, k:], ts[:, k:], self_cond[:, k:])
                x0u = self.predict_from_features(noisy, cameras[:, k:], bg).x0
                x0[:, k:] = guided_x0(x[:, k:], t, x0[:, k:], x0u, w)
            x = scheduler.step(x0, t, x, prediction_type="sample", eta=d.eta, clip_sample=d.clip_x0, generator=generator).prev_sample
            self_cond = torch.where(clean[..., None, None, None], cond, x0)
            if progress is not None:
                progress(i + 1, len(scheduler.timesteps))
        # DDIM/DDPM end on the last x0-prediction, so the final pass's scene is the sample's 3D
        # object and its renders are the sampled views
        return pred

