"""RunSummary: the book-keeping of a batch run, written atomically to OUTDIR/summary.json."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .writers import write_json


class RunSummary:
    """Book-keeping of a batch run, written to OUTDIR/summary.json.

    JSON keys: ``inputs`` (number of inputs), ``succeeded`` (inputs whose outputs exist: done by an earlier
    run and skipped now, plus done now), ``succeeded_this_run`` (done now), ``skipped`` (number already done,
    ``--resume``), ``failed`` (list of {"path", "error"}, by path: the same order whatever finished first),
    ``elapsed_s`` (wall time from construction or :meth:`start` to :meth:`finish`), ``images_per_second`` (succeeded / elapsed_s, 0 when
    nothing ran) and ``config`` (the run's settings).
    """

    def __init__(self, inputs: int | Sequence[Any] = 0, config: Mapping[str, Any] | None = None):
        self.inputs = inputs if isinstance(inputs, int) else len(inputs)
        self.config = dict(config or {})
        self.succeeded_paths: list[str] = []
        self.skipped: list[str] = []
        self.failed: list[dict[str, str]] = []
        self._start = time.perf_counter()
        self._elapsed: float | None = None
        self.write_error: str | None = None  # set by the runner when summary.json could not be written

    def start(self) -> None:
        """(Re)start the clock, e.g. after model loading so throughput counts only image work."""
        self._start, self._elapsed = time.perf_counter(), None

    @property
    def succeeded(self) -> int:
        """Number of inputs processed in this run."""
        return len(self.succeeded_paths)

    def add_success(self, path: str | os.PathLike) -> None:
        """Record one input processed in this run."""
        self.succeeded_paths.append(os.fspath(path))

    def add_skipped(self, path: str | os.PathLike) -> None:
        """Record one input skipped because its output already exists (``--resume``)."""
        self.skipped.append(os.fspath(path))

    def add_failure(self, path: str | os.PathLike, error: BaseException | str) -> None:
        """Record one failed input; an exception is stored as "<ExceptionType>: <message>"."""
        message = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        self.failed.append({"path": os.fspath(path), "error": message})

    def finish(self) -> None:
        """Stop the clock (idempotent)."""
        if self._elapsed is None:
            self._elapsed = time.perf_counter() - self._start

    @property
    def elapsed(self) -> float:
        """Seconds from start to finish (or to now while running)."""
        return self._elapsed if self._elapsed is not None else time.perf_counter() - self._start

    @property
    def images_per_second(self) -> float:
        """Succeeded inputs per elapsed second (0.0 when none succeeded)."""
        elapsed = self.elapsed
        return self.succeeded / elapsed if self.succeeded and elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The summary as written to summary.json."""
        return {"inputs": self.inputs, "succeeded": self.succeeded + len(self.skipped),
                "succeeded_this_run": self.succeeded, "skipped": len(self.skipped),
                "failed": sorted(self.failed, key=lambda f: f["path"]), "elapsed_s": round(self.elapsed, 6),
                "images_per_second": round(self.images_per_second, 6), "config": self.config}

    def write(self, outdir: str | os.PathLike) -> Path:
        """Write OUTDIR/summary.json atomically (the clock keeps running; call :meth:`finish` first for the
        final summary). Returns the file path."""
        path = Path(outdir) / "summary.json"
        write_json(path, self.to_dict())
        return path
