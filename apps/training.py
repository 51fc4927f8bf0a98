"""The training loop behind ``vsd-run recipe``.

Every step is seeded by (recipe seed, step), so a run is reproducible and a resumed run draws
exactly the batches and noise the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from ..core import distributed
from ..core.checkpoint import info_to_dict, load_checkpoint, save_run_checkpoint
from ..core.engine import ViewsetDiffusion
from ..core.models import build_model
from ..core.errors import DataError, RecipeError, VsdError
from ..core.progress import Progress
from ..core.recipe import Recipe
from ..core.runlock import RunLock
from ..core.viewset import Viewset, collate_viewsets
from .media import save_grid
from .memory import keep_freed_memory


def build_dataset(recipe: Recipe, split: str):
    return recipe.data.build(split=split)


def step_seed(seed: int, step: int, attempt: int = 0) -> int:
    """The seed of every random draw of one training step (data, noise, timesteps).

    ``attempt`` counts the retries of a step skipped for a non-finite loss: a retry must draw a
    different batch, or a batch that always gives NaN would be drawn again until the run stops.
    """
    return (seed * 1_000_003 + step * 7919 + attempt * 104_729) % (2**62)


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


def compile_denoiser(model: ViewsetDiffusion, backend: str = "inductor") -> None:
    """torch.compile the denoiser's two halves (per-view encoding, aggregation + decoding), which
    are what training and sampling call; parameter names (and so checkpoints) stay unchanged."""
    d = model.denoiser
    d.encode_views = torch.compile(d.encode_views, backend=backend)
    d.decode = torch.compile(d.decode, backend=backend)


def initialise_from(model: ViewsetDiffusion, source: str, quiet: bool = False) -> list[str]:
    """Copy into ``model`` the tensors of ``source``'s model (EMA weights; see train.init_from)
    whose name and shape match; returns the names copied. The denoiser, the network every
    representation shares, must match whole: an error names the tensors that do not."""
    from .sampling import load_model

    try:
        theirs = load_model(source, device="cpu").state_dict()
    except VsdError as exc:
        raise RecipeError(model.recipe.source, "train.init_from", str(exc)) from None
    own = model.state_dict()
    copied = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k.startswith("denoiser.") and k not in copied]
    if missing:
        shown = ", ".join(f"{k} {tuple(own[k].shape)} vs {tuple(theirs[k].shape) if k in theirs else 'absent'}" for k in missing[:3])
        raise RecipeError(
            model.recipe.source, "train.init_from",
            f"the denoiser of {source} does not match this recipe's ({len(missing)} tensors differ: {shown}"
            f"{', ...' if len(missing) > 3 else ''}); its model, encoder and aggregator settings must be the same",
        )
    model.load_state_dict(copied, strict=False)
    if not quiet:
        fresh = sorted({".".join(k.split(".")[:2]) for k in own if k not in copied})
        print(f"initialised {len(copied)} of {len(own)} tensors from {source}; fresh: {', '.join(fresh) or 'none'}", file=sys.stderr)
    return list(copied)


def learning_rate(tr, step: int) -> float:
    """train.lr at ``step``: a linear warm-up, then constant or a cosine decay that reaches
    lr * min_lr_ratio at train.steps (and stays there if training goes on)."""
    warm = min(1.0, (step + 1) / max(1, tr.warmup_steps))
    if tr.lr_schedule == "constant" or step < tr.warmup_steps:
        return tr.lr * warm
    span = max(1, tr.steps - tr.warmup_steps)
    progress = min(1.0, (step - tr.warmup_steps) / span)
    return tr.lr * (tr.min_lr_ratio + (1 - tr.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam over the model's parameters, as one fused kernel where this torch build has one for
    the parameters' device (CPU since torch 2.4; 4x faster than the per-tensor loop there)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)


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
        from .pipeline import Pipeline, Result

        result = Result(Pipeline(model), cond.scene, (cond.x0 + 1) / 2, batch.cameras, progress=False)
        files["turntable"] = result.turntable(out_dir / f"{tag}_turntable.gif")
    return files


class _LossModule(nn.Module):
    """The training loss as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: ViewsetDiffusion):
        super().__init__()
        self.model = model

    def forward(self, batch: Viewset, seed: int, rows: slice, total: int):
        return self.model.training_loss(batch, seed, rows, total)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Trains a recipe into a run directory: checkpoints/, samples/, log.csv, recipe.yaml.

    Under torchrun every process runs a Trainer; ``train.batch_size`` is per process (the global
    batch is batch_size x processes) and only rank 0 writes anything.
    """

    def __init__(self, recipe: Recipe, out_dir: str | Path, *, resume: bool = False, quiet: bool = False):
        self._lock: RunLock | None = None
        try:
            self._setup(recipe, out_dir, resume=resume, quiet=quiet)
        except BaseException:
            self.close()
            raise

    def _setup(self, recipe: Recipe, out_dir: str | Path, *, resume: bool, quiet: bool) -> None:
        self.recipe, self.out = recipe, Path(out_dir)
        tr = recipe.train
        if tr.threads:
            torch.set_num_threads(tr.threads)
        keep_freed_memory()
        self.dist = distributed.setup(recipe.device)
        if self.dist.is_main:  # one live writer per run directory, from before any file is read until run() ends
            self._lock = RunLock(self.out, hint="wait for that run to finish, or choose another --out", quiet=quiet).acquire()
        self.device = self.dist.device
        self.quiet = quiet or not self.dist.is_main
        torch.manual_seed(recipe.seed)
        if self.dist.is_main:
            from ..datatools.prepare import ensure_dataset

            ensure_dataset(recipe, quiet=quiet)
        distributed.barrier(self.dist)
        self.train_set = build_dataset(recipe, "train")
        self.val_set = build_dataset(recipe, "val")
        if len(self.train_set) == 0:
            raise VsdError(f"recipe {recipe.source}: the training split of data ({recipe.data.type}) is empty")
        self.model = build_model(recipe, self.train_set.info).to(self.device)
        if tr.init_from and not resume:
            initialise_from(self.model, tr.init_from, quiet=self.quiet)
        self.opt = make_optimizer(self.model, tr.lr)
        self.ema = EMA(self.model, tr.ema_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if tr.precision == "fp16" else None
        self.step = 0
        self.skipped = 0
        self.ckpt_path = self.out / "checkpoints" / "last.pt"
        if resume:
            self._resume()
        elif self.ckpt_path.exists():
            raise VsdError(f"{self.out} already holds a run (found {self.ckpt_path}); pass --resume to continue it or choose another --out")
        self.loss_module: nn.Module = _LossModule(self.model)
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.loss_module = nn.parallel.DistributedDataParallel(self.loss_module, device_ids=ids)
        if tr.compile:
            compile_denoiser(self.model, tr.compile_backend)
        if self.dist.is_main:
            self._write(lambda: (self.out.mkdir(parents=True, exist_ok=True), (self.out / "recipe.yaml").write_text(recipe.dump())))

    def _resume(self) -> None:
        if not self.ckpt_path.parent.exists():
            raise VsdError(f"--resume was given but {self.out} holds no checkpoints")
        from ..core.checkpoint import check_resume_recipe, load_state_checked

        state = load_checkpoint(self.out, map_location=self.device, resume=True)
        path = state["path"]
        check_resume_recipe(state, self.recipe, self.out)
        against = f"the model of recipe {self.recipe.source}"
        load_state_checked(self.model, state["model"], path, "`model` weights", against)
        load_state_checked(self.ema.model, state["ema"], path, "`ema` weights", against)
        try:
            self.opt.load_state_dict(state["optimizer"])
            moments = [(p, k, v) for p, s in self.opt.state.items() for k, v in s.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
            wrong = [f"{k} {tuple(v.shape)} for a parameter of {tuple(p.shape)}" for p, k, v in moments if v.shape != p.shape]
            if wrong:
                raise ValueError(f"{len(wrong)} optimiser state tensor(s) of the wrong shape, e.g. {wrong[0]}")
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"checkpoint {path}: its `optimizer` state does not fit the model of recipe {self.recipe.source} ({first}); "
                f"the run cannot be resumed from it"
            ) from None
        self.step = state["step"]

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
        return learning_rate(self.recipe.train, step)

    def _batch(self, idx: list[int], positions: range, seed: int) -> Viewset:
        # each item's random draws (e.g. fresh cameras) are seeded by its place in the global batch
        items = []
        for pos, i in zip(positions, idx):
            torch.manual_seed(seed + 7 * pos + 1)
            items.append(self.train_set[i])
        return collate_viewsets(items).to(self.device)

    def train_step(self) -> dict:
        """One optimiser step over the global batch (this process's share, in micro-batches)."""
        tr, d = self.recipe.train, self.dist
        seed = step_seed(self.recipe.seed, self.step, self.skipped)
        total = tr.batch_size * d.world
        idx = torch.randint(len(self.train_set), (total,), generator=torch.Generator().manual_seed(seed)).tolist()
        micro = tr.batch_size // tr.grad_accum
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        stats_sum: dict[str, float] = {}
        for m in range(tr.grad_accum):
            lo = d.rank * tr.batch_size + m * micro
            rows = slice(lo, lo + micro)
            batch = self._batch(idx[rows], range(lo, lo + micro), seed)
            sync = m == tr.grad_accum - 1 or d.world == 1
            ctx = contextlib.nullcontext() if sync else self.loss_module.no_sync()
            with ctx:
                with self._autocast():
                    loss, stats = self.loss_module(batch, seed + 1, rows, total)
                scaled = loss / tr.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) / tr.grad_accum
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        if self.scaler:
            self.scaler.unscale_(self.opt)
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip or math.inf)
        stats_sum["grad_norm"] = float(norm)
        if not (math.isfinite(norm) and math.isfinite(stats_sum["loss"])):
            return self._nonfinite(stats_sum)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.ema.update(self.model)
        self.skipped = 0
        self.step += 1
        return distributed.mean_over_ranks(stats_sum, d)

    def _autocast(self):
        p = self.recipe.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[p])

    def _nonfinite(self, stats: dict) -> dict:
        """A NaN/Inf loss or gradient: the step is not applied (weights, EMA, checkpoints untouched)."""
        tr = self.recipe.train
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:  # fp16 overflow is normal: the scaler lowers its scale and we retry
            self.scaler.update()
        self.skipped += 1
        what = f"loss {stats['loss']}, gradient norm {stats['grad_norm']}"
        if tr.nonfinite == "stop" or self.skipped > tr.max_skipped_steps:
            raise VsdError(
                f"training stopped at step {self.step}: non-finite {what} "
                f"({self.skipped} step(s) in a row); nothing non-finite was applied or saved, the last good checkpoint is in {self.ckpt_path.parent}"
            )
        return {**stats, "skipped": 1.0}

    def _write(self, fn):
        """Run a write; a full or read-only disk becomes a clear error, keeping earlier files."""
        try:
            return fn()
        except OSError as exc:
            raise VsdError(
                f"cannot write to {getattr(exc, 'filename', None) or self.out}: {exc.strerror or exc}; "
                f"training stopped at step {self.step}, earlier checkpoints in {self.ckpt_path.parent} are intact"
            ) from None

    def checkpoint(self) -> None:
        if self.dist.is_main:
            self._write(lambda: save_run_checkpoint(self.out, self.state(), keep=self.recipe.train.keep_checkpoints))
        distributed.barrier(self.dist)

    def samples(self, final: bool = False) -> dict:
        if not self.dist.is_main:
            return {}
        batch = fixed_batch(self.val_set, 4, self.device)
        steps = self.recipe.diffusion.sampling_steps
        return self._write(
            lambda: write_samples(self.ema.model, batch, self.out / "samples", f"step_{self.step:06d}", steps=steps, seed=self.recipe.seed, turntable=final)
        )

    def close(self) -> None:
        """Let go of the run directory; run() does so when it ends, however it ends."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def run(self) -> dict:
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict:
        tr = self.recipe.train
        stop = _StopRequest()
        with stop, _RunLog(self, tr) as log, Progress("train", tr.steps, done=self.step, quiet=self.quiet) as bar:
            t0, s0, last = time.perf_counter(), self.step, {}
            deadline = t0 + 60 * tr.max_minutes if tr.max_minutes else math.inf
            while self.step < tr.steps and time.perf_counter() < deadline and not stop.requested:
                last = self.train_step()
                if last.get("skipped"):
                    continue
                rate = (self.step - s0) / max(1e-9, time.perf_counter() - t0)
                bar.update(self.step, loss=last["loss"])
                if self.step % tr.log_every == 0 or self.step == tr.steps:
                    log.row(self.step, self.lr_at(self.step - 1), rate, time.perf_counter() - t0, last)
                if self.step % tr.checkpoint_every == 0:
                    self.checkpoint()
                if self.step % tr.sample_every == 0 and self.step < tr.steps:
                    self.samples()
            self.checkpoint()
        if stop.requested:
            raise VsdError(f"stopped by {stop.requested} at step {self.step}; checkpoint written, continue with --resume")
        files = self.samples(final=True)
        return {"step": self.step, "last": last, "files": files, "checkpoint": self.ckpt_path}


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and exits."""

    def __init__(self):
        self.requested: str | None = None
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def summary_writer(log_dir: Path):
    """A TensorBoard SummaryWriter when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        return None
    return SummaryWriter(str(log_dir))


class _RunLog:
    """log.csv (and TensorBoard scalars when available) on rank 0, continued on resume."""

    FIELDS = ["step", "loss", "mse", "mse_heldout", "grad_norm", "lr", "steps_per_s", "elapsed_s"]

    def __init__(self, trainer: "Trainer", tr):
        self.t, self.fh, self.tb = trainer, None, None

    def __enter__(self):
        if self.t.dist.is_main:
            path = self.t.out / "log.csv"
            new = not path.exists() or self.t.step == 0
            if not new:  # drop rows past the checkpoint we resumed from
                rows = path.read_text().splitlines()
                keep = [rows[0]] + [r for r in rows[1:] if r and int(r.split(",")[0]) <= self.t.step]
                tmp = path.with_name(f".{path.name}.tmp")  # a kill here must not lose the log
                tmp.write_text("\n".join(keep) + "\n")
                os.replace(tmp, path)
            self.fh = self.t._write(lambda: open(path, "w" if new else "a", newline=""))
            self.w = csv.DictWriter(self.fh, fieldnames=self.FIELDS, extrasaction="ignore")
            if new:
                self.w.writeheader()
            self.tb = summary_writer(self.t.out / "tensorboard")
        return self

    def row(self, step, lr, rate, elapsed, stats):
        if self.tb is not None:
            for k, v in {**stats, "lr": lr, "steps_per_s": rate}.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.fh:
            self.t._write(lambda: (self.w.writerow({"step": step, "lr": lr, "steps_per_s": round(rate, 3), "elapsed_s": round(elapsed, 1), **stats}), self.fh.flush()))

    def __exit__(self, *exc):
        if self.fh:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()
