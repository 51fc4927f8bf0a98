"""A run's report (``vsd-run report``): one self-contained HTML page and a markdown file.

The HTML embeds every image (PNG grids, the turntable GIF, the loss curve) as base64 data URIs,
so ``report.html`` opens from disk in a browser and can be mailed as one file. The markdown
links the same images by relative path. Contents: the step trained to (the newest intact
checkpoint's), the recipe's summary, metrics tables of the evaluations found
(``RUN/eval*/metrics.json`` or the folders given; fidelity to the input among them), the loss
curves from ``log.csv`` (matplotlib when importable, else an inline SVG drawn here), and the
latest conditional and unconditional sample grids and turntable.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from pathlib import Path

import yaml

from ..core.checkpoint import load_checkpoint, run_checkpoints
from ..core.errors import DataError
from .evaluation import markdown_table, summary_table

CURVES = ("loss", "mse", "mse_heldout")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; background: #fff; }
h1 { border-bottom: 3px solid #1f77b4; padding-bottom: .2em; }
h2 { margin-top: 1.6em; color: #1f4e79; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 14px; }
th, td { border: 1px solid #bbb; padding: 4px 10px; text-align: right; }
th { background: #1f4e79; color: #fff; }
tr:nth-child(even) td { background: #e8f0fa; }
td:first-child, th:first-child, table.text td { text-align: left; }
.scroll { overflow-x: auto; }
img { image-rendering: pixelated; border: 1px solid #ccc; max-width: 100%; }
.note { color: #555; font-size: 13px; }
pre { background: #f4f4f4; padding: .8em; overflow-x: auto; }
"""


# ---- inputs --------------------------------------------------------------------------------
def read_log(path: Path) -> dict[str, list[tuple[float, float]]]:
    """log.csv -> {column: [(step, value), ...]} for the loss columns present."""
    if not path.exists():
        return {}
    series: dict[str, list[tuple[float, float]]] = {c: [] for c in CURVES}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for c in CURVES:
                try:
                    v = float(row.get(c) or "nan")
                    s = float(row["step"])
                except (TypeError, ValueError, KeyError):
                    continue
                if math.isfinite(v):
                    series[c].append((s, v))
    return {c: pts for c, pts in series.items() if pts}


def latest_samples(run: Path) -> dict[str, Path]:
    """The newest conditional/unconditional grid and turntable under RUN/samples."""
    found: dict[str, tuple[int, Path]] = {}
    pattern = re.compile(r"step_(\d+)_(cond|uncond|turntable)\.(png|gif)$")
    for p in (run / "samples").glob("step_*"):
        m = pattern.match(p.name)
        if m:
            kind = {"cond": "conditional", "uncond": "unconditional", "turntable": "turntable"}[m[2]]
            step = int(m[1])
            if kind not in found or step > found[kind][0]:
                found[kind] = (step, p)
    return {k: found[k][1] for k in ("conditional", "unconditional", "turntable") if k in found}


def trained_steps(run: Path, series: dict) -> tuple[int | None, str]:
    """The step the run has trained to, and where that is read: its newest intact checkpoint
    (log.csv rows come every train.log_every steps, so the log's last row may be short of it),
    else the log's last step; (None, "") when neither is there."""
    if run_checkpoints(run) or (run / "checkpoints" / "last.pt").is_file():
        try:
            state = load_checkpoint(run)
            return int(state["step"]), f"checkpoints/{Path(state['path']).name}"
        except DataError:
            pass
    logged = max((p[0] for pts in series.values() for p in pts), default=None)
    return (None, "") if logged is None else (int(logged), "log.csv")


def find_evals(run: Path, given: list[Path] | None) -> list[Path]:
    dirs = list(given) if given else sorted(p.parent for p in run.glob("eval*/metrics.json"))
    missing = [d for d in dirs if not (Path(d) / "metrics.json").is_file()]
    if missing:
        raise DataError(f"no metrics.json in {', '.join(map(str, missing))} (run `vsd-run eval` first)")
    return [Path(d) for d in dirs]


def recipe_rows(raw: dict) -> list[list[str]]:
    """(section, type, settings) rows of a resolved recipe."""
    rows = []
    for key, value in raw.items():
        if isinstance(value, dict):
            settings = ", ".join(f"{k}={v}" for k, v in value.items() if k != "type")
            rows.append([key, str(value.get("type", "")), settings])
        else:
            rows.append([key, "", str(value)])
    return rows


# ---- loss curves ---------------------------------------------------------------------------
def loss_png(series: dict) -> bytes | None:
    """The loss curves as PNG bytes (log y axis), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for (name, pts), colour in zip(series.items(), COLOURS):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=colour, lw=1.2)
    if all(p[1] > 0 for pts in series.values() for p in pts):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss / MSE (images in [-1, 1])")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def loss_svg(series: dict, width: int = 700, height: int = 340) -> str:
    """The loss curves as an inline SVG of polylines (log y axis when all values are positive)."""
    left, right, top, bottom = 70, 20, 20, 40
    steps = [p[0] for pts in series.values() for p in pts]
    vals = [p[1] for pts in series.values() for p in pts]
    logy = all(v > 0 for v in vals)
    f = (lambda v: math.log10(v)) if logy else (lambda v: v)
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(map(f, vals)), max(map(f, vals))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    X = lambda s: left + (s - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    Y = lambda v: top + (1 - (f(v) - y0) / (y1 - y0)) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" stroke="#888"/>']
    lo, hi = (10**y0, 10**y1) if logy else (y0, y1)
    parts += [f'<text x="{left - 5}" y="{top + 4}" text-anchor="end">{hi:.3g}</text>',
              f'<text x="{left - 5}" y="{height - bottom}" text-anchor="end">{lo:.3g}</text>',
              f'<text x="{left}" y="{height - bottom + 16}">{x0:g}</text>',
              f'<text x="{width - right}" y="{height - bottom + 16}" text-anchor="end">{x1:g}</text>',
              f'<text x="{(width + left) / 2}" y="{height - 8}" text-anchor="middle">step{" (log y)" if logy else ""}</text>']
    for i, ((name, pts), colour) in enumerate(zip(series.items(), COLOURS)):
        coords = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        parts.append(f'<text x="{width - right - 120}" y="{top + 16 + 15 * i}" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---- output --------------------------------------------------------------------------------
def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def html_table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='scroll'><table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _eval_sections(d: Path) -> tuple[str, list[str], list[tuple[str, list[str], list[list[str]]]]]:
    """Title, notes and tables (summary + per object) of one evaluation folder."""
    summary = json.loads((d / "metrics.json").read_text())
    s = summary["settings"]
    title = f"Evaluation: {d.name} ({summary['kind']}, split {s['split']}, {summary['objects']} objects, {s['samples']} samples, {s['steps']} steps)"
    notes = [f"LPIPS: {summary['lpips']}"] + [f"{k}: {v}" for k, v in summary.get("notes", {}).items()]
    tables = summary_table(summary)
    if (d / "metrics.csv").is_file():
        with open(d / "metrics.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        if len(rows) > 1:
            tables.append(("Per object", rows[0], [[_short(c) for c in r] for r in rows[1:]]))
    return title, notes, tables


def _short(cell: str) -> str:
    try:
        return f"{float(cell):.4g}" if "." in cell or "e" in cell.lower() else cell
    except ValueError:
        return cell


def write_report(run_dir: str | Path, eval_dirs: list[Path] | None = None, *, use_matplotlib: bool = True) -> dict[str, Path]:
    """Write RUN/report.html and RUN/report.md; returns their paths (and the loss plot's)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"run directory {run} does not exist")
    raw = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
    series = read_log(run / "log.csv")
    samples = latest_samples(run)
    evals = [_eval_sections(d) for d in find_evals(run, eval_dirs)]
    name = raw.get("name") or run.name
    files: dict[str, Path] = {}

    png = loss_png(series) if series and use_matplotlib else None
    svg = loss_svg(series) if series and png is None else None
    if png is not None:
        files["loss_plot"] = run / "report_loss.png"
        files["loss_plot"].write_bytes(png)
    elif svg is not None:
        files["loss_plot"] = run / "report_loss.svg"
        files["loss_plot"].write_text(svg)

    steps, where = trained_steps(run, series)
    head = f"Run directory: {run.resolve()}" + (f"; trained {steps} step{'' if steps == 1 else 's'} ({where})" if steps is not None else "")
    html_parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vsd report: {html.escape(name)}</title>",
                  f"<style>{STYLE}</style></head><body><h1>vsd report: {html.escape(name)}</h1><p class='note'>{html.escape(head)}</p>"]
    md = [f"# vsd report: {name}", "", head, ""]

    if raw:
        rows = recipe_rows(raw)
        html_parts += ["<h2>Recipe</h2>", html_table(["section", "type", "settings"], rows, "text")]
        md += ["## Recipe", "", markdown_table(["section", "type", "settings"], rows), ""]
    for title, notes, tables in evals:
        html_parts += [f"<h2>{html.escape(title)}</h2>"] + [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
        md += [f"## {title}", ""] + [f"- {n}" for n in notes] + [""]
        for t, header, rows in tables:
            html_parts += [f"<h3>{html.escape(t)}</h3>", html_table(header, rows)]
            md += [f"### {t}", "", markdown_table(header, rows), ""]
    if not evals:
        html_parts.append("<p class='note'>No evaluation found (run <code>vsd-run eval</code>).</p>")
        md += ["No evaluation found (run `vsd-run eval`).", ""]

    html_parts.append("<h2>Training loss</h2>")
    md += ["## Training loss", ""]
    if png is not None:
        html_parts.append(f"<img alt='loss curves' src='{data_uri(png, 'image/png')}'>")
    elif svg is not None:
        html_parts.append(svg)
    else:
        html_parts.append("<p class='note'>No log.csv.</p>")
    md += [f"![loss curves]({files['loss_plot'].name})" if "loss_plot" in files else "No log.csv.", ""]

    captions = {"conditional": "Conditional samples (rows: objects; ground-truth views, then sampled views)",
                "unconditional": "Unconditional samples", "turntable": "Turntable of the conditional samples"}
    for kind, path in samples.items():
        mime = "image/gif" if path.suffix == ".gif" else "image/png"
        html_parts += [f"<h2>{captions[kind]}</h2>", f"<p class='note'>{html.escape(path.name)}</p>",
                       f"<img alt='{kind}' src='{data_uri(path.read_bytes(), mime)}' style='min-width:{min(900, 4 * 64)}px'>"]
        md += [f"## {captions[kind]}", "", f"![{kind}]({path.relative_to(run).as_posix()})", ""]
    if not samples:
        html_parts.append("<p class='note'>No sample grids in samples/.</p>")

    if raw:
        html_parts += ["<h2>Full recipe</h2>", f"<pre>{html.escape(yaml.safe_dump(raw, sort_keys=False))}</pre>"]
    html_parts.append("</body></html>")
    files["html"] = run / "report.html"
    files["html"].write_text("\n".join(html_parts))
    files["markdown"] = run / "report.md"
    files["markdown"].write_text("\n".join(md))
    return files
