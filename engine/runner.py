"""Batch runs over files: read, segment, write — one bad file never stops the others.

Inputs go through the streaming runtime (:mod:`refseg.runtime.stream`): images are decoded ahead
of the batch on the models, and outputs are handed to a bounded background writer
(:class:`refseg.runtime.writer.BackgroundWriter`). Every output is written atomically (mask last),
so a killed run leaves only whole files.

Resume: ``resume=True`` skips inputs whose mask is already there. The run's settings (everything
that changes the masks: the configuration without ``batch_size``/``device``, the references,
the checkpoints, the backend) are fingerprinted into ``OUTDIR/run_config.json`` before the first
output is written; a resume under different settings is refused (``ValueError`` naming what
differs) unless ``force=True``, which recomputes every input. :func:`plan_folder` does all of this
without models, so a resume with nothing left loads none.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refseg.io import raster, writers
from refseg.io.run_summary import RunSummary
from refseg.runtime.progress import Progress
from refseg.runtime.stream import StreamItem, stream_segment
from refseg.runtime.writer import BackgroundWriter

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
"""File beside the outputs holding the settings fingerprint of the run that wrote them."""
_NOT_IN_FINGERPRINT = ("name", "batch_size", "device")  # do not change the masks


def _file_identity(path) -> str | None:
    if path is None:
        return None
    path = Path(path)
    try:
        return f"{path.name} ({path.stat().st_size} bytes)"
    except OSError:
        return path.name


def run_settings(config, reference_digests: list[str], sam_checkpoint=None, dinov2_checkpoint=None,
                 backend: str = "torch") -> dict[str, Any]:
    """What decides the masks of a run (the fingerprinted part of ``run_config.json``).

    Args:
        config: the :class:`refseg.SegmenterConfig` as requested.
        reference_digests: :func:`refseg.segmenter.reference_digest` of each reference, in order.
        sam_checkpoint, dinov2_checkpoint: files given explicitly (name and size are recorded).
        backend: the backend name requested.
    """
    values = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    return {"config": values, "references": list(reference_digests), "backend": backend,
            "checkpoints": {"sam": _file_identity(sam_checkpoint),
                            "dinov2": _file_identity(dinov2_checkpoint)}}


def fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``settings``."""
    text = json.dumps(writers.jsonable(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and a == list(b)):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _remove_stale_temporaries(paths: writers.OutputPaths) -> None:
    """Delete the atomic writer's temporary files of these outputs left by a killed run."""
    for target in (paths.mask, paths.prompts, paths.overlay):
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
            try:
                stale.unlink()
                log.debug("removed %s, left by an interrupted run", stale)
            except OSError:
                pass


@dataclass
class FolderPlan:
    """What a folder run will do: ``todo`` (input, output paths) and the summary so far."""

    outdir: Path
    todo: list[tuple[Path, writers.OutputPaths]]
    summary: RunSummary
    settings: dict[str, Any] | None = None
    previous: dict[str, Any] = field(default_factory=dict)


def plan_folder(inputs: list[Path], outdir: Path, resume: bool = False, force: bool = False,
                settings: dict[str, Any] | None = None) -> FolderPlan:
    """Decide, without any model, which inputs a run into ``outdir`` has to process.

    Raises:
        ValueError: ``resume`` into a folder written under other settings (without ``force``),
            naming the settings that differ.
    """
    outdir = Path(outdir)
    summary = RunSummary(inputs, config=(settings or {}).get("config"))
    stored_path = outdir / RUN_CONFIG
    if resume and settings is not None and stored_path.is_file():
        try:
            stored = json.loads(stored_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{stored_path}: unreadable ({exc}); rerun with --force to recompute") from exc
        if stored.get("fingerprint") != fingerprint(settings):
            changes = _differences(stored.get("settings", {}), writers.jsonable(settings))
            if not force:
                raise ValueError(
                    f"{outdir}: the existing outputs were written with other settings "
                    f"({'; '.join(changes) or 'fingerprint differs'}); rerun with --force to "
                    "recompute them, or choose another output folder")
            log.warning("--force: settings differ from the earlier run (%s); recomputing every input",
                        "; ".join(changes))
            resume = False
    elif resume and any(outdir.glob("*.png")) and not stored_path.is_file():
        log.warning("%s: no %s; cannot check that the existing outputs used the same settings",
                    outdir, RUN_CONFIG)
    stems = writers.unique_stems(inputs)
    todo: list[tuple[Path, writers.OutputPaths]] = []
    for path in inputs:
        try:
            paths = writers.output_paths(outdir, path, stems[path])
        except ValueError as exc:
            summary.add_failure(path, exc)
            continue
        if resume:
            _remove_stale_temporaries(paths)
        if resume and writers.is_done(paths):
            summary.add_skipped(path)
        else:
            todo.append((path, paths))
    if summary.skipped:
        log.info("resume: %d of %d inputs already done", len(summary.skipped), len(inputs))
    return FolderPlan(outdir, todo, summary, settings)


def write_outputs(result, image: np.ndarray, paths: writers.OutputPaths, num_classes: int,
                  save_prompts: bool, overlay: bool, source: str) -> None:
    """Write one input's files atomically: prompts JSON, overlay, then the mask (what resume checks).

    Used by the folder run and by the Ray job's write tasks, so both write the same bytes."""
    if save_prompts:
        writers.write_json(paths.prompts, result.to_json(source=source))
    if overlay:
        points = [result.points[c] for c in result.points]
        labels = [result.point_labels[c] for c in result.points]
        writers.write_png(paths.overlay, writers.overlay(
            raster.to_rgb_uint8(image), result.mask,
            points=np.concatenate(points) if points else None,
            point_labels=np.concatenate(labels) if labels else None))
    # The mask goes last: its presence is what --resume treats as "done".
    writers.write_png(paths.mask, writers.mask_to_png_array(result.mask, num_classes))


def write_run_config(plan: FolderPlan) -> None:
    """Write ``run_config.json`` (the settings fingerprint) before the first output, so that even a
    killed run leaves it for a later ``--resume`` to check."""
    plan.outdir.mkdir(parents=True, exist_ok=True)
    if plan.settings is not None:
        writers.write_json(plan.outdir / RUN_CONFIG, {"fingerprint": fingerprint(plan.settings),
                                                      "settings": plan.settings})


def finish_run(plan: FolderPlan) -> RunSummary:
    """Log the failures, write ``summary.json`` and log the totals.

    Per-input errors are logged first: a ``summary.json`` that cannot be written never hides them
    (its failure is kept in ``summary.write_error``)."""
    summary = plan.summary
    summary.finish()
    for failure in summary.failed:
        log.error("%s: %s", failure["path"], failure["error"])
    try:
        plan.outdir.mkdir(parents=True, exist_ok=True)
        summary.write(plan.outdir)
    except (OSError, TypeError, ValueError) as exc:
        summary.write_error = f"{plan.outdir / 'summary.json'}: cannot write the run summary ({exc})"
        log.error("%s; the per-input results above stand", summary.write_error)
    log.info("%d done (%d earlier, %d now), %d failed; %.2f images/s",
             summary.succeeded + len(summary.skipped), len(summary.skipped), summary.succeeded,
             len(summary.failed), summary.images_per_second)
    return summary


def run_folder(segmenter, inputs: list[Path], outdir: Path, save_prompts: bool = False,
               overlay: bool = False, resume: bool = False, force: bool = False,
               settings: dict[str, Any] | None = None, plan: FolderPlan | None = None,
               progress: str = "auto", batch_size: int | None = None) -> RunSummary:
    """Segment ``inputs`` into ``outdir`` (``<stem>.png`` + optional json/overlay + summary.json).

    Args:
        segmenter: a :class:`refseg.Segmenter` with its reference(s) set.
        resume, force: see the module docstring; ``settings`` defaults to
            :func:`run_settings` of the segmenter's configuration and references.
        plan: a :func:`plan_folder` result computed earlier (the CLI plans before loading models).
        progress: ``auto``, ``bar``, ``log`` or ``off`` (:class:`refseg.runtime.progress.Progress`).

    Returns:
        The run summary (also written to ``outdir/summary.json``); failed inputs are listed there
        and logged, the others are written.
    """
    outdir = Path(outdir)
    if settings is None and plan is None:
        settings = run_settings(segmenter.config, getattr(segmenter, "reference_digests", []),
                                backend=getattr(getattr(segmenter, "backend", None), "name", "torch"))
    plan = plan or plan_folder(inputs, outdir, resume, force, settings)
    summary = plan.summary
    write_run_config(plan)
    summary.config = segmenter.config.to_dict()
    num_classes = len(segmenter.classes)
    items = (StreamItem(key=str(path), load=functools.partial(raster.read_image, path), meta=paths)
             for path, paths in plan.todo)
    bar = Progress(len(plan.todo), progress)

    def record(done: list[tuple[str, BaseException | None]]) -> None:
        for key, error in done:
            if error is None:
                summary.add_success(key)
            else:
                summary.add_failure(key, error)
            bar.update(1)

    summary.start()
    with BackgroundWriter(max_pending=8) as writer:
        for out in stream_segment(segmenter, items, batch_size=batch_size):
            if out.error is not None:
                summary.add_failure(out.item.key, out.error)
                bar.update(1)
            else:
                writer.submit(out.item.key, functools.partial(
                    write_outputs, out.result, out.image, out.item.meta, num_classes, save_prompts,
                    overlay, out.item.key))
            del out
            record(writer.completed())
    record(writer.results_left)
    bar.close()
    return finish_run(plan)
