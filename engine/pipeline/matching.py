"""Stage 3–4a: feature-space matching — reference / target patch tokens -> candidate prompt patches.

For every target and every class (grid labels 1 FG / 0 BG / -1 ignored on the reference grid):

* forward match: each reference FG patch's best target patch is a candidate positive, each reference
  BG patch's best target patch a candidate negative, and each FG patch's worst ("farthest") target
  patch a hard-negative candidate;
* backward (cycle) check: every target patch's best match among ALL reference patches; a positive
  survives when its back-match is FG, a negative when it is BG; a farthest match becomes a hard
  negative when its back-match is NOT FG.

The forward / farthest / backward reductions do not depend on the labels, so one call of the
similarity seam ``refseg.kernels.match`` serves every class and every target of a batch. With
``matcher="hungarian"`` the forward matches are one-to-one assignments
(``scipy.optimize.linear_sum_assignment``) of each class's FG (resp. BG) patches to target patches,
and the cycle check assigns the matched target patches one-to-one back to all reference patches.

Candidates are returned as boolean masks over target patches (so duplicates vanish); converted to
points they are listed in ascending patch index (row-major). The GBMSeg release listed them in Python
``set`` iteration order, which depends on CPython's tuple hashes and insertion history and is not
reproduced (the physical stage is order-sensitive; see tests/test_gbmseg_golden.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import SegmenterConfig
from . import native
from .accelerator import accelerator_path, to_device
from .grid import BG, FG, cells_to_pixels
from .grouping import compact

log = logging.getLogger(__name__)


@dataclass
class Candidates:
    """Candidate prompt patches on the target grid for B targets × C classes.

    positives / negatives / hard_negatives: (B, C, Nt) bool masks over target patch indices
    (row-major, ``i = row · G + col``). offimage_pos / offimage_neg: (B, C) bool — the GBMSeg
    release would also emit patch index -1 (its rejected entries, overwritten with -1) for this set;
    always False unless ``gbmseg_offimage_quirk``.
    """

    positives: torch.Tensor
    negatives: torch.Tensor
    hard_negatives: torch.Tensor
    offimage_pos: torch.Tensor
    offimage_neg: torch.Tensor


def _similarity_seam():
    from refseg.kernels import match  # the single similarity seam (Triton kernel / torch reference)
    return match


def _labels_2d(ref_labels: torch.Tensor, nr: int) -> torch.Tensor:
    lab = torch.as_tensor(ref_labels)
    if lab.dim() == 3:  # (C, G, G) grids
        lab = lab.reshape(lab.shape[0], -1)
    elif lab.dim() == 1:
        lab = lab[None]
    if lab.dim() != 2 or lab.shape[1] != nr:
        raise ValueError(f"ref_labels: expected (Nr,) / (C, Nr) / (C, G, G) labels for Nr={nr} reference "
                         f"patches, got shape {tuple(ref_labels.shape)}")
    return lab.to(torch.int8)


def _scatter_mask(idx: torch.Tensor, keep: torch.Tensor, nt: int) -> torch.Tensor:
    """idx (B, C, Nr) target indices, keep (B, C, Nr) bool -> (B, C, Nt) bool (dump bucket Nt)."""
    target = torch.where(keep, idx, torch.full_like(idx, nt))
    out = torch.zeros(*idx.shape[:2], nt + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(2, target, True)
    return out[..., :nt]


def match_candidates(ref_tokens: torch.Tensor, ref_labels: torch.Tensor, tgt_tokens: torch.Tensor,
                     config: SegmenterConfig) -> Candidates:
    """Candidate positive / negative / hard-negative target patches for a batch of targets.

    Args:
        ref_tokens: (Nr, D) reference patch tokens (n-shot: several references concatenated), or
            (B, Nr, D) one reference set per target.
        ref_labels: (Nr,), (C, Nr) or (C, G, G) int grid labels (1 FG, 0 BG, -1 ignored) per class,
            aligned with ``ref_tokens`` rows.
        tgt_tokens: (B, Nt, D) target patch tokens.
        config: ``metric``, ``matcher``, ``cycle_check``, ``hard_negatives``, ``fallback``,
            ``gbmseg_offimage_quirk``.

    Returns:
        :class:`Candidates` with masks (B, C, Nt).
    """
    if tgt_tokens.dim() != 3:
        raise ValueError(f"tgt_tokens: expected (B, Nt, D), got shape {tuple(tgt_tokens.shape)}")
    b, nt, dim = tgt_tokens.shape
    ref = ref_tokens if ref_tokens.dim() == 3 else ref_tokens[None]
    if ref.dim() != 3 or ref.shape[-1] != dim or ref.shape[0] not in (1, b):
        raise ValueError(f"ref_tokens: expected (Nr, {dim}) or ({b}, Nr, {dim}), got {tuple(ref_tokens.shape)}")
    ref = ref.expand(b, -1, -1).to(tgt_tokens.dtype)
    nr = ref.shape[1]
    labels = _labels_2d(ref_labels, nr).to(tgt_tokens.device)
    c = labels.shape[0]
    fg, bg = labels == FG, labels == BG  # (C, Nr)
    accel = accelerator_path(tgt_tokens.device)
    if not accel and not bool(fg.any(-1).all()):  # (the Segmenter refuses such references up front)
        log.warning("%d class(es) have no foreground reference patch: no positive candidates",
                    int((~fg.any(-1)).sum()))
    if config.matcher == "hungarian":
        return _hungarian_candidates(ref, tgt_tokens, labels, config)

    res = _similarity_seam()(ref, tgt_tokens, metric=config.metric, k=1)
    fast = None if accel else native.match_nn(res, labels, config)
    if fast is not None:  # the C++ prompt engine (refseg._C) on the CPU: identical results
        return Candidates(*fast)
    fwd, far, bwd = res.fwd_idx[..., 0], res.far_idx, res.bwd_idx  # (B, Nr), (B, Nr), (B, Nt)
    fwd_c = fwd[:, None].expand(b, c, nr)
    lab_b = labels[None].expand(b, c, nr)
    back = lab_b.gather(2, bwd.gather(1, fwd)[:, None].expand(b, c, nr))  # label of the back-match
    pos_ok = fg & (back == FG) if config.cycle_check else fg.expand(b, c, nr)
    neg_ok = bg & (back == BG) if config.cycle_check else bg.expand(b, c, nr)
    positives = _scatter_mask(fwd_c, pos_ok, nt)
    negatives = _scatter_mask(fwd_c, neg_ok, nt)
    if config.hard_negatives:
        far_back = lab_b.gather(2, bwd.gather(1, far)[:, None].expand(b, c, nr))
        hard = _scatter_mask(far[:, None].expand(b, c, nr), fg & (far_back != FG), nt)
    else:
        hard = torch.zeros_like(positives)
    if config.fallback:
        # better = larger score for cosine, smaller distance for euclidean
        key = res.fwd_val[..., 0] if config.metric == "cosine" else -res.fwd_val[..., 0]
        positives = _fallback(positives, fwd_c, fg, key, "positive")
        negatives = _fallback(negatives, fwd_c, bg, key, "negative")
    quirk = config.gbmseg_offimage_quirk and config.cycle_check
    off_pos = (fg & ~pos_ok).any(-1) if quirk else torch.zeros(b, c, dtype=torch.bool, device=fwd.device)
    off_neg = (bg & ~neg_ok).any(-1) if quirk else torch.zeros_like(off_pos)
    return Candidates(positives, negatives, hard, off_pos, off_neg)


def _fallback(mask: torch.Tensor, fwd_c: torch.Tensor, member: torch.Tensor, key: torch.Tensor,
              what: str) -> torch.Tensor:
    """Where a set is empty but the class has reference patches, keep its single best forward match
    (computed for every set and applied where needed: no host read)."""
    empty = ~mask.any(-1) & member.any(-1)  # (B, C)
    k = torch.where(member, key[:, None], torch.full_like(key[:, None], float("-inf")))  # (B, C, Nr)
    best_ref = k.argmax(-1, keepdim=True)
    best_tgt = fwd_c.gather(2, best_ref)
    add = torch.zeros_like(mask).scatter_(2, best_tgt, True) & empty[..., None]
    if not accelerator_path(mask.device) and log.isEnabledFor(logging.DEBUG):
        log.debug("cycle check left %d %s set(s) empty; kept the best forward match", int(empty.sum()), what)
    return mask | add


def hungarian_solver():
    """scipy's ``linear_sum_assignment``, or one message naming the ``methods`` extra to install."""
    from ..optional import require

    return require("scipy.optimize", "methods",
                   "Hungarian matching (the matcher preset, matcher='hungarian')").linear_sum_assignment


def _hungarian_candidates(ref: torch.Tensor, tgt: torch.Tensor, labels: torch.Tensor,
                          config: SegmenterConfig) -> Candidates:
    """One-to-one forward assignment per class and label, one-to-one backward check (scipy)."""
    lsa = hungarian_solver()

    b, nt = tgt.shape[:2]
    nr = ref.shape[1]
    res = _similarity_seam()(ref, tgt, metric=config.metric, k=nt)
    # full score matrix (B, Nr, Nt) rebuilt from the complete sorted top-Nt lists
    score = torch.empty(b, nr, nt, dtype=torch.float64, device=res.fwd_val.device)
    score.scatter_(2, res.fwd_idx, res.fwd_val.to(torch.float64))
    cost = (-score if config.metric == "cosine" else score).cpu().numpy()
    far = res.far_idx.cpu()
    lab = labels.cpu()
    c = lab.shape[0]
    pos = torch.zeros(b, c, nt, dtype=torch.bool)
    neg = torch.zeros_like(pos)
    hard = torch.zeros_like(pos)
    off_pos = torch.zeros(b, c, dtype=torch.bool)
    off_neg = torch.zeros_like(off_pos)
    quirk = config.gbmseg_offimage_quirk and config.cycle_check
    for bi in range(b):  # one scipy problem per (target, class, label): not per point
        back_all = None
        for ci in range(c):
            for want, out, off in ((FG, pos, off_pos), (BG, neg, off_neg)):
                rows = torch.nonzero(lab[ci] == want)[:, 0].numpy()
                if rows.size == 0:
                    continue
                _, cols = lsa(cost[bi][rows])
                if config.cycle_check:
                    # matched targets -> all reference patches; every row is assigned (rows <= Nr), in order
                    _, back_cols = lsa(cost[bi][:, cols].T)
                    back = torch.as_tensor(back_cols, dtype=torch.int64)
                    ok = lab[ci][back] == want
                    off[bi, ci] = quirk and bool((~ok).any())
                    cols = cols[ok.numpy()]
                out[bi, ci, torch.as_tensor(cols, dtype=torch.int64)] = True
            if config.hard_negatives:
                if back_all is None:
                    back_all = torch.as_tensor(cost[bi].argmin(0))  # NN back-match of every target patch
                fg_rows = lab[ci] == FG
                far_t = far[bi][fg_rows]
                hard[bi, ci, far_t[lab[ci][back_all[far_t]] != FG]] = True
    dev = tgt.device
    return Candidates(pos.to(dev), neg.to(dev), hard.to(dev), off_pos.to(dev), off_neg.to(dev))


def candidates_to_points(cand: Candidates, grid_size: int, image_size: int,
                         target_sizes) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Masks -> padded (x, y) target-pixel point sets, one set per (target, class).

    Args:
        cand: :class:`Candidates` with (B, C, Nt) masks, Nt = grid_size².
        grid_size: G = S / 14. image_size: S.
        target_sizes: (H, W) shared by all targets, or B pairs (H, W).

    Returns:
        ``{"positives" | "negatives" | "hard_negatives": (points (B·C, N, 2) float64, valid (B·C, N))}``,
        sets ordered target-major (set = b · C + c), points in ascending patch index; with the
        off-image quirk, index -1 (→ (553, -7) at S = 560) leads the positive / negative lists.
    """
    b, c, nt = cand.positives.shape
    sizes = torch.as_tensor(target_sizes, dtype=torch.int64)
    sizes = sizes.expand(b, 2) if sizes.dim() == 1 else sizes
    if sizes.shape != (b, 2):
        raise ValueError(f"target_sizes: expected (H, W) or {b} pairs, got {target_sizes!r}")
    kinds = (("positives", cand.positives, cand.offimage_pos), ("negatives", cand.negatives, cand.offimage_neg),
             ("hard_negatives", cand.hard_negatives, None))
    padded = []
    for name, mask, off in kinds:
        flat = mask.reshape(b * c, nt)
        idx = torch.arange(-1, nt, device=flat.device).expand(b * c, nt + 1)
        lead = off.reshape(b * c, 1) if off is not None else torch.zeros(b * c, 1, dtype=torch.bool,
                                                                         device=flat.device)
        idx, valid = compact(idx[..., None], torch.cat([lead, flat], 1))
        padded.append((name, idx, valid))
    # ONE host read for the three widths: the later stages are O(N²) in them, padding to G² is too wide
    counts = torch.stack([valid.sum(-1).amax() if valid.numel() else valid.new_zeros((), dtype=torch.int64)
                          for _, _, valid in padded])
    widths = counts.tolist()
    out = {}
    sizes_rows = to_device(sizes.repeat_interleave(c, 0), cand.positives.device)
    for (name, idx, valid), width in zip(padded, widths):
        idx, valid = idx[:, :width, 0], valid[:, :width]
        pix = cells_to_pixels(idx, grid_size, image_size, sizes_rows)
        out[name] = (pix.to(torch.float64), valid)
    return out
