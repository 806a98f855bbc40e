"""One volume with SAM 2 memory (``refseg segment ... --propagate``): one-shot prompts on a few anchor slices
per label, then SAM 2 propagation both ways through the label's extent.

For one volume (:func:`propagate_volume`), all labels together:

1. **Probe.** The matching pipeline (DINOv2 -> cycle-checked matches -> point prompts, exactly as the
   per-slice mode makes them, no SAM decode) runs on every s-th slice of the range, s = ceil(n /
   ``max_probes``) (every slice up to 64). A label's confidence on a probed slice is its number of
   cycle-consistent positive matches: reference foreground patches whose nearest target patch matches back
   into the foreground. It needs no decoder and grows with how much of the reference's foreground finds a
   consistent home on that slice, so the most confident slices show the structure large and clear.
2. **Extent.** The probed slices where the label has a positive prompt (where per-slice mode would place a
   mask), from the first to the last, widened on each side by max(s, 10 % of its length) slices (SAM 2's
   object score decides where the structure really ends) and kept inside the range.
3. **Anchors.** The extent is split into ``anchors`` equal parts; in each, the probed slice with the most
   positive matches (ties: the lower slice) is an anchor, prompted with its matching prompts (points, and the
   box where the preset makes one). Same-volume mode: the labelled slices, prompted with their masks.
4. **Propagation.** One SAM 2 state per volume (every slice encoded once per pass for all labels), one memory
   bank per label (``obj_id`` = label value): a forward pass from the earliest first anchor to the furthest
   extent end, a backward pass from the latest first anchor to the nearest extent start. Per label, slices
   from its first anchor on take the forward result, slices before it the backward one.
5. **Per slice and label.** Object score "absent" (logits -1024) -> no voxel, never a forced mask. A mask of
   more than ``max_area_ratio`` x the label's largest reference area (converted to target pixels by the
   in-plane voxel sizes) is dropped and reported; after :data:`OVERSIZE_RUN` oversize slices in a row the
   label stops in that direction (its memory already holds them). Overlapping labels: the larger logit
   wins, as in per-slice mode.

The job side (planning, references, writing, summary, Ray by volume) is :mod:`refseg.jobs.volume`; the
models (a matching Segmenter and :class:`refseg.VideoPredictor`) are held by
:class:`refseg.jobs.propagate_worker.VolumePropagator`.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from refseg.io.intensity import Window
from refseg.models.sam2_memory import NO_OBJ_SCORE
from refseg.pipeline.match_method import ClassPrompts

log = logging.getLogger(__name__)

DEFAULT_ANCHORS = 3
"""Anchor slices per label (cross-volume mode)."""
DEFAULT_MAX_AREA_RATIO = 2.0
"""A propagated mask larger than this multiple of the label's largest reference area is dropped."""
MAX_PROBES = 64
"""Slices probed by the matching per volume at most (every slice of a range up to this length)."""
OVERSIZE_RUN = 3
"""Oversize slices in a row after which a label stops in that pass's direction."""
EXTENT_MARGIN = 0.1
"""The extent found by the probes is widened by this share of its length (at least the probe step)."""


class PromptSource(Protocol):
    """What the propagation needs from the matching pipeline: a :class:`refseg.Segmenter` (built
    ``with_sam=False``) with its references set."""

    config: object

    @property
    def classes(self) -> list[int]: ...

    def match_prompts(self, images: Sequence[np.ndarray]) -> list[dict[int, ClassPrompts]]:
        """Per (H, W) uint8 image, class value -> :class:`ClassPrompts`."""


@dataclass(frozen=True)
class PropagationSettings:
    """``--anchors``, ``--max-area-ratio``, ``--sam-image-size`` (None: the model's input side) and
    :data:`MAX_PROBES`."""

    anchors: int = DEFAULT_ANCHORS
    max_area_ratio: float = DEFAULT_MAX_AREA_RATIO
    sam_image_size: int | None = None
    max_probes: int = MAX_PROBES

    def __post_init__(self):
        if self.anchors < 1:
            raise ValueError(f"--anchors must be >= 1, got {self.anchors}")
        if not self.max_area_ratio > 0:
            raise ValueError(f"--max-area-ratio must be > 0, got {self.max_area_ratio}")
        if self.sam_image_size is not None and (self.sam_image_size <= 0 or self.sam_image_size % 32):
            raise ValueError(f"--sam-image-size must be a positive multiple of 32, got {self.sam_image_size}")


@dataclass
class PropagationTask:
    """One volume to propagate, built by the job before any model (picklable: Ray actors run it).

    Attributes:
        name: the volume (messages). axis: canonical slicing axis. targets: canonical slices to decide.
        labels: label values. window: intensity window of reference and target slices.
        max_area: label -> its largest reference area, in target pixels.
        volume: the canonical target array (in-process runs) ...
        source: ... or (path, DICOM series UID) read where the task runs.
        anchor_masks: same-volume mode: label -> {labelled slice: (H, W) bool mask}.
    """

    name: str
    axis: int
    targets: list[int]
    labels: list[int]
    window: Window
    max_area: dict[int, float]
    settings: PropagationSettings = PropagationSettings()
    volume: np.ndarray | None = field(default=None, repr=False)
    source: tuple[str, str | None] | None = None
    anchor_masks: dict[int, dict[int, np.ndarray]] = field(default_factory=dict, repr=False)


@dataclass
class LabelTrack:
    """What happened to one label in one volume (its part of the summary record)."""

    anchors: list[int] = field(default_factory=list)
    matches: list[int] = field(default_factory=list)  # positive matches of each anchor (masks: -1)
    extent: tuple[int, int] | None = None
    slices_with_voxels: int = 0
    absent: int = 0              # slices where the object score said "absent"
    oversize_dropped: list[int] = field(default_factory=list)
    stopped: dict[str, int] = field(default_factory=dict)  # "forward" / "backward" -> slice it stopped at

    def record(self) -> dict:
        return {"anchors": self.anchors, "anchor_matches": self.matches,
                "extent": None if self.extent is None else list(self.extent),
                "slices_with_voxels": self.slices_with_voxels, "absent_slices": self.absent,
                "oversize_dropped": self.oversize_dropped, "stopped": self.stopped}


@dataclass
class VolumePropagation:
    """Result of :func:`propagate_volume`: ``slices`` canonical slice -> (H, W) uint8 label image (slices
    with at least one voxel only), ``tracks`` per label, the ``probed`` slices, wall ``seconds`` and
    ``timings`` (stage -> seconds, as stream results carry them)."""

    slices: dict[int, np.ndarray]
    tracks: dict[int, LabelTrack]
    probed: list[int]
    tracked: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def _pixel_area(volume, axis: int) -> float:
    """mm² of one pixel of a canonical slice along ``axis`` (the in-plane voxel sizes of the RAS+ array)."""
    from refseg.io.volume import canonical_affine

    sizes = np.linalg.norm(canonical_affine(volume.affine, volume.shape)[:3, :3], axis=0)
    return float(np.prod([sizes[a] for a in range(3) if a != axis]))


def largest_areas(plan) -> dict[int, float]:
    """label -> its largest area on one reference slice, in pixels of the target's slices (converted by the
    in-plane voxel sizes of reference and target); ``plan``: a :class:`refseg.jobs.volume_plan.VolumePlan`."""
    other = tuple(a for a in range(3) if a != plan.axis)
    scale = _pixel_area(plan.reference, plan.axis) / _pixel_area(plan.target, plan.axis)
    return {c: float((plan.labels_canonical == c).sum(axis=other).max()) * scale for c in plan.labels}


def propagation_task(plan, settings: PropagationSettings, source: tuple[str, str | None] | None = None
                     ) -> PropagationTask:
    """The :class:`PropagationTask` of a planned volume (:func:`refseg.jobs.volume_plan.plan_volume`).

    ``source`` (path, series UID): the worker reads the target itself (Ray); None: the plan's array is
    carried. Same-volume mode (``plan.same_volume``): every labelled slice holding a label is
    one of its anchors, prompted with its mask.
    """
    from refseg.io.volume import slice_view

    masks: dict[int, dict[int, np.ndarray]] = {}
    if plan.same_volume:
        other = tuple(a for a in range(3) if a != plan.axis)
        for c in plan.labels:
            holding = np.nonzero((plan.labels_canonical == c).any(axis=other))[0]
            masks[c] = {int(s): slice_view(plan.labels_canonical, plan.axis, int(s)) == c for s in holding}
    return PropagationTask(plan.name, plan.axis, list(plan.targets), list(plan.labels), plan.window,
                           largest_areas(plan), settings, None if source else plan.target_canonical, source, masks)


def matching_reference_slices(plan) -> list[int]:
    """The reference slices the probes match against, all at once (n-shot): the union of the plan's
    reference sets (the protocol's chunk slices of every label, every labelled slice with
    ``--pool-references``, the ``--reference-slices``; same-volume mode: the labelled slices)."""
    return sorted({s for slices in plan.groups for s in slices} | set(plan.copied))


def slice_stack(canonical: np.ndarray, axis: int) -> np.ndarray:
    """(K, H, W) view of every :func:`refseg.io.volume.slice_view` of ``canonical`` along ``axis`` (no copy):
    ``slice_stack(c, a)[t]`` equals ``slice_view(c, a, t)``."""
    return np.moveaxis(canonical, axis, 0)[:, ::-1, ::-1].transpose(0, 2, 1)


class WindowedSlices:
    """The slices of a :func:`slice_stack` as (H, W) uint8 through ``window``, made when indexed: the
    frames SAM 2 sees are the very pixels the matching (and per-slice mode) sees, whatever the dtype."""

    def __init__(self, stack: np.ndarray, window: Window):
        self.stack, self.window = stack, window

    def __len__(self) -> int:
        return len(self.stack)

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self.stack) <= index < len(self.stack):
            raise IndexError(index)
        return self.window.apply(self.stack[index])


def probe_slices(targets: Sequence[int], max_probes: int = MAX_PROBES) -> tuple[list[int], int]:
    """(every s-th target slice, s): s = ceil(len(targets) / max_probes), the last slice always included."""
    targets = sorted(targets)
    if not targets:
        return [], 1
    step = max(1, math.ceil(len(targets) / max_probes))
    chosen = targets[::step]
    if chosen[-1] != targets[-1]:
        chosen.append(targets[-1])
    return chosen, step


def choose_anchors(matches: dict[int, int], count: int, lo: int, hi: int) -> list[int]:
    """Anchor slices of one label: [lo, hi] split into ``count`` equal parts, in each the slice of
    ``matches`` (slice -> positive matches, only slices with a positive prompt) with the most matches, ties
    to the lower slice; parts without such a slice give none. Ascending, distinct."""
    chosen = []
    span = hi - lo + 1
    for part in range(count):
        start = lo + (part * span) // count
        end = lo + ((part + 1) * span) // count  # exclusive
        inside = [t for t in matches if start <= t < end]
        if inside:
            chosen.append(max(inside, key=lambda t: (matches[t], -t)))
    return sorted(set(chosen))


def _widen(lo: int, hi: int, step: int, bounds: tuple[int, int]) -> tuple[int, int]:
    margin = max(step, math.ceil(EXTENT_MARGIN * (hi - lo + 1)))
    return max(bounds[0], lo - margin), min(bounds[1], hi + margin)


class SliceComposer:
    """Collects every label's decision on every slice of its extent; a slice is composed (the larger logit
    wins where labels overlap) once all its labels have decided. Masks are kept sparse until then.

    Args:
        extents: label -> (lo, hi) canonical slices; targets: the slices to compose.
    """

    def __init__(self, targets: Sequence[int], extents: dict[int, tuple[int, int]], shape: tuple[int, int]):
        self.shape = shape
        self.pending = {t: {c for c, (lo, hi) in extents.items() if lo <= t <= hi} for t in targets}
        self.kept: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        self.slices: dict[int, np.ndarray] = {}

    def decide(self, t: int, label: int, mask: torch.Tensor | None = None, logits: torch.Tensor | None = None):
        """Label ``label`` on slice ``t``: ``mask`` (H, W) bool with its ``logits``, or None for no voxel."""
        waiting = self.pending.get(t)
        if waiting is None or label not in waiting:
            return
        waiting.discard(label)
        if mask is not None:
            index = mask.flatten().nonzero().flatten()
            self.kept.setdefault(t, []).append((label, index.cpu().numpy(),
                                                logits.flatten()[index].float().cpu().numpy()))
        if not waiting:
            self._compose(t)

    def flush(self) -> None:
        """Decide 'no voxel' for every label still pending (a pass that stopped early)."""
        for t, waiting in list(self.pending.items()):
            for label in list(waiting):
                self.decide(t, label)

    def _compose(self, t: int) -> None:
        del self.pending[t]
        kept = self.kept.pop(t, [])
        if not kept:
            return
        out = np.zeros(self.shape[0] * self.shape[1], np.uint8)
        best = np.full(out.shape, -np.inf, np.float32)
        for label, index, values in kept:
            wins = values > best[index]
            out[index[wins]] = label
            best[index[wins]] = values[wins]
        self.slices[t] = out.reshape(self.shape)


def _find_anchors(task: PropagationTask, prompts: dict[int, dict[int, ClassPrompts]], step: int,
                  tracks: dict[int, LabelTrack]) -> dict[int, list[tuple[int, ClassPrompts | np.ndarray]]]:
    """label -> [(slice, prompts or mask)] and each track's extent and anchors."""
    bounds = (min(task.targets), max(task.targets))
    found = {}
    for c in task.labels:
        seen = {t: p[c].matches for t, p in prompts.items() if c in p and p[c].positives > 0}
        masks = task.anchor_masks.get(c, {})
        if not seen and not masks:
            log.warning("%s: label %d: no probed slice has a positive match; no voxel of it", task.name, c)
            continue
        where = sorted(set(seen) | set(masks))
        lo, hi = _widen(where[0], where[-1], step, bounds)
        if masks:  # same-volume mode: the labelled slices are the anchors
            lo, hi = min(lo, min(masks)), max(hi, max(masks))
            anchors = [(t, masks[t]) for t in sorted(masks)]
            tracks[c].matches = [-1] * len(anchors)
        else:
            chosen = choose_anchors(seen, task.settings.anchors, where[0], where[-1])
            anchors = [(t, prompts[t][c]) for t in chosen]
            tracks[c].matches = [seen[t] for t in chosen]
        tracks[c].anchors = [t for t, _ in anchors]
        tracks[c].extent = (lo, hi)
        found[c] = anchors
        log.info("%s: label %d: anchors %s (positive matches %s), extent %d..%d", task.name, c,
                 tracks[c].anchors, tracks[c].matches, lo, hi)
    return found


def _probe(source: PromptSource, task: PropagationTask, frames: WindowedSlices) -> tuple[dict, int]:
    """Matching prompts on the probed slices: ({slice: {label: ClassPrompts}}, probe step)."""
    probes, step = probe_slices(task.targets, task.settings.max_probes)
    batch = max(1, int(getattr(source.config, "batch_size", 1)))
    prompts: dict[int, dict[int, ClassPrompts]] = {}
    for i in range(0, len(probes), batch):
        chunk = probes[i:i + batch]
        for t, found in zip(chunk, source.match_prompts([frames[t] for t in chunk])):
            prompts[t] = found
    return prompts, step


class _Pass:
    """One direction: which label decides which slices, and each label's oversize run."""

    def __init__(self, name: str, keep: dict[int, range]):
        self.name, self.keep = name, keep
        self.run = {c: 0 for c in keep}
        self.stopped: set[int] = set()


def _track(predictor, state, composer: SliceComposer, tracks: dict[int, LabelTrack], task: PropagationTask,
           start: int, count: int, reverse: bool, keep: dict[int, range]) -> int:
    """Run one propagation pass and hand every label's decisions to ``composer``; returns slices visited."""
    direction = _Pass("backward" if reverse else "forward", keep)
    visited = 0
    outputs = predictor.propagate_in_video(state, start_frame_idx=start, max_frame_num_to_track=count,
                                           reverse=reverse)
    try:
        for t, obj_ids, logits in outputs:
            visited += 1
            for j, c in enumerate(obj_ids):
                if t not in keep.get(c, ()):
                    continue
                if c in direction.stopped:
                    composer.decide(t, c)
                    continue
                _decide(composer, tracks[c], direction, task, t, c, logits[j, 0])
            ahead = [c for c, slices in keep.items() if c not in direction.stopped and len(slices)
                     and (t > slices[-1] if reverse else t < slices[-1])]
            if not ahead:
                break
    finally:
        outputs.close()
    return visited


def _decide(composer: SliceComposer, track: LabelTrack, direction: _Pass, task: PropagationTask, t: int, c: int,
            logits: torch.Tensor) -> None:
    mask = logits > 0
    area = int(mask.sum())
    if area == 0:
        if bool((logits == NO_OBJ_SCORE).all()):
            track.absent += 1
        direction.run[c] = 0
        composer.decide(t, c)
        return
    limit = task.settings.max_area_ratio * task.max_area[c]
    if area > limit:
        track.oversize_dropped.append(t)
        log.warning("%s: label %d slice %d: propagated mask of %d px > %.3g x the largest reference area "
                    "(%.0f px); dropped", task.name, c, t, area, task.settings.max_area_ratio, task.max_area[c])
        composer.decide(t, c)
        direction.run[c] += 1
        if direction.run[c] >= OVERSIZE_RUN:
            direction.stopped.add(c)
            track.stopped[direction.name] = t
            log.warning("%s: label %d: %d oversize slices in a row; %s pass stopped at slice %d", task.name, c,
                        OVERSIZE_RUN, direction.name, t)
        return
    direction.run[c] = 0
    composer.decide(t, c, mask, logits)


@torch.inference_mode()
def propagate_volume(predictor, source: PromptSource, task: PropagationTask, volume: np.ndarray
                     ) -> VolumePropagation:
    """Segment one volume with SAM 2 memory (see the module docstring).

    Args:
        predictor: a :class:`refseg.VideoPredictor` (SAM 2 / 2.1 / MedSAM2).
        source: the matching pipeline with its references set (:class:`PromptSource`).
        task: what to do; volume: its canonical target array.
    """
    start = time.perf_counter()
    frames = WindowedSlices(slice_stack(volume, task.axis), task.window)
    tracks = {c: LabelTrack() for c in task.labels}
    prompts, step = _probe(source, task, frames) if task.targets else ({}, 1)
    probe_s = time.perf_counter() - start
    anchors = _find_anchors(task, prompts, step, tracks) if task.targets else {}
    composer = SliceComposer(task.targets, {c: tracks[c].extent for c in anchors}, frames.stack.shape[1:])
    visited = 0
    if anchors:
        device = torch.device(predictor.device)
        state = predictor.init_state(frames=frames, offload_state_to_cpu=device.type != "cpu")
        # slice by slice, every label's prompt on it, then its memories: one encoder pass per anchor slice
        for t in sorted({t for prompted in anchors.values() for t, _ in prompted}):
            for c, prompted in anchors.items():
                for _, prompt in (p for p in prompted if p[0] == t):
                    if isinstance(prompt, np.ndarray):  # same-volume mode: a labelled slice's mask
                        predictor.add_new_mask(state, t, c, prompt)
                    else:
                        predictor.add_new_points_or_box(state, t, c, points=prompt.points, labels=prompt.labels,
                                                        box=prompt.box)
            predictor.propagate_in_video_preflight(state)
        first = {c: tracks[c].anchors[0] for c in anchors}
        lo = {c: tracks[c].extent[0] for c in anchors}
        hi = {c: tracks[c].extent[1] for c in anchors}
        forward = {c: range(first[c], hi[c] + 1) for c in anchors}
        visited += _track(predictor, state, composer, tracks, task, min(first.values()),
                          max(hi.values()) - min(first.values()), False, forward)
        backward = {c: range(first[c] - 1, lo[c] - 1, -1) for c in anchors}
        if any(len(r) for r in backward.values()):
            begin = max(first.values())
            visited += _track(predictor, state, composer, tracks, task, begin, begin - min(lo.values()), True,
                              backward)
        del state
    composer.flush()
    for image in composer.slices.values():
        for c in np.unique(image):
            if c:
                tracks[int(c)].slices_with_voxels += 1
    seconds = time.perf_counter() - start
    return VolumePropagation(composer.slices, tracks, sorted(prompts), visited, seconds,
                             {"matching": probe_s, "propagation": seconds - probe_s})
