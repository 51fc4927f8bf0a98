"""The ``vsd-run`` command line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..apps.memory import keep_freed_memory
from ..core.errors import VsdError, VsdNotice
from .console import err, out

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="vsd: Viewset Diffusion, a 3D generative engine trained from posed 2D images.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command()
def plugins(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also show each plugin's class"),
) -> None:
    """List every plugin: slot, name, providing distribution and version, and load failures."""
    from ..core.registry import get_registry

    reg = get_registry()
    table = Table(title="vsd plugins")
    cols = ["slot", "name", "provider", "version", "status"] + (["class"] if verbose else [])
    for col in cols:
        table.add_column(col, overflow="fold")

    def row(info, status):
        cls = [f"{info.cls.__module__}.{info.cls.__qualname__}"] if verbose else []
        table.add_row(info.slot, info.name, info.provider, info.version, status, *cls)

    for info in reg.all():
        row(info, "ok")
    for infos in reg.duplicates.values():
        for info in infos:
            row(info, "[red]duplicate name")
    for f in reg.failures:
        table.add_row("-", f.entry_point, f.provider, f.version, f"[red]failed: {escape(f.error)}", *([""] if verbose else []))
    out.print(table)


@app.command()
def recipes() -> None:
    """List the recipes shipped with vsd (usable by bare name)."""
    from ..core.recipe import SHIPPED_RECIPES, shipped_recipes

    for name in shipped_recipes():
        first = (SHIPPED_RECIPES / name).read_text().splitlines()[0]
        desc = first.lstrip("# ").strip() if first.startswith("#") else ""
        out.print(f"{name:32s} {desc}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def recipe(
    file: str = typer.Argument(..., help="recipe file, or the name of a shipped recipe"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key.path=value overrides, e.g. train.steps=100"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the fully resolved recipe and exit"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<recipe name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
) -> None:
    """Train a model from a recipe (validated first), writing checkpoints, sample grids and a turntable."""
    from ..core.recipe import load_recipe

    r = load_recipe(file, overrides or [])
    if dry_run:
        out.print(r.dump(), end="", markup=False, highlight=False, soft_wrap=True)
        return
    from ..apps.training import Trainer

    run_dir = out_dir or Path("runs") / r.name
    trainer = Trainer(r, run_dir, resume=resume, quiet=quiet)
    if not quiet:
        err.print(f"training [bold]{r.name}[/] for {r.train.steps} steps into {run_dir} (from step {trainer.step})")
    result = trainer.run()
    out.print(f"done: step {result['step']}, last loss {result['last'].get('loss', float('nan')):.4f}")
    out.print(f"checkpoint: {result['checkpoint']}")
    for kind, path in result["files"].items():
        out.print(f"{kind}: {', '.join(map(str, path)) if isinstance(path, list) else path}")


@app.command()
def sample(
    checkpoint: Path = typer.Argument(..., help="checkpoint file, run directory or shipped model name (vsd-run models)"),
    input: Optional[Path] = typer.Option(None, "--input", help="condition on this image (seen from --camera, or from the front)"),
    camera: Optional[Path] = typer.Option(None, "--camera", help="JSON camera of the --input image (c2w, K, width, height; examples/inputs/*.json); default: seen from the front"),
    num_samples: int = typer.Option(4, "--num-samples", min=1, help="samples to draw"),
    views: Optional[int] = typer.Option(None, "--views", min=1, help="views per sampled viewset"),
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="sampler steps (default: the recipe's)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance weight w (-1: ignore the input)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: a new folder samples/<model>-<input or unconditional>[-N])"),
    overwrite: bool = typer.Option(False, "--overwrite", help="write into an --out folder that already holds files"),
) -> None:
    """Draw samples (unconditional, or conditioned on --input) and write PNG grids and turntables."""
    from ..apps.sampling import load_model, sample_to_files

    check_camera(input, camera)
    out_dir = output_folder(out_dir, Path("samples"), default_name(checkpoint, input), overwrite)
    model = load_model(checkpoint, notice=True)
    try:
        files = sample_to_files(model, out_dir, input_image=input, camera=camera, num_samples=num_samples, views=views, seed=seed, steps=steps, guidance=guidance)
    except OSError as exc:
        raise VsdError(f"cannot write samples to {exc.filename or out_dir}: {exc.strerror or exc}") from None
    print_written(files, out_dir)


def _model_label(checkpoint: Path) -> str:
    """A short name for the model a checkpoint argument names: its run or shipped-model folder."""
    p = Path(checkpoint)
    if p.suffix in (".pt", ".safetensors"):
        p = p.parent.parent if p.parent.name == "checkpoints" else p.parent if p.name == "model.safetensors" else p.with_suffix("")
    return p.name or "model"


def fresh_folder(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name-2``, ``-3``, ... : the first that does not exist or is empty,
    so that a command's default output never replaces an earlier one."""
    for i in range(1, 10_000):
        cand = parent / (name if i == 1 else f"{name}-{i}")
        if not cand.exists() or (cand.is_dir() and not any(cand.iterdir())):
            return cand
    raise VsdError(f"{parent} holds 10,000 folders named {name}-N; pass --out")


class OutputExistsError(VsdError):
    """An --out folder that already holds files, or that is a file: nothing is written."""

    exit_code = 2


def check_camera(input: Path | None, camera: Path | None) -> None:
    """Refuse, before any work, a --camera without an --input image or a camera file that does not read."""
    from ..apps.sampling import input_camera

    input_camera(input, camera)


def default_name(checkpoint: Path, input: Path | None) -> str:
    """``<model>-<input stem>``, or ``<model>-unconditional``: what a default output folder holds."""
    return f"{_model_label(checkpoint)}-{input.stem if input else 'unconditional'}"


def output_folder(out_dir: Path | None, parent: Path, name: str, overwrite: bool = False) -> Path:
    """Where a command writes: ``out_dir`` when given (refused when it is a file, or already
    holds files and ``overwrite`` is off), else a fresh ``parent/name[-N]`` (:func:`fresh_folder`).
    Checked before any work, so that a refused command has touched nothing."""
    if out_dir is None:
        return fresh_folder(parent, name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"--out {out_dir} is a file, not a folder; choose a folder (a new or empty one) with --out")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held and not overwrite:
        noun = "file" if len(held) == 1 else "files"
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise OutputExistsError(
            f"{out_dir} already holds {len(held)} {noun} (e.g. {shown}); pass --overwrite to write into it, or choose another --out"
        )
    return out_dir


def print_written(files: dict, folder: Path) -> None:
    """The files a command wrote (one line per kind), then the folder holding them."""
    for kind, path in files.items():
        shown = ", ".join(map(str, path)) if isinstance(path, list) else str(path)
        out.print(f"{kind}: {shown}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"folder: {folder}", markup=False, highlight=False, soft_wrap=True)


def _register_command_modules() -> None:
    """Command groups that live in their own modules (each has ``register(app)``)."""
    import importlib

    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue
            raise
        mod.register(app)


COMMAND_MODULES = ("eval", "data", "export", "refine", "sweep", "pack", "importer")
_register_command_modules()


WARNINGS_LOG = "warnings.log"
SHOW_WARNINGS_ENV = "VSD_SHOW_WARNINGS"


def warnings_log_path() -> Path:
    """$VSD_CACHE_DIR/warnings.log, else ~/.cache/vsd/warnings.log (or under $XDG_CACHE_HOME)."""
    root = os.environ.get("VSD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vsd"
    return Path(root) / WARNINGS_LOG


class _WarningsLog(logging.FileHandler):
    """Appends to the log, making its folder on the first warning; an unwritable log is skipped
    rather than disturbing the command."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def handleError(self, record) -> None:
        pass


@contextlib.contextmanager
def warnings_to_log():
    """Python warnings (library deprecations, fallbacks) go to :func:`warnings_log_path`, not to
    the terminal, where a source line would sit above the command's own messages; with
    VSD_SHOW_WARNINGS=1 they are shown as usual. The previous state is restored on exit."""
    if os.environ.get(SHOW_WARNINGS_ENV, "").strip() not in ("", "0"):
        yield
        return
    handler = _WarningsLog(warnings_log_path(), delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("py.warnings")
    propagate, shown = logger.propagate, warnings.showwarning
    logger.addHandler(handler)
    logger.propagate = False  # the root logger's handlers (or logging's last resort) print to stderr

    def to_log(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, VsdNotice):  # vsd's own notices reach the user, in one line
            impl = getattr(warnings, "_showwarnmsg_impl", None)
            if shown is not getattr(warnings, "_showwarning_orig", None):
                shown(message, category, filename, lineno, file, line)  # a caller's own display
            elif impl is not None and getattr(impl, "__module__", None) != "warnings":
                # catch_warnings(record=True) (a test, a notebook) is recording: hand it over
                impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
            else:
                err.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
            return
        logger.warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    warnings.showwarning = to_log  # what logging.captureWarnings does, restorable whatever was there
    try:
        yield
    finally:
        warnings.showwarning = shown
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()


def main(argv: list[str] | None = None) -> int:
    with warnings_to_log():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    keep_freed_memory()
    try:
        app(args=argv, standalone_mode=False)
    except VsdError as exc:
        # escape: messages quote user input (paths, values) that may contain [brackets]
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; the last checkpoint is kept")
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors carry their own exit code
        for exceptions in _click_exception_modules():
            if isinstance(exc, exceptions.ClickException):
                exc.show()
                return exc.exit_code
            if isinstance(exc, exceptions.Abort):
                return 1
        raise
    return 0


def _click_exception_modules() -> list:
    """click's exceptions, and those of the copy of click that newer typer releases bundle."""
    import importlib

    mods = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


if __name__ == "__main__":
    sys.exit(main())
