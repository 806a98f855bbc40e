"""The streaming runtime: items in, segmentations out, one bounded pipeline.

Every producer of images uses this one entry point: files of a folder, slices of a CT/MRI volume, tiles
of a whole-slide image. A producer describes each image as a :class:`StreamItem` (a key for messages and
a ``load`` callable that decodes it); :func:`stream_segment` loads, validates, batches and segments them
and yields one :class:`StreamOutput` per item, in input order. A failing item (unreadable file, too
small, a model error that a retry one by one isolates) yields an output with ``error`` set; the stream
goes on. Errors raised while loading or validating name the item's key.

Pipeline: reader threads (decode + validate; on the CPU path both resizes; on the accelerator path the
uint8 pixels are pinned and copied to the device on a side stream) -> a bounded window of items read
ahead, so the copies of batches n+1, n+2 overlap batch n -> resizes and normalisation, DINOv2 and SAM
encoders, matching and prompt engineering on the device -> one decoder call for all prompt sets of the
batch -> label maps on the device -> one copy to the host -> the consumer (the folder job hands
outputs to a bounded :class:`refseg.runtime.writer.BackgroundWriter`).

A segmenter for this module offers ``config`` (``batch_size``), ``prepare_target(image, source)`` and
``segment_prepared(targets, fallback=None)``; the jobs call its ``stream`` method
(:meth:`refseg.Segmenter.stream` runs :func:`stream_segment`; the Ray pool of :mod:`refseg.jobs.ray_pool` its own).

    items = (StreamItem(key=str(p), load=functools.partial(read_image, p)) for p in paths)
    for out in stream_segment(segmenter, items):
        if out.error is None:
            write(out.item, out.result)
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamItem:
    """One image to segment.

    Attributes:
        key: unique human-readable name used in messages and errors (a file path,
            ``"ct.nii.gz[z=12]"``, ``"slide.svs@(x, y)"``).
        load: decodes the image: returns an (H, W) or (H, W, C) array; raising marks this item failed.
        meta: the producer's payload (output paths, slice index, tile origin ...), returned untouched.
    """

    key: str
    load: Callable[[], np.ndarray]
    meta: Any = None


@dataclass
class StreamOutput:
    """The outcome for one :class:`StreamItem`: ``result`` on success, else ``error``.

    ``image`` is the decoded array (``None`` if loading failed), kept for overlays and stitching.
    """

    item: StreamItem
    image: np.ndarray | None = None
    result: Any = None  # refseg.segmenter.SegmentationResult
    error: BaseException | None = None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class _Loaded:
    """Reader-thread product: the output under construction, its prepared target, seconds taken."""

    out: StreamOutput
    target: Any = None
    seconds: float = 0.0


def _load(segmenter, item: StreamItem) -> _Loaded:
    start = time.perf_counter()
    try:
        image = item.load()
        target = segmenter.prepare_target(image, source=item.key)
    except Exception as exc:  # recorded for this item, the stream goes on
        return _Loaded(StreamOutput(item, error=exc))
    return _Loaded(StreamOutput(item, image=image), target, time.perf_counter() - start)


class _Batcher:
    """Runs batches on the models: halves the batch on out-of-memory (reported once), retries a
    failing batch one by one so that only the items that fail themselves are marked failed."""

    def __init__(self, segmenter, step: int, fallback: bool | None = None):
        self.segmenter = segmenter
        self.step = step
        self.fallback = fallback
        self.oom_reported = False

    def run(self, batch: list[_Loaded]) -> None:
        good = [b for b in batch if b.out.error is None]
        if good:
            self._run(good)

    def _run(self, good: list[_Loaded]) -> None:
        try:
            extra = {} if self.fallback is None else {"fallback": self.fallback}
            results = self.segmenter.segment_prepared([b.target for b in good], **extra)
        except Exception as exc:
            if is_out_of_memory(exc) and len(good) > 1:
                self._halve(len(good), exc)
                start = 0
                while start < len(good):  # self.step may shrink further inside
                    chunk = good[start:start + self.step]
                    self._run(chunk)
                    start += len(chunk)
                return
            if len(good) == 1:
                good[0].out.error = exc
                return
            log.warning("batch of %d (%s ... %s) failed (%s: %s); retrying one by one", len(good),
                        good[0].out.item.key, good[-1].out.item.key, type(exc).__name__, exc)
            for b in good:
                self._run([b])
            return
        for b, result in zip(good, results):
            result.timings = {"load": b.seconds, **result.timings}
            b.out.result = result

    def _halve(self, size: int, exc: BaseException) -> None:
        self.step = max(1, min(self.step, size // 2))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not self.oom_reported:
            log.warning("out of memory with a batch of %d (%s); continuing with batches of %d",
                        size, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, self.step)
            self.oom_reported = True
        else:
            log.debug("out of memory again with a batch of %d; now %d", size, self.step)


def default_workers() -> int:
    """Reader threads: one per CPU core, at most 4 (decoding releases the GIL; more only queue)."""
    return max(1, min(4, os.cpu_count() or 1))


def stream_segment(segmenter, items: Iterable[StreamItem], batch_size: int | None = None,
                   prefetch: int = 2, workers: int | None = None, fallback: bool | None = None
                   ) -> Iterator[StreamOutput]:
    """Segment ``items`` with ``segmenter`` (reference already set), yielding outputs in input order.

    Reader threads decode each item (``item.load``) and prepare it for the encoders
    (``segmenter.prepare_target``: RGB conversion, the too-small check, the CPU path's resizes or the
    accelerator path's copy to the device); at most ``(prefetch + 1) * batch_size`` items are read
    ahead, so memory does not grow with the number of items. Batches go through
    ``segmenter.segment_prepared`` (one call per encoder, one decoder call). A CUDA out-of-memory halves
    the batch size for the rest of the stream (logged once).

    Args:
        segmenter: a :class:`refseg.Segmenter` whose reference is set.
        items: any iterable (consumed lazily: memory is bounded by the batches in flight).
        batch_size: targets per encoder call; ``None`` uses ``segmenter.config.batch_size``.
        prefetch: batches decoded ahead of the one on the models.
        workers: reader threads (default :func:`default_workers`).
        fallback: passed to ``segment_prepared`` (None: the config's).
    """
    batcher = _Batcher(segmenter, max(1, batch_size or segmenter.config.batch_size), fallback)
    iterator = iter(items)
    window: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="refseg-read")

    def fill() -> None:
        limit = (max(0, prefetch) + 1) * batcher.step
        while len(window) < limit:
            item = next(iterator, None)
            if item is None:
                return
            window.append(pool.submit(_load, segmenter, item))

    try:
        fill()
        while window:
            batch = [window.popleft().result() for _ in range(min(batcher.step, len(window)))]
            fill()  # the readers work on (and copy) the next batches while this one is on the models
            batcher.run(batch)
            for b in batch:
                yield b.out
            del batch
    finally:
        for future in window:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
