"""Batch runs over files: read, segment, write — one bad file never stops the others.

Images of the next chunk are decoded in a background thread while the current chunk runs on the
models. Every output is written atomically, so an interrupted run leaves only whole files, and
``resume=True`` skips inputs whose mask is already there.
"""
from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from refseg.io import raster, writers

log = logging.getLogger(__name__)


def _read(path: Path) -> np.ndarray | BaseException:
    try:
        return raster.read_image(path)
    except Exception as exc:  # recorded per input, the run goes on
        return exc


def _write_outputs(result, image: np.ndarray, paths: writers.OutputPaths, num_classes: int,
                   save_prompts: bool, overlay: bool) -> None:
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
    outdir.mkdir(parents=True, exist_ok=True)
    stems = writers.unique_stems(inputs)
    summary = writers.RunSummary(inputs, config=segmenter.config.to_dict())
    num_classes = len(segmenter.classes)
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
        log.info("resume: %d of %d inputs already done", len(summary.skipped), len(inputs))
    step = segmenter.config.batch_size
    chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
    bar = _progress(len(todo))
    summary.start()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="refseg-read") as pool:
        pending = pool.submit(lambda c: [_read(p) for p, _ in c], chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            images = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(lambda c: [_read(p) for p, _ in c], chunks[k + 1])
            _run_chunk(segmenter, chunk, images, summary, num_classes, save_prompts, overlay)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    summary.finish()
    summary.write(outdir)
    for failure in summary.failed:
        log.error("%s: %s", failure["path"], failure["error"])
    log.info("%d succeeded, %d failed, %d skipped; %.2f images/s", summary.succeeded,
             len(summary.failed), len(summary.skipped), summary.images_per_second)
    return summary


def _run_chunk(segmenter, chunk, images, summary, num_classes, save_prompts, overlay) -> None:
    good = []
    for (path, paths), image in zip(chunk, images):
        if isinstance(image, BaseException):
            summary.add_failure(path, image)
        else:
            good.append((path, paths, image))
    if not good:
        return
    try:
        results = segmenter.segment_batch([image for _, _, image in good])
    except Exception as exc:
        if len(good) == 1:
            summary.add_failure(good[0][0], exc)
            return
        # Isolate the culprit: redo the chunk one image at a time.
        log.warning("batch failed (%s); retrying its %d images one by one", exc, len(good))
        results = []
        for path, _, image in good:
            try:
                results.append(segmenter.segment(image))
            except Exception as one_exc:
                summary.add_failure(path, one_exc)
                results.append(None)
    for (path, paths, image), result in zip(good, results):
        if result is None:
            continue
        try:
            _write_outputs(result, image, paths, num_classes, save_prompts, overlay)
            summary.add_success(path)
        except Exception as exc:
            summary.add_failure(path, exc)
