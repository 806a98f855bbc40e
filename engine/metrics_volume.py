"""Volume evaluation: per-structure Dice of NIfTI label maps over the whole volume (and per slice).

    refseg eval -p OUT.nii.gz -g GT.nii.gz [--label 5 6] [--per-slice] [--axis 2]
    refseg eval -p PRED_DIR -g GT_DIR            # NIfTI files paired by name (stem without .nii[.gz])

Empty rule (:data:`VOLUME_EMPTY_RULE`): a structure (label value) is scored in a volume when the ground
truth or the prediction holds it; present in only one of them gives Dice 0; absent from both, it is not
scored (no row, not in the mean). Per-slice Dice applies the same rule to each slice (slice index along the
canonical RAS+ ``--axis``, as in ``refseg segment``). Prediction and ground truth must have the same shape;
their affines differing by more than 1e-3 gives a warning (voxels are paired by index).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from refseg.metrics import dice

log = logging.getLogger(__name__)

VOLUME_EMPTY_RULE = ("a structure is scored where the ground truth or the prediction holds it (only one of "
                     "them -> Dice 0); absent from both it is not scored")


@dataclasses.dataclass
class VolumeScore:
    """Scores of one volume: ``dice[label]`` over the whole volume, ``per_slice[label]`` a list of
    (slice index, Dice) when asked; ``error`` set (and no scores) when the pair could not be read."""

    name: str
    gt_path: str
    pred_path: str | None
    dice: dict[int, float]
    per_slice: dict[int, list[tuple[int, float]]]
    error: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Volume options of ``refseg eval``."""
    group = parser.add_argument_group("volumes (NIfTI label maps)")
    group.add_argument("--label", type=int, nargs="+", help="structures (label values) to score; default: "
                       "every label in ground truth or prediction")
    group.add_argument("--per-slice", action="store_true", help="also print Dice per slice")
    group.add_argument("--axis", type=int, choices=(0, 1, 2), default=2,
                       help="slice axis of --per-slice in RAS+ canonical orientation (2 = axial)")


def is_volume_eval(args: argparse.Namespace) -> bool:
    """True when ``-p`` or ``-g`` is a NIfTI file or a folder holding NIfTI files."""
    from refseg.io.volume import is_nifti_path

    def holds_nifti(path: Path) -> bool:
        return is_nifti_path(path) or (path.is_dir() and any(is_nifti_path(p) for p in path.iterdir()))

    return holds_nifti(Path(args.pred)) or holds_nifti(Path(args.gt))


def score_volume(pred: np.ndarray, gt: np.ndarray, labels: Sequence[int] | None = None,
                 per_slice_axis: int | None = None) -> tuple[dict[int, float], dict[int, list[tuple[int, float]]]]:
    """Per-structure Dice of two label arrays of one shape (see the module's empty rule).

    ``per_slice_axis``: also score every slice along this array axis. Returns (dice, per_slice).
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    if labels is None:
        labels = sorted((set(np.unique(gt).tolist()) | set(np.unique(pred).tolist())) - {0})
    scores, slices = {}, {}
    for label in labels:
        p, g = pred == label, gt == label
        if not p.any() and not g.any():
            continue
        scores[int(label)] = dice(p, g)
        if per_slice_axis is not None:
            other = tuple(a for a in range(p.ndim) if a != per_slice_axis)
            present = np.nonzero(p.any(axis=other) | g.any(axis=other))[0]
            slices[int(label)] = [(int(k), dice(np.take(p, k, per_slice_axis), np.take(g, k, per_slice_axis)))
                                  for k in present]
    return scores, slices


def evaluate_volume(pred_path, gt_path, labels: Sequence[int] | None = None, per_slice: bool = False,
                    axis: int = 2) -> VolumeScore:
    """Score one NIfTI prediction against its ground truth (both read with ``read_label_volume``)."""
    from refseg.io.volume import read_label_volume, reorientation, volume_stem

    gt = read_label_volume(gt_path)
    pred = read_label_volume(pred_path)
    if pred.shape != gt.shape:
        raise ValueError(f"{pred_path}: shape {pred.shape} differs from the ground truth {gt_path} {gt.shape}")
    if not np.allclose(pred.affine, gt.affine, atol=1e-3):
        log.warning("%s: affine differs from the ground truth %s; voxels are paired by index", pred_path, gt_path)
    turn = reorientation(gt.affine)
    p, g = turn.apply(pred.data), turn.apply(gt.data)
    scores, slices = score_volume(p, g, labels, axis if per_slice else None)
    return VolumeScore(volume_stem(gt_path), str(gt_path), str(pred_path), scores, slices)


def _pairs(pred: Path, gt: Path) -> list[tuple[Path | None, Path]]:
    from refseg.io.volume import is_nifti_path, volume_stem

    if not gt.is_dir():
        return [(pred if pred.exists() else None, gt)]
    gts = sorted(p for p in gt.iterdir() if p.is_file() and is_nifti_path(p) and not p.name.startswith("."))
    if not gts:
        raise ValueError(f"{gt}: folder holds no NIfTI ground truth")
    preds = {volume_stem(p): p for p in pred.iterdir() if is_nifti_path(p)} if pred.is_dir() else {}
    return [(preds.get(volume_stem(g)), g) for g in gts]


def evaluate_volumes(pred, gt, labels: Sequence[int] | None = None, per_slice: bool = False,
                     axis: int = 2) -> list[VolumeScore]:
    """Score NIfTI predictions against ground truth: two files, or two folders paired by name. A missing
    prediction scores 0 for every ground-truth structure; an unreadable pair is reported in ``error``."""
    from refseg.io.volume import read_label_volume, volume_stem

    out = []
    for pred_path, gt_path in _pairs(Path(pred), Path(gt)):
        name = volume_stem(gt_path)
        try:
            if pred_path is None:
                present = sorted(set(np.unique(read_label_volume(gt_path).data).tolist()) - {0})
                chosen = [c for c in present if labels is None or c in labels]
                out.append(VolumeScore(name, str(gt_path), None, {c: 0.0 for c in chosen}, {},
                                       error="no prediction (scored 0)"))
                continue
            out.append(evaluate_volume(pred_path, gt_path, labels, per_slice, axis))
        except (ValueError, OSError) as exc:
            out.append(VolumeScore(name, str(gt_path), str(pred_path), {}, {}, error=str(exc)))
    return out


def format_volume_table(scores: list[VolumeScore], per_slice: bool = False) -> str:
    """Rows volume / structure / Dice, a mean per structure over the volumes scoring it, and the empty rule."""
    width = max([len("volume")] + [len(s.name) for s in scores])
    lines = [f"{'volume':<{width}}  {'label':>5}  {'dice':>7}  note", "-" * (width + 22)]
    by_label: dict[int, list[float]] = {}
    for s in scores:
        if not s.dice:
            lines.append(f"{s.name:<{width}}  {'-':>5}  {'-':>7}  {s.error or 'no structure'}")
        for label, value in s.dice.items():
            by_label.setdefault(label, []).append(value)
            lines.append(f"{s.name:<{width}}  {label:>5}  {value:7.4f}  {s.error or ''}".rstrip())
            if per_slice:
                for k, v in s.per_slice.get(label, []):
                    lines.append(f"{'':<{width}}  {'':>5}  {v:7.4f}  slice {k}")
    lines.append("-" * (width + 22))
    for label in sorted(by_label):
        values = by_label[label]
        lines.append(f"{'mean':<{width}}  {label:>5}  {float(np.mean(values)):7.4f}  over {len(values)} volume(s)")
    lines.append(f"Empty rule: {VOLUME_EMPTY_RULE}.")
    return "\n".join(lines)


def run_volume_eval(args: argparse.Namespace) -> int:
    """``refseg eval`` on NIfTI: prints the table; exit 1 when no volume could be scored."""
    scores = evaluate_volumes(args.pred, args.gt, labels=args.label, per_slice=args.per_slice, axis=args.axis)
    sys.stdout.write(format_volume_table(scores, args.per_slice) + "\n")
    for s in scores:
        if s.error:
            log.error("%s: %s", s.gt_path, s.error)
    return 0 if any(s.dice and s.pred_path for s in scores) else 1
