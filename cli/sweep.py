"""``vsd-run sweep``: train and evaluate a family of recipes (see :mod:`vsd.apps.sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_command)


STATE_STYLE = {"done": "green", "failed": "red", "running": "cyan", "interrupted": "yellow", "pending": "dim"}


def sweep_command(
    file: Path = typer.Argument(..., help="sweep file (YAML: base, overrides, axes/mode or runs, eval, metric, out)"),
    workers: int = typer.Option(1, "--workers", min=1, help="runs trained at once"),
    status: bool = typer.Option(False, "--status", help="print every run's state and exit"),
    executor: str = typer.Option("local", "--executor", help="local (worker processes here) or ray (Ray tasks; $RAY_ADDRESS picks the cluster)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="sweep folder (default: the file's `out`, else runs/sweeps/<name>)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads per run (default: cores // workers)"),
) -> None:
    """Train and evaluate every run of a sweep in parallel; re-running skips finished runs and
    resumes interrupted ones. Writes results.csv, results.md and metric.png. Exits 1 when a run failed."""
    from rich.markup import escape

    from .console import err, out
    from ..core.errors import VsdError
    from ..apps.sweep import SweepInterrupted, load_sweep, run_sweep, status_rows

    sweep = load_sweep(file, out_dir)
    if status:
        print_status(sweep, status_rows(sweep))
        return
    if executor not in ("local", "ray"):
        raise VsdError(f"--executor must be local or ray, got {executor!r}")
    try:
        rows = run_sweep(sweep, workers=workers, executor=executor, threads=threads,
                         log=lambda msg: err.print(escape(msg), highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        raise SweepInterrupted(f"sweep interrupted; the running runs checkpointed. Run `vsd-run sweep {file}` again to resume them") from None
    print_status(sweep, rows)
    files = [sweep.out / name for name in ("results.csv", "results.md", "metric.png") if (sweep.out / name).exists()]
    out.print("written: " + ", ".join(map(str, files)), markup=False, highlight=False, soft_wrap=True)
    failed = [r["run"] for r in rows if r["status"] != "done"]
    if failed:
        raise VsdError(f"{len(failed)} of {len(rows)} runs did not finish ({', '.join(failed)}); their errors are in {sweep.out / 'results.md'}")


def print_status(sweep, rows: list[dict]) -> None:
    """A table of every run's state; the errors of failed runs below it."""
    from rich.markup import escape
    from rich.table import Table

    from .console import out
    from ..apps.sweep import format_value

    table = Table(title=f"sweep {sweep.name}: {sweep.out}")
    for col in [*sweep.axes, "state", "step", "tries", sweep.metric]:
        table.add_column(col, no_wrap=col not in sweep.axes, overflow="fold")
    for r in rows:
        value, step = r.get(sweep.metric), r.get("train_step")
        style = STATE_STYLE.get(r["status"], "")
        state = r["status"] + (f" ({r['stage']})" if r.get("stage") and r["status"] != "done" else "")
        table.add_row(*(escape(format_value(r[a])) if r[a] != "" else "" for a in sweep.axes), f"[{style}]{state}[/]",
                      "" if step is None else str(step), str(r.get("attempts") or 0), f"{value:.4g}" if isinstance(value, float) else "")
    out.print(table)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    out.print(", ".join(f"{n} {s}" for s, n in counts.items()), highlight=False)
    for r in rows:
        if r.get("error"):
            out.print(f"[red]{escape(r['run'])}[/]: {escape(r['error'].splitlines()[0])}", highlight=False, soft_wrap=True)
