"""Segmenting a CT / MRI volume slice by slice from labelled reference slices.

Geometry: both volumes are viewed in their closest RAS+ canonical orientation and sliced along ``axis``
(0 sagittal, 1 coronal, 2 axial; see :mod:`refseg.io.volume`); slice indices (``slices``,
``reference_slices``) count along that canonical axis (axial: from the feet up). The label map comes
back in the target's stored voxel order, same shape.

Which reference slice serves which target slice, for each requested label c (candidates: the reference
slices holding c, or those of ``reference_slices`` holding c):

* default (the ProtoSAM / SSL-ALPNet protocol): the candidates are split into ``chunks`` contiguous
  chunks (``numpy.array_split``) and each chunk is represented by its middle slice; a target slice at
  relative position p in the segmented range (0 <= p < 1) uses chunk ``floor(p * chunks)``. With
  ``reference_slices`` every given slice is its own chunk.
* ``pool_references``: every candidate slice is one shot of an n-shot reference.
* same-volume mode (``reference`` is ``None``: the labels mark a few slices of the target itself): each
  target slice uses the nearest labelled slice (ties: the lower one); the labelled slices are copied into
  the output unchanged and not segmented.

All labels are segmented together: one SAM encode per target slice, one prompt set per label. A reference
slice contributes every requested label it holds (a label covering no whole 14 px patch of that slice is
left out of it). Intensities of reference and target slices go through one :class:`Window`.

Empty slices: volume runs decode with ``fallback=False`` and a label whose prompt set has no positive
point after the cycle check gets no mask on that slice (rather than SAM's answer to negatives alone).
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from refseg.io.intensity import DEFAULT_PERCENTILES, Window, auto_window
from refseg.io.volume import Volume, read_volume, reorientation, slice_view, put_slice_view
from refseg.config import PATCH_SIZE
from refseg.pipeline.grid import FG, binary_to_grid, resize_binary_mask
from refseg.runtime.stream import StreamItem, segment_items

log = logging.getLogger(__name__)

DEFAULT_CHUNKS = 3
"""Reference chunks of the ProtoSAM protocol (SSL-ALPNet's evaluation uses 3)."""


@dataclass
class VolumePlan:
    """Validated inputs of one volume run (pure numpy; built before any model loads).

    ``groups`` maps a tuple of canonical reference slice indices to the canonical target slices that use
    them, in target order. ``copied`` are target slices taken from the labels (same-volume mode).
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


def _parse_range(slices, count: int, name: str) -> list[int]:
    if slices is None:
        return list(range(count))
    if isinstance(slices, str):
        start, sep, stop = slices.partition(":")
        if not sep:
            raise ValueError(f"{name}: --slices {slices!r} is not of the form A:B")
        try:
            slices = slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
        except ValueError:
            raise ValueError(f"{name}: --slices {slices!r}: A and B must be integers") from None
    if isinstance(slices, slice):
        chosen = list(range(count))[slices]
    else:
        chosen = sorted({int(s) for s in slices})
        bad = [s for s in chosen if not 0 <= s < count]
        if bad:
            raise ValueError(f"{name}: slice(s) {bad} outside 0..{count - 1}")
    if not chosen:
        raise ValueError(f"{name}: slice range {slices} selects no slice of {count}")
    return chosen


def _covering(mask: np.ndarray, classes: list[int], config) -> list[int]:
    """The classes of ``mask`` holding at least one foreground cell under ``config``'s grid rule."""
    if not classes:
        return []
    stack = np.stack([resize_binary_mask(mask == c, config.image_size) for c in classes])
    grids = binary_to_grid(torch.from_numpy(stack), rule=config.grid_rule, fraction=config.grid_fraction,
                           skip_last=config.gbmseg_skip_last)
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
            raise ValueError(f"{label_volume.path}: label(s) {small} cover no whole {PATCH_SIZE}-px patch on any "
                             f"reference slice at image_size {config.image_size}; use a larger --image-size or "
                             f"--set grid_rule=fraction")
        holds = {c: np.asarray(v) for c, v in usable.items()}
    if reference_slices is not None:
        given = np.asarray(_parse_range(list(reference_slices), ref_can.shape[axis], str(label_volume.path)))
        holds = {c: np.intersect1d(v, given) for c, v in holds.items()}
        missing = [c for c, v in holds.items() if v.size == 0]
        if missing:
            raise ValueError(f"{label_volume.path}: label(s) {missing} absent from reference slices "
                             f"{given.tolist()}")
    targets = _parse_range(slices, tgt_can.shape[axis], name)
    copied: list[int] = []
    if same_volume:
        labelled = set(np.unique(np.concatenate(list(holds.values()))).tolist())
        copied = [t for t in targets if t in labelled]
        targets = [t for t in targets if t not in labelled]
    groups: dict[tuple[int, ...], list[int]] = {}
    for pos, t in enumerate(targets):
        chosen = set()
        for c in labels:
            cand = holds[c]
            if pool_references:
                chosen.update(cand.tolist())
            elif same_volume:
                chosen.add(_nearest(cand, t))
            else:
                parts = [cand[i:i + 1] for i in range(cand.size)] if reference_slices is not None \
                    else np.array_split(cand, min(max(1, chunks), cand.size))
                part = parts[min(len(parts) - 1, pos * len(parts) // len(targets))]
                chosen.add(int(part[len(part) // 2]))
        groups.setdefault(tuple(sorted(chosen)), []).append(t)
    if window is None:
        window = auto_window(reference.data, DEFAULT_PERCENTILES, source="reference volume p0.5-p99.5")
        if window is None:
            raise ValueError(f"{reference.path}: the reference volume is constant (no contrast to window)")
    return VolumePlan(target=target, reference=reference, labels=labels, axis=axis, targets=targets,
                      groups=groups, copied=copied, window=window, name=name, target_canonical=tgt_can,
                      reference_canonical=ref_can, labels_canonical=lab_can)


def reference_shots(plan: VolumePlan, slices: tuple[int, ...], config) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(uint8 image, label mask, source) per reference slice, keeping only labels that survive the grid."""
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
        shots.append((image, mask, f"{plan.reference.path}[axis {plan.axis} slice {s}]"))
    return shots


def _drop_unprompted(result) -> None:
    """Empty-slice rule: clear every class whose prompt set holds no positive point."""
    for c, lab in result.point_labels.items():
        if not bool((np.asarray(lab) == 1).any()) and c in result.class_masks:
            result.mask[result.mask == c] = 0
            result.class_masks[c] = np.zeros_like(result.class_masks[c])


@functools.lru_cache(maxsize=1)
def _canonical_volume(path: str, series_uid: str | None, stamp: tuple) -> np.ndarray:
    volume = read_volume(path, series_uid=series_uid)
    return reorientation(volume.affine).apply(volume.data)


def read_canonical_slice(path: str, series_uid: str | None, axis: int, index: int, window: Window) -> np.ndarray:
    """(H, W) uint8 slice ``index`` along canonical ``axis`` of the volume file ``path``, through ``window``.

    The picklable slice loader of remote runs (a worker reads the file itself): the last volume read is
    kept per process (keyed by path, series, size and mtime), so a slice batch costs one read per worker.
    """
    stat = os.stat(path)
    return window.apply(slice_view(_canonical_volume(path, series_uid, (stat.st_size, stat.st_mtime_ns)), axis, index))


def _slice_loader(plan: VolumePlan, t: int, target_file: tuple[str, str | None] | None):
    if target_file is not None:
        return functools.partial(read_canonical_slice, str(target_file[0]), target_file[1], plan.axis, t, plan.window)
    return lambda: plan.window.apply(slice_view(plan.target_canonical, plan.axis, t))


def run_plan(segmenter, plan: VolumePlan, batch_size: int | None = None,
             on_slice: Callable[[int, int], None] | None = None,
             target_file: tuple[str, str | None] | None = None) -> VolumeSegmentation:
    """Segment the planned target slices with ``segmenter`` (its references are replaced per group).

    ``on_slice(done, total)`` is called after every target slice (progress). The segmenter's config is
    switched to ``fallback=False`` for the run and restored afterwards. Slices are windowed to uint8 here
    (``plan.window``), so the segmenter's own window plays no part.

    ``target_file`` = (path, DICOM series UID or ``None``) of the file ``plan.target`` was read from:
    slices are then loaded from it by :func:`read_canonical_slice` (picklable, for a
    :class:`refseg.ray_stream.RaySegmenter`), else from ``plan.target_canonical``.
    """
    axis = plan.axis
    out = np.zeros(plan.target_canonical.shape, np.uint8)
    for t in plan.copied:
        mask = slice_view(plan.labels_canonical, axis, t)
        put_slice_view(out, axis, t, np.where(np.isin(mask, plan.labels), mask, 0).astype(np.uint8))
    failed: dict[int, str] = {}
    segmented: list[int] = []
    done, total = 0, len(plan.targets)
    saved = segmenter.config
    start = time.perf_counter()
    try:
        segmenter.config = saved.replace(fallback=False)
        for slices, members in plan.groups.items():
            shots = reference_shots(plan, slices, segmenter.config)
            if not shots:
                for t in members:
                    failed[t] = f"reference slices {list(slices)}: no label covers a whole patch"
                continue
            segmenter.set_reference(*shots[0])
            for shot in shots[1:]:
                segmenter.add_reference(*shot)
            missing = sorted(set(plan.labels) - set(segmenter.classes))
            if missing:
                log.warning("%s: label(s) %s have no usable reference patch on slices %s; not segmented on "
                            "%d slice(s)", plan.name, missing, list(slices), len(members))
            items = (StreamItem(key=f"{plan.name}[axis={axis} slice={t}]", meta=t,
                                load=_slice_loader(plan, t, target_file)) for t in members)
            for result in segment_items(segmenter, items, batch_size=batch_size):
                t = result.item.meta
                if result.error is not None:
                    failed[t] = f"{type(result.error).__name__}: {result.error}"
                else:
                    _drop_unprompted(result.result)
                    put_slice_view(out, axis, t, result.result.mask)
                    segmented.append(t)
                done += 1
                if on_slice is not None:
                    on_slice(done, total)
    finally:
        segmenter.config = saved
    seconds = time.perf_counter() - start
    turn = reorientation(plan.target.affine)
    labels = np.ascontiguousarray(turn.undo(out))
    return VolumeSegmentation(labels=labels, segmented=sorted(segmented), copied=list(plan.copied),
                              failed=failed, seconds=seconds, reference_slices=list(plan.groups))


def segment_volume(segmenter, volume, reference_labels, reference=None, labels=None, axis: int = 2,
                   slices=None, reference_slices=None, pool_references: bool = False,
                   chunks: int = DEFAULT_CHUNKS, window: Window | None = None, batch_size: int | None = None,
                   on_slice=None) -> VolumeSegmentation:
    """:func:`plan_volume` then :func:`run_plan`; see :meth:`refseg.Segmenter.segment_volume`."""
    plan = plan_volume(volume, reference_labels, reference=reference, labels=labels, axis=axis, slices=slices,
                       reference_slices=reference_slices, pool_references=pool_references, chunks=chunks,
                       window=window, config=segmenter.config)
    return run_plan(segmenter, plan, batch_size=batch_size, on_slice=on_slice)
