"""Uncertainty-aware Top-K point prompts (docs/algorithm.md §4, AutoPromptSeg's prompt generator).

For every target, class and *view* v — one view per reference and, with ``topk_flip``, its
horizontally flipped twin (test-time augmentation: the target is flipped, encoded, and the token grid
flipped back) — a FG probability p_v on the G×G grid is computed, either from ProtoSAM's prototypes
of that reference (``topk_confidence="prototype"``) or from nearest-neighbour similarity
(``"similarity"``: sigmoid(``proto_scale`` · (max cos to reference FG − max cos to reference BG))).
Mean m = mean_v p_v is the confidence, u = std_v p_v the uncertainty (disagreement). Scores:
FG = m − w·u where m > 0.5, BG = (1 − m) − w·u where m < 0.5 (w = ``topk_uncertainty_weight``).
Max-pool non-maximum suppression (window ``topk_nms_kernel``) keeps local maxima; the ``topk_k``
best FG peaks are positives and the ``topk_neg_k`` best BG peaks negatives, at their cell centres.
Volumes run the preset slice by slice (no 3-D suppression across slices).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refseg.config import SegmenterConfig
from refseg.pipeline.decode import decode_batch
from refseg.pipeline.features import dinov2_batch
from refseg.pipeline.inputs import PreparedTarget, sam_inputs
from refseg.pipeline.grid import FG, cells_to_pixels
from refseg.pipeline.methods import ReferenceSet, TargetOutput, patch_tokens
from refseg.pipeline.prompts import PromptBatch
from refseg.pipeline.prototypes import Prototypes, build_prototypes, fg_scores, grid_mask


def nms_2d(score: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Local maxima of (..., H, W) scores under a ``kernel``×``kernel`` max-pool (odd), as bool.

    A cell is kept when it equals the maximum of its window (plateaus keep all their cells;
    :func:`top_peaks` then orders them by index).
    """
    if kernel % 2 == 0 or kernel < 1:
        raise ValueError(f"nms_2d: kernel={kernel} must be odd and >= 1")
    shape = score.shape
    x = score.reshape(-1, 1, *shape[-2:]).float()
    return (x == F.max_pool2d(x, kernel, stride=1, padding=kernel // 2)).reshape(shape)


def top_peaks(score: torch.Tensor, keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest kept entries of flat (..., N) scores.

    Returns:
        indices (..., k) int64 and valid (..., k) bool (False where fewer than k entries are kept);
        ties are broken by the lower index.
    """
    n = score.shape[-1]
    key = torch.where(keep, score.float(), torch.full_like(score, float("-inf"), dtype=torch.float32))
    # A stable descending sort keeps equal scores in index order.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :min(k, n)]
    valid = torch.gather(keep, -1, order)
    if k > n:
        pad = k - n
        order = torch.cat([order, order.new_zeros(*order.shape[:-1], pad)], -1)
        valid = torch.cat([valid, valid.new_zeros(*valid.shape[:-1], pad)], -1)
    return order, valid


def confidence_and_uncertainty(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, ...) per-view FG probabilities -> (mean, std) over views (std 0 for a single view)."""
    mean = views.mean(0)
    std = views.std(0, unbiased=False) if views.shape[0] > 1 else torch.zeros_like(mean)
    return mean, std


def select_points(mean: torch.Tensor, std: torch.Tensor, config: SegmenterConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., G, G) confidence / uncertainty -> Top-K FG and BG cells after max-pool NMS.

    Returns:
        (pos_idx (..., K), pos_valid, neg_idx (..., K_neg), neg_valid), flat cell indices; with
        ``config.fallback`` a map without any FG peak keeps its most confident cell as positive.
    """
    w = config.topk_uncertainty_weight
    fg = mean - w * std
    bg = (1.0 - mean) - w * std
    flat = lambda t: t.flatten(-2)  # noqa: E731
    keep_fg = flat(nms_2d(fg, config.topk_nms_kernel) & (mean > 0.5))
    keep_bg = flat(nms_2d(bg, config.topk_nms_kernel) & (mean < 0.5))
    pos, pos_ok = top_peaks(flat(fg), keep_fg, config.topk_k)
    if config.fallback:
        none = ~pos_ok.any(-1)
        pos[..., 0] = torch.where(none, flat(mean).argmax(-1), pos[..., 0])
        pos_ok[..., 0] |= none
    if config.topk_neg_k == 0:
        neg = pos.new_zeros(*pos.shape[:-1], 0)
        return pos, pos_ok, neg, neg.bool()
    neg, neg_ok = top_peaks(flat(bg), keep_bg, config.topk_neg_k)
    return pos, pos_ok, neg, neg_ok


# ------------------------------------------------------------------------------- method interface
@dataclass
class TopKState:
    """Per reference r: ``prototypes[r][j]`` of class j, and for the similarity confidence its
    unit tokens (T, D) with ``labels[r]`` (C, T) grid labels."""

    classes: list[int]
    prototypes: list[list[Prototypes]]
    tokens: list[torch.Tensor]
    labels: list[torch.Tensor]


def prepare(refs: ReferenceSet, backend, config: SegmenterConfig) -> TopKState:
    g = config.grid_size
    protos, toks, labels = [], [], []
    for r, (tok, mask) in enumerate(zip(refs.tokens, refs.masks)):
        tok = patch_tokens(tok, g)
        protos.append([build_prototypes(tok, grid_mask(mask == c, g), config.proto_threshold)
                       for c in refs.classes])
        toks.append(F.normalize(tok.float(), dim=-1))
        labels.append(refs.labels[:, r * g * g:(r + 1) * g * g])
    return TopKState(list(refs.classes), protos, toks, labels)


def view_probabilities(state: TopKState, tokens: torch.Tensor, config: SegmenterConfig) -> torch.Tensor:
    """(B, N, D) target tokens of one view -> (R, B, C, N) FG probability per reference."""
    out = []
    for r, protos in enumerate(state.prototypes):
        if config.topk_confidence == "prototype":
            s = torch.stack([fg_scores(tokens, p.to(tokens.device), config.proto_scale) for p in protos], 1)
        else:
            sim = F.normalize(tokens.float(), dim=-1) @ state.tokens[r].to(tokens.device).T  # (B, N, T)
            lab = state.labels[r].to(tokens.device)
            cols = []
            for j in range(len(protos)):
                fg = torch.where(lab[j] == FG, sim, torch.full_like(sim, -2.0)).amax(-1)
                bg = torch.where(lab[j] == 0, sim, torch.full_like(sim, -2.0)).amax(-1)
                cols.append(config.proto_scale * (fg - bg))
            s = torch.stack(cols, 1)
        out.append(torch.sigmoid(s))
    return torch.stack(out)


def segment_chunk(state: TopKState, targets: list[PreparedTarget], backend, config: SegmenterConfig, timer
                  ) -> list[TargetOutput]:
    """Top-K prompts on a chunk of targets; all prompt sets of the chunk in one decoder call."""
    rgbs = [t.rgb for t in targets]
    g, b, c = config.grid_size, len(rgbs), len(state.classes)
    views_in = rgbs + ([np.ascontiguousarray(im[:, ::-1]) for im in rgbs] if config.topk_flip else [])
    with timer("dinov2"):
        tokens = patch_tokens(backend.encode_dinov2(dinov2_batch(views_in, config.image_size)), g)
    with timer("prompts"):
        views = [view_probabilities(state, tokens[:b], config)]
        if config.topk_flip:
            flipped = view_probabilities(state, tokens[b:], config)
            views.append(flipped.reshape(*flipped.shape[:-1], g, g).flip(-1).flatten(-2))
        stack = torch.cat(views).reshape(-1, b, c, g, g)          # (V, B, C, G, G)
        mean, std = confidence_and_uncertainty(stack)
        pos, pos_ok, neg, neg_ok = select_points(mean, std, config)
        sizes = torch.as_tensor([im.shape[:2] for im in rgbs], dtype=torch.int64).repeat_interleave(c, 0)
        pos_px = cells_to_pixels(pos.reshape(b * c, -1).cpu(), g, config.image_size, sizes).float()
        neg_px = cells_to_pixels(neg.reshape(b * c, -1).cpu(), g, config.image_size, sizes).float()
        prompts = _assemble(pos_px, pos_ok.reshape(b * c, -1).cpu(), neg_px, neg_ok.reshape(b * c, -1).cpu(),
                            config.use_box)
    with timer("sam_encoder"):
        embeddings = backend.encode_sam(sam_inputs(targets, backend, config))
    with timer("decoder"):
        decoded = decode_batch(backend, embeddings, prompts, c,
                               [t.sam_input_size for t in targets], [t.size for t in targets], config)
    outputs = []
    for i in range(b):
        rows = list(range(i * c, (i + 1) * c))
        out = TargetOutput(decoded[i])
        for j, cls in enumerate(state.classes):
            out.points[cls], out.labels[cls] = prompts.prompt(rows[j])
            box = None if prompts.boxes is None else prompts.boxes[rows[j]].numpy()
            out.boxes[cls] = None if box is None or np.isnan(box).any() else box
        outputs.append(out)
    return outputs


def _assemble(pos: torch.Tensor, pos_ok: torch.Tensor, neg: torch.Tensor, neg_ok: torch.Tensor,
              use_box: bool) -> PromptBatch:
    """Padded positives-then-negatives :class:`PromptBatch` (box = positives' extent)."""
    p = pos.shape[0]
    n = (pos_ok.sum(-1) + neg_ok.sum(-1)).to(torch.int64)
    m = max(int(n.max()) if p else 0, 1)
    points = torch.zeros(p, m, 2)
    labels = torch.full((p, m), -1, dtype=torch.int64)
    boxes = torch.full((p, 4), float("nan")) if use_box else None
    for i in range(p):
        a, z = pos[i][pos_ok[i]], neg[i][neg_ok[i]]
        points[i, :len(a)], labels[i, :len(a)] = a, 1
        points[i, len(a):len(a) + len(z)], labels[i, len(a):len(a) + len(z)] = z, 0
        if use_box and len(a):
            boxes[i] = torch.cat([a.amin(0), a.amax(0)])
    return PromptBatch(points, labels, n, boxes)
