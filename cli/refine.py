"""``vsd-run refine``: sample one object and refit it as a higher-resolution hash grid."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("refine")
    def refine(
        checkpoint: Path = typer.Argument(..., help="checkpoint file, run directory or shipped model name (vsd-run models)"),
        input: Optional[Path] = typer.Option(None, "--input", help="condition on this image (seen from --camera, or from the front)"),
        camera: Optional[Path] = typer.Option(None, "--camera", help="JSON camera of the --input image (c2w, K, width, height; examples/inputs/*.json); default: seen from the front"),
        seed: int = typer.Option(0, "--seed"),
        sample_steps: Optional[int] = typer.Option(None, "--sample-steps", min=1, help="sampler steps (default: the recipe's)"),
        guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance weight w"),
        steps: int = typer.Option(300, "--steps", min=0, help="optimisation steps of the refinement"),
        views: int = typer.Option(24, "--views", min=1, help="target views rendered from the sample"),
        size: int = typer.Option(64, "--size", min=4, help="target render size (pixels)"),
        levels: int = typer.Option(16, "--levels", min=1, help="hash-grid levels"),
        max_resolution: int = typer.Option(128, "--max-resolution", min=2, help="finest hash-grid level"),
        log2_table_size: int = typer.Option(15, "--log2-table-size", min=4, max=24),
        rays: int = typer.Option(4096, "--rays", min=1, help="rays per optimisation step"),
        implementation: str = typer.Option("auto", "--implementation", help="auto, torch or tcnn"),
        format: str = typer.Option("glb", "--format", help="mesh format: glb, ply or obj"),
        resolution: int = typer.Option(128, "--resolution", min=4, help="marching-cubes grid size"),
        threshold: Optional[float] = typer.Option(None, "--threshold", help="density level of the surface (1/world-length)"),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: a new folder refined/<model>-<input or unconditional>[-N])"),
        overwrite: bool = typer.Option(False, "--overwrite", help="write into an --out folder that already holds files"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
    ) -> None:
        """Sample one object, fit a free hash grid to its renders, write a turntable and a mesh."""
        from pydantic import ValidationError

        from .console import out
        from ..core.errors import VsdError
        from ..apps.export import FORMATS
        from ..apps.refine import RefineSettings, refine_to_files
        from ..apps.sampling import load_model
        from .main import check_camera, default_name, output_folder, print_written

        if format.lower() not in FORMATS:
            raise VsdError(f"--format: unknown mesh format {format!r}; choose one of {', '.join(FORMATS)}")
        try:
            settings = RefineSettings(
                steps=steps, views=views, levels=levels, size=size, max_resolution=max_resolution,
                min_resolution=min(16, max_resolution), log2_table_size=log2_table_size,
                rays_per_step=rays, implementation=implementation,
            )
        except ValidationError as exc:
            bad = ", ".join(".".join(map(str, e["loc"])) + f": {e['msg']}" for e in exc.errors())
            raise VsdError(f"refine settings: {bad}") from None
        check_camera(input, camera)
        out_dir = output_folder(out_dir, Path("refined"), default_name(checkpoint, input), overwrite)
        model = load_model(checkpoint, notice=True)
        result = refine_to_files(
            model, out_dir, settings, input_image=input, camera=camera, seed=seed, sample_steps=sample_steps, guidance=guidance,
            mesh_format=format.lower(), mesh_resolution=resolution, threshold=threshold, quiet=quiet,
        )
        out.print(f"photometric mse: {result['loss_before']:.5f} -> {result['loss_after']:.5f}")
        print_written(result["files"], out_dir)
