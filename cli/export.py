"""``vsd-run export``: sample objects from a checkpoint and write them as meshes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        checkpoint: Path = typer.Argument(..., help="checkpoint file, run directory or shipped model name (vsd-run models)"),
        input: Optional[Path] = typer.Option(None, "--input", help="condition on this image (seen from --camera, or from the front)"),
        camera: Optional[Path] = typer.Option(None, "--camera", help="JSON camera of the --input image (c2w, K, width, height; examples/inputs/*.json); default: seen from the front"),
        num_samples: int = typer.Option(1, "--num-samples", min=1, help="objects to sample, one mesh each"),
        format: str = typer.Option("glb", "--format", help="glb, ply or obj"),
        resolution: int = typer.Option(64, "--resolution", min=4, help="marching-cubes grid size for fields"),
        threshold: Optional[float] = typer.Option(None, "--threshold", help="density level of the surface (1/world-length)"),
        min_component: float = typer.Option(0.02, "--min-component", min=0.0, help="drop parts smaller than this share of the largest"),
        seed: int = typer.Option(0, "--seed"),
        steps: Optional[int] = typer.Option(None, "--steps", min=1, help="sampler steps (default: the recipe's)"),
        guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance weight w"),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: a new folder meshes/<model>-<input or unconditional>[-N])"),
        overwrite: bool = typer.Option(False, "--overwrite", help="write into an --out folder that already holds files"),
    ) -> None:
        """Sample objects (unconditional, or conditioned on --input) and write one mesh per sample."""
        from .main import check_camera, default_name, output_folder, print_written
        from ..core.errors import VsdError
        from ..apps.export import FORMATS
        from ..apps.sampling import export_to_files, load_model

        fmt = format.lower()
        if fmt not in FORMATS:
            raise VsdError(f"--format: unknown mesh format {format!r}; choose one of {', '.join(FORMATS)}")
        check_camera(input, camera)
        out_dir = output_folder(out_dir, Path("meshes"), default_name(checkpoint, input), overwrite)
        model = load_model(checkpoint, notice=True)
        paths = export_to_files(
            model, out_dir, input_image=input, camera=camera, num_samples=num_samples, format=fmt, resolution=resolution,
            threshold=threshold, min_component_ratio=min_component, seed=seed, steps=steps, guidance=guidance,
        )
        print_written({"mesh": paths}, out_dir)
