"""Stage 4: prompts -> SAM masks -> label map in the target's original geometry.

One SAM encode per target; all classes of a target are decoded in ONE decoder call (one prompt set
per class, padded with SAM's "not a point" label −1 to the longest set of that target only, so a
single-class target gets exactly the official predictor's input). With ``multimask_output`` the
mask of highest predicted IoU is kept per set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.models.sam_transforms import postprocess_masks, resize_boxes, resize_coords
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
    logits[live] = postprocess_masks(low_res[pick, best][:, None], input_size, original_size)[:, 0]
    iou[live] = scores[pick, best]
    return DecodedTarget(logits, iou)


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
