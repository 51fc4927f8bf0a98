"""``vsd-run import``: bring a released original Viewset Diffusion experiment into vsd."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_(
        folder: Path = typer.Argument(..., help="the original experiment's folder (.hydra/config.yaml and model.pth)"),
        name: str = typer.Argument(..., help="model name to load it by (vsd.load(name), vsd-run sample NAME)"),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="folder of models (default: $VSD_MODELS_DIR, else ~/.cache/vsd/models)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an imported model of the same name"),
    ) -> None:
        """Convert a released original experiment (its config read as YAML, its weights loaded without
        unpickling anything) into OUT/NAME/model.safetensors, loadable by NAME like a shipped model."""
        from .console import out
        from ..apps.paper_import import import_to_models, models_dir

        path = import_to_models(folder, name, out_dir, overwrite)
        size = path.stat().st_size / 2**20
        where = "" if out_dir is None or Path(out_dir).resolve() == models_dir().resolve() else f" (load it by path: {path})"
        out.print(f"{name}: {path} ({size:.1f} MiB){where}", markup=False, highlight=False, soft_wrap=True)
