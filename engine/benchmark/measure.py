"""Measurement primitives: synchronised timing with percentiles, peak memory, mask / tensor agreement.

Peak memory is CUDA's ``max_memory_allocated`` on a GPU. On the CPU it is the peak resident set size
(RSS) of this process while the measured block ran, sampled every few milliseconds from
``/proc/self/statm`` by a background thread (no psutil); where ``/proc`` is missing the process-wide
``resource.getrusage`` maximum is reported instead (monotonic over the whole run, flagged as such).
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work on ``device`` (no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100, linear interpolation) of ``values``; ``None`` when empty."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


@dataclass
class Timing:
    """Seconds per timed call (after ``warmup`` untimed calls; ``warmup_s`` is their total)."""

    samples: list[float] = field(default_factory=list)
    warmup: int = 0
    warmup_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time (all threads) of the timed calls

    @property
    def p50(self) -> float | None:
        return percentile(self.samples, 50)

    @property
    def p95(self) -> float | None:
        return percentile(self.samples, 95)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None

    @property
    def total(self) -> float:
        return float(sum(self.samples))

    def to_dict(self) -> dict:
        return {"p50_s": self.p50, "p95_s": self.p95, "mean_s": self.mean, "repeats": len(self.samples),
                "warmup": self.warmup, "warmup_s": self.warmup_s, "cpu_s": self.cpu_s}


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1,
               device: torch.device | str | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (GPU synchronised around each).

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_calls: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    timing = Timing(warmup=warmup)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    timing.warmup_s = time.perf_counter() - start
    cpu0 = time.process_time()
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        timing.samples.append(time.perf_counter() - t0)
    timing.cpu_s = time.process_time() - cpu0
    return timing


def _rss_bytes() -> int | None:
    try:
        with open(_STATM) as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB


@dataclass
class MemoryReading:
    """Peak memory of one measured block: ``kind`` is ``cuda_max_allocated``, ``rss_peak`` or
    ``rss_maxrss_process`` (process-wide maximum since start, where /proc is missing)."""

    kind: str
    peak_mib: float | None = None
    start_mib: float | None = None

    def to_dict(self) -> dict:
        return {"memory_kind": self.kind, "peak_mib": self.peak_mib, "start_mib": self.start_mib}


@contextmanager
def peak_memory(device: torch.device | str, interval_s: float = 0.005):
    """Context manager yielding a :class:`MemoryReading` filled in when the block exits."""
    dev = torch.device(device)
    if dev.type == "cuda":
        reading = MemoryReading("cuda_max_allocated")
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        reading.start_mib = torch.cuda.memory_allocated(dev) / 2**20
        try:
            yield reading
        finally:
            torch.cuda.synchronize(dev)
            reading.peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
        return
    start = _rss_bytes()
    if start is None:
        reading = MemoryReading("rss_maxrss_process")
        try:
            yield reading
        finally:
            reading.peak_mib = _maxrss_bytes() / 2**20
        return
    reading = MemoryReading("rss_peak", start_mib=start / 2**20)
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            value = _rss_bytes()
            if value is not None and value > peak[0]:
                peak[0] = value

    thread = threading.Thread(target=sample, name="refseg-rss", daemon=True)
    thread.start()
    try:
        yield reading
    finally:
        stop.set()
        thread.join()
        end = _rss_bytes()
        reading.peak_mib = max(peak[0], end or 0) / 2**20


def mask_agreement(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """IoU and Dice of two binary masks of equal shape (non-zero = foreground; both empty -> 1.0).

    Raises:
        ValueError: the shapes differ.
    """
    from refseg.eval.metrics import dice, iou

    return {"iou": iou(pred, ref), "dice": dice(pred, ref)}


def mean_agreement(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float | None]:
    """Mean and minimum IoU / Dice over (prediction, reference) mask pairs."""
    if not pairs:
        return {"iou_mean": None, "iou_min": None, "dice_mean": None, "dice_min": None}
    scores = [mask_agreement(p, r) for p, r in pairs]
    ious, dices = [s["iou"] for s in scores], [s["dice"] for s in scores]
    return {"iou_mean": float(np.mean(ious)), "iou_min": float(np.min(ious)),
            "dice_mean": float(np.mean(dices)), "dice_min": float(np.min(dices))}


def tensor_agreement(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How close a model output is to the fp32 reference output (same shape).

    Returns ``max_abs`` error, ``rel_l2`` (‖out − ref‖ / ‖ref‖) and the mean per-row ``cosine``
    similarity over the last axis.

    Raises:
        ValueError: the shapes differ.
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"tensor_agreement: shape {tuple(out.shape)} differs from reference {tuple(ref.shape)}")
    a, b = out.detach().float().cpu(), ref.detach().float().cpu()
    diff = a - b
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)
    return {"max_abs": float(diff.abs().max()), "rel_l2": float(diff.norm() / b.norm().clamp(min=1e-30)),
            "cosine": float(cos.mean())}
