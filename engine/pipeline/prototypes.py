"""ProtoSAM (docs/algorithm.md §3): prototypes on DINOv2 tokens -> coarse mask -> component prompts.

1. The reference mask of each class is nearest-resized to the G×G token grid (G = S / 14).
2. Local prototypes: 2×2 average-pooled reference features where the 2×2 average of the grid mask
   is ≥ ``proto_threshold`` (FG), and likewise where the background share is ≥ it (BG); plus one
   global masked-average FG prototype. All L2-normalised; n references pool their prototypes.
3. Per target token and prototype set: s_k = ``proto_scale`` · cosine, score = Σ_k softmax(s)_k s_k;
   FG probability = softmax(score_BG, score_FG)_FG, bilinearly upsampled (as scores) to S×S.
4. Coarse mask = probability > 0.5; per 8-connected component (all, the largest, or the most
   confident one) the most confident FG pixel and the centroid are positives, the component's
   bounding box the box; all components of all classes decoded in one call; union per class.

Volumes run slice by slice; which reference slice serves which target slice (the chunked protocol of
SSL-ALPNet / ProtoSAM) is :func:`refseg.jobs.volume_plan.support_slice`.
Coordinates: S-space pixels (x, y) on the S×S DINOv2 input, mapped to target pixels as
``x_t = (x_s + 0.5) · W / S − 0.5`` (centres of pixels), boxes by their pixel edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refseg.config import SegmenterConfig
from refseg.pipeline.grid import resize_binary_mask
from refseg.pipeline.inputs import PreparedTarget, dinov2_inputs, sam_inputs
from refseg.pipeline.methods import ReferenceSet, TargetOutput, decode_target_sets, patch_tokens
from refseg.pipeline.postprocess import label_components
from refseg.pipeline.prompt_sets import PromptSets


@dataclass
class Prototypes:
    """L2-normalised prototypes of one class: ``fg`` (Kf, D) (locals first, global last), ``bg`` (Kb, D)."""

    fg: torch.Tensor
    bg: torch.Tensor

    def to(self, device: torch.device | str) -> "Prototypes":
        return Prototypes(self.fg.to(device), self.bg.to(device))


@dataclass
class ProtoState:
    """Reference-side state: the class values and one :class:`Prototypes` per class."""

    classes: list[int]
    prototypes: list[Prototypes]


def grid_mask(mask: np.ndarray, grid_size: int) -> torch.Tensor:
    """(H, W) bool mask -> (G, G) bool, nearest-resized to the token grid."""
    return torch.from_numpy(resize_binary_mask(mask, grid_size, resample="nearest").copy())


def build_prototypes(tokens: torch.Tensor, fg: torch.Tensor, threshold: float = 0.95) -> Prototypes:
    """Adaptive local prototypes plus the global FG prototype of one reference and class.

    Args:
        tokens: (G·G, D) float reference tokens, row-major grid.
        fg: (G, G) bool grid mask of the class (True = FG).
        threshold: pooled-mask share making a 2×2 cell a local prototype of FG (or of BG).

    Returns:
        :class:`Prototypes`; the global FG prototype is always present, BG falls back to the global
        BG mean when no 2×2 cell is pure enough (and is empty only when nothing is background).
    """
    g = fg.shape[0]
    if tokens.shape[0] != g * g:
        raise ValueError(f"build_prototypes: {tokens.shape[0]} tokens for a {g}x{g} grid mask")
    feats = tokens.float().T.reshape(1, -1, g, g)
    fgf = fg.to(tokens.device, torch.float32)[None, None]
    pooled = F.avg_pool2d(feats, 2)[0].flatten(1).T          # (g/2 · g/2, D)
    share = F.avg_pool2d(fgf, 2).flatten()                   # FG share of each 2×2 cell
    flat_fg = fg.flatten().to(tokens.device)
    protos_fg = [pooled[share >= threshold]]
    if bool(flat_fg.any()):
        protos_fg.append(tokens.float()[flat_fg].mean(0, keepdim=True))
    bg = pooled[(1.0 - share) >= threshold]
    if bg.shape[0] == 0 and bool((~flat_fg).any()):
        bg = tokens.float()[~flat_fg].mean(0, keepdim=True)
    return Prototypes(F.normalize(torch.cat(protos_fg), dim=-1), F.normalize(bg, dim=-1))


def prototype_score(tokens: torch.Tensor, prototypes: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Softmax-weighted prototype score: (..., N, D) tokens, (K, D) unit prototypes -> (..., N).

    s_k = scale · cos(token, prototype_k); score = Σ_k softmax_k(s) · s_k.
    """
    s = scale * F.normalize(tokens.float(), dim=-1) @ prototypes.T
    return (torch.softmax(s, dim=-1) * s).sum(-1)


def fg_scores(tokens: torch.Tensor, protos: Prototypes, scale: float = 20.0) -> torch.Tensor:
    """(..., N, D) -> (..., N) FG-minus-BG score; sigmoid of it is the FG-vs-BG softmax probability."""
    fg = prototype_score(tokens, protos.fg, scale)
    if protos.bg.shape[0] == 0:
        return fg
    return fg - prototype_score(tokens, protos.bg, scale)


@dataclass
class Components:
    """Prompts of the K components of a coarse mask, S-space pixels (x, y).

    peak: (K, 2) most confident pixel; centroid: (K, 2) mean pixel; box: (K, 4) (x0, y0, x1, y1)
    pixel-edge box; size: (K,) pixels; confidence: (K,) peak probability.
    """

    peak: torch.Tensor
    centroid: torch.Tensor
    box: torch.Tensor
    size: torch.Tensor
    confidence: torch.Tensor


def component_prompts(prob: torch.Tensor, mode: str = "all", threshold: float = 0.5) -> Components:
    """Components of ``prob > threshold`` (8-connected) and their point / box prompts.

    Args:
        prob: (H, W) FG probability.
        mode: ``all`` components, the ``largest`` (most pixels) or the most ``confident`` (highest
            peak probability; ties: the first in raster order).
    """
    h, w = prob.shape
    labels, sizes = label_components(prob > threshold, connectivity=8)
    k = int(sizes.numel())
    if k == 0:
        z = torch.zeros(0, 2, dtype=torch.float32)
        return Components(z, z.clone(), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    flat = labels.flatten()
    on = (flat > 0).nonzero().flatten()
    comp = flat[on] - 1
    p = prob.flatten()[on].float()
    ys = torch.div(on, w, rounding_mode="floor").float()
    xs = (on % w).float()
    peak_val = torch.full((k,), -1.0).scatter_reduce(0, comp, p, reduce="amax")
    is_peak = p == peak_val[comp]
    big = torch.iinfo(torch.int64).max
    first = torch.full((k,), big, dtype=torch.int64).scatter_reduce(
        0, comp, torch.where(is_peak, on, torch.full_like(on, big)), reduce="amin")
    peak = torch.stack([(first % w).float(), torch.div(first, w, rounding_mode="floor").float()], -1)
    count = sizes.float()
    centroid = torch.stack([torch.zeros(k).index_add(0, comp, xs) / count,
                            torch.zeros(k).index_add(0, comp, ys) / count], -1)
    inf = float("inf")
    x0 = torch.full((k,), inf).scatter_reduce(0, comp, xs, reduce="amin")
    y0 = torch.full((k,), inf).scatter_reduce(0, comp, ys, reduce="amin")
    x1 = torch.full((k,), -inf).scatter_reduce(0, comp, xs, reduce="amax")
    y1 = torch.full((k,), -inf).scatter_reduce(0, comp, ys, reduce="amax")
    box = torch.stack([x0, y0, x1 + 1, y1 + 1], -1)  # pixel edges
    out = Components(peak, centroid, box, sizes, peak_val)
    if mode == "all":
        return out
    if mode not in ("largest", "confident"):
        raise ValueError(f"component mode {mode!r} is not one of all, largest, confident")
    i = int(torch.argmax(sizes if mode == "largest" else peak_val))
    return Components(peak[i:i + 1], centroid[i:i + 1], box[i:i + 1], sizes[i:i + 1], peak_val[i:i + 1])


def to_target_pixels(points: torch.Tensor, size: int, original_size: tuple[int, int]) -> torch.Tensor:
    """(..., 2) S-space pixel centres (x, y) -> target pixel centres, (x + 0.5)·W/S − 0.5."""
    h, w = original_size
    scale = torch.tensor([w / size, h / size], dtype=torch.float32)
    return (points.float() + 0.5) * scale - 0.5


def box_to_target(boxes: torch.Tensor, size: int, original_size: tuple[int, int]) -> torch.Tensor:
    """(..., 4) S-space pixel-edge boxes -> target (x0, y0, x1, y1) with x1/y1 the last pixel inside."""
    h, w = original_size
    scale = torch.tensor([w / size, h / size, w / size, h / size], dtype=torch.float32)
    out = boxes.float() * scale
    out[..., 2:] -= 1.0
    return torch.maximum(out, out.new_zeros(()))


# ------------------------------------------------------------------------------- method interface
def prepare(refs: ReferenceSet, backend, config: SegmenterConfig) -> ProtoState:
    """One :class:`Prototypes` per class (in ``refs.classes`` order), pooled over the references."""
    g = config.grid_size
    out = []
    for c in refs.classes:
        parts = [build_prototypes(patch_tokens(tok, g), grid_mask(mask == c, g), config.proto_threshold)
                 for tok, mask in zip(refs.tokens, refs.masks) if bool((mask == c).any())]
        out.append(Prototypes(torch.cat([p.fg for p in parts]), torch.cat([p.bg for p in parts])))
    return ProtoState(list(refs.classes), out)


def target_sets(probs: list[torch.Tensor], config: SegmenterConfig, original_size: tuple[int, int]
                ) -> PromptSets | None:
    """Prompt sets (two positives + box per component) of one target from its per-class S×S
    probabilities; ``None`` when no class has a component (and ``config.fallback`` is off)."""
    s = config.image_size
    pts, labs, owner, boxes = [], [], [], []
    for j, prob in enumerate(probs):
        comps = component_prompts(prob, config.proto_components)
        peak, centroid, box = comps.peak, comps.centroid, comps.box
        if peak.shape[0] == 0 and config.fallback:  # no pixel above 0.5: the most confident patch
            i = int(prob.argmax())
            y, x = divmod(i, s)
            peak = centroid = torch.tensor([[float(x), float(y)]])
            half = 7.0
            box = torch.tensor([[max(0.0, x - half), max(0.0, y - half), min(s, x + half + 1), min(s, y + half + 1)]])
        for k in range(peak.shape[0]):
            pts.append(to_target_pixels(torch.stack([peak[k], centroid[k]]), s, original_size))
            labs.append(torch.ones(2, dtype=torch.int64))
            owner.append(j)
            boxes.append(box_to_target(box[k], s, original_size))
    return PromptSets.from_lists(pts, labs, owner, boxes) if pts else None


def probabilities(state: ProtoState, tokens: torch.Tensor, config: SegmenterConfig) -> torch.Tensor:
    """(B, G·G, D) target tokens -> (B, C, S, S) FG probabilities, one map per class."""
    g, s = config.grid_size, config.image_size
    scores = torch.stack([fg_scores(tokens, p.to(tokens.device), config.proto_scale)
                          for p in state.prototypes], 1)  # (B, C, N)
    up = F.interpolate(scores.reshape(-1, 1, g, g).float(), (s, s), mode="bilinear", align_corners=False)
    return torch.sigmoid(up).reshape(tokens.shape[0], len(state.prototypes), s, s)


def segment_chunk(state: ProtoState, targets: list[PreparedTarget], backend, config: SegmenterConfig, timer
                  ) -> list[TargetOutput]:
    """ProtoSAM on a chunk of targets (see :mod:`refseg.pipeline.methods`)."""
    with timer("dinov2"):
        tokens = backend.encode_dinov2(dinov2_inputs(targets, backend, config))
        tokens = patch_tokens(tokens, config.grid_size)
    with timer("prompts"):
        probs = probabilities(state, tokens, config).cpu()
        sets = [target_sets(list(probs[b]), config, t.size) for b, t in enumerate(targets)]
    with timer("sam_encoder"):
        embeddings = backend.encode_sam(sam_inputs(targets, backend, config))
    return [decode_target_sets(backend, config, embeddings[b], sets[b], state.classes, t.sam_input_size, t.size,
                               timer) for b, t in enumerate(targets)]
