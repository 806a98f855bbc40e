"""Progress of a job, per stream item (image, slice, tile): a tqdm bar on a terminal, INFO lines otherwise.

Without a terminal (CI logs, ``nohup``, a cluster job) a line such as
``progress: 40/200 slices (20 %), 3.1 slices/s, ETA 52 s`` is logged at INFO every ``every_n`` items or
``every_s`` seconds, whichever comes first, and once at the end. Every mode (folders, volumes, slides, on
Ray or not) reports through this one class; the total may grow while a job plans its inputs (a volume's
slices are known once it is read, a slide's tissue tiles once its thumbnail is).
"""
from __future__ import annotations

import logging
import math
import sys
import time

log = logging.getLogger("refseg.progress")

MODES = ("auto", "bar", "log", "off")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Counts finished items out of ``total``.

    Args:
        total: items to process (may grow later: :meth:`grow`).
        mode: ``auto`` (bar when stderr is a terminal, else log lines), ``bar``, ``log``, ``off``.
        every_n: log a line every this many items (default: about every 10 % of ``total``, at most every
            100 items).
        every_s: ... or when this many seconds passed since the last line.
        unit: plural noun of an item (``images``, ``slices``, ``tiles``).
    """

    def __init__(self, total: int, mode: str = "auto", every_n: int | None = None,
                 every_s: float = 30.0, unit: str = "images"):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.total, self.done, self.mode, self.unit = total, 0, mode, unit
        self._every_n = every_n
        self.every_s = every_s
        self._start = self._last = time.perf_counter()
        self._last_done = 0
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit.rstrip("s"), desc="refseg", file=sys.stderr)

    @property
    def every_n(self) -> int:
        return self._every_n or max(1, min(100, math.ceil(self.total / 10)))

    def grow(self, n: int) -> None:
        """``n`` more items to process than announced so far."""
        self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def line(self) -> str:
        """The progress sentence for the current count."""
        elapsed = time.perf_counter() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "unknown"
        return (f"progress: {self.done}/{self.total} {self.unit} ({pct:.0f} %), {rate:.2f} {self.unit}/s, "
                f"ETA {eta}")

    def update(self, n: int = 1) -> None:
        """``n`` more items finished."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log":
            now = time.perf_counter()
            if self.done - self._last_done >= self.every_n or now - self._last >= self.every_s:
                log.info("%s", self.line())
                self._last, self._last_done = now, self.done

    def close(self) -> None:
        """Close the bar, or log the final line if the last one was not at the end."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "log" and self.done != self._last_done:
            log.info("%s", self.line())
            self._last_done = self.done
