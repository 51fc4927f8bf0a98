"""Progress of every long operation: training, sampling, evaluation, data preparation.

One mechanism, two outputs. On a terminal, a rich bar (what, bar, done/total, rate, time left,
fields such as the loss). Anywhere else (CI logs, ``nohup``, notebooks, files) plain lines::

    train 120/2000 (6%)  5.83 steps/s  eta 5m22s  loss 0.0412

one when the operation starts, then one whenever it advances and ``interval`` seconds of wall
time (30 by default; ``VSD_PROGRESS_INTERVAL`` sets another) have passed since the last line,
and a last one when it ends. Lines follow wall time, not counts, so a run of slow steps still
writes one line per step once each step takes longer than the interval.

    with Progress("sample", total=steps, unit="steps") as bar:
        for i in range(steps):
            ...
            bar.update(i + 1, loss=loss)

``quiet=True`` writes nothing. A Progress opened on a terminal while another one's bar is shown
there stays silent, so that nested operations do not fight over the screen.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, TextIO

from .errors import VsdError

INTERVAL_ENV = "VSD_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0

_live_bars = 0  # rich bars shown now (rich allows one live display at a time)


def default_interval() -> float:
    """Seconds between plain lines: ``$VSD_PROGRESS_INTERVAL``, else 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise VsdError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds >= 0 between progress lines (default {DEFAULT_INTERVAL:g})")
    return value


def format_duration(seconds: float) -> str:
    """``42s``, ``5m22s``, ``2h05m``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _field(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Progress of one operation of ``total`` ``unit`` (None: unknown); see the module docstring.

    ``done``: how many were already done before it started (a resumed run): shown in the count,
    left out of the rate. ``unit="bytes"`` shows sizes and transfer rates. ``interval``: seconds
    between plain lines (default :func:`default_interval`). ``clock``: the time source, seconds.
    """

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        unit: str = "steps",
        done: int = 0,
        quiet: bool = False,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.unit = what, total, unit
        self.done = self.start_done = done
        self.fields: dict = {}
        self.quiet = quiet
        self.interval = default_interval() if interval is None else interval
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.t0 = self.last_line = 0.0
        self.lines_at: int | None = None  # the count the last plain line showed
        self.bar = None
        self.task = None
        self.entered = False
        self.plain = False  # writing plain lines (off a terminal)

    # ---- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        self.entered = True
        self.t0 = self.last_line = self.clock()
        if self.quiet:
            return self
        if self._is_terminal():
            self._start_bar()
        else:
            self.plain = True
            self._line()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self._stop_bar()
        elif self.plain and self.lines_at != self.done:
            self._line()

    def _is_terminal(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):  # a closed or file-like stream without isatty
            return False

    # ---- advancing ------------------------------------------------------------------------
    def update(self, done: int, total: int | None = None, **fields) -> None:
        """Set the count done so far (and the total, when it becomes known) and the fields."""
        self.done = done
        if total is not None:
            self.total = total
        self.fields.update(fields)
        if not self.entered:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=self.total, fields=self._fields_text(), rate=self._rate_text())
        elif self.plain and self.clock() - self.last_line >= self.interval:
            self._line()

    def advance(self, k: int = 1, **fields) -> None:
        self.update(self.done + k, **fields)

    def callback(self) -> Callable[[int, int], None]:
        """A ``progress(i, n)`` function (as ``ViewsetDiffusion.sample`` takes) updating this."""
        return lambda i, n: self.update(i, total=n)

    # ---- numbers --------------------------------------------------------------------------
    def rate(self) -> float:
        """Units per second since the start, counting only what was done since."""
        elapsed = self.clock() - self.t0
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float:
        """Seconds left at the current rate (inf when unknown)."""
        rate = self.rate()
        if self.total is None or rate <= 0:
            return math.inf
        return max(0.0, (self.total - self.done) / rate)

    def _count(self, n: float) -> str:
        return format_bytes(n) if self.unit == "bytes" else str(n)

    def _rate_text(self) -> str:
        rate = self.rate()
        if self.unit == "bytes":
            return f"{format_bytes(rate)}/s"
        return f"{rate:.3g} {self.unit}/s"

    def _fields_text(self) -> str:
        return "  ".join(f"{k} {_field(v)}" for k, v in self.fields.items())

    def line(self) -> str:
        """The plain line for the current state."""
        if self.total is not None:
            pct = 100 * self.done / self.total if self.total else 100.0
            count = f"{self._count(self.done)}/{self._count(self.total)} ({pct:.0f}%)"
        else:
            count = f"{self._count(self.done)} {'' if self.unit == 'bytes' else self.unit}".rstrip()
        parts = [f"{self.what} {count}"]
        if self.done > self.start_done:
            parts.append(self._rate_text())
            finished = self.total is not None and self.done >= self.total
            elapsed = self.clock() - self.t0
            parts.append(f"took {format_duration(elapsed)}" if finished else f"eta {format_duration(self.eta())}")
        if self.fields:
            parts.append(self._fields_text())
        return "  ".join(parts)

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line = self.clock()
        self.lines_at = self.done

    # ---- the terminal bar -----------------------------------------------------------------
    def _start_bar(self) -> None:
        global _live_bars
        if _live_bars:  # an outer operation's bar is on screen: this one stays silent
            return
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        count = DownloadColumn() if self.unit == "bytes" else MofNCompleteColumn()
        self.bar = RichProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), count, TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(), TextColumn("{task.fields[fields]}"),
            console=Console(file=self.stream), transient=False,
        )  # fmt: skip
        self.bar.start()
        _live_bars += 1
        self.task = self.bar.add_task(self.what, total=self.total, completed=self.done, rate="", fields=self._fields_text())

    def _stop_bar(self) -> None:
        global _live_bars
        self.bar.update(self.task, completed=self.done, total=self.total, fields=self._fields_text(), rate=self._rate_text())
        self.bar.stop()
        self.bar = None
        _live_bars -= 1
