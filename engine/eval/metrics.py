"""Segmentation metrics: Dice and IoU per image (per class for label masks) and folder evaluation.

Convention (algorithm.md section 6): when prediction and ground truth are both empty, Dice = IoU = 1.0;
such cases are counted in the mean and their number is reported. A ground-truth image without a usable
prediction (missing file, unreadable file, size mismatch) scores 0 for every class and is reported.
Ground-truth files that cannot be read are reported and left out of the mean (there is nothing to score).

Binary or labels: when every mask holds 0 and at most one other value (0/1, 0/63, 0/255 ...), the masks
are binary whatever that value is (foreground = non-zero); otherwise every
non-zero value is a class, and a label set that differs between predictions and ground truth is a warning
naming the values.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from refseg.io.raster import IMAGE_SUFFIXES, ImageReadError, list_images, read_label_map

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
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def n_paired(self) -> int:
        """Images scored against a prediction that could be read (not missing, not an error)."""
        return sum(s.status == "ok" for s in self.images)

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
        lines.extend(f"Warning: {w}" for w in self.warnings)
        return "\n".join(lines)


PAIR_BY = ("stem", "order")
"""How predictions are paired with ground-truth files: by file stem, or by sorted file-name order."""


def _prediction_files(pred_dir: Path) -> list[Path]:
    """Mask files of a prediction folder, sorted by name: image suffixes, not hidden, not the engine's
    ``<stem>_overlay.png`` drawings."""
    return sorted((p for p in pred_dir.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.stem.endswith("_overlay")), key=lambda p: p.name)


def pair_files(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, pair_by: str = "stem"
               ) -> list[tuple[Path, Path | None]]:
    """(ground-truth file, prediction file or None) for every ground-truth image of ``gt_dir``.

    ``pair_by="stem"``: the prediction ``<stem>.png`` of each ground truth ``<stem>.*``.
    ``pair_by="order"``: the i-th prediction file (sorted by name, any image suffix, overlays left out)
    with the i-th ground-truth file; the two folders must hold the same number of files.

    Raises:
        FileNotFoundError: a folder does not exist. ValueError: two ground-truth files share a stem,
            the counts differ (order), an unknown ``pair_by``, or ``gt_dir`` holds no image.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if pair_by not in PAIR_BY:
        raise ValueError(f"pair_by: expected one of {', '.join(PAIR_BY)}, got {pair_by!r}")
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: prediction folder does not exist")
    gt_files = list_images(gt_dir)
    if pair_by == "order":
        preds = _prediction_files(pred_dir)
        if len(preds) != len(gt_files):
            raise ValueError(f"--pair-by order: {pred_dir} holds {len(preds)} mask file(s) but {gt_dir} holds "
                             f"{len(gt_files)}; sorted-order pairing needs the same number")
        return list(zip(gt_files, preds))
    stems: dict[str, Path] = {}
    for g in gt_files:
        if g.stem in stems:
            raise ValueError(f"{gt_dir}: two ground-truth files share the stem {g.stem!r} "
                             f"({stems[g.stem].name}, {g.name}); predictions cannot be matched")
        stems[g.stem] = g
    preds = {}
    for p in pred_dir.iterdir():
        if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith("."):
            preds.setdefault(p.stem, p)
    return [(g, preds.get(g.stem)) for g in gt_files]


@dataclasses.dataclass
class LoadedPair:
    """One ground truth with its prediction, read: ``gt``/``pred`` label arrays (None when unusable);
    ``error`` says why; ``scored`` is False when the ground truth itself is unusable."""
    name: str
    gt_path: Path
    pred_path: Path | None
    gt: np.ndarray | None
    pred: np.ndarray | None
    error: str | None = None
    scored: bool = True


def load_pairs(pairs: Sequence[tuple[Path, Path | None]], threshold: float | None = None
               ) -> list[LoadedPair]:
    """Read every pair with :func:`refseg.io.raster.read_label_map`. ``threshold``: when given, every
    ground truth (any format) is binarised at ``value >= threshold``; else JPEG ground truth at 128 and
    other formats keep their stored values. Unreadable files and size mismatches become errors."""
    loaded = []
    for g, pred_path in pairs:
        name = g.stem
        try:
            gt = read_label_map(g, binarise_at=threshold)
        except ImageReadError as exc:
            loaded.append(LoadedPair(name, g, pred_path, None, None, f"ground truth: {exc}", scored=False))
            continue
        if pred_path is None:
            loaded.append(LoadedPair(name, g, None, gt, None))
            continue
        try:
            pred = read_label_map(pred_path)
        except ImageReadError as exc:
            loaded.append(LoadedPair(name, g, pred_path, gt, None, f"prediction: {exc}"))
            continue
        if pred.shape != gt.shape:
            message = (f"size mismatch: prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} (W x H), "
                       f"ground truth {g} is {gt.shape[1]}x{gt.shape[0]}")
            loaded.append(LoadedPair(name, g, pred_path, gt, None, message))
            continue
        loaded.append(LoadedPair(name, g, pred_path, gt, pred))
    return loaded


def _nonzero_values(arrays: Iterable[np.ndarray]) -> tuple[set[int], bool]:
    """(non-zero values over all arrays, True when every array holds at most one non-zero value)."""
    found: set[int] = set()
    each_two_valued = True
    for array in arrays:
        values = {int(v) for v in np.unique(array) if v != 0}
        each_two_valued &= len(values) <= 1
        found |= values
    return found, each_two_valued


def score_pairs(loaded: Sequence[LoadedPair], labels: Iterable[int] | None = None,
                force_binary: bool = False) -> EvalReport:
    """Score read pairs (any equal shapes: 2-D images or 3-D volumes) into an :class:`EvalReport`.

    ``labels``: classes to score. By default the masks are binary (foreground = non-zero) when each
    mask holds at most one non-zero value, whichever it is (0/63 against 0/255 is binary); otherwise every non-zero value found is a class, and label
    sets that differ between predictions and ground truth are reported as a warning. ``force_binary``:
    binary whatever the values (used when the ground truth was thresholded).
    """
    gt_values, gt_two = _nonzero_values(p.gt for p in loaded if p.gt is not None)
    pred_values, pred_two = _nonzero_values(p.pred for p in loaded if p.pred is not None)
    warnings: list[str] = []
    if labels is not None:
        classes = sorted({int(c) for c in labels})
        if not classes or classes[0] <= 0:
            raise ValueError(f"labels: expected positive class labels, got {classes}")
        binary = False
    else:
        binary = force_binary or (gt_two and pred_two)
        classes = [1] if binary else (sorted(gt_values | pred_values) or [1])
        if not binary and pred_values and gt_values and pred_values != gt_values:
            warnings.append(f"label sets differ: predictions hold {sorted(pred_values)}, ground truth holds "
                            f"{sorted(gt_values)} (only in predictions: {sorted(pred_values - gt_values)}; "
                            f"only in ground truth: {sorted(gt_values - pred_values)})")
    for warning in warnings:
        log.warning("%s", warning)

    images: list[ImageScore] = []
    for p in loaded:
        pred_str = os.fspath(p.pred_path) if p.pred_path else None
        if p.pred is not None:
            pred, gt = ((p.pred != 0).astype(np.int64), (p.gt != 0).astype(np.int64)) if binary else (p.pred, p.gt)
            scores = per_class_scores(pred, gt, classes)  # binary: classes == [1]
            images.append(ImageScore(p.name, os.fspath(p.gt_path), pred_str, {c: s[0] for c, s in scores.items()},
                                     {c: s[1] for c, s in scores.items()},
                                     [c for c, s in scores.items() if s[2]]))
        elif p.scored:
            zeros = {c: 0.0 for c in classes}
            status = "missing" if p.pred_path is None else "error"
            images.append(ImageScore(p.name, os.fspath(p.gt_path), pred_str, dict(zeros), dict(zeros), [],
                                     status=status, error=p.error))
        else:
            images.append(ImageScore(p.name, os.fspath(p.gt_path), pred_str, {}, {}, [], status="error",
                                     error=p.error, scored=False))

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
        binary=binary, warnings=warnings)
    log.info("evaluated %d image(s): mean Dice %.4f, mean IoU %.4f", len(scored_images),
             report.mean_dice_all, report.mean_iou_all)
    return report


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, threshold: float | None = None,
                     labels: Iterable[int] | None = None, pair_by: str = "stem") -> EvalReport:
    """Score predicted masks against ground-truth masks of a folder.

    pred_dir: ``<stem>.png`` masks (as written by the engine). gt_dir: masks with any image suffix.
    ``pair_by``: ``"stem"`` (same file stem) or ``"order"`` (sorted file names), see :func:`pair_files`.
    ``threshold``: binarise every ground truth, any format, at ``value >= threshold`` and score binary;
    ``None``: JPEG ground truth at 128, binary vs labels decided from the values (module docstring).
    ``labels``: classes to score (see :func:`score_pairs`).
    """
    loaded = load_pairs(pair_files(pred_dir, gt_dir, pair_by), threshold)
    return score_pairs(loaded, labels, force_binary=threshold is not None and labels is None)
