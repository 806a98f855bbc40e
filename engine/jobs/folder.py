"""The folder job: 2-D images in, ``<stem>.png`` label masks out (plus ``<stem>.json`` prompts and
``<stem>_overlay.png`` when asked) — one bad file never stops the others.

    refseg segment -r ref.png -m ref_mask.png -i images/ -o out/ [--save-prompts] [--overlay] [--resume]

Every input is one stream item: images are decoded ahead of the batch on the models, and outputs go to a
bounded background writer (:class:`refseg.runtime.writer.BackgroundWriter`) as they leave the stream; each
file is written atomically, the mask last (its presence is what ``--resume`` treats as done). The
references may be plain images or regions of slides (:mod:`refseg.jobs.references`).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from refseg.io import raster, writers
from refseg.jobs.base import ItemPass, Job, Unit, job_arguments, job_files
from refseg.jobs.references import load_references
from refseg.jobs.segmenter_spec import LocalRunner, SegmenterSpec
from refseg.jobs.summary import RunSummary


def write_outputs(result, image: np.ndarray, paths: writers.OutputPaths, num_classes: int,
                  save_prompts: bool, overlay: bool, source: str) -> None:
    """Write one input's files atomically: prompts JSON, overlay, then the mask (what resume checks)."""
    if save_prompts:
        writers.write_json(paths.prompts, result.to_json(source=source))
    if overlay:
        points = [result.points[c] for c in result.points]
        labels = [result.point_labels[c] for c in result.points]
        writers.write_png(paths.overlay, writers.overlay(
            raster.to_rgb_uint8(image), result.mask,
            points=np.concatenate(points) if points else None,
            point_labels=np.concatenate(labels) if labels else None))
    writers.write_png(paths.mask, writers.mask_to_png_array(result.mask, num_classes))


def list_inputs(source: str | os.PathLike | Sequence) -> list[Path]:
    """The images of a folder (sorted), one image file, or a list of files. A single file is read here, so
    that an unreadable one stops the job before any model loads."""
    if isinstance(source, (list, tuple)):
        return [Path(p) for p in source]
    path = Path(source)
    inputs = raster.list_images(path)
    if path.is_file():
        raster.read_image(path)
    return inputs


def _refuse_slide_options_without_a_slide_reference(args) -> None:
    """--level / --mpp / --slide-reader choose how a slide reference is read; with plain references they
    would do nothing."""
    from refseg.jobs.checks import given
    from refseg.jobs.references import is_slide

    if any(is_slide(Path(r), args.slide) for r in args.reference or []):
        return
    wrong = [flag for flag, dest in (("--level", "level"), ("--mpp", "mpp"), ("--slide-reader", "slide_reader"))
             if given(args, dest)]
    if wrong:
        raise ValueError(f"{' '.join(wrong)}: read a slide reference; -r {' '.join(args.reference or [])} holds "
                         f"no slide, so remove {'it' if len(wrong) == 1 else 'them'}")


class FolderJob(Job):
    """``refseg segment`` on 2-D images (see the module docstring)."""

    mode = "folder"

    def prepare(self) -> None:
        from refseg.io.intensity import parse_window

        args = self.args
        window = parse_window(args.window) if args.window else None
        _refuse_slide_options_without_a_slide_reference(args)
        # references: read and checked here, unless the job was given a segmenter that holds them
        self.references = load_references(args, window)[0] if args.reference else []
        if not self.references and not self._given_runner:
            raise ValueError("give a reference: -r IMAGE -m MASK")
        inputs = list_inputs(args.input)
        outdir = writers.prepare_output_folder(args.output)  # a file / uncreatable / unwritable -o stops here
        self.files = job_files(outdir)
        self.spec = SegmenterSpec.from_args(args, self.config, window)
        stems = writers.unique_stems(inputs)
        for path in inputs:
            try:
                paths = writers.output_paths(outdir, path, stems[path])
            except ValueError as exc:
                self.early_failures.append((path, exc))
                continue
            self.units.append(Unit(path, [paths.mask, paths.prompts, paths.overlay], paths))

    def reference_digests(self) -> list[str]:
        from refseg.segmenter import reference_digest

        if not self.references:  # a given segmenter's own references
            return list(getattr(self.runner.segmenter, "reference_digests", []))
        return [reference_digest(np.asarray(image), mask) for image, mask, _ in self.references]

    def mode_settings(self) -> dict:
        return {"window": self.args.window}

    def unit_done(self, unit: Unit) -> bool:
        return writers.is_done(unit.data)

    def passes(self, units: list[Unit]) -> Iterator[ItemPass]:
        from refseg.runtime.stream import StreamItem
        from refseg.runtime.writer import BackgroundWriter

        if self.references:
            self.runner.set_references(self.references)
        self.num_classes = len(self.runner.classes)
        items = (StreamItem(key=str(u.path), load=functools.partial(raster.read_image, u.path), meta=u)
                 for u in units)
        self.writer = BackgroundWriter(max_pending=8)
        try:
            yield ItemPass(items, len(units))
        finally:
            self._record(self.writer.close())

    def consume(self, out) -> None:
        if out.error is not None:
            self.summary.add_failure(out.item.key, out.error)
        else:  # a Ray run leaves the pixels on the actors: the overlay reads the file again
            image = out.image if out.image is not None or not self.args.overlay else out.item.load()
            self.writer.submit(out.item.key, functools.partial(
                write_outputs, out.result, image, out.item.meta.data, self.num_classes, self.args.save_prompts,
                self.args.overlay, out.item.key))
        self._record(self.writer.completed())

    def _record(self, done: list[tuple[str, BaseException | None]]) -> None:
        for key, error in done:
            if error is None:
                self.summary.add_success(key)
            else:
                self.summary.add_failure(key, error)


def run_folder(segmenter, inputs: str | os.PathLike | Sequence, outdir: str | os.PathLike,
               save_prompts: bool = False, overlay: bool = False, resume: bool = False, force: bool = False,
               progress: str = "auto") -> RunSummary:
    """The folder job from Python with a Segmenter whose reference is set: ``inputs`` (a folder, a file or
    a list of files) -> ``outdir`` (``<stem>.png`` + optional json/overlay + ``summary.json``).

    Returns:
        The run summary (also written to ``outdir/summary.json``).
    """
    args = job_arguments(input=list(inputs) if isinstance(inputs, (list, tuple)) else inputs, output=outdir,
                         save_prompts=save_prompts, overlay=overlay, resume=resume, force=force, progress=progress)
    job = FolderJob(args, segmenter.config, runner=LocalRunner(segmenter=segmenter))
    job.run()
    return job.summary
