"""RunSummary: the book-keeping of a job, one schema for folders, volumes and slides.

Written atomically as ``summary.json`` in the output folder, or as ``<OUT>.summary.json`` beside a single
output file (a volume's ``OUT.nii.gz`` gives ``OUT.summary.json``: see :func:`refseg.jobs.base.job_files`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from refseg.io.writers import write_json

ITEM_WORDS = {"folder": "image", "volume": "slice", "slide": "tile"}
"""What one stream item is in each mode (progress lines and ``item``)."""


class RunSummary:
    """Book-keeping of a job, with the same JSON keys in every mode.

    JSON keys: ``mode`` (``folder``, ``volume``, ``slide``), ``inputs`` (number of inputs: image files,
    volumes, slides), ``succeeded`` (inputs whose outputs exist: done by an earlier run and skipped now, plus
    done now), ``succeeded_this_run`` (done now), ``skipped`` (number already done, ``--resume``),
    ``failed`` (list of {"path", "error"}, sorted by path), ``item`` (``image``, ``slice`` or ``tile``),
    ``items_segmented`` (items segmented now), ``elapsed_s`` (wall time from :meth:`start` to
    :meth:`finish`), ``items_per_second``, ``config`` (the configuration of the models as loaded), ``models``
    (the DINOv2 and SAM models actually loaded, with the backend and device; ``null`` when nothing had to be
    run), and the mode's own key (``volumes`` / ``slides``: one record per input) when the mode has one.
    """

    def __init__(self, inputs: int | Sequence[Any] = 0, config: Mapping[str, Any] | None = None,
                 mode: str = "folder"):
        if mode not in ITEM_WORDS:
            raise ValueError(f"RunSummary: mode must be one of {', '.join(ITEM_WORDS)}, got {mode!r}")
        self.mode = mode
        self.inputs = inputs if isinstance(inputs, int) else len(inputs)
        self.config = dict(config or {})
        self.models: dict[str, Any] | None = None
        self.succeeded_paths: list[str] = []
        self.skipped: list[str] = []
        self.failed: list[dict[str, str]] = []
        self.records: list[dict[str, Any]] = []  # the mode's own per-input records (volumes, slides)
        self.items_segmented = 0
        self._start = time.perf_counter()
        self._elapsed: float | None = None
        self.write_error: str | None = None  # set when summary.json could not be written

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
    def items_per_second(self) -> float:
        """Items (images, slices, tiles) segmented per elapsed second (0.0 when none)."""
        elapsed = self.elapsed
        return self.items_segmented / elapsed if self.items_segmented and elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The summary as written to summary.json."""
        data = {"mode": self.mode, "inputs": self.inputs, "succeeded": self.succeeded + len(self.skipped),
                "succeeded_this_run": self.succeeded, "skipped": len(self.skipped),
                "failed": sorted(self.failed, key=lambda f: f["path"]), "item": ITEM_WORDS[self.mode],
                "items_segmented": self.items_segmented, "elapsed_s": round(self.elapsed, 6),
                "items_per_second": round(self.items_per_second, 6), "config": self.config,
                "models": self.models}
        if self.mode != "folder":
            data[f"{self.mode}s"] = sorted(self.records, key=lambda r: r["path"])
        return data

    def write(self, path: str | os.PathLike) -> Path:
        """Write the summary atomically to the file ``path``; the clock keeps running, call :meth:`finish`
        first for the final summary. Returns the path."""
        write_json(path, self.to_dict())
        return Path(path)
