"""Many prompt sets per target -> ONE batched SAM decoder call -> per-class union of their masks.

The method family (ProtoSAM components, Matcher subsets, PerSAM's cascade) produces several prompt
sets per class of a target. :class:`PromptSets` holds all of them for one target, padded with SAM's
"not a point" label −1, with ``owner`` naming the class index each set belongs to.
:func:`decode_prompt_sets` decodes them against the target's embedding in a single
``backend.decode`` call; :func:`union_by_owner` merges the chosen masks of each class (a pixel is in
the union when any of its sets' logits is > 0, so the union's logit is their maximum).
All coordinates are (x, y) pixels of the target image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from refseg.models.sam_transforms import postprocess_masks, resize_boxes, resize_coords
from refseg.pipeline.decode import DecodedTarget


@dataclass
class PromptSets:
    """P prompt sets of one target.

    points: (P, M, 2) float32 (x, y) target pixels; labels: (P, M) int64 1 / 0 / −1 (padding);
    boxes: (P, 4) float32 (x0, y0, x1, y1) target pixels, or None (no set has a box);
    owner: (P,) int64 class index (into the Segmenter's class list) of every set.
    """

    points: torch.Tensor
    labels: torch.Tensor
    owner: torch.Tensor
    boxes: Optional[torch.Tensor] = None

    @classmethod
    def from_lists(cls, points: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                   owner: Sequence[int], boxes: Optional[Sequence[torch.Tensor]] = None) -> "PromptSets":
        """Pad per-set (n_i, 2) points / (n_i,) labels to one (P, max n_i, 2) batch."""
        if not points:
            raise ValueError("PromptSets.from_lists: no prompt set given")
        m = max(int(p.shape[0]) for p in points)
        pts = torch.zeros(len(points), m, 2, dtype=torch.float32)
        lab = torch.full((len(points), m), -1, dtype=torch.int64)
        for i, (p, l) in enumerate(zip(points, labels)):
            pts[i, :p.shape[0]] = p.float().cpu()
            lab[i, :p.shape[0]] = l.to(torch.int64).cpu()
        box = None if boxes is None else torch.stack([b.float().cpu() for b in boxes])
        return cls(pts, lab, torch.as_tensor(list(owner), dtype=torch.int64), box)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def set_prompt(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Set ``i`` without padding: ((n, 2) float32 points, (n,) int64 labels)."""
        keep = self.labels[i] >= 0
        return self.points[i][keep].numpy(), self.labels[i][keep].numpy()


@dataclass
class DecodedSets:
    """Decoder output of P sets: ``low_res`` (P, 256, 256) logits of the chosen mask (highest
    predicted IoU with multimask output), ``iou`` (P,) its predicted IoU."""

    low_res: torch.Tensor
    iou: torch.Tensor


def decode_prompt_sets(backend, embedding: torch.Tensor, sets: PromptSets, original_size: tuple[int, int],
                       multimask: bool, mask_input: Optional[torch.Tensor] = None) -> DecodedSets:
    """Decode every set of ``sets`` in ONE ``backend.decode`` call.

    Args:
        backend: runtime backend (``decode(embedding, coords, labels, boxes, multimask, mask_input)``).
        embedding: (256, 64, 64) SAM embedding of the target.
        original_size: (H, W) of the target (points are mapped into SAM's 1024 frame).
        multimask: three masks per set, the highest predicted IoU kept; else the single mask.
        mask_input: (P, 1, 256, 256) low-res logits as mask prompts, or None.
    """
    coords = resize_coords(sets.points.double(), original_size).float()
    boxes = None if sets.boxes is None else resize_boxes(sets.boxes.double(), original_size).float()
    if mask_input is None:
        low, scores = backend.decode(embedding, coords, sets.labels, boxes, multimask)
    else:
        low, scores = backend.decode(embedding, coords, sets.labels, boxes, multimask, mask_input=mask_input)
    low, scores = low.float(), scores.float()
    best = scores.argmax(dim=1)
    pick = torch.arange(low.shape[0], device=low.device)
    return DecodedSets(low[pick, best], scores[pick, best])


def upsample_sets(decoded: DecodedSets, rows: torch.Tensor, input_size: tuple[int, int],
                  original_size: tuple[int, int]) -> torch.Tensor:
    """Logits (len(rows), H, W) in the target's frame for the chosen sets ``rows``."""
    low = decoded.low_res[rows.to(decoded.low_res.device)]
    return postprocess_masks(low[:, None], input_size, original_size)[:, 0]


def union_by_owner(decoded: DecodedSets, owner: torch.Tensor, n_classes: int, input_size: tuple[int, int],
                   original_size: tuple[int, int], keep: Optional[torch.Tensor] = None) -> DecodedTarget:
    """Per-class union of the kept sets: logits (C, H, W) = max over the class's sets (−inf when a
    class has none), iou (C,) = the largest predicted IoU among them (0 when none).

    ``keep``: (P,) bool, the sets taking part (default: all).
    """
    h, w = original_size
    dev = decoded.low_res.device
    keep = torch.ones(len(owner), dtype=torch.bool) if keep is None else keep.cpu()
    rows = keep.nonzero().flatten()
    logits = torch.full((n_classes, h, w), float("-inf"), device=dev)
    iou = torch.zeros(n_classes, device=dev)
    if rows.numel() == 0:
        return DecodedTarget(logits, iou)
    up = upsample_sets(decoded, rows, input_size, original_size)
    own = owner[rows].to(dev)
    for c in range(n_classes):
        sel = (own == c).nonzero().flatten()
        if sel.numel():
            logits[c] = up[sel].amax(dim=0)
            iou[c] = decoded.iou[rows.to(dev)[sel]].max()
    return DecodedTarget(logits, iou)


def box_extent(boxes: torch.Tensor) -> Optional[np.ndarray]:
    """(n, 4) boxes -> (4,) float32 box enclosing them all, or None for n = 0."""
    if boxes is None or boxes.numel() == 0:
        return None
    return torch.cat([boxes[:, :2].amin(0), boxes[:, 2:].amax(0)]).cpu().numpy().astype(np.float32)
