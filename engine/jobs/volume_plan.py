"""Planning a CT / MRI volume run: which labelled reference slices serve which target slice (pure numpy,
before any model loads), and the reference shots and slice loaders of the run.

Geometry: both volumes are viewed in their closest RAS+ canonical orientation and sliced along ``axis``
(0 sagittal, 1 coronal, 2 axial; see :mod:`refseg.io.volume`); slice indices (``slices``,
``reference_slices``) count along that canonical axis (axial: from the feet up). The label map comes
back in the target's stored voxel order, same shape.

Which reference slice serves which target slice, for each requested label c (candidates: the reference
slices holding c, or those of ``reference_slices`` holding c):

* default (the SSL-ALPNet / ProtoSAM evaluation protocol, :func:`support_slice`): the n candidates are
  split into C = ``chunks`` chunks by relative position, chunk k holding the candidates at relative
  positions [k / C, (k + 1) / C), and each chunk is represented by its middle slice, candidate
  ``floor((2k + 1) n / (2C))``; a target slice at relative position p = (t - first) / (last - first) of the
  segmented range uses chunk ``min(C - 1, floor(C p))``. With ``reference_slices`` every given slice is its
  own chunk.
* ``pool_references``: every candidate slice is one shot of an n-shot reference.
* same-volume mode (``reference`` is ``None``: the labels mark a few slices of the target itself): each
  target slice uses the nearest labelled slice (ties: the lower one); the labelled slices are copied into
  the output unchanged and not segmented.

All labels are segmented together: one SAM encode per target slice, one prompt set per label. A reference
slice contributes every requested label it holds (a label covering no whole encoder patch of that slice is
left out of it). Intensities of reference and target slices go through one :class:`Window`.

Empty slices: a label whose prompt set has no positive point after the cycle check gets no mask on that
slice (rather than SAM's answer to negatives alone); ``refseg segment`` builds volume Segmenters with
``fallback=False``, so no positive point is forced either.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from refseg.io.intensity import DEFAULT_PERCENTILES, Window, auto_window
from refseg.io.masks import as_label_map
from refseg.io.volume import Volume, read_volume, reorientation, slice_view
from refseg.io.volume import slice_range
from refseg.pipeline.grid import FG, binary_to_grid, resize_binary_mask

log = logging.getLogger(__name__)

DEFAULT_CHUNKS = 3
"""Reference chunks of the ProtoSAM protocol (SSL-ALPNet's evaluation uses 3)."""
AXIS_NAMES = ("axis 0 (sagittal)", "axis 1 (coronal)", "axis 2 (axial)")


@dataclass
class VolumePlan:
    """Validated inputs of one volume run (pure numpy; built before any model loads).

    ``groups`` maps a tuple of canonical reference slice indices to the canonical target slices that use
    them, in target order. ``copied`` are target slices taken from the labels (``same_volume`` mode: the
    labels mark slices of the target itself).
    """

    target: Volume
    reference: Volume
    labels: list[int]
    axis: int
    targets: list[int]
    groups: dict[tuple[int, ...], list[int]]
    copied: list[int]
    window: Window
    name: str
    target_canonical: np.ndarray = field(repr=False, default=None)
    reference_canonical: np.ndarray = field(repr=False, default=None)
    labels_canonical: np.ndarray = field(repr=False, default=None)
    same_volume: bool = False


@dataclass
class VolumeSegmentation:
    """Result of :func:`segment_volume`.

    Attributes:
        labels: (I, J, K) uint8 label map in the target's stored voxel order (label values kept).
        segmented: canonical slice indices segmented; ``copied``: taken from the same-volume labels.
        failed: canonical slice index -> error message (those slices stay 0).
        seconds: wall time of the slice loop.
        reference_slices: canonical reference slice indices used, per group, in group order.
    """

    labels: np.ndarray
    segmented: list[int]
    copied: list[int]
    failed: dict[int, str]
    seconds: float
    reference_slices: list[tuple[int, ...]]

    @property
    def slices_per_second(self) -> float:
        return len(self.segmented) / self.seconds if self.seconds > 0 and self.segmented else 0.0


def _as_volume(value, name: str) -> Volume:
    if isinstance(value, Volume):
        return value
    array = np.asarray(value)
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D array, got shape {array.shape}")
    return Volume(data=array, affine=np.eye(4), path=Path(name))


def _slices(slices, count: int, name: str, axis: int) -> list[int]:
    """``slices`` as ``"A:B"``, a ``slice`` or indices -> sorted indices, each within 0..count-1."""
    if slices is None or isinstance(slices, str):
        return slice_range(slices, count, name, AXIS_NAMES[axis])
    if isinstance(slices, slice):
        chosen = list(range(count))[slices]
    else:
        chosen = sorted({int(s) for s in slices})
        bad = [s for s in chosen if not 0 <= s < count]
        if bad:
            raise ValueError(f"{name}: slice(s) {bad} outside 0..{count - 1} ({count} slices along "
                             f"{AXIS_NAMES[axis]})")
    if not chosen:
        raise ValueError(f"{name}: the slices asked for select none of the {count} along {AXIS_NAMES[axis]}")
    return chosen


def support_slice(position: float, labelled: Sequence[int], chunks: int) -> int:
    """The reference slice of a target slice under the SSL-ALPNet / ProtoSAM protocol.

    Args:
        position: the target's relative position in its range, 0 (first) .. 1 (last).
        labelled: the reference slices holding the label, ascending (n of them).
        chunks: C; the labelled slices form C chunks by relative position.

    Returns:
        The middle slice of chunk k = min(C - 1, floor(C * position)): ``labelled[floor((2k + 1) n / (2C))]``
        (exact integer arithmetic; also when n < C).
    """
    if not labelled:
        raise ValueError("support_slice: no labelled slice")
    if chunks < 1:
        raise ValueError(f"support_slice: chunks must be >= 1, got {chunks}")
    k = min(chunks - 1, max(0, int(chunks * position)))
    n = len(labelled)
    return int(labelled[min(n - 1, (2 * k + 1) * n // (2 * chunks))])


def _covering(mask: np.ndarray, classes: list[int], config) -> list[int]:
    """The classes of ``mask`` holding at least one foreground cell under ``config``'s grid rule."""
    if not classes:
        return []
    stack = np.stack([resize_binary_mask(mask == c, config.image_size) for c in classes])
    grids = binary_to_grid(torch.from_numpy(stack), patch_size=config.patch_size, rule=config.grid_rule,
                           fraction=config.grid_fraction, skip_last=config.gbmseg_skip_last)
    return [c for c, grid in zip(classes, grids) if bool((grid == FG).any())]


def _nearest(candidates: np.ndarray, t: int) -> int:
    return int(candidates[np.argmin(np.abs(candidates - t))])  # argmin: the first (lower) on ties


def plan_volume(target: Volume | np.ndarray, reference_labels: Volume | np.ndarray,
                reference: Volume | np.ndarray | None = None, labels: Sequence[int] | None = None,
                axis: int = 2, slices=None, reference_slices: Sequence[int] | None = None,
                pool_references: bool = False, chunks: int = DEFAULT_CHUNKS,
                window: Window | None = None, config=None) -> VolumePlan:
    """Check the inputs and decide which reference slices serve which target slice (see module doc).

    ``config`` (:class:`refseg.SegmenterConfig`): when given, a slice is a candidate for label c only if c
    covers at least one whole patch there under the config's grid rule and image size (else the shot
    would carry no foreground patch of c).

    Raises:
        ValueError: naming the file: a shape mismatch between reference image and labels, an axis not in
            0..2, a label absent from the reference, an empty slice range, no labelled slice.
    """
    target = _as_volume(target, "target")
    same_volume = reference is None
    reference = target if same_volume else _as_volume(reference, "reference")
    label_volume = _as_volume(reference_labels, "reference labels")
    name = str(target.path)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (canonical sagittal, coronal, axial), got {axis}")
    if label_volume.shape != reference.shape:
        raise ValueError(f"{label_volume.path}: label map shape {label_volume.shape} differs from the "
                         f"reference image {reference.path} {reference.shape}")
    if not np.allclose(label_volume.affine, reference.affine, atol=1e-3) and \
            not np.allclose(label_volume.affine, np.eye(4)):
        log.warning("%s: affine differs from the reference image's %s; voxels are paired by index",
                    label_volume.path, reference.path)
    ref_turn = reorientation(reference.affine)
    tgt_turn = ref_turn if same_volume else reorientation(target.affine)
    ref_can = ref_turn.apply(reference.data)
    lab_can = ref_turn.apply(np.asarray(label_volume.data)).astype(np.int64)
    tgt_can = ref_can if same_volume else tgt_turn.apply(target.data)
    present = set(np.unique(lab_can).tolist()) - {0}
    if labels is None:
        labels = sorted(present)
        if not labels:
            raise ValueError(f"{label_volume.path}: label map has no foreground voxel")
    labels = [int(c) for c in labels]
    absent = [c for c in labels if c not in present]
    if absent:
        raise ValueError(f"{label_volume.path}: label(s) {absent} absent from the reference label map "
                         f"(present: {sorted(present)[:40]})")
    if any(not 0 < c <= 255 for c in labels):
        raise ValueError(f"labels must lie in 1..255 (uint8 output), got {labels}")
    other_axes = tuple(a for a in range(3) if a != axis)
    holds = {c: np.nonzero((lab_can == c).any(axis=other_axes))[0] for c in labels}  # slices holding c
    if config is not None:
        usable: dict[int, list[int]] = {c: [] for c in labels}
        for s in sorted(set(np.concatenate(list(holds.values())).tolist())):
            mask = slice_view(lab_can, axis, s)
            for c in _covering(mask, [c for c in labels if (mask == c).any()], config):
                usable[c].append(s)
        small = [c for c in labels if not usable[c]]
        if small:
            raise ValueError(f"{label_volume.path}: label(s) {small} cover no whole {config.patch_size}-px patch on any "
                             f"reference slice at image_size {config.image_size}; use a larger --image-size or "
                             f"--set grid_rule=fraction")
        holds = {c: np.asarray(v) for c, v in usable.items()}
    if reference_slices is not None:
        given = np.asarray(_slices(list(reference_slices), ref_can.shape[axis], str(label_volume.path), axis))
        holds = {c: np.intersect1d(v, given) for c, v in holds.items()}
        missing = [c for c, v in holds.items() if v.size == 0]
        if missing:
            raise ValueError(f"{label_volume.path}: label(s) {missing} absent from reference slices "
                             f"{given.tolist()}")
    targets = _slices(slices, tgt_can.shape[axis], name, axis)
    copied: list[int] = []
    if same_volume:
        labelled = set(np.unique(np.concatenate(list(holds.values()))).tolist())
        copied = [t for t in targets if t in labelled]
        targets = [t for t in targets if t not in labelled]
    groups: dict[tuple[int, ...], list[int]] = {}
    span = max(1, targets[-1] - targets[0]) if targets else 1
    for t in targets:
        chosen = set()
        for c in labels:
            cand = holds[c].tolist()
            if pool_references:
                chosen.update(cand)
            elif same_volume:
                chosen.add(_nearest(np.asarray(cand), t))
            else:
                chosen.add(support_slice((t - targets[0]) / span, cand,
                                         len(cand) if reference_slices is not None else chunks))
        groups.setdefault(tuple(sorted(chosen)), []).append(t)
    if window is None:
        window = auto_window(reference.data, DEFAULT_PERCENTILES, source="reference volume p0.5-p99.5")
        if window is None:
            raise ValueError(f"{reference.path}: the reference volume is constant (no contrast to window)")
    return VolumePlan(target=target, reference=reference, labels=labels, axis=axis, targets=targets,
                      groups=groups, copied=copied, window=window, name=name, target_canonical=tgt_can,
                      reference_canonical=ref_can, labels_canonical=lab_can, same_volume=same_volume)


def reference_shots(plan: VolumePlan, slices: tuple[int, ...], config) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(uint8 image, label map, source) per reference slice, keeping only labels that survive the grid; the
    masks are :func:`refseg.io.masks.as_label_map` views, so the Segmenter keeps their values."""
    shots = []
    for s in slices:
        mask = slice_view(plan.labels_canonical, plan.axis, s)
        mask = np.where(np.isin(mask, plan.labels), mask, 0)
        present = sorted(set(np.unique(mask).tolist()) - {0})
        dropped = sorted(set(present) - set(_covering(mask, present, config)))
        if dropped:
            log.debug("%s slice %d: label(s) %s cover no whole patch; left out of this shot",
                      plan.reference.path, s, dropped)
            mask = np.where(np.isin(mask, dropped), 0, mask)
        if not mask.any() or mask.all():
            continue
        image = plan.window.apply(slice_view(plan.reference_canonical, plan.axis, s))
        # label values as they are: a slice holding label 5 alone stays 5 (not the 2-D rule's class 1)
        shots.append((image, as_label_map(mask), f"{plan.reference.path}[axis {plan.axis} slice {s}]"))
    return shots


def drop_unprompted(result) -> None:
    """Empty-slice rule: clear every class whose prompt set holds no positive point."""
    for c, lab in result.point_labels.items():
        if not bool((np.asarray(lab) == 1).any()) and c in result.class_masks:
            result.mask[result.mask == c] = 0
            result.class_masks[c] = np.zeros_like(result.class_masks[c])


@functools.lru_cache(maxsize=1)
def _canonical_volume(path: str, series_uid: str | None, stamp: tuple) -> np.ndarray:
    volume = read_volume(path, series_uid=series_uid)
    return reorientation(volume.affine).apply(volume.data)


def canonical_volume(path: str, series_uid: str | None = None) -> np.ndarray:
    """The canonical (closest RAS+) array of the volume file ``path``, as Ray actors read their inputs: the
    last volume read is kept per process (keyed by path, series, size and mtime), so the slice batches of
    one volume cost one read per actor."""
    stat = os.stat(path)
    return _canonical_volume(path, series_uid, (stat.st_size, stat.st_mtime_ns))


def read_canonical_slice(path: str, series_uid: str | None, axis: int, index: int, window: Window) -> np.ndarray:
    """(H, W) uint8 slice ``index`` along canonical ``axis`` of the volume file ``path``, through ``window``
    (the picklable slice loader of Ray runs; the volume is read once per actor: :func:`canonical_volume`)."""
    return window.apply(slice_view(canonical_volume(path, series_uid), axis, index))
