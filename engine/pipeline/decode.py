"""Stage 4: prompts -> SAM masks -> label map in the target's original geometry.

One SAM encode per target. Each target's prompt sets (one per class) are padded with SAM's "not a
point" label −1 to the longest set *of that target* — exactly what one decoder call per target
gives, and for a single class exactly the official predictor's input. :func:`decode_batch` then
decodes the prompt sets of ALL targets of a batch in ONE decoder call: sets are padded further to
the longest set of the batch, and that extra padding is masked out of the decoder's attention
(``point_mask``), so every set decodes to the same numbers as in its own per-target call (tested).
Backends without a batched decoder (the exported graphs) get one call per target. With
``multimask_output`` the mask of highest predicted IoU is kept per set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.models.sam_transforms import postprocess_masks, preprocessing_for, resize_boxes, resize_coords
from refseg.pipeline.postprocess import clean_mask
from refseg.pipeline.prompts import PromptBatch


@dataclass
class DecodedTarget:
    """SAM output for the C classes of one target.

    logits: (C, H, W) float32 mask logits in the original frame (−inf for classes without prompt);
    iou: (C,) float32 predicted IoU of the chosen masks (0 for classes without prompt).
    """

    logits: torch.Tensor
    iou: torch.Tensor


def decode_target(backend, embedding: torch.Tensor, prompts: PromptBatch, rows: list[int],
                  input_size: tuple[int, int], original_size: tuple[int, int],
                  config: SegmenterConfig) -> DecodedTarget:
    """Decode the prompt sets ``rows`` of ``prompts`` (one per class) against one embedding.

    Args:
        backend: a runtime backend (``decode`` as in :mod:`refseg.runtime.torch_backend`).
        embedding: (256, 64, 64) SAM image embedding of the target.
        prompts: points in target pixels (x, y).
        rows: indices into ``prompts`` of this target's sets, in class order.
        input_size: (h, w) of the resized target inside SAM's 1024² input.
        original_size: (H, W) of the target.
    """
    h, w = original_size
    side = getattr(backend, "sam_size", 1024)
    rows_t = torch.as_tensor(rows, dtype=torch.int64, device=prompts.num_points.device)
    counts = prompts.num_points[rows_t]
    live = (counts > 0).nonzero().flatten()
    if live.numel() == 0:
        return DecodedTarget(torch.full((len(rows), h, w), float("-inf")), torch.zeros(len(rows)))
    sel = rows_t[live]
    m = int(counts[live].max())
    coords = resize_coords(prompts.points[sel, :m].double(), original_size, input_size=input_size).float()
    labels = prompts.labels[sel, :m]
    boxes = None
    if config.use_box and prompts.boxes is not None:
        boxes = resize_boxes(prompts.boxes[sel].double(), original_size, input_size=input_size).float()
    low_res, scores = backend.decode(embedding, coords, labels, boxes, config.multimask_output)
    low_res, scores = low_res.float(), scores.float()  # stay on the backend's device
    dev = low_res.device
    pick = torch.arange(len(sel), device=dev)
    best = scores.argmax(dim=1)  # with single-mask output this is 0
    live = live.to(dev)
    logits = torch.full((len(rows), h, w), float("-inf"), device=dev)
    iou = torch.zeros(len(rows), device=dev)
    logits[live] = postprocess_masks(low_res[pick, best][:, None], input_size, original_size, side,
                                     direct=preprocessing_for(config.sam) == "medsam")[:, 0]
    iou[live] = scores[pick, best]
    return DecodedTarget(logits, iou)


def _input_scale(original_sizes: list[tuple[int, int]], input_sizes: list[tuple[int, int]],
                 device) -> torch.Tensor:
    """(T, 2) float64 (x, y) factors from each original (H, W) frame to its (h, w) inside SAM's input
    (SAM: longest side resized; MedSAM: stretched to the square)."""
    scale = [(nw / w, nh / h) for (h, w), (nh, nw) in zip(original_sizes, input_sizes)]
    return torch.tensor(scale, dtype=torch.float64, device=device)


def decode_batch(backend, embeddings: torch.Tensor, prompts: PromptBatch, num_classes: int,
                 input_sizes: list[tuple[int, int]], original_sizes: list[tuple[int, int]],
                 config: SegmenterConfig) -> list[DecodedTarget]:
    """Decode the prompt sets of T targets (C classes each) in one decoder call.

    Args:
        backend: a runtime backend; ``decode_batch`` is used when it has one, else one ``decode``
            call per target (:func:`decode_target`).
        embeddings: (T, 256, 64, 64) SAM image embeddings (64 = ``backend.sam_size`` / 16).
        prompts: T·C sets, target-major (set = t · C + c), points (x, y) in target pixels.
        input_sizes: per target (h, w) inside SAM's square input (``backend.sam_size``, 1024 for
            the released models); original_sizes: per target (H, W).

    Returns:
        One :class:`DecodedTarget` per target, identical to :func:`decode_target` on its own rows.
    """
    t_count = len(original_sizes)
    if not hasattr(backend, "decode_batch"):
        return [decode_target(backend, embeddings[t], prompts, list(range(t * num_classes, (t + 1) * num_classes)),
                              input_sizes[t], original_sizes[t], config) for t in range(t_count)]
    counts = prompts.num_points.tolist()  # the one host sync of the stage: shapes depend on it
    sel, own_len = [], []
    for t in range(t_count):
        rows = [r for r in range(t * num_classes, (t + 1) * num_classes) if counts[r] > 0]
        width = max((counts[r] for r in rows), default=0)  # the per-target padding of decode_target
        sel += rows
        own_len += [width] * len(rows)
    out = [DecodedTarget(torch.full((num_classes, h, w), float("-inf")), torch.zeros(num_classes))
           for h, w in original_sizes]
    if not sel:
        return out
    dev = prompts.points.device
    sel_t = torch.as_tensor(sel, dtype=torch.int64, device=dev)
    target = sel_t // num_classes
    m = max(own_len)
    side = getattr(backend, "sam_size", 1024)
    scale = _input_scale(original_sizes, input_sizes, dev)[target]  # (P, 2)
    coords = (prompts.points[sel_t, :m].double() * scale[:, None]).float()
    labels = prompts.labels[sel_t, :m]
    own = torch.as_tensor(own_len, device=dev)
    point_mask = None
    if min(own_len) < m:
        point_mask = torch.arange(m, device=dev)[None] < own[:, None]
    boxes = None
    if config.use_box and prompts.boxes is not None:
        boxes = (prompts.boxes[sel_t].double().view(-1, 2, 2) * scale[:, None]).float().view(-1, 4)
    low_res, scores = backend.decode_batch(embeddings, target, coords, labels, point_mask, boxes,
                                           config.multimask_output)
    low_res, scores = low_res.float(), scores.float()
    best = scores.argmax(dim=1)
    pick = torch.arange(len(sel), device=low_res.device)
    chosen, chosen_iou = low_res[pick, best], scores[pick, best]  # (P, 256, 256), (P,)
    direct = preprocessing_for(config.sam) == "medsam"  # MedSAM's one-step resize
    start = 0
    for t in range(t_count):
        n = sum(1 for r in sel if r // num_classes == t)
        if n == 0:
            continue
        h, w = original_sizes[t]
        live = torch.as_tensor([r - t * num_classes for r in sel[start:start + n]], device=low_res.device)
        logits = torch.full((num_classes, h, w), float("-inf"), device=low_res.device)
        iou = torch.zeros(num_classes, device=low_res.device)
        logits[live] = postprocess_masks(chosen[start:start + n, None], input_sizes[t], (h, w), side,
                                         direct=direct)[:, 0]
        iou[live] = chosen_iou[start:start + n]
        out[t] = DecodedTarget(logits, iou)
        start += n
    return out


def to_label_map(decoded: DecodedTarget, classes: list[int], config: SegmenterConfig
                 ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Threshold, clean and merge per-class logits into one label map.

    Where classes overlap, the class with the larger logit wins.

    Returns:
        (H, W) uint8 label map (class values; 0 background) and class -> (H, W) bool masks.
    """
    logits = decoded.logits
    masks = torch.stack([
        clean_mask(logits[i] > 0, keep_largest=config.keep_largest_contour,
                   min_component_fraction=config.min_component_fraction, holes=config.fill_holes)
        for i in range(len(classes))])
    scored = torch.where(masks, logits, torch.full((), float("-inf"), device=logits.device))
    winner = scored.argmax(dim=0)
    any_fg = masks.any(dim=0)
    values = torch.as_tensor(classes, dtype=torch.int64, device=logits.device)
    label_map = torch.where(any_fg, values[winner], 0).to(torch.uint8).cpu().numpy()  # one copy to host
    class_masks = {c: label_map == c for c in classes}
    return label_map, class_masks
