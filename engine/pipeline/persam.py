"""PerSAM, training-free (docs/algorithm.md §5): SAM-feature prototype -> two points -> cascade.

1. Reference: the SAM image embedding (256, 64, 64) of the reference; its mask is mapped into SAM's
   frame like the image (resized to the (h, w) input region of the 1024² input, zero padding),
   bilinearly reduced to 64×64 and thresholded > 0; the prototype is the mean embedding over
   those cells (n references: over all of their cells), L2-normalised.
2. Target: cosine between the prototype and every L2-normalised embedding cell, upsampled to the
   target frame like mask logits; the argmax is the positive point, the argmin the negative.
3. Cascade (the paper's post-refinement): (a) points, single-mask output; (b) points + the mask
   prompt (a)'s low-res logits, multimask, highest predicted IoU kept; (c) points + (b)'s logits +
   the box around (b)'s mask, multimask, highest IoU kept. ``persam_refinements`` = 0 / 1 / 2 stops
   after (a) / (b) / (c). Every step decodes all classes of a target in one call. A class whose (b)
   mask is empty keeps (b)'s result (no box to give).
Target-guided attention and target semantic prompting (PerSAM's decoder changes) are not used.

With SAM 2 the prototype comes from the stride-16 ``image_embed`` of its :class:`~refseg.models.sam2.Sam2Embedding`
(S/16 cells of its stretched S x S input: no padding), references are prepared as SAM 2 prepares images, and
maps and masks reach the target's frame in one bilinear step (:func:`refseg.pipeline.decode.upsample`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refseg.config import SegmenterConfig
from refseg.models import sam2_transforms
from refseg.models.sam2 import Sam2Embedding
from refseg.models.sam_transforms import prepare_images, preprocessing_for
from refseg.pipeline.decode import DecodedTarget, upsample
from refseg.pipeline.inputs import PreparedTarget, sam_inputs
from refseg.pipeline.methods import ReferenceSet, TargetOutput, decode_prompt_sets
from refseg.pipeline.prompt_sets import PromptSets

SAM_SIDE = 1024


def mask_to_embedding_grid(mask: np.ndarray, input_size: tuple[int, int], grid: int = 64,
                           side: int = SAM_SIDE) -> torch.Tensor:
    """(H, W) bool mask -> (grid, grid) bool cells of the SAM embedding it covers.

    The mask is bilinearly resized to ``input_size`` (h, w) inside the zero-padded side² frame (1024²;
    SAM 2: (h, w) = (side, side), no padding), then bilinearly to ``grid``² and thresholded > 0. An
    empty result keeps the cell of its maximum.
    """
    h, w = input_size
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, (h, w), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, side - w, 0, side - h))
    m = F.interpolate(m, (grid, grid), mode="bilinear", align_corners=False)[0, 0]
    out = m > 0
    if not bool(out.any()):
        out.view(-1)[int(m.argmax())] = True
    return out


def prototype(embeddings: list[torch.Tensor], cells: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the (256,) embedding vectors over the selected cells of all references, unit norm.

    embeddings: (256, 64, 64) each; cells: (64, 64) bool each.
    """
    feats = torch.cat([e.flatten(1).T[c.flatten().to(e.device)] for e, c in zip(embeddings, cells)])
    return F.normalize(feats.float().mean(0), dim=0)


def stride16_features(embedding: torch.Tensor | Sam2Embedding) -> torch.Tensor:
    """The (256, h, w) map the prototype lives in: SAM's embedding, SAM 2's ``image_embed``."""
    return embedding.image_embed if isinstance(embedding, Sam2Embedding) else embedding


def cosine_map(prototypes: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """(C, 256) unit prototypes, (256, 64, 64) embedding -> (C, 64, 64) cosine similarity."""
    feats = F.normalize(embedding.float().flatten(1), dim=0)
    return (prototypes.to(feats.device).float() @ feats).reshape(-1, *embedding.shape[-2:])


def select_points(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) similarity in the target frame -> positive (C, 2) argmax and negative (C, 2) argmin,
    (x, y) pixels (first occurrence in raster order on ties)."""
    w = sim.shape[-1]
    flat = sim.flatten(1)

    def xy(i: torch.Tensor) -> torch.Tensor:
        return torch.stack([i % w, torch.div(i, w, rounding_mode="floor")], -1).float()

    return xy(flat.argmax(1)), xy(flat.argmin(1))


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) bool -> (C, 4) float32 (x0, y0, x1, y1) inclusive pixel boxes and (C,) non-empty."""
    c, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device).float()
    ar_w = torch.arange(w, device=masks.device).float()
    inf = torch.tensor(float("inf"), device=masks.device)
    x0 = torch.where(cols, ar_w, inf).amin(1)
    x1 = torch.where(cols, ar_w, -inf).amax(1)
    y0 = torch.where(rows, ar_h, inf).amin(1)
    y1 = torch.where(rows, ar_h, -inf).amax(1)
    ok = cols.any(1)
    box = torch.stack([x0, y0, x1, y1], -1)
    return torch.where(ok[:, None], box, torch.zeros_like(box)), ok


@dataclass
class CascadeResult:
    """Final low-res logits (C, h, w), IoU (C,), boxes (C, 4) used in the last step (NaN rows
    where none), and ``steps``: the name of every decoder call, in order."""

    low_res: torch.Tensor
    iou: torch.Tensor
    boxes: torch.Tensor
    steps: list[str]


def cascade(backend, embedding: torch.Tensor, sets: PromptSets, input_size: tuple[int, int],
            original_size: tuple[int, int], refinements: int = 2,
            config: SegmenterConfig | None = None) -> CascadeResult:
    """PerSAM's decoding: points -> + mask prompt -> + mask prompt and box (see module docstring).
    ``config`` says how masks reach the target's frame for the box (:func:`~.decode.upsample`; None: SAM's)."""
    c = len(sets)
    steps = ["points"]
    first = decode_prompt_sets(backend, embedding, sets, input_size, original_size, multimask=False)
    low, iou = first.low_res, first.iou
    boxes = torch.full((c, 4), float("nan"))
    if refinements >= 1:
        steps.append("mask")
        second = decode_prompt_sets(backend, embedding, sets, input_size, original_size, multimask=True,
                                    mask_input=low[:, None])
        low, iou = second.low_res, second.iou
    if refinements >= 2:
        masks = upsample(backend, config, low, input_size, original_size) > 0
        box, ok = mask_boxes(masks)
        steps.append("mask+box")
        boxed = PromptSets(sets.points, sets.labels, sets.owner, box.cpu())
        third = decode_prompt_sets(backend, embedding, boxed, input_size, original_size, multimask=True,
                                   mask_input=low[:, None])
        okd = ok.to(low.device)
        low = torch.where(okd[:, None, None], third.low_res, low)
        iou = torch.where(okd, third.iou, iou)
        boxes = torch.where(ok.cpu()[:, None], box.cpu(), boxes)
    return CascadeResult(low, iou, boxes, steps)


# ------------------------------------------------------------------------------- method interface
@dataclass
class PerSAMState:
    classes: list[int]
    prototypes: torch.Tensor  # (C, 256) unit


def prepare(refs: ReferenceSet, backend, config: SegmenterConfig) -> PerSAMState:
    """Encode every reference with SAM once and build one prototype per class."""
    side = backend.sam_size
    if preprocessing_for(config.sam) == "sam2":
        prepared = sam2_transforms.prepare_images(refs.rgbs, side)
    else:
        prepared = prepare_images(refs.rgbs, side)
    embeddings = backend.encode_sam(prepared.pixels)
    grid = stride16_features(embeddings[0]).shape[-1]
    protos = []
    for c in refs.classes:
        pairs = [(stride16_features(embeddings[r]),
                  mask_to_embedding_grid(refs.masks[r] == c, prepared.input_sizes[r], grid, side))
                 for r in range(len(refs.rgbs)) if bool((refs.masks[r] == c).any())]
        protos.append(prototype([e for e, _ in pairs], [m for _, m in pairs]))
    return PerSAMState(list(refs.classes), torch.stack(protos))


def segment_chunk(state: PerSAMState, targets: list[PreparedTarget], backend, config: SegmenterConfig, timer
                  ) -> list[TargetOutput]:
    """PerSAM on a chunk of targets (one SAM encoder call for the chunk)."""
    with timer("sam_encoder"):
        embeddings = backend.encode_sam(sam_inputs(targets, backend, config))
    outputs = []
    c = len(state.classes)
    for i, target in enumerate(targets):
        size, inp = target.size, target.sam_input_size
        with timer("prompts"):
            sim = upsample(backend, config, cosine_map(state.prototypes, stride16_features(embeddings[i])), inp, size)
            pos, neg = select_points(sim)
            sets = PromptSets(torch.stack([pos, neg], 1).cpu(),
                              torch.tensor([[1, 0]] * c, dtype=torch.int64), torch.arange(c))
        with timer("decoder"):
            res = cascade(backend, embeddings[i], sets, inp, size, config.persam_refinements, config)
            logits = upsample(backend, config, res.low_res, inp, size)
        out = TargetOutput(DecodedTarget(logits, res.iou))
        for j, cls in enumerate(state.classes):
            out.points[cls] = sets.points[j].numpy().astype(np.float32)
            out.labels[cls] = sets.labels[j].numpy()
            box = res.boxes[j]
            out.boxes[cls] = None if bool(torch.isnan(box).any()) else box.numpy().astype(np.float32)
        outputs.append(out)
    return outputs
