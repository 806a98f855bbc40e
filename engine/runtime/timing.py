"""Per-stage timing that neither lies on GPUs nor stalls them.

On CUDA a stage is timed by two CUDA events recorded on the current stream: recording costs no host
sync, so stages still overlap host work and copies; the elapsed times are read when :attr:`StageTimer.totals`
is first asked for, which the Segmenter does after the batch's one copy to the host (every event has
completed by then, so reading them waits for nothing). ``synchronize=True`` (a profile: the
Segmenter's ``profile`` flag) instead synchronises the device around every stage and reads the host
clock: each stage's wall time alone, at the price of serialising the pipeline. On the CPU the host clock
is the stage time.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates seconds per stage name: ``with timer("sam_encoder"): ...``; read :attr:`totals`."""

    def __init__(self, device: torch.device | str = "cpu", synchronize: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.synchronize = synchronize and self.cuda
        self._host: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, stage: str):
        if self.cuda and not self.synchronize:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((stage, start, end))
            return
        if self.synchronize:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self._host[stage] += time.perf_counter() - begin

    @property
    def totals(self) -> dict[str, float]:
        """Stage name -> seconds (events are resolved here, waiting for the last one if still running)."""
        for stage, start, end in self._events:
            end.synchronize()
            self._host[stage] += start.elapsed_time(end) / 1e3
        self._events.clear()
        return dict(self._host)
