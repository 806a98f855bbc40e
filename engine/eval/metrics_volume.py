"""Volume evaluation: per-structure Dice of NIfTI label maps over the whole volume (and per slice).

    refseg eval -p OUT.nii.gz -g GT.nii.gz [--label 5 6] [--per-slice] [--axis 2] [--slices 10:40]
    refseg eval -p PRED_DIR -g GT_DIR            # NIfTI files paired by name (stem without .nii[.gz])

Empty rule (:data:`VOLUME_EMPTY_RULE`): a structure (label value) is scored in a volume when the ground
truth or the prediction holds it; present in only one of them gives Dice 0; absent from both, it is not
scored (no row, not in the mean). Per-slice Dice applies the same rule to each slice (slice index along the
canonical RAS+ ``--axis``, as in ``refseg segment``); ``--slices A:B`` scores only those slices.

Pairing voxels: both label maps are viewed in their closest RAS+ canonical orientation. When the two
canonical grids agree (same shape, affines within 1e-3 mm) the voxels are paired by world position, so a
prediction stored in a DICOM series' voxel order scores against a NIfTI ground truth of the same space
(axes permuted or flipped: no interpolation is needed). Grids of the same stored shape whose affines differ
are paired by index with a warning; other grids are refused.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from refseg.eval.metrics import dice

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

    def to_dict(self) -> dict:
        """JSON-friendly copy (``refseg eval --json``)."""
        return {"name": self.name, "gt": self.gt_path, "pred": self.pred_path,
                "dice": {str(k): v for k, v in self.dice.items()},
                "per_slice": {str(k): [list(p) for p in v] for k, v in self.per_slice.items()},
                "error": self.error}


def is_volume_eval(pred, gt) -> bool:
    """True when ``pred`` or ``gt`` is a NIfTI file or a folder holding NIfTI files."""
    from refseg.io.volume import is_nifti_path

    def holds_nifti(path: Path) -> bool:
        return is_nifti_path(path) or (path.is_dir() and any(is_nifti_path(p) for p in path.iterdir()))

    return holds_nifti(Path(pred)) or holds_nifti(Path(gt))


def aligned(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (RAS+) arrays of two :class:`refseg.io.volume.Volume` label maps, voxel for voxel (see the
    module doc for the rule).

    Raises:
        ValueError: naming both files, when the grids describe different spaces.
    """
    from refseg.io.volume import canonical_affine, reorientation

    p = reorientation(pred.affine).apply(pred.data)
    g = reorientation(gt.affine).apply(gt.data)
    if p.shape == g.shape and np.allclose(canonical_affine(pred.affine, pred.shape),
                                          canonical_affine(gt.affine, gt.shape), atol=1e-3):
        return p, g
    if pred.shape == gt.shape:
        log.warning("%s: grid differs from the ground truth %s; voxels are paired by index", pred.path, gt.path)
        turn = reorientation(gt.affine)
        return turn.apply(pred.data), g
    raise ValueError(f"{pred.path}: grid {pred.shape} ({pred.orientation()}) describes another space than the "
                     f"ground truth {gt.path} {gt.shape} ({gt.orientation()}); resample one onto the other first")


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
                    axis: int = 2, slices: str | None = None) -> VolumeScore:
    """Score one NIfTI prediction against its ground truth (both read with ``read_label_volume``, paired by
    :func:`aligned`); ``slices`` ``"A:B"`` keeps canonical slices A..B-1 along ``axis``."""
    from refseg.io.volume import read_label_volume, volume_stem
    from refseg.io.volume import slice_range

    p, g = aligned(read_label_volume(pred_path), read_label_volume(gt_path))
    offset = 0
    if slices is not None:
        chosen = slice_range(slices, g.shape[axis], str(gt_path), f"axis {axis}")
        offset = chosen[0]
        p, g = (np.take(a, chosen, axis=axis) for a in (p, g))
    scores, per = score_volume(p, g, labels, axis if per_slice else None)
    per = {c: [(k + offset, d) for k, d in rows] for c, rows in per.items()}
    return VolumeScore(volume_stem(gt_path), str(gt_path), str(pred_path), scores, per)


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
                     axis: int = 2, slices: str | None = None) -> list[VolumeScore]:
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
            out.append(evaluate_volume(pred_path, gt_path, labels, per_slice, axis, slices))
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
