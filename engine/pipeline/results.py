"""Method outputs -> :class:`SegmentationResult`: label maps on the device, ONE copy to the host.

:func:`finish` turns the per-class logits of every target of a batch into label maps on the device
(:func:`refseg.pipeline.decode.label_maps`), then copies every tensor the results need — label maps,
predicted IoUs, the padded prompts and boxes — to the host in ONE transfer (:func:`copy_to_host`: the
tensors' bytes packed into one buffer), and cuts the padding off on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.pipeline.decode import label_maps
from refseg.pipeline.methods import TargetOutput
from refseg.pipeline.prompts import warn_missing_positives

BATCH_STAGES = ("dinov2", "matching", "prompts", "sam_encoder", "decoder", "postprocess")
"""Stages that run once per batch; a result's timing for them is the batch's time / batch size."""


@dataclass
class SegmentationResult:
    """The segmentation of one target image.

    Attributes:
        mask: (H, W) uint8 label map in the input's geometry: 0 background, otherwise the class
            value of the reference mask (1 for a binary reference).
        class_masks: class value -> (H, W) bool mask.
        points: class value -> (N, 2) float32 prompt points, (x, y) pixels of the target.
        point_labels: class value -> (N,) int64, 1 positive / 0 negative.
        boxes: class value -> (4,) float32 box (x0, y0, x1, y1) pixels, or None.
        scores: class value -> SAM's predicted IoU of the chosen mask (0.0 when no prompt).
        timings: stage name -> seconds for this image. ``load`` (decode + prepare, when it came
            through the stream) is this image's own time; the stages in :data:`BATCH_STAGES` run once
            per batch and hold the batch's time divided by ``batch_size``.
        batch_size: number of images in the batch this image was segmented in.
    """

    mask: np.ndarray
    class_masks: dict[int, np.ndarray] = field(default_factory=dict)
    points: dict[int, np.ndarray] = field(default_factory=dict)
    point_labels: dict[int, np.ndarray] = field(default_factory=dict)
    boxes: dict[int, Optional[np.ndarray]] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1

    def to_json(self, source: Optional[str] = None) -> dict:
        """Prompts, scores and timings as plain JSON types (used for ``<stem>.json``).

        ``input`` records ``source`` (the input's path or key) and the image size in pixels;
        ``timings_s`` as :attr:`timings`, with ``timings_batch_shared`` naming the stages that are
        a share of the batch (batch time / ``batch_size``) rather than this image's own time.
        """
        h, w = self.mask.shape
        return {
            "input": {"path": source, "width": int(w), "height": int(h)},
            "classes": {
                str(c): {
                    "points": self.points[c].tolist(),
                    "labels": self.point_labels[c].tolist(),
                    "box": None if self.boxes.get(c) is None else self.boxes[c].tolist(),
                    "predicted_iou": self.scores.get(c, 0.0),
                    "area": int(self.class_masks[c].sum()),
                } for c in self.class_masks
            },
            "timings_s": self.timings,
            "timings_batch_shared": {"stages": [k for k in self.timings if k in BATCH_STAGES],
                                     "batch_size": self.batch_size},
        }


_NUMPY = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16,
          torch.int32: np.int32, torch.int64: np.int64, torch.float16: np.float16, torch.float32: np.float32,
          torch.float64: np.float64}


def copy_to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Copy tensors of any dtypes and shapes (on one device) to numpy arrays in ONE transfer: their bytes
    are packed into one uint8 buffer on the device, copied once, and viewed back on the host."""
    if not tensors:
        return []
    flat = [t.detach().contiguous().view(-1) for t in tensors]
    packed = torch.cat([f.view(torch.uint8) if f.numel() else f.new_empty(0, dtype=torch.uint8) for f in flat])
    host = packed.cpu().numpy()
    out, start = [], 0
    for t, f in zip(tensors, flat):
        size = f.numel() * f.element_size()
        dtype = _NUMPY[t.dtype]
        out.append(host[start:start + size].view(dtype).reshape(tuple(t.shape)))
        start += size
    return out


def finish(outputs: list[TargetOutput], classes: list[int], config: SegmenterConfig, timer
           ) -> list[SegmentationResult]:
    """Label maps (on the device, timed as ``postprocess``) and host-side results for one batch."""
    with timer("postprocess"):
        maps = label_maps([o.decoded for o in outputs], classes, config)
        slots: list[tuple] = []  # (where, key) of every tensor, in packing order
        tensors: list[torch.Tensor] = []

        def add(where, key, value):
            if isinstance(value, torch.Tensor):
                slots.append((where, key))
                tensors.append(value)

        fields = [{"mask": m, "iou": o.decoded.iou, "points": dict(o.points), "labels": dict(o.labels),
                   "boxes": dict(o.boxes)} for m, o in zip(maps, outputs)]
        for f in fields:
            add(f, "mask", f["mask"])
            add(f, "iou", f["iou"])
            for name in ("points", "labels", "boxes"):
                for c, value in f[name].items():
                    add(f[name], c, value)
        for (where, key), array in zip(slots, copy_to_host(tensors)):
            where[key] = array
    results, has_positive = [], []
    for f, o in zip(fields, outputs):
        result = SegmentationResult(mask=f["mask"], class_masks={c: f["mask"] == c for c in classes},
                                    batch_size=len(outputs))
        for j, c in enumerate(classes):
            keep = np.asarray(f["labels"][c]) >= 0  # padding label −1
            result.points[c] = np.asarray(f["points"][c])[keep].astype(np.float32, copy=False)
            result.point_labels[c] = np.asarray(f["labels"][c])[keep].astype(np.int64, copy=False)
            box = f["boxes"].get(c)
            result.boxes[c] = None if box is None or np.isnan(box).any() else np.asarray(box, np.float32)
            result.scores[c] = float(f["iou"][j])
        if o.check_positives:
            has_positive += [bool((result.point_labels[c] == 1).any()) for c in classes]
        results.append(result)
    warn_missing_positives(np.array(has_positive, dtype=bool))
    return results
