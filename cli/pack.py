"""``vsd-run pack`` and ``vsd-run models``: ship a trained run as named safetensors weights."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("pack")
    def pack(
        checkpoint: Path = typer.Argument(..., help="checkpoint file or run directory"),
        name: str = typer.Argument(..., help="model name, e.g. minens-voxel (loaded by vsd.load(name))"),
        overrides: Optional[List[str]] = typer.Argument(None, help="key=value changes to the embedded recipe (e.g. data.skins=auto)"),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="folder of models (default: the package's pretrained/)"),
        objects: int = typer.Option(8, "--objects", min=1, help="held-out test viewsets stored beside the weights"),
    ) -> None:
        """Write OUT/NAME/model.safetensors (EMA weights + resolved recipe) and heldout.safetensors."""
        from .console import out
        from ..apps.pretrained import PRETRAINED_DIR
        from ..apps.pretrained import pack as do_pack

        path = do_pack(checkpoint, name, out_dir or PRETRAINED_DIR, overrides or [], objects)
        size = sum(p.stat().st_size for p in path.parent.iterdir()) / 2**20
        out.print(f"{name}: {path.parent} ({size:.1f} MiB)", markup=False, highlight=False, soft_wrap=True)

    @app.command("models")
    def models() -> None:
        """List the models shipped with this install and those imported (names for vsd.load and vsd-run sample)."""
        from .console import out
        from ..apps.pretrained import PRETRAINED_DIR, load_weights, names

        from ..apps.paper_import import models_dir

        shipped = names()
        for n in shipped:
            w = load_weights(PRETRAINED_DIR / n / "model.safetensors")
            out.print(f"{n}  (step {w['step']}, {len(w['ema'])} tensors)", markup=False, highlight=False)
        if not shipped:
            out.print("no models are shipped in this install", markup=False)
        for n in names(models_dir()):
            w = load_weights(models_dir() / n / "model.safetensors")
            out.print(f"{n}  (imported, step {w['step']}, {len(w['ema'])} tensors)", markup=False, highlight=False)
