"""`vsd-run report`: a self-contained HTML page (embedded images, metrics tables) and markdown,
checked as text and, where chromium is installed, as a rendered screenshot."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vsd.apps.report import loss_svg, read_log, write_report
from vsd.cli.main import main

from conftest import TINY

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["recipe", "voxel_minens.yaml", *TINY, "--out", str(run), "--quiet"]) == 0
    assert main(["eval", str(run), "--samples", "2", "--objects", "2", "--steps", "1", "--quiet"]) == 0
    return run


def _data_uris(text: str) -> list[tuple[str, bytes]]:
    return [(m[1], base64.b64decode(m[2])) for m in re.finditer(r"data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)", text)]


def test_report_html_embeds_images_and_tables(run_dir):
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    uris = _data_uris(page)
    kinds = [k for k, _ in uris]
    assert kinds.count("image/png") >= 3  # loss curve, conditional and unconditional grids
    assert "image/gif" in kinds  # the turntable
    for mime, data in uris:
        img = Image.open(io.BytesIO(data))
        assert img.format == mime.split("/")[1].upper() and min(img.size) > 8
    # nothing refers to a file beside the page
    assert not re.search(r"src=['\"](?!data:)", page)
    assert "<table" in page and "eval_test_cond1" in page and "best of 2" in page and "unavailable" in page
    assert "voxel-grid" in page and "attention" in page  # recipe summary
    md = (run_dir / "report.md").read_text()
    assert "| group |" in md and "](samples/step_000002_cond.png)" in md and "](report_loss.png)" in md
    assert (run_dir / "report_loss.png").stat().st_size > 0


def test_report_embeds_the_newest_samples_and_turntable_byte_for_byte(run_dir):
    page = write_report(run_dir)["html"].read_text()
    embedded = [data for _, data in _data_uris(page)]
    for name in ("step_000002_cond.png", "step_000002_uncond.png", "step_000002_turntable.gif"):
        assert (run_dir / "samples" / name).read_bytes() in embedded, name
    md = (run_dir / "report.md").read_text()
    assert "](samples/step_000002_uncond.png)" in md and "](samples/step_000002_turntable.gif)" in md


def test_report_shows_the_fidelity_metrics_of_the_evaluation(run_dir):
    import json

    files = write_report(run_dir)
    fid = json.loads((run_dir / "eval_test_cond1" / "metrics.json").read_text())["groups"]["all"]["fidelity"]
    psnr = f"{fid['input_view_psnr']:.2f}"
    page, md = files["html"].read_text(), files["markdown"].read_text()
    assert "Fidelity to the input" in page and "<th>input-view PSNR</th>" in page and f"<td>{psnr}</td>" in page
    assert "### Fidelity to the input" in md and "input-view PSNR" in md and f"| {psnr} |" in md


def test_report_step_is_the_newest_checkpoints(run_dir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    log = run / "log.csv"
    log.write_text("\n".join(log.read_text().splitlines()[:2]) + "\n")  # logged only up to step 1
    head = lambda: write_report(run)["markdown"].read_text().splitlines()[2]  # noqa: E731
    assert head().endswith("; trained 2 steps (checkpoints/step_00000002.pt)")
    assert "trained 2 steps" in (run / "report.html").read_text()
    shutil.rmtree(run / "checkpoints")  # no checkpoint: the log's last step
    assert head().endswith("; trained 1 step (log.csv)")


def test_loss_curve_falls_back_to_inline_svg(run_dir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    files = write_report(run, use_matplotlib=False)
    page = files["html"].read_text()
    assert "<svg" in page and page.count("<polyline") == len(read_log(run / "log.csv"))
    svg = loss_svg({"loss": [(1, 1.0), (2, 0.1)], "mse": [(1, 0.5), (2, 0.5)]}, width=100, height=100)
    # log y axis: 1.0 at the top of the plot area (y=20), 0.1 at its bottom (y=100-40)
    pts = re.findall(r'points="([^"]+)"', svg)[0].split()
    assert [float(p.split(",")[1]) for p in pts] == pytest.approx([20.0, 60.0])


def test_report_names_a_missing_eval_folder(run_dir, tmp_path):
    assert main(["report", str(run_dir), "--eval", str(tmp_path / "nowhere")]) == 2


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_headless_browser(run_dir, tmp_path):
    files = write_report(run_dir)
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           files["html"].resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.exists(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1200)
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text antialiasing, table shading, plot and sample images
    # the recipe table sits near the top: its band holds header, stripes and text
    band = img[150:700]
    assert len(np.unique(band.reshape(-1, 3), axis=0)) > 50 and band.std() > 10
    # the table header colour (#1f4e79) is drawn
    assert (np.abs(img.astype(int) - [0x1F, 0x4E, 0x79]).sum(-1) < 6).sum() > 1000
