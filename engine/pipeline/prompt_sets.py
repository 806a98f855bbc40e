"""Many prompt sets per target: the method family's container for them.

The method family (ProtoSAM components, Matcher subsets, PerSAM's cascade) produces several prompt
sets per class of a target. :class:`PromptSets` holds all of them for one target, padded with SAM's
"not a point" label −1, with ``owner`` naming the class index each set belongs to. They are decoded
through the one decode path (:func:`refseg.pipeline.methods.decode_prompt_sets`, in ONE decoder call
per target) and united per class (:func:`refseg.pipeline.decode.unite_by_owner`: a pixel is in the
union when any of its sets' logits is > 0, so the union's logit is their maximum).
All coordinates are (x, y) pixels of the target image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch



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


def box_extent(boxes: torch.Tensor) -> Optional[np.ndarray]:
    """(n, 4) boxes -> (4,) float32 box enclosing them all, or None for n = 0."""
    if boxes is None or boxes.numel() == 0:
        return None
    return torch.cat([boxes[:, :2].amin(0), boxes[:, 2:].amax(0)]).cpu().numpy().astype(np.float32)
