"""Stage 4b: physical-space prompt engineering — candidate points -> SAM point prompts (and boxes).

Order of operations for every prompt set (one target × one class), following docs/algorithm.md §1–2:

1. Off-image points are dropped (kept as given only when ``config.gbmseg_offimage_quirk``).
2. Exact duplicates are removed (first occurrence kept) in each class.
3. Positives are grouped with ``pos_radius`` (representative: largest mean distance to the negatives).
4. Negatives are grouped with ``neg_radius`` (representative: largest mean distance to the final
   positives), then every negative closer than ``exclusion_radius`` to its nearest positive is dropped.
   With ``config.fallback``, a set whose negatives were all excluded keeps the one farthest from the
   positives.
5. With ``kmeans_k`` > 0, a class holding more than K points is thinned to K points by k-means on the
   coordinates (``refseg.kernels.kmeans``), keeping in each cluster the member nearest the centre.
6. Hard negatives (when given) are de-duplicated, grouped with ``hard_radius`` (representative
   farthest — in mean distance — from the positives) and appended WITHOUT exclusion.
7. ``max_points`` caps the set (earliest points kept; negatives get at most half when positives need
   the room). Optional box = extent of the positives.

Radii are converted to pixels per target with :meth:`SegmenterConfig.radius_px`. Points are (x, y) in
target pixels, positives first, then negatives, then hard negatives, each in walk order.

On the CPU the C++ prompt engine (:mod:`.native`) runs the stage when built. On the accelerator path
(:mod:`.accelerator`) the torch code below runs on the device on padded, masked tensors: choices that
depend only on the config are made on the host, sets are thinned by one k-means call for all sets
(no selection of the sets that need it), and the only host reads are the leader search's convergence
tests (:func:`~.grouping.greedy_leaders`) and, when neither ``kmeans_k`` nor ``max_points`` bounds the
set sizes, one read of the widest set.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import SegmenterConfig
from . import native
from .accelerator import accelerator_path, to_device
from .grouping import (compact, deduplicate, group_by_radius, mean_distance, min_sq_distance,
                       pairwise_sq_dist, take_points, trimmed_width)

log = logging.getLogger(__name__)


MAX_STATIC_WIDTH = 64
"""Widest prompt set the accelerator path pads to without reading the true width (k-means and
``max_points`` bound it from the config); wider bounds cost one host read of the widest set."""


@dataclass
class PromptBatch:
    """Padded SAM point prompts for P prompt sets (P = targets × classes, in the caller's order).

    points: (P, M, 2) float32 (x, y) target pixels; labels: (P, M) int64, 1 positive, 0 negative,
    -1 padding (SAM's "not a point"); num_points: (P,) int64; boxes: (P, 4) float32
    (x0, y0, x1, y1) extent of the positives (NaN rows where a set has none), or None when
    ``use_box`` is off.
    """

    points: torch.Tensor
    labels: torch.Tensor
    num_points: torch.Tensor
    boxes: Optional[torch.Tensor] = None

    def prompt(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Set ``i`` without padding as numpy ``(points (n, 2) float32, labels (n,) int64)``."""
        n = int(self.num_points[i])
        return self.points[i, :n].cpu().numpy(), self.labels[i, :n].cpu().numpy()


def _as_points(value, name: str) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value, dtype=np.float64))
    if t.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.float64)
    if t.dim() != 2 or t.shape[1] != 2:
        raise ValueError(f"{name}: expected (N, 2) (x, y) points, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.float64)


def pad_point_sets(sets: Sequence, name: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (n_i, 2) point arrays -> (P, N, 2) float64 padded points and (P, N) bool valid mask."""
    pts = [_as_points(s, f"{name}[{i}]") for i, s in enumerate(sets)]
    n = max([len(p) for p in pts], default=0)
    out = torch.zeros(len(pts), n, 2, dtype=torch.float64)
    valid = torch.zeros(len(pts), n, dtype=torch.bool)
    for i, p in enumerate(pts):
        out[i, :len(p)] = p
        valid[i, :len(p)] = True
    return out.to(device), valid.to(device)


def on_image(points: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(P, N) bool: 0 <= x <= W-1 and 0 <= y <= H-1 for ``sizes`` (P, 2) = (H, W)."""
    h, w = sizes[:, 0, None].to(points.dtype), sizes[:, 1, None].to(points.dtype)
    x, y = points[..., 0], points[..., 1]
    return (x >= 0) & (y >= 0) & (x <= w - 1) & (y <= h - 1)


def kmeans_thin(points: torch.Tensor, valid: torch.Tensor, k: int, iters: int = 100,
                seed: int = 0) -> torch.Tensor:
    """(P, N) bool keep-mask thinning every set with more than ``k`` valid points to ``k`` points.

    ``valid`` must be compacted (valid entries first). One batched ``refseg.kernels.kmeans`` call on
    all sets (each problem is independent of the others; sets of at most ``k`` points keep theirs, so no
    set needs to be selected on the host); in each cluster the member nearest the centre (ties:
    earliest) is kept.
    """
    if k <= 0 or points.shape[1] <= k:
        return valid
    from refseg.kernels import kmeans  # the one clustering seam (Triton / torch)

    counts = valid.sum(-1)
    big = counts > k
    centres, assign, _ = kmeans(points.to(torch.float32), counts, k, iters=iters, seed=seed, init="k-means++")
    p, n = valid.shape
    near = centres.to(torch.float64).gather(1, assign.clamp(min=0)[..., None].expand(-1, -1, 2))
    d = ((points.to(torch.float64) - near) ** 2).sum(-1)
    d = torch.where(valid, d, torch.full_like(d, float("inf")))
    cluster = torch.where(valid, assign.clamp(min=0), torch.full_like(assign, k))
    best = torch.full((p, k + 1), float("inf"), dtype=torch.float64, device=points.device)
    best = best.scatter_reduce(1, cluster, d, reduce="amin", include_self=True)
    winner = valid & (d == best.gather(1, cluster))
    idx = torch.arange(n, device=points.device).expand_as(winner)
    first = torch.full((p, k + 1), n, dtype=torch.int64, device=points.device)
    first = first.scatter_reduce(1, cluster, torch.where(winner, idx, torch.full_like(idx, n)),
                                 reduce="amin", include_self=True)[:, :k]
    thinned = torch.zeros(p, n + 1, dtype=torch.bool, device=points.device)
    thinned.scatter_(1, first, True)
    return torch.where(big[:, None], thinned[:, :n], valid)


def _radius(config: SegmenterConfig, key: str, sizes: torch.Tensor) -> torch.Tensor:
    """(P,) float64 pixel radius of field ``key`` per set (sizes (P, 2) = (H, W))."""
    value = float(getattr(config, key))
    if config.radius_unit == "pixel":
        return torch.full((len(sizes),), value, dtype=torch.float64, device=sizes.device)
    return value * sizes.amax(-1).to(torch.float64)


def _group(points: torch.Tensor, valid: torch.Tensor, config: SegmenterConfig, key: str, sizes: torch.Tensor,
           other: torch.Tensor, other_valid: torch.Tensor, sq_dist_other: Optional[torch.Tensor] = None):
    """Greedy grouping of de-duplicated sets with radius field ``key``; representative = largest mean
    distance to ``other``. Whether the radius is 0 is the config's (no host read).

    Returns (points (P, K, 2), valid (P, K), order (P, K) indices into the input, -1 = padding).
    """
    if float(getattr(config, key)) > 0:
        score = mean_distance(points, valid, other, other_valid, sq_dist_other)
        order = group_by_radius(points, valid, _radius(config, key, sizes), score)
    else:  # r = 0 only merges duplicates: no score needed
        order = group_by_radius(points, valid, 0.0)
    out, out_valid = take_points(points, order)
    return out, out_valid, order


def engineer_padded(pos: torch.Tensor, pos_valid: torch.Tensor, neg: torch.Tensor, neg_valid: torch.Tensor,
                    sizes: torch.Tensor, config: SegmenterConfig, hard: Optional[torch.Tensor] = None,
                    hard_valid: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32
                    ) -> PromptBatch:
    """Core of the physical-space stage on padded sets (all tensors on one device).

    Args:
        pos, neg, hard: (P, N*, 2) candidate (x, y) target pixels, any order-significant layout.
        pos_valid, neg_valid, hard_valid: (P, N*) bool.
        sizes: (P, 2) int64 (H, W) of each set's target image.
        config: radii, exclusion, k-means, fall-back, box, cap and the off-image quirk flag.
        dtype: dtype of the returned points and boxes.

    Returns:
        :class:`PromptBatch` on the inputs' device.
    """
    accel = accelerator_path(pos.device)
    if not accel:
        fast = native.engineer_padded(pos, pos_valid, neg, neg_valid, sizes, config, hard, hard_valid, dtype)
        if fast is not None:  # the C++ prompt engine (refseg._C) on the CPU: identical results
            return PromptBatch(*fast)
    if not config.gbmseg_offimage_quirk:
        pos_valid, neg_valid = pos_valid & on_image(pos, sizes), neg_valid & on_image(neg, sizes)
        if hard is not None:
            hard_valid = hard_valid & on_image(hard, sizes)
    pos_valid, neg_valid = deduplicate(pos, pos_valid), deduplicate(neg, neg_valid)

    # positives: grouped against the de-duplicated negatives
    pos, pos_valid, _ = _group(pos, pos_valid, config, "pos_radius", sizes, neg, neg_valid)

    # negatives: grouped against the final positives, then exclusion around the positives; the
    # negative-to-positive distances are computed once for both
    excl = _radius(config, "exclusion_radius", sizes)
    d_np = pairwise_sq_dist(neg, pos) if config.exclusion_radius > 0 else None
    neg, neg_valid, order = _group(neg, neg_valid, config, "neg_radius", sizes, pos, pos_valid, d_np)
    if d_np is not None:
        rows = d_np.gather(1, order.clamp(min=0)[..., None].expand(-1, -1, d_np.shape[2]))
        nearest = min_sq_distance(neg, pos, pos_valid, rows)
        kept = neg_valid & (nearest >= (excl * excl)[:, None])
        if config.fallback:  # a set whose negatives were all excluded keeps the farthest one
            lost = neg_valid.any(-1) & ~kept.any(-1)
            far = torch.where(neg_valid, nearest, torch.full_like(nearest, -1.0)).argmax(-1)
            kept |= lost[:, None] & (torch.arange(kept.shape[1], device=kept.device) == far[:, None])
            if not accel and log.isEnabledFor(logging.DEBUG):
                log.debug("exclusion removed every negative in %d set(s); kept the farthest one",
                          int(lost.sum()))
        neg, neg_valid = compact(neg, kept)

    if config.kmeans_k > 0:
        pos, pos_valid, neg, neg_valid = _thin(pos, pos_valid, neg, neg_valid, config)

    if hard is not None and hard.shape[1]:
        hard_valid = deduplicate(hard, hard_valid)
        hard, hard_valid, _ = _group(hard, hard_valid, config, "hard_radius", sizes, pos, pos_valid)
        neg, neg_valid = torch.cat([neg, hard], 1), torch.cat([neg_valid, hard_valid], 1)
        neg, neg_valid = compact(neg, neg_valid)

    if not accel:  # on the accelerator path the caller warns from the host copy of the prompts
        warn_missing_positives(pos_valid.any(-1))
    if config.max_points > 0:
        pos_valid, neg_valid = _cap(pos_valid, neg_valid, config.max_points)
    return _assemble(pos, pos_valid, neg, neg_valid, config.use_box, dtype, config.max_points)


def warn_missing_positives(has_positive: torch.Tensor | np.ndarray) -> None:
    """One warning when some of the (P,) prompt sets have no positive point."""
    missing = int((~has_positive).sum())
    if missing:
        log.warning("%d prompt set(s) have no positive point", missing)


def _thin(pos, pos_valid, neg, neg_valid, config: SegmenterConfig):
    """k-means thinning of positives and negatives in ONE call (2P problems), then both cut to K
    columns: a thinned set holds at most K points, so that width is known without a host read."""
    k = config.kmeans_k
    width = max(pos.shape[1], neg.shape[1])

    def widen(points, valid):
        extra = width - points.shape[1]
        return (torch.nn.functional.pad(points, (0, 0, 0, extra)),
                torch.nn.functional.pad(valid, (0, extra), value=False))

    (pp, pv), (nn_, nv) = widen(pos, pos_valid), widen(neg, neg_valid)
    keep = kmeans_thin(torch.cat([pp, nn_]), torch.cat([pv, nv]), k, config.kmeans_iters, config.kmeans_seed)
    p = pos.shape[0]
    pos, pos_valid = compact(pp, keep[:p])
    neg, neg_valid = compact(nn_, keep[p:])
    return pos[:, :k], pos_valid[:, :k], neg[:, :k], neg_valid[:, :k]


def _cap(pos_valid: torch.Tensor, neg_valid: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``m`` points per set: negatives keep up to m//2 when positives need the room."""
    n_pos, n_neg = pos_valid.sum(-1), neg_valid.sum(-1)
    keep_pos = torch.minimum(n_pos, m - torch.minimum(n_neg, torch.full_like(n_neg, m // 2)))
    keep_neg = torch.minimum(n_neg, m - keep_pos)
    rank_pos = pos_valid.cumsum(-1) - 1
    rank_neg = neg_valid.cumsum(-1) - 1
    return pos_valid & (rank_pos < keep_pos[:, None]), neg_valid & (rank_neg < keep_neg[:, None])


def _assemble(pos, pos_valid, neg, neg_valid, use_box: bool, dtype: torch.dtype, max_points: int = 0
              ) -> PromptBatch:
    pts = torch.cat([pos, neg], 1)
    valid = torch.cat([pos_valid, neg_valid], 1)
    lab = torch.cat([torch.ones_like(pos_valid, dtype=torch.int64),
                     torch.zeros_like(neg_valid, dtype=torch.int64)], 1)
    lab = torch.where(valid, lab, torch.full_like(lab, -1))
    pts, valid2 = compact(pts, valid)
    lab, _ = compact(lab[..., None], valid)
    num = valid.sum(-1)
    full = pts.shape[1] if max_points <= 0 else min(pts.shape[1], max_points)
    if accelerator_path(pts.device) and full > MAX_STATIC_WIDTH:  # unbounded by the config: one read
        width = int(num.max()) if num.numel() else 0
    else:
        width = trimmed_width(num, full)
    points = torch.where(valid2[..., None], pts, torch.zeros_like(pts))[:, :width].to(dtype)
    labels = torch.where(valid2, lab[..., 0], torch.full_like(lab[..., 0], -1))[:, :width]
    boxes = None
    if use_box:
        big = torch.finfo(torch.float64).max
        pad = torch.zeros(pos.shape[0], 1, 2, dtype=pos.dtype, device=pos.device)  # no positive -> NaN row
        pos_b = torch.cat([pos, pad], 1)
        valid_b = torch.cat([pos_valid, pos_valid.new_zeros(pos.shape[0], 1)], 1)[..., None]
        lo = torch.where(valid_b, pos_b, torch.full_like(pos_b, big)).amin(1)
        hi = torch.where(valid_b, pos_b, torch.full_like(pos_b, -big)).amax(1)
        boxes = torch.cat([lo, hi], -1).to(dtype)
        boxes = torch.where(pos_valid.any(-1, keepdim=True), boxes, torch.full_like(boxes, float("nan")))
    return PromptBatch(points=points, labels=labels, num_points=num, boxes=boxes)


def engineer_prompt_batch(positives: Sequence, negatives: Sequence, hard_negatives: Optional[Sequence] = None,
                          *, image_sizes, config: SegmenterConfig, device=None,
                          dtype: torch.dtype = torch.float32) -> PromptBatch:
    """Batched physical-space stage for P prompt sets (several targets and/or classes).

    Args:
        positives, negatives: length-P sequences of (n_i, 2) (x, y) target-pixel candidates
            (numpy / torch / nested lists); order matters (greedy walk order).
        hard_negatives: optional length-P sequence of hard-negative candidates.
        image_sizes: (H, W) shared by all sets, or a length-P sequence of (H, W).
        config: the :class:`SegmenterConfig`.
        device: where to compute (default CPU; the greedy walk syncs once per group on a GPU).
        dtype: dtype of the returned points / boxes (computation is float64).
    """
    if len(positives) != len(negatives) or (hard_negatives is not None and len(hard_negatives) != len(positives)):
        n_hard = None if hard_negatives is None else len(hard_negatives)
        raise ValueError(f"positives ({len(positives)}), negatives ({len(negatives)}) and hard_negatives "
                         f"({n_hard}) must have one entry per set")
    sizes = torch.as_tensor(image_sizes, dtype=torch.int64)
    if sizes.dim() == 1:
        sizes = sizes.expand(len(positives), 2)
    if sizes.shape != (len(positives), 2) or bool((sizes <= 0).any()):
        raise ValueError(f"image_sizes must be (H, W) or one positive (H, W) per set, got {image_sizes!r}")
    pos, pv = pad_point_sets(positives, "positives", device)
    neg, nv = pad_point_sets(negatives, "negatives", device)
    hard = hv = None
    if hard_negatives is not None:
        hard, hv = pad_point_sets(hard_negatives, "hard_negatives", device)
    return engineer_padded(pos, pv, neg, nv, sizes.to(pos.device), config, hard, hv, dtype)


def _warn_offimage(value, name: str, height: int, width: int) -> None:
    """One warning naming how many of the (N, 2) (x, y) points ``value`` lie outside the (H, W) image
    (the rule of :func:`on_image`) and the first few; the stage drops them."""
    pts = _as_points(value, name)
    off = ~on_image(pts[None], torch.tensor([[height, width]]))[0]
    if bool(off.any()):
        bad = pts[off]
        shown = ", ".join(f"({x:g}, {y:g})" for x, y in bad[:3].tolist()) + (", ..." if len(bad) > 3 else "")
        log.warning("engineer_points: dropped %d of %d %s outside the %dx%d (W x H) image: %s", len(bad),
                    len(pts), name, width, height, shown)


def engineer_points(positives, negatives, hard_negatives=None, *, preset: str = "gbmseg",
                    image_size: tuple[int, int], config: Optional[SegmenterConfig] = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Physical-space stage for one prompt set.

    Args:
        positives, negatives, hard_negatives: (N, 2) (x, y) pixel candidates of an (H, W) target.
        preset: preset name used when ``config`` is None.
        image_size: (H, W) of the target image. Points outside it (x not in [0, W-1] or y not
            in [0, H-1], or NaN) are dropped with one warning per argument (kept as given with
            ``gbmseg_offimage_quirk``).
        config: overrides ``preset``.

    Returns:
        points (N, 2) (x, y) — int64 when every input coordinate is integral, else float64 —
        and labels (N,) int64 (1 positive, 0 negative): positives first, then negatives, then
        hard negatives, each in greedy-walk order.
    """
    config = config if config is not None else SegmenterConfig.from_preset(preset)
    if not config.gbmseg_offimage_quirk:  # off-image points are dropped by the stage: say so
        height, width = (int(v) for v in image_size)
        for value, name in ((positives, "positives"), (negatives, "negatives"), (hard_negatives, "hard_negatives")):
            if value is not None:
                _warn_offimage(value, name, height, width)
    hard = None if hard_negatives is None else [hard_negatives]
    batch = engineer_prompt_batch([positives], [negatives], hard, image_sizes=tuple(image_size), config=config,
                                  dtype=torch.float64)
    n = int(batch.num_points[0])
    pts = batch.points[0, :n]
    inputs = [_as_points(v, "points") for v in (positives, negatives, hard_negatives) if v is not None]
    integral = all(bool((t == t.round()).all()) for t in inputs)
    points = pts.round().to(torch.int64).numpy() if integral else pts.numpy()
    return points, batch.labels[0, :n].numpy()


def prompts_from_candidates(cand, config: SegmenterConfig, target_sizes, device=None,
                            dtype: torch.dtype = torch.float32) -> PromptBatch:
    """:class:`~refseg.pipeline.matching.Candidates` (B, C, Nt) -> :class:`PromptBatch` of B·C sets.

    Sets are ordered target-major (set = b · C + c). ``target_sizes``: (H, W) shared by all targets
    or B pairs. Hard negatives are used when ``config.hard_negatives``.
    """
    from .matching import candidates_to_points

    b, c, _ = cand.positives.shape
    pts = candidates_to_points(cand, config.grid_size, config.image_size, target_sizes)
    sizes = torch.as_tensor(target_sizes, dtype=torch.int64)
    sizes = (sizes.expand(b, 2) if sizes.dim() == 1 else sizes).repeat_interleave(c, 0)
    dev = device if device is not None else torch.device("cpu")
    (pos, pv), (neg, nv), (hard, hv) = (tuple(t.to(dev) for t in pts[k])
                                        for k in ("positives", "negatives", "hard_negatives"))
    if not config.hard_negatives:
        hard = hv = None
    return engineer_padded(pos, pv, neg, nv, to_device(sizes, dev), config, hard, hv, dtype)
