"""``refseg segment`` on CT / MRI volumes: arguments, inputs -> outputs, progress, resume, summary.json.

    refseg segment -r REF.nii.gz -m REF_LABELS.nii.gz -i TARGET.nii.gz -o OUT.nii.gz --label 5 6
    refseg segment -r REF_DICOM_DIR -m MASK_PNG_DIR -i DICOM_DIR -o OUT.nii.gz --window abdomen
    refseg segment -r CT.nii.gz -m FEW_SLICES.nii.gz -i CT.nii.gz -o OUT.nii.gz       # same-volume mode
    refseg segment -r REF.nii.gz -m REF_LABELS.nii.gz -i FOLDER_OF_VOLUMES -o OUTDIR --resume

The job is chosen by :func:`is_volume_job` (``-i`` or ``-r`` a NIfTI file or a DICOM / volume folder).
A folder of volumes holds ``.nii`` / ``.nii.gz`` files and DICOM series sub-folders; each gives
``OUTDIR/<name>.nii.gz``. ``summary.json`` (in the output folder, for a single ``OUT.nii.gz`` in its
folder) lists per-volume times. Every output is written atomically; ``--resume`` skips volumes whose
output already decodes. A volume with failed slices is written (those slices empty) and listed as failed.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
"""Seconds between two progress lines (slices/s, ETA) of one volume."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Volume options of ``refseg segment`` (``--window`` also serves 2-D 16-bit / float images)."""
    group = parser.add_argument_group("volumes (NIfTI files, DICOM series folders)")
    group.add_argument("--window", help="intensity window LEVEL,WIDTH in the file's units (e.g. 40,400) or a "
                       "preset: abdomen, liver, lung, bone, brain; default: the reference's own window "
                       "(volumes: p0.5..p99.5 of the reference volume)")
    group.add_argument("--label", type=int, nargs="+", help="label values of the reference label map to "
                       "segment (default: all present); one prompt set per label")
    group.add_argument("--axis", type=int, choices=(0, 1, 2), default=2, help="slicing axis of the RAS+ "
                       "canonical orientation: 0 sagittal, 1 coronal, 2 axial (default)")
    group.add_argument("--slices", help="target slices A:B along --axis (Python range, canonical order)")
    group.add_argument("--reference-slices", help="comma-separated reference slice indices to use "
                       "(default: every slice holding the label)")
    group.add_argument("--pool-references", action="store_true", help="use every labelled reference slice "
                       "at once (n-shot) instead of the slice of matching relative position")
    group.add_argument("--reference-chunks", type=int, default=3, help="chunks of the relative-position "
                       "choice (ProtoSAM protocol; default 3)")
    group.add_argument("--series", help="SeriesInstanceUID to read when a DICOM folder holds several")


def is_volume_job(args: argparse.Namespace) -> bool:
    """True when ``-i`` or the first ``-r`` is a NIfTI file or a folder of DICOM files / volumes."""
    from refseg.io.volume import is_volume_path

    return is_volume_path(args.input) or is_volume_path(args.reference[0])


def _volume_inputs(path: Path) -> tuple[list[Path], bool]:
    """(volumes, folder_mode): a NIfTI file or DICOM folder is one volume, else the folder's volumes."""
    from refseg.io.dicom import dicom_files
    from refseg.io.volume import is_nifti_path

    if is_nifti_path(path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
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


def _output_path(output: Path, volume: Path, folder_mode: bool) -> Path:
    from refseg.io.volume import is_nifti_path, volume_stem

    if folder_mode or not is_nifti_path(output):
        return output / f"{volume_stem(volume)}.nii.gz"
    return output


def _reference_slices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--reference-slices {text!r}: expected comma-separated integers") from None


class _Progress:
    """Logs slices/s and ETA at most every :data:`PROGRESS_EVERY_S` seconds, and at the end."""

    def __init__(self, name: str):
        self.name, self.start, self.last = name, time.perf_counter(), 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter() - self.start
        if done < total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = done / now if now > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        log.info("%s: slice %d/%d, %.2f slices/s, ETA %.0f s", self.name, done, total, rate, eta)


def run(args: argparse.Namespace, config) -> int:
    """Run the volume job described by ``args`` (see module doc). Returns the CLI exit code."""
    from refseg.io import volume as vio
    from refseg.io.intensity import parse_window
    from refseg.io.run_summary import RunSummary
    from refseg.io.writers import write_json
    from refseg.segmenter import Segmenter
    from refseg.volume_segment import plan_volume, run_plan

    if len(args.reference) != 1 or len(args.reference_mask) != 1:
        raise ValueError("volumes take one -r/-m pair (use --pool-references for n-shot from its slices)")
    window = parse_window(args.window) if args.window else None
    reference_slices = _reference_slices(args.reference_slices)
    inputs, folder_mode = _volume_inputs(Path(args.input))
    output = Path(args.output)
    if not folder_mode and not vio.is_nifti_path(output) and output.exists() and not output.is_dir():
        raise ValueError(f"{output}: output must be a .nii/.nii.gz file name or a folder")
    ref_path, mask_path = Path(args.reference[0]), Path(args.reference_mask[0])
    # The reference is read and checked before any model loads.
    reference = vio.read_volume(ref_path, series_uid=args.series)
    if Path(mask_path).is_dir():
        label_data = vio.read_slice_masks(mask_path, reference)
        labels_volume = vio.Volume(data=label_data, affine=reference.affine, path=mask_path)
    else:
        labels_volume = vio.read_label_volume(mask_path)
    plan_options = dict(labels=args.label, axis=args.axis, slices=args.slices, reference_slices=reference_slices,
                        pool_references=args.pool_references, chunks=args.reference_chunks, window=window,
                        config=config)
    plan_volume(reference, labels_volume, reference=reference, **{**plan_options, "slices": None})

    summary = RunSummary(inputs, config={**config.to_dict(), "window": args.window, "axis": args.axis,
                                         "labels": args.label, "pool_references": args.pool_references})
    summary_dir = output if folder_mode or not vio.is_nifti_path(output) else output.parent
    todo = []
    for path in inputs:
        out_path = _output_path(output, path, folder_mode)
        if out_path.exists() and (out_path.resolve() == path.resolve() or out_path.resolve() == ref_path.resolve()
                                  or out_path.resolve() == mask_path.resolve()):
            raise ValueError(f"{out_path}: the output would overwrite an input; choose another output name")
        if args.resume and out_path.exists() and vio.is_readable_nifti(out_path):
            summary.add_skipped(path)
        else:
            todo.append((path, out_path))
    if summary.skipped:
        log.info("resume: %d of %d volumes already done", len(summary.skipped), len(inputs))
    volumes = []
    if todo:
        on_ray = getattr(args, "ray", None) is not None  # slice batches on Ray actors (refseg.ray_stream)
        if on_ray:
            from refseg.ray_stream import ray_segmenter_from_args

            segmenter = ray_segmenter_from_args(args, config)
        else:
            segmenter = Segmenter(config, sam_checkpoint=args.sam_checkpoint,
                                  dinov2_checkpoint=args.dinov2_checkpoint, device=args.device,
                                  backend=args.backend, engine_dir=args.engine_dir)
        summary.start()
        for path, out_path in todo:
            started = time.perf_counter()
            try:
                same = path.resolve() == ref_path.resolve()
                target = reference if same else vio.read_volume(path, series_uid=args.series)
                plan = plan_volume(target, labels_volume, reference=None if same else reference, **plan_options)
                result = run_plan(segmenter, plan, on_slice=_Progress(path.name),
                                  target_file=(str(path), args.series) if on_ray else None)
                vio.write_label_volume(out_path, result.labels, target)
            except Exception as exc:  # one bad volume never stops the others
                summary.add_failure(path, exc)
                log.error("%s: %s", path, exc)
                continue
            seconds = time.perf_counter() - started
            volumes.append({"input": str(path), "output": str(out_path), "seconds": round(seconds, 3),
                            "slices_segmented": len(result.segmented), "slices_copied": len(result.copied),
                            "slices_per_second": round(result.slices_per_second, 4),
                            "window": [plan.window.lo, plan.window.hi, plan.window.source],
                            "reference_slices": [list(s) for s in result.reference_slices],
                            "failed_slices": {str(k): v for k, v in result.failed.items()}})
            if result.failed:
                summary.add_failure(path, f"{len(result.failed)} slice(s) failed and were left empty: "
                                    + "; ".join(f"slice {k}: {v}" for k, v in sorted(result.failed.items())[:5]))
            else:
                summary.add_success(path)
            log.info("%s -> %s: %d slices in %.1f s (%.2f slices/s)", path, out_path, len(result.segmented),
                     seconds, result.slices_per_second)
        if on_ray:
            segmenter.close()
    summary.finish()
    data = summary.to_dict()
    data["volumes"] = volumes
    data["slices_per_second"] = round(sum(v["slices_segmented"] for v in volumes) / summary.elapsed, 4) \
        if volumes and summary.elapsed > 0 else 0.0
    for failure in summary.failed:
        log.error("%s: %s", failure["path"], failure["error"])
    write_json(summary_dir / "summary.json", data)
    return 1 if summary.failed else 0
