"""A bounded background writer: outputs are encoded and written while the models run.

    with BackgroundWriter(max_pending=8) as writer:
        for out in stream_segment(segmenter, items):
            writer.submit(out.item.key, functools.partial(write_outputs, out))
            for key, error in writer.completed():
                ...  # record success / failure
    for key, error in writer.results_left: ...

One thread runs the jobs in submission order (PNG encoding releases the GIL, so it overlaps with
the encoders). ``submit`` blocks while ``max_pending`` jobs wait, so memory stays bounded when the
disk is slower than the models. Every job's outcome is reported exactly once, with its exception
(a failed write never stops the later ones).
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Any, Callable

_STOP = object()


class BackgroundWriter:
    """Runs write jobs on one background thread, at most ``max_pending`` queued."""

    def __init__(self, max_pending: int = 8):
        self._jobs: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._done: deque[tuple[Any, BaseException | None]] = deque()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="refseg-write", daemon=True)
        self._thread.start()
        self.results_left: list[tuple[Any, BaseException | None]] = []

    def _work(self) -> None:
        while True:
            task = self._jobs.get()
            if task is _STOP:
                return
            key, job = task
            try:
                job()
                outcome = None
            except Exception as exc:  # reported for this key; the writer goes on
                outcome = exc
            with self._lock:
                self._done.append((key, outcome))

    def submit(self, key: Any, job: Callable[[], None]) -> None:
        """Queue ``job`` (blocks while the queue is full)."""
        if not self._thread.is_alive():
            raise RuntimeError("BackgroundWriter is closed")
        self._jobs.put((key, job))

    def completed(self) -> list[tuple[Any, BaseException | None]]:
        """(key, error or None) of the jobs finished since the last call, in order."""
        with self._lock:
            items = list(self._done)
            self._done.clear()
        return items

    def close(self) -> list[tuple[Any, BaseException | None]]:
        """Wait for every queued job; returns the outcomes not yet collected by :meth:`completed`."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
        self.results_left = self.completed()
        return self.results_left

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
