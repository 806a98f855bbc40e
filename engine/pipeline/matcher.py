"""Matcher (docs/algorithm.md §5): Hungarian patch matching -> k-means++ centres -> many positive
subsets decoded in one batched call -> scored (EMD, purity, coverage) -> union of the best.

Per target and class:

1. Tokens (``feature_key="x_prenorm"`` in the preset) L2-normalised, cosine S = ref · tgtᵀ.
2. Forward matching: Hungarian assignment (``scipy.optimize.linear_sum_assignment``, maximising S)
   of the reference FG patches to target patches. Reverse matching: Hungarian assignment of the
   matched target patches to ALL reference patches; a match survives when its reverse partner is
   FG (when none survives, all are kept, as the release does).
3. More than ``matcher_keep_half_above`` matches -> the better half by similarity.
4. The matched target cells' centres (x, y target pixels) are clustered by k-means++ with
   K = ``matcher_centres`` (:func:`refseg.kernels.kmeans`, all problems of a chunk in one call).
5. Subsets of the centres of every size in ``matcher_sample_range`` (all combinations, or
   ``matcher_max_subsets`` of them drawn with ``kmeans_seed``) are positive-only prompt sets; all
   sets of all classes of a target go through ONE decoder call.
6. Each mask, area-pooled to the G×G grid (a cell is in when any part is), is scored:
   purity = matched cells inside / mask cells, coverage = matched cells inside / matched cells,
   EMD score = 1 − EMD((1 − S)/2 between reference FG and mask tokens, uniform weights) when POT
   (``pip install pot``) is installed (otherwise 0, logged once);
   score = ``matcher_alpha``·EMD + ``matcher_beta``·purity·coverage^``matcher_exp``.
   Filters (threshold min(t, best value)) on coverage, EMD, purity; then the ``matcher_merge``
   best masks whose score ≥ ``matcher_score_threshold`` × the best are united.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refseg.config import SegmenterConfig
from refseg.pipeline.grid import FG, cells_to_pixels
from refseg.pipeline.matching import hungarian_solver
from refseg.pipeline.methods import ReferenceSet, TargetOutput, decode_target_sets, patch_tokens
from refseg.pipeline.decode import DecodedSets
from refseg.pipeline.inputs import PreparedTarget, dinov2_inputs, sam_inputs
from refseg.pipeline.prompt_sets import PromptSets

log = logging.getLogger(__name__)
_WARNED = set()


def hungarian_matches(ref: torch.Tensor, tgt: torch.Tensor, ref_fg: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward + reverse Hungarian matching.

    Args:
        ref: (Nr, D) unit reference tokens; tgt: (Nt, D) unit target tokens; ref_fg: (Nr,) bool.

    Returns:
        (ref_idx (n,), tgt_idx (n,)) int64 surviving forward matches, and their cosine (n,).
    """
    lsa = hungarian_solver()
    sim = (ref.float() @ tgt.float().T).cpu()
    fg_idx = ref_fg.cpu().nonzero().flatten()
    rows, cols = lsa(sim[fg_idx].double().numpy(), maximize=True)
    r_idx, t_idx = fg_idx[torch.as_tensor(rows)], torch.as_tensor(cols, dtype=torch.int64)
    back_t, back_r = lsa(sim.T[t_idx].double().numpy(), maximize=True)
    partner = torch.full((len(t_idx),), -1, dtype=torch.int64)
    partner[torch.as_tensor(back_t)] = torch.as_tensor(back_r, dtype=torch.int64)
    keep = (partner >= 0) & ref_fg.cpu()[partner.clamp(min=0)]
    if bool(keep.any()):
        r_idx, t_idx = r_idx[keep], t_idx[keep]
    return r_idx, t_idx, sim[r_idx, t_idx]


def keep_better_half(sim: torch.Tensor, above: int = 40) -> torch.Tensor:
    """Indices of the matches kept: all when n ≤ ``above``, else the n // 2 best (best first)."""
    n = int(sim.numel())
    order = torch.sort(sim, descending=True, stable=True).indices
    return order[:n // 2] if n > above else order


def sample_subsets(n: int, sample_range: tuple[int, int], max_subsets: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Subsets (index tuples) of ``n`` centres with sizes lo..hi (clamped to n), all combinations
    in size-then-lexicographic order, or ``max_subsets`` of them drawn without replacement."""
    lo, hi = min(sample_range[0], n), min(sample_range[1], n)
    subsets = [s for size in range(max(lo, 1), hi + 1) for s in itertools.combinations(range(n), size)]
    if len(subsets) > max_subsets:
        gen = torch.Generator().manual_seed(int(seed))
        pick = torch.randperm(len(subsets), generator=gen)[:max_subsets].sort().values
        subsets = [subsets[i] for i in pick.tolist()]
    return subsets


def masks_on_grid(low_res: torch.Tensor, input_size: tuple[int, int], grid_size: int) -> torch.Tensor:
    """(P, 256, 256) low-res logits -> (P, G·G) bool: a cell is in when any part of it is FG.

    The crop of the padded 1024 frame holding the image is area-resized to the square G×G grid
    (the DINOv2 view of the target).
    """
    h, w = (max(1, round(s / 4)) for s in input_size)
    crop = (low_res[:, :h, :w] > 0).float()[:, None]
    return (F.adaptive_avg_pool2d(crop, grid_size)[:, 0] > 0).flatten(1)


def emd_scores(ref_fg: torch.Tensor, tgt: torch.Tensor, masks: torch.Tensor) -> torch.Tensor | None:
    """1 − EMD between unit reference FG tokens (Nf, D) and the mask tokens of each (P, Nt) grid
    mask (cost (1 − cos)/2, uniform weights); ``None`` when POT is not installed."""
    try:
        import ot
    except ImportError:
        if "pot" not in _WARNED:
            _WARNED.add("pot")
            log.info("POT is not installed (pip install pot): Matcher's EMD score is left out")
        return None
    cost = ((1.0 - ref_fg.float() @ tgt.float().T) / 2).cpu().double().numpy()
    out = torch.zeros(masks.shape[0])
    for p in range(masks.shape[0]):
        cols = masks[p].cpu().numpy()
        if cols.any():
            m = cost[:, cols]
            out[p] = 1.0 - float(ot.emd2(np.full(m.shape[0], 1.0 / m.shape[0]), np.full(m.shape[1], 1.0 / m.shape[1]), m))
    return out


def select_masks(purity: torch.Tensor, coverage: torch.Tensor, emd: torch.Tensor | None,
                 config: SegmenterConfig) -> torch.Tensor:
    """(P,) metrics of one class's masks -> (P,) bool, the masks entering the union."""
    p = purity.shape[0]
    e = torch.zeros(p) if emd is None else emd
    score = config.matcher_alpha * e + config.matcher_beta * purity * coverage ** config.matcher_exp
    alive = torch.ones(p, dtype=torch.bool)
    for values, thr in ((coverage, config.matcher_coverage_filter), (emd, config.matcher_emd_filter),
                        (purity, config.matcher_purity_filter)):
        if values is None or thr <= 0 or not bool(alive.any()):
            continue
        alive &= values >= min(thr, float(values[alive].max()))
    idx = alive.nonzero().flatten()
    idx = idx[torch.sort(score[idx], descending=True, stable=True).indices][:config.matcher_merge]
    keep = torch.zeros(p, dtype=torch.bool)
    if idx.numel() == 0:
        return keep
    best = float(score[idx[0]])
    chosen = idx[score[idx] >= config.matcher_score_threshold * best] if best > 0 else idx[:1]
    keep[chosen] = True
    keep[idx[0]] = True
    return keep


# ------------------------------------------------------------------------------- method interface
@dataclass
class MatcherState:
    """Unit pooled reference tokens (Nr, D) and per class its (Nr,) FG membership."""

    classes: list[int]
    tokens: torch.Tensor
    fg: torch.Tensor  # (C, Nr) bool


def prepare(refs: ReferenceSet, backend, config: SegmenterConfig) -> MatcherState:
    g = config.grid_size
    tokens = F.normalize(torch.cat([patch_tokens(t, g) for t in refs.tokens]).float(), dim=-1)
    return MatcherState(list(refs.classes), tokens, (refs.labels == FG).to(tokens.device))


def segment_chunk(state: MatcherState, targets: list[PreparedTarget], backend, config: SegmenterConfig, timer
                  ) -> list[TargetOutput]:
    """Matcher on a chunk of targets (see the module docstring)."""
    from refseg.kernels import kmeans

    g, b, c = config.grid_size, len(targets), len(state.classes)
    with timer("dinov2"):
        tokens = backend.encode_dinov2(dinov2_inputs(targets, backend, config))
        tgt = F.normalize(patch_tokens(tokens, g).float(), dim=-1)
    with timer("matching"):
        matched = []  # per (target, class): matched target cells after the halving
        for i in range(b):
            for j in range(c):
                _, t_idx, sim = hungarian_matches(state.tokens, tgt[i], state.fg[j])
                matched.append(t_idx[keep_better_half(sim, config.matcher_keep_half_above)].unique())
    with timer("prompts"):
        n = max(len(m) for m in matched)
        pts = torch.zeros(b * c, n, 2)
        sizes = torch.as_tensor([t.size for t in targets], dtype=torch.int64)
        for p, m in enumerate(matched):
            pts[p, :len(m)] = cells_to_pixels(m, g, config.image_size, tuple(sizes[p // c].tolist())).float()
        counts = torch.as_tensor([len(m) for m in matched], dtype=torch.int64)
        centres, _, _ = kmeans(pts, counts, config.matcher_centres, iters=config.kmeans_iters,
                               seed=config.kmeans_seed, init="k-means++")
        centres = centres.cpu()
        target_sets = []
        for i in range(b):
            points, owner = [], []
            for j in range(c):
                cen = centres[i * c + j]
                cen = cen[~torch.isnan(cen).any(-1)]
                for subset in sample_subsets(len(cen), config.matcher_sample_range,
                                             config.matcher_max_subsets, config.kmeans_seed):
                    points.append(cen[list(subset)])
                    owner.append(j)
            target_sets.append(PromptSets.from_lists(points, [torch.ones(len(q), dtype=torch.int64)
                                                              for q in points], owner) if points else None)
    with timer("sam_encoder"):
        embeddings = backend.encode_sam(sam_inputs(targets, backend, config))
    outputs = []
    for i in range(b):
        def keep(sets: PromptSets, decoded: DecodedSets, i=i) -> torch.Tensor:
            grid = masks_on_grid(decoded.low_res, targets[i].sam_input_size, g).cpu()
            chosen = torch.zeros(len(sets), dtype=torch.bool)
            for j in range(c):
                rows = (sets.owner == j).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                inside = torch.zeros(g * g, dtype=torch.bool)
                inside[matched[i * c + j]] = True
                mg = grid[rows]
                hits = (mg & inside).sum(-1).float()
                purity = hits / mg.sum(-1).clamp(min=1).float()
                coverage = hits / max(int(inside.sum()), 1)
                emd = emd_scores(state.tokens[state.fg[j]], tgt[i], mg)
                chosen[rows] = select_masks(purity, coverage, emd, config)
            return chosen

        outputs.append(decode_target_sets(backend, config, embeddings[i], target_sets[i], state.classes,
                                          targets[i].sam_input_size, targets[i].size, timer, keep=keep))
    return outputs
