"""The volume job: CT / MRI volumes segmented slice by slice from labelled reference slices.

    refseg segment -r REF.nii.gz -m REF_LABELS.nii.gz -i TARGET.nii.gz -o OUT.nii.gz --label 5 6
    refseg segment -r REF_DICOM_DIR -m MASK_PNG_DIR -i DICOM_DIR -o OUT.nii.gz [--pair-by order]
    refseg segment -r CT.nii.gz -m FEW_SLICES.nii.gz -i CT.nii.gz -o OUT.nii.gz       # same-volume mode
    refseg segment -r REF.nii.gz -m REF_LABELS.nii.gz -i FOLDER_OF_VOLUMES -o OUTDIR --resume

A folder of volumes holds ``.nii`` / ``.nii.gz`` files and DICOM series sub-folders; each gives
``OUTDIR/<name>.nii.gz`` and the run's ``OUTDIR/summary.json``. A single output ``OUT.nii.gz`` gets
``OUT.summary.json`` and ``OUT.run_config.json`` beside it (:func:`refseg.jobs.base.job_files`), so another
run into the same folder keeps them. The label map has the target's geometry (affine and header kept) and
the label values asked for (``--label 5`` writes 5). A volume with failed slices is written (those slices
empty) and listed as failed. Which reference slices serve which target slice: :mod:`refseg.jobs.volume_plan`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from refseg.jobs.base import ItemPass, Job, Unit, job_files
from refseg.jobs.segmenter_spec import LocalRunner, SegmenterSpec
from refseg.io.volume import slice_range
from refseg.jobs.volume_plan import (DEFAULT_CHUNKS, AXIS_NAMES, VolumePlan, VolumeSegmentation, drop_unprompted,
                                     plan_volume, read_canonical_slice, reference_shots)

log = logging.getLogger(__name__)

DEFAULT_AXIS = 2


def volume_inputs(path: Path) -> tuple[list[Path], bool]:
    """(volumes, folder_mode): a NIfTI file or DICOM folder is one volume, else the folder's volumes."""
    from refseg.io.dicom import dicom_files
    from refseg.io.volume import is_nifti_path

    if is_nifti_path(path):
        if not path.exists():
            raise ValueError(f"{path}: no such file")
        return [path], False
    if not path.is_dir():
        raise ValueError(f"{path}: not a NIfTI file (.nii, .nii.gz) or a folder of DICOM files / volumes")
    if dicom_files(path):
        return [path], False
    found = sorted((p for p in path.iterdir() if not p.name.startswith(".")
                    and ((p.is_file() and is_nifti_path(p)) or (p.is_dir() and dicom_files(p)))),
                   key=lambda p: p.name)
    if not found:
        raise ValueError(f"{path}: folder holds no NIfTI file and no DICOM series sub-folder")
    return found, True


def _reference_slices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--reference-slices {text!r}: expected comma-separated integers") from None


class VolumeRun:
    """The slice stream of one planned volume and its label map under construction.

    :meth:`passes` yields one item pass per reference set (the runner's references are replaced before
    each), :meth:`consume` puts each slice's mask in place as it leaves the stream, :meth:`result` returns
    the label map in the target's stored voxel order. ``target_file`` = (path, DICOM series UID) makes the
    slice loaders picklable (Ray actors read the file themselves).
    """

    def __init__(self, plan: VolumePlan, target_file: tuple[str, str | None] | None = None):
        from refseg.io.volume import put_slice_view, slice_view

        self.plan, self.target_file = plan, target_file
        self.out = np.zeros(plan.target_canonical.shape, np.uint8)
        for t in plan.copied:
            mask = slice_view(plan.labels_canonical, plan.axis, t)
            put_slice_view(self.out, plan.axis, t, np.where(np.isin(mask, plan.labels), mask, 0).astype(np.uint8))
        self.failed: dict[int, str] = {}
        self.segmented: list[int] = []
        self.start = time.perf_counter()

    def _loader(self, t: int):
        import functools

        from refseg.io.volume import slice_view

        plan = self.plan
        if self.target_file is not None:
            return functools.partial(read_canonical_slice, str(self.target_file[0]), self.target_file[1],
                                     plan.axis, t, plan.window)
        return lambda: plan.window.apply(slice_view(plan.target_canonical, plan.axis, t))

    def passes(self, runner) -> Iterator[ItemPass]:
        from refseg.runtime.stream import StreamItem

        plan = self.plan
        for slices, members in plan.groups.items():
            shots = reference_shots(plan, slices, runner.config)
            problem = None if shots else "no label covers a whole patch"
            if shots:
                try:
                    runner.set_references(shots)
                except ValueError as exc:
                    problem = str(exc)
            if problem is not None:
                for t in members:
                    self.failed[t] = f"reference slices {list(slices)}: {problem}"
                continue
            missing = sorted(set(plan.labels) - set(runner.classes))
            if missing:
                log.warning("%s: label(s) %s have no usable reference patch on slices %s; not segmented on "
                            "%d slice(s)", plan.name, missing, list(slices), len(members))
            items = (StreamItem(key=f"{plan.name}[axis={plan.axis} slice={t}]", meta=t, load=self._loader(t))
                     for t in members)
            yield ItemPass(items, len(members))

    def consume(self, out) -> None:
        from refseg.io.volume import put_slice_view

        t = out.item.meta
        if out.error is not None:
            self.failed[t] = f"{type(out.error).__name__}: {out.error}"
        else:
            drop_unprompted(out.result)
            put_slice_view(self.out, self.plan.axis, t, out.result.mask)
            self.segmented.append(t)

    def result(self) -> VolumeSegmentation:
        from refseg.io.volume import reorientation

        labels = np.ascontiguousarray(reorientation(self.plan.target.affine).undo(self.out))
        return VolumeSegmentation(labels=labels, segmented=sorted(self.segmented), copied=list(self.plan.copied),
                                  failed=dict(self.failed), seconds=time.perf_counter() - self.start,
                                  reference_slices=list(self.plan.groups))


def segment_volume(segmenter, volume, reference_labels, reference=None, labels=None, axis: int = DEFAULT_AXIS,
                   slices=None, reference_slices=None, pool_references: bool = False,
                   chunks: int = DEFAULT_CHUNKS, window=None, batch_size: int | None = None) -> VolumeSegmentation:
    """:func:`refseg.jobs.volume_plan.plan_volume` then every slice through ``segmenter`` (its references
    are replaced per reference set); see :meth:`refseg.Segmenter.segment_volume`."""
    plan = plan_volume(volume, reference_labels, reference=reference, labels=labels, axis=axis, slices=slices,
                       reference_slices=reference_slices, pool_references=pool_references, chunks=chunks,
                       window=window, config=segmenter.config)
    return run_volume_plan(segmenter, plan, batch_size)


def run_volume_plan(segmenter, plan: VolumePlan, batch_size: int | None = None) -> VolumeSegmentation:
    """Every planned slice of ``plan`` through ``segmenter``, in-process (its references are replaced per
    reference set)."""
    run, runner = VolumeRun(plan), LocalRunner(segmenter=segmenter)
    for item_pass in run.passes(runner):
        for out in runner.stream(item_pass.items, batch_size):
            run.consume(out)
    return run.result()


def _given(task):
    return task


def _raise(error: BaseException):
    raise error


class VolumeJob(Job):
    """``refseg segment`` on volumes (see the module docstring). Segmenters decode with ``fallback=False``
    (a label with no positive point on a slice stays empty there), set in the spec from the start.

    ``--propagate`` (:mod:`refseg.jobs.propagate`): a stream item is a whole volume (Ray distributes
    volumes), the references are the matching's reference slices all at once (set once for every volume of
    another file; same-volume: that volume's labelled slices), and the models are a matching Segmenter and
    SAM 2 (:class:`refseg.jobs.propagate_worker.PropagationSpec`).
    """

    mode = "volume"

    def __init__(self, args, config, runner=None, **runner_options):
        super().__init__(args, config.replace(fallback=False), runner=runner, **runner_options)
        self.propagate = bool(args.propagate)
        self._planned: dict[int, tuple[Unit, VolumePlan]] = {}  # --propagate: volumes in the stream

    def needs_dicom(self) -> bool:
        from refseg.io.volume import is_nifti_path

        return any(not is_nifti_path(p) for p in (self.args.input, *self.args.reference))

    def prepare(self) -> None:
        from refseg.io import volume as vio
        from refseg.io.intensity import parse_window
        from refseg.io.writers import prepare_output_folder
        from refseg.jobs.checks import output_file

        args = self.args
        if self.propagate:  # the SAM 2 checkpoint and the options that fit, before reading any volume
            from refseg.jobs.checks import check_propagation
            from refseg.jobs.propagate import DEFAULT_ANCHORS, DEFAULT_MAX_AREA_RATIO, PropagationSettings

            self.sam2 = check_propagation(args, self.config)
            self.settings = PropagationSettings(
                anchors=DEFAULT_ANCHORS if args.anchors is None else args.anchors,
                max_area_ratio=DEFAULT_MAX_AREA_RATIO if args.max_area_ratio is None else args.max_area_ratio,
                sam_image_size=args.sam_image_size)
        if len(args.reference) != 1 or len(args.reference_mask) != 1:
            raise ValueError("volumes take one -r/-m pair (use --pool-references for n-shot from its slices)")
        self.axis = DEFAULT_AXIS if args.axis is None else args.axis
        window = parse_window(args.window) if args.window else None
        inputs, folder_mode = volume_inputs(Path(args.input))
        output = Path(args.output)
        if folder_mode or not vio.is_nifti_path(output):
            outdir = prepare_output_folder(output)
            self.files = job_files(outdir)
            out_paths = [outdir / f"{vio.volume_stem(p)}.nii.gz" for p in inputs]
        else:
            output = output_file(output, vio.NIFTI_SUFFIXES)
            self.files = job_files(output, vio.volume_stem(output))
            out_paths = [output]
        # the reference is read and checked before any model loads
        self.ref_path, mask_path = Path(args.reference[0]), Path(args.reference_mask[0])
        self.reference = vio.read_volume(self.ref_path, series_uid=args.series)
        if mask_path.is_dir():
            label_data = vio.read_slice_masks(mask_path, self.reference, args.pair_by or "stem")
            self.labels_volume = vio.Volume(data=label_data, affine=self.reference.affine, path=mask_path)
        else:
            self.labels_volume = vio.read_label_volume(mask_path)
        self.plan_options = dict(labels=args.label, axis=self.axis, slices=args.slices,
                                 reference_slices=_reference_slices(args.reference_slices),
                                 pool_references=args.pool_references, window=window, config=self.config,
                                 chunks=DEFAULT_CHUNKS if args.reference_chunks is None else args.reference_chunks)
        self.reference_plan = plan_volume(self.reference, self.labels_volume, reference=self.reference,
                                          **{**self.plan_options, "slices": None})
        protected = {p.resolve() for p in (self.ref_path, mask_path, *inputs)}
        for path, out_path in zip(inputs, out_paths):
            if out_path.exists() and out_path.resolve() in protected:
                raise ValueError(f"{out_path}: the output would overwrite an input; choose another output name")
            if args.slices is not None:  # a range outside the volume: said now, not after the models load
                slice_range(args.slices, vio.canonical_length(path, self.axis, args.series), str(path),
                            AXIS_NAMES[self.axis])
            self.units.append(Unit(path, [out_path], out_path))
        self.spec = SegmenterSpec.from_args(args, self.config, window)
        if self.propagate:
            from refseg.jobs.propagate_worker import PropagationSpec

            self.spec = PropagationSpec.for_propagation(self.spec, self.sam2, self.settings)

    def reference_digests(self) -> list[str]:
        from refseg.segmenter import reference_digest

        return [reference_digest(self.reference.data, self.labels_volume.data)]

    def mode_settings(self) -> dict:
        a = self.args
        return {"window": a.window, "labels": a.label, "axis": self.axis, "slices": a.slices,
                "reference_slices": a.reference_slices, "pool_references": a.pool_references,
                "chunks": self.plan_options["chunks"], "series": a.series, "pair_by": a.pair_by or "stem",
                **({"propagate": {"sam": self.sam2, "anchors": self.settings.anchors,
                                  "max_area_ratio": self.settings.max_area_ratio,
                                  "sam_image_size": self.settings.sam_image_size}} if self.propagate else {})}

    def unit_done(self, unit: Unit) -> bool:
        from refseg.io.volume import is_readable_nifti

        return unit.data.exists() and is_readable_nifti(unit.data)

    def batch_size(self) -> int | None:
        return 1 if self.propagate else None  # --propagate: one volume per call (slices per DINOv2 call: config)

    def item_count(self, out) -> int:
        return out.item.meta[1] if self.propagate else 1

    def passes(self, units: list[Unit]) -> Iterator[ItemPass]:
        from refseg.io import volume as vio

        if self.propagate:
            yield from self._propagation_passes(units)
            return
        for unit in units:
            try:
                same = unit.path.resolve() == self.ref_path.resolve()
                target = self.reference if same else vio.read_volume(unit.path, series_uid=self.args.series)
                plan = plan_volume(target, self.labels_volume, reference=None if same else self.reference,
                                   **self.plan_options)
            except Exception as exc:  # one bad volume never stops the others
                self.summary.add_failure(unit.path, exc)
                continue
            self.current = VolumeRun(plan, (str(unit.path), self.args.series) if self.runner.remote else None)
            yield from self.current.passes(self.runner)
            self._write(unit, plan, self.current.result())

    def consume(self, out) -> None:
        if self.propagate:
            self._consume_propagation(out)
        else:
            self.current.consume(out)

    # ------------------------------------------------------------------ --propagate
    def _same(self, unit: Unit) -> bool:
        return unit.path.resolve() == self.ref_path.resolve()

    def _propagation_passes(self, units: list[Unit]) -> Iterator[ItemPass]:
        """One pass holding every volume of another file (references set once: Ray spreads the volumes over
        its actors), then one pass per same-volume unit (its own labelled slices as references)."""
        from refseg.io.volume import canonical_length

        self.summary.config = {**self.summary.config, "sam": self.summary.models["sam"]}  # SAM 2, as loaded
        others = [u for u in units if not self._same(u)]
        if others:
            problem = self._set_references(self.reference_plan)
            if problem is not None:
                for unit in others:
                    self.summary.add_failure(unit.path, problem)
            else:
                counts = []
                for unit in others:
                    try:
                        counts.append(len(slice_range(self.args.slices, canonical_length(
                            unit.path, self.axis, self.args.series), str(unit.path), AXIS_NAMES[self.axis])))
                    except ValueError:
                        counts.append(0)  # the plan fails below, naming the problem
                items = (self._propagation_item(unit, count) for unit, count in zip(others, counts))
                yield ItemPass(items, sum(counts))
        for unit in filter(self._same, units):
            try:
                plan = plan_volume(self.reference, self.labels_volume, reference=None, **self.plan_options)
            except ValueError as exc:
                self.summary.add_failure(unit.path, exc)
                continue
            problem = self._set_references(plan)
            if problem is not None:
                self.summary.add_failure(unit.path, problem)
                continue
            yield ItemPass([self._propagation_item(unit, len(plan.targets), plan)], len(plan.targets))

    def _set_references(self, plan: VolumePlan) -> str | None:
        """The matching's references for ``plan`` (all its reference slices at once); a problem as text."""
        from refseg.jobs.propagate import matching_reference_slices

        slices = tuple(matching_reference_slices(plan))
        shots = reference_shots(plan, slices, self.runner.config)
        if not shots:
            return f"reference slices {list(slices)}: no label covers a whole patch"
        try:
            self.runner.set_references(shots)
        except ValueError as exc:
            return f"reference slices {list(slices)}: {exc}"
        missing = sorted(set(plan.labels) - set(self.runner.classes))
        if missing:
            log.warning("label(s) %s have no usable reference patch on slices %s; not segmented", missing,
                        list(slices))
        return None

    def _propagation_item(self, unit: Unit, count: int, plan: VolumePlan | None = None):
        """The stream item of one volume: its :class:`~refseg.jobs.propagate.PropagationTask` (planned here,
        on the driver; a volume that cannot be planned becomes an item whose load raises, so the stream
        reports it in order)."""
        import functools

        from refseg.io import volume as vio
        from refseg.jobs.propagate import propagation_task
        from refseg.runtime.stream import StreamItem

        index = len(self._planned)
        try:
            if plan is None:
                target = vio.read_volume(unit.path, series_uid=self.args.series)
                plan = plan_volume(target, self.labels_volume, reference=self.reference, **self.plan_options)
            source = (str(unit.path), self.args.series) if self.runner.remote else None
            load = functools.partial(_given, propagation_task(plan, self.settings, source))
            self._planned[index] = (unit, plan)
        except Exception as exc:  # one bad volume never stops the others
            load = functools.partial(_raise, exc)
            self._planned[index] = (unit, None)
        return StreamItem(key=str(unit.path), load=load, meta=(index, count))

    def _consume_propagation(self, out) -> None:
        import dataclasses

        from refseg.io.volume import put_slice_view
        from refseg.jobs.propagate import matching_reference_slices

        unit, plan = self._planned.pop(out.item.meta[0])
        if out.error is not None:
            self.summary.add_failure(unit.path, out.error)
            return
        found = out.result
        run = VolumeRun(plan)
        for t, image in found.slices.items():
            put_slice_view(run.out, plan.axis, t, image)
        run.segmented = list(plan.targets)
        references = matching_reference_slices(plan if plan.same_volume else self.reference_plan)
        result = dataclasses.replace(run.result(), seconds=found.seconds, reference_slices=[tuple(references)])
        self._write(unit, plan, result, {"propagation": {
            "sam": self.summary.models["sam"], "anchors": self.settings.anchors,
            "max_area_ratio": self.settings.max_area_ratio, "probed_slices": found.probed,
            "slices_tracked": found.tracked, "labels": {str(c): t.record() for c, t in found.tracks.items()}}})

    def _write(self, unit: Unit, plan: VolumePlan, result: VolumeSegmentation, extra: dict | None = None) -> None:
        from refseg.io.volume import write_label_volume

        try:
            write_label_volume(unit.data, result.labels, plan.target)
        except Exception as exc:
            self.summary.add_failure(unit.path, exc)
            return
        self.summary.records.append({
            "path": str(unit.path), "output": str(unit.data), "seconds": round(result.seconds, 3),
            "slices_segmented": len(result.segmented), "slices_copied": len(result.copied),
            "slices_per_second": round(result.slices_per_second, 4),
            "window": [plan.window.lo, plan.window.hi, plan.window.source], "labels": plan.labels,
            "reference_slices": [list(s) for s in result.reference_slices],
            "failed_slices": {str(k): v for k, v in sorted(result.failed.items())}, **(extra or {})})
        if result.failed:
            self.summary.add_failure(unit.path, f"{len(result.failed)} slice(s) failed and were left empty: "
                                     + "; ".join(f"slice {k}: {v}" for k, v in sorted(result.failed.items())[:5]))
        else:
            self.summary.add_success(unit.path)
        log.info("%s -> %s: %d slices in %.1f s (%.2f slices/s)", unit.path, unit.data, len(result.segmented),
                 result.seconds, result.slices_per_second)
