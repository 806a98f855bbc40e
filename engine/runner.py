"""Batch runs over files: read, segment, write — one bad file never stops the others.

Inputs go through the streaming runtime (:mod:`refseg.runtime.stream`): images are decoded ahead
of the batch on the models. Every output is written atomically, so an interrupted run leaves only whole files, and
``resume=True`` skips inputs whose mask is already there.
"""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import numpy as np

from refseg.io import raster, writers
from refseg.runtime.stream import StreamItem, stream_segment

log = logging.getLogger(__name__)


def write_outputs(result, image: np.ndarray, paths: writers.OutputPaths, num_classes: int,
                  save_prompts: bool, overlay: bool) -> None:
    """Write one input's files atomically: prompts JSON, overlay, then the mask (what resume checks)."""
    if save_prompts:
        writers.write_json(paths.prompts, result.to_json())
    if overlay:
        points = [result.points[c] for c in result.points]
        labels = [result.point_labels[c] for c in result.points]
        writers.write_png(paths.overlay, writers.overlay(
            raster.to_rgb_uint8(image), result.mask,
            points=np.concatenate(points) if points else None,
            point_labels=np.concatenate(labels) if labels else None))
    # The mask goes last: its presence is what --resume treats as "done".
    writers.write_png(paths.mask, writers.mask_to_png_array(result.mask, num_classes))


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="refseg", file=sys.stderr)


def run_folder(segmenter, inputs: list[Path], outdir: Path, save_prompts: bool = False,
               overlay: bool = False, resume: bool = False) -> writers.RunSummary:
    """Segment ``inputs`` into ``outdir`` (``<stem>.png`` + optional json/overlay + summary.json).

    Returns:
        The run summary (also written to ``outdir/summary.json``); failed inputs are listed there
        and logged, the others are written.
    """
    summary = writers.RunSummary(inputs, config=segmenter.config.to_dict())
    num_classes = len(segmenter.classes)
    todo = plan_outputs(inputs, outdir, resume, summary)
    items = (StreamItem(key=str(path), load=functools.partial(raster.read_image, path), meta=paths)
             for path, paths in todo)
    bar = _progress(len(todo))
    summary.start()
    for out in stream_segment(segmenter, items):
        path = Path(out.item.key)
        if out.error is not None:
            summary.add_failure(path, out.error)
        else:
            try:
                write_outputs(out.result, out.image, out.item.meta, num_classes, save_prompts, overlay)
                summary.add_success(path)
            except Exception as exc:
                summary.add_failure(path, exc)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return finish_run(summary, outdir)


def plan_outputs(inputs: list[Path], outdir: Path, resume: bool,
                 summary: writers.RunSummary) -> list[tuple[Path, writers.OutputPaths]]:
    """Output paths of every input still to do; inputs already done (``resume``) or unnamable are
    recorded in ``summary``. Creates ``outdir``."""
    outdir.mkdir(parents=True, exist_ok=True)
    stems = writers.unique_stems(inputs)
    todo: list[tuple[Path, writers.OutputPaths]] = []
    for path in inputs:
        try:
            paths = writers.output_paths(outdir, path, stems[path])
        except ValueError as exc:
            summary.add_failure(path, exc)
            continue
        if resume and writers.is_done(paths):
            summary.add_skipped(path)
        else:
            todo.append((path, paths))
    if summary.skipped:
        log.info("resume: %d of %d inputs already done", len(summary.skipped), summary.inputs)
    return todo


def finish_run(summary: writers.RunSummary, outdir: Path) -> writers.RunSummary:
    """Stop the clock, write ``outdir/summary.json`` and log every failure and the totals."""
    summary.finish()
    # Per-input errors first: a summary.json that cannot be written must not hide them.
    for failure in summary.failed:
        log.error("%s: %s", failure["path"], failure["error"])
    try:
        summary.write(outdir)
    except (OSError, TypeError, ValueError) as exc:
        summary.write_error = f"{outdir / 'summary.json'}: cannot write the run summary ({exc})"
        log.error("%s; the per-input results above stand", summary.write_error)
    log.info("%d succeeded, %d failed, %d skipped; %.2f images/s", summary.succeeded,
             len(summary.failed), len(summary.skipped), summary.images_per_second)
    return summary
