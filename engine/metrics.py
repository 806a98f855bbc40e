"""Segmentation metrics: Dice and IoU per image (per class for label masks) and folder evaluation.

Convention (algorithm.md section 6): when prediction and ground truth are both empty, Dice = IoU = 1.0;
such cases are counted in the mean and their number is reported. A ground-truth image without a usable
prediction (missing file, unreadable file, size mismatch) scores 0 for every class and is reported.
Ground-truth files that cannot be read are reported and left out of the mean (there is nothing to score).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from refseg.io.raster import ImageReadError, list_images, read_mask

log = logging.getLogger(__name__)

EMPTY_RULE = "prediction and ground truth both empty -> Dice = IoU = 1.0 (counted in the mean)"


def _overlap(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """(|P & G|, |P|, |G|) for masks of the same shape; non-zero = foreground."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} does not match gt shape {gt.shape}")
    p, g = pred != 0, gt != 0
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p)), int(np.count_nonzero(g))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2|P & G| / (|P| + |G|) of two binary masks of any equal shape (2-D images or 3-D volumes);
    non-zero = foreground. Both empty -> 1.0."""
    inter, n_pred, n_gt = _overlap(pred, gt)
    return 1.0 if n_pred + n_gt == 0 else 2.0 * inter / (n_pred + n_gt)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU (Jaccard) = |P & G| / |P | G| of two binary masks of equal shape; both empty -> 1.0."""
    inter, n_pred, n_gt = _overlap(pred, gt)
    union = n_pred + n_gt - inter
    return 1.0 if union == 0 else inter / union


def per_class_scores(pred: np.ndarray, gt: np.ndarray, labels: Iterable[int]
                     ) -> dict[int, tuple[float, float, bool]]:
    """For each label c: (Dice, IoU, both_empty) of ``pred == c`` vs ``gt == c``; any equal shape."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} does not match gt shape {gt.shape}")
    out = {}
    for label in labels:
        p, g = pred == label, gt == label
        empty = not p.any() and not g.any()
        out[int(label)] = (dice(p, g), iou(p, g), empty)
    return out


@dataclasses.dataclass
class ImageScore:
    """Scores of one ground-truth image. ``status``: "ok", "missing" (no prediction, scored 0),
    "error" with ``scored`` True (bad prediction, scored 0) or False (bad ground truth, not scored)."""
    name: str
    gt_path: str
    pred_path: str | None
    dice: dict[int, float]
    iou: dict[int, float]
    empty_both: list[int]
    status: str = "ok"
    error: str | None = None
    scored: bool = True


@dataclasses.dataclass
class EvalReport:
    """Result of :func:`evaluate_folders`; ``mean_dice[c]`` / ``mean_iou[c]`` average over scored images,
    ``mean_dice_all`` / ``mean_iou_all`` average the per-class means."""
    classes: list[int]
    images: list[ImageScore]
    mean_dice: dict[int, float]
    mean_iou: dict[int, float]
    mean_dice_all: float
    mean_iou_all: float
    n_empty_both: int
    missing: list[str]
    errors: list[str]
    binary: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (``refseg.io.writers.write_json`` can write it)."""
        out = dataclasses.asdict(self)
        out["empty_rule"] = EMPTY_RULE
        return out

    def format_table(self) -> str:
        """Text table: one row per image (per image and class for label masks), mean rows, then lines
        stating the empty-mask rule with its count, the missing predictions and the errors."""
        width = max([len("image")] + [len(s.name) for s in self.images])
        lines = []
        if self.binary:
            lines.append(f"{'image':<{width}}  {'dice':>7}  {'iou':>7}  note")
        else:
            lines.append(f"{'image':<{width}}  {'class':>5}  {'dice':>7}  {'iou':>7}  note")
        lines.append("-" * len(lines[0]))
        for score in self.images:
            note = score.status if score.status != "ok" else ""  # details follow in the "Errors" lines
            for label in self.classes if score.scored else [None]:
                empty = label in score.empty_both
                row_note = "; ".join(n for n in (note, "both empty" if empty else "") if n)
                d = f"{score.dice[label]:7.4f}" if label is not None else f"{'-':>7}"
                j = f"{score.iou[label]:7.4f}" if label is not None else f"{'-':>7}"
                if self.binary:
                    lines.append(f"{score.name:<{width}}  {d}  {j}  {row_note}".rstrip())
                else:
                    cls = str(label) if label is not None else "-"
                    lines.append(f"{score.name:<{width}}  {cls:>5}  {d}  {j}  {row_note}".rstrip())
        lines.append("-" * len(lines[0]))
        n_scored = sum(s.scored for s in self.images)
        if self.binary:
            lines.append(f"{'mean':<{width}}  {self.mean_dice_all:7.4f}  {self.mean_iou_all:7.4f}  "
                         f"over {n_scored} image(s)")
        else:
            for label in self.classes:
                lines.append(f"{'mean':<{width}}  {label:>5}  {self.mean_dice[label]:7.4f}  "
                             f"{self.mean_iou[label]:7.4f}")
            lines.append(f"{'mean':<{width}}  {'all':>5}  {self.mean_dice_all:7.4f}  {self.mean_iou_all:7.4f}  "
                         f"mean of {len(self.classes)} class mean(s) over {n_scored} image(s)")
        unit = "case(s)" if self.binary else "image-class case(s)"
        lines.append(f"Empty masks: {EMPTY_RULE}; {self.n_empty_both} such {unit}.")
        if self.missing:
            lines.append(f"Missing predictions (scored 0): {len(self.missing)}: {', '.join(self.missing)}")
        if self.errors:
            lines.append(f"Errors: {len(self.errors)}")
            lines.extend(f"  {e}" for e in self.errors)
        return "\n".join(lines)


def _match_predictions(pred_dir: Path, gt_files: Sequence[Path]) -> dict[str, Path | None]:
    preds = {}
    if pred_dir.is_dir():
        for p in pred_dir.iterdir():
            if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith("."):
                preds.setdefault(p.stem, p)
    return {g.stem: preds.get(g.stem) for g in gt_files}


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, threshold: int = 128,
                     labels: Iterable[int] | None = None) -> EvalReport:
    """Score predicted mask PNGs against ground-truth masks, matched by file stem.

    pred_dir: ``<stem>.png`` masks (as written by the engine). gt_dir: masks with any image suffix, read with
    :func:`refseg.io.raster.read_mask` (``threshold`` applies to JPEG masks). ``labels``: classes to score;
    by default the masks are scored as binary (foreground = label > 0) when every mask holds only {0, 1},
    otherwise every non-zero label found in the ground truth or predictions is scored separately.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: prediction folder does not exist")
    gt_files = list_images(gt_dir)
    stems: dict[str, Path] = {}
    for g in gt_files:
        if g.stem in stems:
            raise ValueError(f"{gt_dir}: two ground-truth files share the stem {g.stem!r} "
                             f"({stems[g.stem].name}, {g.name}); predictions cannot be matched")
        stems[g.stem] = g
    matches = _match_predictions(pred_dir, gt_files)

    loaded: list[tuple[Path, Path | None, np.ndarray | None, np.ndarray | None, str | None, bool]] = []
    found_labels: set[int] = set()
    for g in gt_files:
        pred_path = matches[g.stem]
        try:
            gt = read_mask(g, threshold=threshold)
        except ImageReadError as exc:
            loaded.append((g, pred_path, None, None, f"ground truth: {exc}", False))
            continue
        found_labels.update(int(v) for v in np.unique(gt) if v != 0)
        if pred_path is None:
            loaded.append((g, None, gt, None, None, True))
            continue
        try:
            pred = read_mask(pred_path, threshold=threshold)
        except ImageReadError as exc:
            loaded.append((g, pred_path, gt, None, f"prediction: {exc}", True))
            continue
        if pred.shape != gt.shape:
            message = (f"size mismatch: prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} (W x H), "
                       f"ground truth {g} is {gt.shape[1]}x{gt.shape[0]}")
            loaded.append((g, pred_path, gt, None, message, True))
            continue
        found_labels.update(int(v) for v in np.unique(pred) if v != 0)
        loaded.append((g, pred_path, gt, pred, None, True))

    if labels is not None:
        classes = sorted({int(c) for c in labels})
        if not classes or classes[0] <= 0:
            raise ValueError(f"labels: expected positive class labels, got {classes}")
    else:
        classes = sorted(found_labels) or [1]
    binary = classes == [1]

    images: list[ImageScore] = []
    for g, pred_path, gt, pred, error, scored in loaded:
        name, pred_str = g.stem, (os.fspath(pred_path) if pred_path else None)
        if pred is not None:
            scores = per_class_scores(pred, gt, classes)
            images.append(ImageScore(name, os.fspath(g), pred_str, {c: s[0] for c, s in scores.items()},
                                     {c: s[1] for c, s in scores.items()},
                                     [c for c, s in scores.items() if s[2]]))
        elif scored:
            zeros = {c: 0.0 for c in classes}
            status = "missing" if pred_path is None else "error"
            images.append(ImageScore(name, os.fspath(g), pred_str, dict(zeros), dict(zeros), [],
                                     status=status, error=error))
        else:
            images.append(ImageScore(name, os.fspath(g), pred_str, {}, {}, [], status="error", error=error,
                                     scored=False))

    scored_images = [s for s in images if s.scored]
    mean_dice = {c: float(np.mean([s.dice[c] for s in scored_images])) if scored_images else 0.0
                 for c in classes}
    mean_iou = {c: float(np.mean([s.iou[c] for s in scored_images])) if scored_images else 0.0
                for c in classes}
    report = EvalReport(
        classes=classes, images=images, mean_dice=mean_dice, mean_iou=mean_iou,
        mean_dice_all=float(np.mean(list(mean_dice.values()))),
        mean_iou_all=float(np.mean(list(mean_iou.values()))),
        n_empty_both=sum(len(s.empty_both) for s in images),
        missing=[s.name for s in images if s.status == "missing"],
        errors=[f"{s.name}: {s.error}" for s in images if s.status == "error"],
        binary=binary)
    log.info("evaluated %d image(s): mean Dice %.4f, mean IoU %.4f", len(scored_images),
             report.mean_dice_all, report.mean_iou_all)
    return report
