"""``vsd-run eval`` and ``vsd-run report``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("report")(report_command)


class Protocol(str, Enum):
    default = "default"
    paper = "paper"


def eval_command(
    checkpoint: Path = typer.Argument(..., help="checkpoint file, run directory or shipped model name (vsd-run models)"),
    split: str = typer.Option("test", "--split", help="dataset split of the checkpoint's recipe"),
    protocol: Protocol = typer.Option(
        Protocol.default, "--protocol", case_sensitive=False,
        help="default: the views of each dataset item (first --cond-views clean). paper: the published evaluation: "
        "1 clean + 3 noisy views (SRN: clean view 64, noisy views 90, 104, 120, scoring the object's other views; datasets "
        "without a source view, minens and co3d: view 0 of each item clean, views 1-3 noisy, scoring views 1.. of the item), "
        "DDIM 250 steps unless --steps, no guidance unless --guidance",
    ),
    cond_views: int = typer.Option(1, "--cond-views", min=0, help="clean conditioning views (0: unconditional generation, scored by KID)"),
    samples: int = typer.Option(20, "--samples", min=1, help="samples per input, N of best-of-N (20, as in the published evaluation; deterministic checkpoints draw 1)"),
    objects: Optional[int] = typer.Option(None, "--objects", min=1, help="evaluate the first M viewsets (default: all)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="sampler steps (default: the recipe's; 250 under --protocol paper)"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="samples drawn at once"),
    seed: int = typer.Option(0, "--seed"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance weight (default: the recipe's; 0 under --protocol paper)"),
    fit_steps: Optional[int] = typer.Option(None, "--fit-steps", min=0, help="Adam steps per sampler step fitting the volume to the input views (default: the recipe's diffusion.input_fit_steps; 0: none)"),
    lpips_weights: Optional[Path] = typer.Option(None, "--lpips-weights", help="local VGG16 weights for LPIPS (default: $VSD_LPIPS_WEIGHTS; never downloaded)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: RUN/eval_<split>_cond<k>, RUN/eval_<split>_paper under --protocol paper); re-running resumes it"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Evaluate a checkpoint: best-of-N PSNR/SSIM(/LPIPS), averaged sample, diversity and the
    ambiguous subset (conditional), or a kernel distance (unconditional, --cond-views 0).
    --protocol paper: the published evaluation's views, steps and sampler (see --protocol)."""
    from rich.console import Console

    from ..apps.evaluation import EvalConfig, markdown_table, run_eval, summary_table

    cfg = EvalConfig(split=split, cond_views=cond_views, samples=samples, objects=objects, steps=steps, batch_size=batch_size,
                     seed=seed, guidance=guidance, fit_steps=fit_steps, lpips_weights=str(lpips_weights) if lpips_weights else None,
                     protocol=protocol.value)
    summary, out = run_eval(checkpoint, cfg, out_dir, quiet=quiet)
    con = Console()
    if "protocol" in summary.get("notes", {}):
        con.print(f"protocol {summary['notes']['protocol']}", markup=False, highlight=False, soft_wrap=True)
    for title, header, rows in summary_table(summary):
        con.print(f"\n{title}", style="bold", highlight=False)
        con.print(markdown_table(header, rows), markup=False, highlight=False, soft_wrap=True)
    con.print(f"LPIPS: {summary['lpips']}", markup=False, highlight=False, soft_wrap=True)
    con.print(f"written: {out / 'metrics.json'}, {out / 'metrics.csv'}, {out / 'metrics.md'}", markup=False, highlight=False, soft_wrap=True)


def report_command(
    run_dir: Path = typer.Argument(..., help="run directory (holding recipe.yaml, log.csv, samples/)"),
    eval_dirs: Optional[List[Path]] = typer.Option(None, "--eval", help="evaluation folder(s) to include (default: RUN/eval*/ with a metrics.json)"),
) -> None:
    """Write RUN/report.html (self-contained: images embedded) and RUN/report.md."""
    from rich.console import Console

    from ..apps.report import write_report

    files = write_report(run_dir, eval_dirs or None)
    for kind, path in files.items():
        Console().print(f"{kind}: {path}", markup=False, highlight=False, soft_wrap=True)
