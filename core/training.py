"""The training loop behind ``vsd-run recipe``.

Every step is seeded by (recipe seed, step), so a run is reproducible and a resumed run draws
exactly the batches and noise the uninterrupted run would have drawn.
"""

from __future__ import annotations

import copy
import csv
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import info_to_dict, load_checkpoint, save_checkpoint
from .engine import ViewsetDiffusion
from .errors import VsdError
from .media import save_grid, save_video
from .recipe import Recipe
from .viewset import Viewset, collate_viewsets


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VsdError(f"device {name!r} was asked for, but CUDA is not available here; use device: auto or cpu")
    return dev


def build_dataset(recipe: Recipe, split: str):
    return recipe.data.build(split=split)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def fetch_batch(dataset, batch_size: int, generator: torch.Generator, device) -> Viewset:
    idx = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
    return collate_viewsets([dataset[i] for i in idx]).to(device)


class EMA:
    """An exponential moving average of a model's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def fixed_batch(dataset, n: int, device) -> Viewset:
    """The first ``n`` items of a split: the same viewsets in every sample grid of a run."""
    return collate_viewsets([dataset[i] for i in range(min(n, len(dataset)))]).to(device)


@torch.no_grad()
def write_samples(model: ViewsetDiffusion, batch: Viewset, out_dir: Path, tag: str, *, steps: int, seed: int, turntable: bool = False) -> dict:
    """Sample grids for ``batch``: one conditioned on its first view and one unconditional.

    Rows are objects. Conditional grid columns: ground-truth views, then the sample's renders at
    the same cameras (the first is the render at the conditioning camera). Returns the files written.
    """
    model.eval()
    cond_k = min(model.recipe.sample.cond_views, batch.num_views - 1)
    gen = torch.Generator().manual_seed(seed)
    cond = model.sample(batch.cameras, batch.images[:, :cond_k] if cond_k else None, steps=steps, generator=gen)
    uncond = model.sample(batch.cameras, None, steps=steps, generator=gen)
    gt01 = (batch.images + 1) / 2
    files = {
        "conditional": save_grid(torch.cat([gt01, (cond.x0 + 1) / 2], 1).cpu(), out_dir / f"{tag}_cond.png", upscale=2),
        "unconditional": save_grid(((uncond.x0 + 1) / 2).cpu(), out_dir / f"{tag}_uncond.png", upscale=2),
    }
    if turntable:
        frames = render_turntable(model, cond.scene, batch.batch_size)
        # objects side by side in one video
        files["turntable"] = save_video(torch.cat(list(frames), dim=-1), out_dir / f"{tag}_turntable.gif", upscale=2)
    return files


@torch.no_grad()
def render_turntable(model: ViewsetDiffusion, scene, batch: int, frames: int | None = None, size: int | None = None) -> torch.Tensor:
    """Render each of the ``batch`` objects of ``scene`` from a circle of cameras -> (B, F, 3, S, S) in [0, 1]."""
    from .cameras import Cameras

    s, info = model.recipe.sample, model.info
    size = size or s.render_size or model.recipe.data.settings.image_size
    cams = Cameras.orbit(
        frames or s.turntable_frames, info.camera_radius, s.turntable_elevation, fov_deg=info.fov_deg, height=size, width=size, up_axis=info.up_axis
    ).to(next(model.parameters()).device)
    F = cams.shape[0]
    cams = Cameras(cams.c2w[None].expand(batch, F, 4, 4), cams.K[None].expand(batch, F, 4), size, size)
    out = []
    for i in range(0, F, 8):  # a few frames at a time bounds memory
        out.append(model.render(scene, cams[:, i : i + 8])["rgb"])
    return torch.cat(out, 1).cpu()


class Trainer:
    """Trains a recipe into a run directory: checkpoints/, samples/, log.csv, recipe.yaml."""

    def __init__(self, recipe: Recipe, out_dir: str | Path, *, resume: bool = False, quiet: bool = False):
        self.recipe, self.out = recipe, Path(out_dir)
        self.quiet = quiet
        tr = recipe.train
        if tr.threads:
            torch.set_num_threads(tr.threads)
        self.device = select_device(recipe.device)
        torch.manual_seed(recipe.seed)
        self.train_set = build_dataset(recipe, "train")
        self.val_set = build_dataset(recipe, "val")
        self.model = ViewsetDiffusion(recipe, self.train_set.info).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=tr.lr)
        self.ema = EMA(self.model, tr.ema_decay)
        self.step = 0
        self.ckpt_path = self.out / "checkpoints" / "last.pt"
        if resume:
            self._resume()
        elif self.ckpt_path.exists():
            raise VsdError(f"{self.out} already holds a run (found {self.ckpt_path}); pass --resume to continue it or choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.yaml").write_text(recipe.dump())

    def _resume(self) -> None:
        if not self.ckpt_path.exists():
            raise VsdError(f"--resume was given but {self.ckpt_path} does not exist")
        state = load_checkpoint(self.ckpt_path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    def state(self) -> dict:
        return {
            "recipe": self.recipe.dump(),
            "info": info_to_dict(self.train_set.info),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def lr_at(self, step: int) -> float:
        tr = self.recipe.train
        return tr.lr * min(1.0, (step + 1) / max(1, tr.warmup_steps))

    def train_step(self) -> dict:
        tr = self.recipe.train
        torch.manual_seed(step_seed(self.recipe.seed, self.step))
        gen = torch.Generator().manual_seed(step_seed(self.recipe.seed, self.step))
        batch = fetch_batch(self.train_set, tr.batch_size, gen, self.device)
        self.model.train()
        loss, stats = self.model.training_loss(batch)
        if not torch.isfinite(loss):
            raise VsdError(f"the loss became {loss.item()} at step {self.step}; the last good checkpoint is {self.ckpt_path}")
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if tr.grad_clip:
            stats["grad_norm"] = nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
        self.opt.step()
        self.ema.update(self.model)
        self.step += 1
        return {k: float(v) for k, v in stats.items()}

    def checkpoint(self) -> None:
        save_checkpoint(self.ckpt_path, self.state())

    def samples(self, final: bool = False) -> dict:
        batch = fixed_batch(self.val_set, 4, self.device)
        steps = self.recipe.diffusion.sampling_steps
        return write_samples(self.ema.model, batch, self.out / "samples", f"step_{self.step:06d}", steps=steps, seed=self.recipe.seed, turntable=final)

    def run(self) -> dict:
        tr = self.recipe.train
        log_path = self.out / "log.csv"
        new_log = not log_path.exists() or self.step == 0
        fields = ["step", "loss", "mse", "mse_heldout", "grad_norm", "lr", "steps_per_s", "elapsed_s"]
        with open(log_path, "w" if new_log else "a", newline="") as fh, _Progress(tr.steps, self.step, self.quiet) as bar:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if new_log:
                writer.writeheader()
            t0, s0, last = time.perf_counter(), self.step, {}
            deadline = t0 + 60 * tr.max_minutes if tr.max_minutes else math.inf
            while self.step < tr.steps and time.perf_counter() < deadline:
                last = self.train_step()
                rate = (self.step - s0) / max(1e-9, time.perf_counter() - t0)
                bar.update(self.step, last["loss"], rate)
                if self.step % tr.log_every == 0 or self.step == tr.steps or time.perf_counter() >= deadline:
                    writer.writerow({"step": self.step, "lr": self.lr_at(self.step - 1), "steps_per_s": round(rate, 3), "elapsed_s": round(time.perf_counter() - t0, 1), **last})
                    fh.flush()
                if self.step % tr.checkpoint_every == 0:
                    self.checkpoint()
                if self.step % tr.sample_every == 0 and self.step < tr.steps:
                    self.samples()
            self.checkpoint()
        files = self.samples(final=True)
        return {"step": self.step, "last": last, "files": files, "checkpoint": self.ckpt_path}


class _Progress:
    """A rich progress bar on a terminal; plain log lines otherwise (CI, files)."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.tty = sys.stderr.isatty()
        self.bar = None
        self.next_line = start

    def __enter__(self):
        if self.quiet:
            return self
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[rate]:.2f} steps/s"), TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=self.next_line, loss=math.nan, rate=0.0)
        return self

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, rate=rate)
        elif step >= self.next_line or step == self.total:
            eta = (self.total - step) / rate if rate > 0 else math.nan
            print(f"train {step}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  eta {eta:.0f}s", file=sys.stderr, flush=True)
            self.next_line = step + max(1, self.total // 20)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
