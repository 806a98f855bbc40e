"""The job base: plan -> items -> stream -> consume -> finish, the same for folders, volumes and slides.

:meth:`Job.run` does, in this order and once for every mode:

1. checks that need no model: the flags fit the mode (:func:`~refseg.jobs.checks.check_flags`), the extras
   for the outputs asked for are installed, then the mode's :meth:`Job.prepare` reads and checks the
   references, routes and opens the inputs and checks that the output can be written;
2. the resume store (:class:`~refseg.jobs.resume.ResumeStore`): ``--resume`` under other settings is
   refused naming the differences, ``--resume --force`` recomputes; finished inputs are skipped, and the
   temporaries a killed run left beside the outputs are removed;
3. if anything is left: the checkpoints are located (no model yet), the store is written, then the models
   load once, in-process (:class:`~refseg.jobs.segmenter_spec.LocalRunner`) or on a Ray actor pool
   (:class:`~refseg.jobs.ray_pool.RayPool`, ``--ray``);
4. the mode's :meth:`Job.passes` yields item streams (one per reference set); every output goes to the
   mode's :meth:`Job.consume` as it leaves the stream, and the one progress reporter counts it;
5. :meth:`Job.finish`: failures logged, one :class:`~refseg.jobs.summary.RunSummary` written, exit code.

Book-keeping files (:func:`job_files`): ``summary.json`` and ``run_config.json`` in the output folder, or
``<OUT>.summary.json`` and ``<OUT>.run_config.json`` beside a single output file ``OUT.nii.gz``, so that
another run into the same folder never overwrites them.

Exit codes: 0 every input done, 1 some inputs failed (the others are written) or the summary could not be
written, 2 (raised as ``ValueError`` / ``MissingDependencyError`` before any output) bad arguments or inputs.
"""
from __future__ import annotations

import abc
import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from refseg.io import writers
from refseg.jobs.checks import check_flags, require_extras
from refseg.jobs.progress import Progress
from refseg.jobs.resume import ResumeStore, run_settings
from refseg.jobs.segmenter_spec import LocalRunner, SegmenterSpec
from refseg.jobs.summary import ITEM_WORDS, RunSummary

log = logging.getLogger("refseg.jobs")


@dataclass(frozen=True)
class JobFiles:
    """Where a job keeps its book-keeping: the output ``folder``, ``summary`` and ``run_config``."""

    folder: Path
    summary: Path
    run_config: Path


def job_files(output: Path, single_file_stem: str | None = None) -> JobFiles:
    """``OUTDIR/summary.json`` + ``OUTDIR/run_config.json``; for a single output file (``single_file_stem``
    given, e.g. ``ct`` for ``OUT/ct.nii.gz``) ``<stem>.summary.json`` + ``<stem>.run_config.json`` beside it."""
    output = Path(output)
    if single_file_stem is None:
        return JobFiles(output, output / "summary.json", output / "run_config.json")
    folder = output.parent
    return JobFiles(folder, folder / f"{single_file_stem}.summary.json", folder / f"{single_file_stem}.run_config.json")


@dataclass
class Unit:
    """One input of a job (an image file, a volume, a slide) and the files it writes.

    ``targets``: its output files (their leftover temporaries are removed before the run); ``data``: the
    mode's own payload.
    """

    path: Path
    targets: list[Path]
    data: Any = None


@dataclass
class ItemPass:
    """Items streamed with the references set at that point; ``count`` of them (for progress)."""

    items: Iterable
    count: int


# Every ``refseg segment`` option a job reads, with the CLI's defaults (tests check that the parser agrees):
# a job run from Python (:func:`refseg.jobs.folder.run_folder`, ...) starts from these.
JOB_ARGUMENTS: dict[str, Any] = {
    "reference": None, "reference_mask": None, "input": None, "output": None, "preset": "sat", "sam": None,
    "dinov2": None, "sam_checkpoint": None, "dinov2_checkpoint": None, "dinov3": None, "dinov3_checkpoint": None,
    "device": "auto", "backend": "torch",
    "engine_dir": None, "batch_size": None, "image_size": None, "metric": None, "precision": None,
    "compile": False, "overrides": [], "save_prompts": False, "overlay": False, "resume": False, "force": False,
    "progress": "auto", "ray": None, "ray_workers": None, "gpus_per_worker": None,
    "window": None, "label": None, "axis": None, "slices": None, "reference_slices": None,
    "pool_references": False, "reference_chunks": None, "series": None, "pair_by": None,
    "propagate": False, "anchors": None, "max_area_ratio": None, "sam_image_size": None,
    "slide": False, "region": [], "level": None, "mpp": None, "tile_size": None, "overlap": None,
    "min_tissue": None, "no_tissue_detection": False, "thumbnail_size": None, "preview_size": None,
    "simplify": None, "class_name": [], "slide_reader": None, "keep_tiles": False,
}


def job_arguments(**given: Any) -> argparse.Namespace:
    """The arguments of a job run from Python: :data:`JOB_ARGUMENTS` with ``given`` replacing defaults."""
    unknown = sorted(set(given) - set(JOB_ARGUMENTS))
    if unknown:
        raise TypeError(f"unknown job argument(s): {', '.join(unknown)}")
    return argparse.Namespace(**{**JOB_ARGUMENTS, **given})


class Job(abc.ABC):
    """One ``refseg segment`` run. Subclasses (:mod:`refseg.jobs.folder`, :mod:`refseg.jobs.volume`,
    :mod:`refseg.jobs.slide`) implement the mode's steps; :meth:`run` owns the order and the guarantees.

    Args:
        args: the parsed ``refseg segment`` arguments.
        config: the :class:`refseg.SegmenterConfig` from the arguments.
        runner: a runner already holding its models (e.g.
            ``LocalRunner(segmenter=...)`` for a job run from Python); ``None`` loads them from ``args``.
        runner_options: extra keyword arguments of :class:`refseg.jobs.ray_pool.RayPool` (tests).
    """

    mode: str = "folder"

    def __init__(self, args: argparse.Namespace, config, runner=None, **runner_options):
        self.args = args
        self.config = config
        self.runner = runner
        self._given_runner = runner is not None
        self.runner_options = runner_options
        self.units: list[Unit] = []
        self.early_failures: list[tuple[Path, BaseException | str]] = []  # inputs that fail before reading
        self.files: JobFiles | None = None
        self.spec: SegmenterSpec | None = None
        self.reuse = False  # finished outputs may be kept (--resume under the same settings)
        self.summary = RunSummary(0, mode=self.mode)

    # ------------------------------------------------------------------ the mode's steps
    @abc.abstractmethod
    def prepare(self) -> None:
        """Read and check the references, list and check the inputs (``self.units``), check the output
        (``self.files``) and build ``self.spec``; no model loads here."""

    @abc.abstractmethod
    def reference_digests(self) -> list[str]:
        """Digests identifying the references in the resume fingerprint."""

    def mode_settings(self) -> dict[str, Any]:
        """The mode's settings that change the outputs (fingerprinted)."""
        return {}

    @abc.abstractmethod
    def unit_done(self, unit: Unit) -> bool:
        """True when the unit's outputs are all written and readable (``--resume`` skips it)."""

    @abc.abstractmethod
    def passes(self, units: list[Unit]) -> Iterator[ItemPass]:
        """Yield the item streams of ``units`` (set ``self.runner``'s references before each one that needs
        other references). Code after a ``yield`` runs once that pass has been consumed: write a volume,
        stitch a slide, record the unit in ``self.summary``."""

    @abc.abstractmethod
    def consume(self, out) -> None:
        """Handle one :class:`refseg.runtime.stream.StreamOutput` as it leaves the stream."""

    def batch_size(self) -> int | None:
        """Items per model call (``None``: the configuration's ``batch_size``)."""
        return None

    def item_count(self, out) -> int:
        """Items (images, slices, tiles) one stream output stands for, for progress and ``items_segmented``:
        1, or a whole volume's slices when a volume is one stream item (``--propagate``)."""
        return 1

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        """Run the job (see the module docstring); returns the exit code (0 or 1)."""
        args = self.args
        check_flags(args, self.mode)
        require_extras(self.mode, args, dicom=self.needs_dicom())
        self.prepare()
        self.summary = RunSummary(len(self.units) + len(self.early_failures), config=self.spec.config.to_dict(),
                                  mode=self.mode)
        for path, error in self.early_failures:
            self.summary.add_failure(path, error)
        settings = run_settings(self.spec.config, self.reference_digests(), args.sam_checkpoint,
                                args.dinov2_checkpoint, args.backend, self.mode_settings(),
                                dinov3_checkpoint=args.dinov3_checkpoint)
        store = ResumeStore(self.files.run_config, settings)
        done = {id(u) for u in self.units if args.resume and self.unit_done(u)}
        self.reuse = store.reuse(args.resume, args.force, outputs_exist=bool(done))
        todo = []
        for unit in self.units:
            if self.reuse and id(unit) in done:
                self.summary.add_skipped(unit.path)
            else:
                todo.append(unit)
        writers.remove_temporaries(t for unit in todo for t in unit.targets)
        if self.summary.skipped:
            log.info("resume: %d of %d inputs already done", len(self.summary.skipped), len(self.units))
        if todo:
            if not self._given_runner:
                self.spec.check()  # checkpoints located, names checked: still no model
            store.write()
            self._segment(todo)
        else:
            log.info("nothing to do: every input is done or failed before reading")
        return self.finish()

    def needs_dicom(self) -> bool:
        return False

    def open_runner(self):
        """The models, in-process or on Ray (``--ray``), loaded once for the whole job."""
        if self.args.ray is None:
            return LocalRunner(self.spec)
        from refseg.jobs.ray_pool import RayPool

        return RayPool(self.spec, address=None if self.args.ray == "local" else self.args.ray,
                       num_workers=self.args.ray_workers, gpus_per_worker=self.args.gpus_per_worker or 0.0,
                       **self.runner_options)

    def _segment(self, todo: list[Unit]) -> None:
        if self.runner is None:
            self.runner = self.open_runner()
        self.summary.config = self.runner.config.to_dict()  # model names as actually loaded
        self.summary.models = self.runner.models
        progress = Progress(0, self.args.progress, unit=f"{ITEM_WORDS[self.mode]}s")
        self.summary.start()
        passes = self.passes(todo)
        try:
            for item_pass in passes:
                progress.grow(item_pass.count)
                for out in self.runner.stream(item_pass.items, self.batch_size()):
                    count = self.item_count(out)
                    if out.error is None:
                        self.summary.items_segmented += count
                    self.consume(out)
                    progress.update(count)
        finally:
            passes.close()  # a mode's clean-up (e.g. an unfinished GeoJSON temporary) runs now, not at GC
            progress.close()
            self.runner.close()

    def finish(self) -> int:
        """Log every failure, write the summary (a summary that cannot be written never hides the per-input
        results: its failure is logged and gives exit code 1) and log the totals."""
        summary = self.summary
        summary.finish()
        for failure in summary.failed:
            log.error("%s: %s", failure["path"], failure["error"])
        try:
            summary.write(self.files.summary)
        except (OSError, TypeError, ValueError) as exc:
            summary.write_error = f"{self.files.summary}: cannot write the run summary ({exc})"
            log.error("%s; the per-input results above stand", summary.write_error)
        log.info("%d of %d inputs done (%d earlier, %d now), %d failed; %d %ss at %.2f/s",
                 summary.succeeded + len(summary.skipped), summary.inputs, len(summary.skipped), summary.succeeded,
                 len(summary.failed), summary.items_segmented, ITEM_WORDS[self.mode], summary.items_per_second)
        return 1 if summary.failed or summary.write_error else 0
