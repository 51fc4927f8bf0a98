"""The one progress mechanism: plain lines on wall time off a terminal, a rich bar on one, nothing
when quiet; and the commands that use it, run off a terminal with a slowed step."""

from __future__ import annotations

import io
import re
import time

import pytest

from vsd.core.errors import VsdError
from vsd.core.progress import INTERVAL_ENV, Progress, default_interval, format_duration

LINE = re.compile(r"^(?P<what>.+?) (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\)(?P<rest>.*)$")


class Clock:
    """Wall time that moves only when told to: a slowed loop without waiting."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def plain_lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_off_a_terminal_a_line_comes_once_the_interval_has_passed():
    clock, out = Clock(), io.StringIO()
    with Progress("train", 10, interval=0.2, stream=out, clock=clock) as bar:
        assert [m["done"] for m in plain_lines(out.getvalue())] == ["0"]  # the line at the start
        clock.sleep(0.1)
        bar.update(1, loss=0.5)
        assert len(out.getvalue().splitlines()) == 1  # 0.1 s < interval: no line yet
        clock.sleep(0.15)
        bar.update(2, loss=0.25)  # 0.25 s since the last line
        last = plain_lines(out.getvalue())[-1]
        assert (last["done"], last["total"], last["pct"]) == ("2", "10", "20")
        # 2 steps in 0.25 s = 8 steps/s; 8 steps left: eta 1 s
        assert "8 steps/s" in last["rest"] and "eta 1s" in last["rest"] and "loss 0.25" in last["rest"]
        for i in range(3, 11):
            clock.sleep(0.5)  # a slow step: each one is worth a line
            bar.update(i)
    lines = plain_lines(out.getvalue())
    assert [m["done"] for m in lines] == ["0", "2", "3", "4", "5", "6", "7", "8", "9", "10"]
    assert lines[-1]["pct"] == "100" and "took 4s" in lines[-1]["rest"]  # the final line


def test_the_final_line_comes_when_the_last_update_wrote_none():
    clock, out = Clock(), io.StringIO()
    with Progress("eval", 4, unit="objects", interval=30, stream=out, clock=clock) as bar:
        for _ in range(4):
            clock.sleep(1.0)
            bar.advance()
    lines = plain_lines(out.getvalue())
    assert [m["done"] for m in lines] == ["0", "4"]
    assert "1 objects/s" in lines[-1]["rest"]


def test_resumed_work_counts_in_the_total_not_in_the_rate():
    clock, out = Clock(), io.StringIO()
    with Progress("train", 100, done=90, interval=0, stream=out, clock=clock) as bar:
        clock.sleep(2.0)
        bar.update(95)
    lines = plain_lines(out.getvalue())
    assert len(lines) == 2  # the start and the update; the end repeats no line
    line = lines[-1]
    assert (line["done"], line["pct"]) == ("95", "95")
    assert "2.5 steps/s" in line["rest"] and "eta 2s" in line["rest"]


def test_bytes_and_an_unknown_total():
    clock, out = Clock(), io.StringIO()
    with Progress("downloading p", None, unit="bytes", interval=0, stream=out, clock=clock) as bar:
        clock.sleep(1.0)
        bar.update(3 * 2**20)
    assert out.getvalue().splitlines()[-1] == "downloading p 3.0 MiB  3.0 MiB/s  eta ?"


def test_quiet_writes_nothing():
    out = FakeTerminal()
    with Progress("train", 3, quiet=True, interval=0, stream=out) as bar:
        for i in range(3):
            bar.update(i + 1, loss=1.0)
    plain = io.StringIO()
    with Progress("train", 3, quiet=True, interval=0, stream=plain) as bar:
        bar.advance(3)
    assert out.getvalue() == "" and plain.getvalue() == ""


def test_on_a_terminal_the_rich_bar_is_used_and_no_plain_lines():
    out = FakeTerminal()
    with Progress("train", 3, interval=0, stream=out) as bar:
        assert bar.bar is not None
        for i in range(3):
            bar.update(i + 1, loss=0.125)
        with Progress("inner", 2, interval=0, stream=out) as inner:  # a nested bar stays silent
            inner.advance(2)
            assert inner.bar is None
    text = out.getvalue()
    assert "\x1b[" in text and "3/3" in text and "loss 0.125" in text  # rich's live bar
    assert plain_lines(text) == [] and "inner" not in text


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert default_interval() == 0.5 and Progress("x").interval == 0.5
    monkeypatch.delenv(INTERVAL_ENV)
    assert default_interval() == 30.0
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.raises(VsdError, match=rf"{INTERVAL_ENV}='soon'.*seconds"):
        default_interval()


def test_durations():
    assert [format_duration(s) for s in (0.4, 42, 322, 7500, float("inf"))] == ["0s", "42s", "5m22s", "2h05m", "?"]


# ---- commands off a terminal, with a slowed step --------------------------------------------
SLOW = 0.6  # seconds per slowed step, above the interval below
INTERVAL = "0.5"


def _lines_of(text: str, what: str) -> list[re.Match]:
    return [m for m in plain_lines(text) if m["what"].startswith(what)]


def test_training_then_sampling_write_a_line_per_slow_step(tmp_path, monkeypatch, capsys):
    from conftest import TINY

    from vsd.apps.training import Trainer
    from vsd.cli.main import main
    from vsd.core.engine import ViewsetDiffusion

    monkeypatch.setenv(INTERVAL_ENV, INTERVAL)
    step = Trainer.train_step

    def slow_step(self):
        time.sleep(SLOW)
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", slow_step)
    run = tmp_path / "run"
    assert main(["recipe", "voxel_minens.yaml", *TINY, "--out", str(run)]) == 0  # TINY: 2 steps
    train = _lines_of(capsys.readouterr().err, "train")
    assert [(m["done"], m["total"]) for m in train] == [("0", "2"), ("1", "2"), ("2", "2")]
    assert all("steps/s" in m["rest"] and "loss " in m["rest"] for m in train[1:])
    assert all("eta " in m["rest"] for m in train[1:-1]) and "took " in train[-1]["rest"]

    monkeypatch.setattr(Trainer, "train_step", step)
    predict = ViewsetDiffusion.predict_from_volume  # once per sampler step

    def slow_predict(self, *args, **kwargs):
        time.sleep(SLOW)
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(ViewsetDiffusion, "predict_from_volume", slow_predict)
    assert main(["sample", str(run), "--num-samples", "1", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    sample = _lines_of(capsys.readouterr().err, "generate (1 sample)")
    assert [(m["done"], m["total"]) for m in sample] == [("0", "2"), ("1", "2"), ("2", "2")]
    assert "eta " in sample[1]["rest"] and "took " in sample[-1]["rest"]


def test_the_api_shows_sampling_unless_told_not_to(tmp_path, capsys):
    import vsd
    from conftest import TINY

    from vsd.cli.main import main

    run = tmp_path / "run"
    assert main(["recipe", "voxel_minens.yaml", *TINY, "--out", str(run), "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no progress
    pipe = vsd.load(run)
    capsys.readouterr()
    pipe.reconstruct(torch_image(), num_samples=2, steps=2, views=3)
    lines = _lines_of(capsys.readouterr().err, "reconstruct (2 samples)")
    assert [(m["done"], m["total"]) for m in lines] == [("0", "2"), ("2", "2")]
    pipe.reconstruct(torch_image(), num_samples=2, steps=2, views=3, progress=False).turntable(tmp_path / "t.gif", frames=2)
    assert capsys.readouterr().err == ""


def torch_image():
    import torch

    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
