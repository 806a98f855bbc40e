"""Stage 4: prompt sets -> SAM masks -> per-class logits and label maps in each target's geometry.

ONE decode path for every method (the match method and the method family of :mod:`.methods`):
:func:`decode_sets` decodes P prompt sets of T targets in one ``backend.decode_batch`` call. Each set
is padded with SAM's "not a point" label −1 to the longest set *of its target* — exactly what one
decoder call per target gives, and for a single set exactly the official predictor's input; further
padding up to the batch's longest set is masked out of the decoder's attention (``point_mask``), so
every set decodes to the same numbers as in its own per-target call (tested). With multimask output
the mask of highest predicted IoU is kept per set. :func:`unite_by_owner` brings the chosen low-res
masks to each target's frame and merges them per class (the union of a class's sets: the maximum of
their logits); :func:`decode_batch` is the match method's case, one set per (target, class).
:func:`label_maps` thresholds, cleans and merges the classes of every target on the device.

On the accelerator path (:mod:`.accelerator`) nothing here reads the device: every set is decoded
(empty ones are masked afterwards), shapes come from the host-known image sizes. On the CPU path the
empty sets are dropped first (one read) and the backend decodes image by image.

SAM 2 (``config.sam`` a SAM 2 model, :func:`refseg.models.sam_transforms.preprocessing_for` ``"sam2"``) goes
through the same functions: its embeddings are :class:`refseg.models.sam2.Sam2Embedding` batches, which index
by image like SAM's (T, 256, 64, 64) tensor; targets are stretched to its S x S input (no padding: the input
size of every target is (S, S) and points scale by S/W, S/H); its (S/4)² low-res logits go to the target's
frame in one bilinear step, as ``SAM2ImagePredictor`` does (MedSAM likewise). The backend applies SAM 2's
object score (``config.drop_absent``): a set said absent comes back as NO_OBJ_SCORE logits and IoU 0,
i.e. no mask, with no host read.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from refseg.config import SegmenterConfig
from refseg.models.sam_transforms import postprocess_masks, preprocessing_for
from refseg.pipeline.accelerator import accelerator_path, to_device
from refseg.pipeline.postprocess import clean_masks
from refseg.pipeline.prompts import PromptBatch

Size = tuple[int, int]


@dataclass
class DecodedTarget:
    """SAM output for the C classes of one target.

    logits: (C, H, W) float32 mask logits in the original frame (−inf for classes without prompt);
    iou: (C,) float32 predicted IoU of the chosen masks (0 for classes without prompt).
    """

    logits: torch.Tensor
    iou: torch.Tensor


@dataclass
class DecodedSets:
    """Decoder output of P sets: ``low_res`` (P, 256, 256) logits of the chosen mask (highest
    predicted IoU with multimask output; SAM 2: (P, S/4, S/4)), ``iou`` (P,) its predicted IoU."""

    low_res: torch.Tensor
    iou: torch.Tensor


def _input_scale(original_sizes: list[Size], input_sizes: list[Size], device) -> torch.Tensor:
    """(T, 2) float64 (x, y) factors from each original (H, W) frame to its (h, w) inside SAM's input
    (SAM: longest side resized; MedSAM, SAM 2: stretched to the square)."""
    scale = [(nw / w, nh / h) for (h, w), (nh, nw) in zip(original_sizes, input_sizes)]
    return to_device(scale, device, torch.float64)


def decode_image_by_image(backend, embeddings: torch.Tensor, image_index: torch.Tensor,
                          coords: torch.Tensor, labels: torch.Tensor, point_mask: Optional[torch.Tensor] = None,
                          boxes: Optional[torch.Tensor] = None, multimask: bool = False,
                          mask_input: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_batch`` of :class:`refseg.runtime.backend.Backend` as one ``backend.decode`` call per image,
    each image's sets cut to their own width (the largest ``point_mask`` count among them): the very call
    the image alone makes. Reads the grouping to the host (for backends and devices where that costs
    nothing: the exported graphs, the CPU path). ``mask_input`` is passed only when given."""
    index = image_index.cpu()
    widths = (point_mask.sum(1) if point_mask is not None
              else torch.full((len(index),), coords.shape[1], dtype=torch.int64)).cpu()
    low_res, iou, order = [], [], []
    for t in index.unique_consecutive().tolist():
        rows = (index == t).nonzero().flatten()
        width = int(widths[rows].max())
        rows_d = rows.to(coords.device)
        extra = {} if mask_input is None else {"mask_input": mask_input[rows_d]}
        low, score = backend.decode(embeddings[t], coords[rows_d, :width], labels[rows_d, :width],
                                    None if boxes is None else boxes[rows_d], multimask, **extra)
        low_res.append(low)
        iou.append(score)
        order.append(rows)
    back = torch.cat(order).argsort().to(low_res[0].device)
    return torch.cat(low_res)[back], torch.cat(iou)[back]


def decode_sets(backend, embeddings: torch.Tensor, image_index: torch.Tensor, points: torch.Tensor,
                labels: torch.Tensor, input_sizes: list[Size], original_sizes: list[Size], multimask: bool,
                boxes: Optional[torch.Tensor] = None, own_width: Optional[torch.Tensor] = None,
                mask_input: Optional[torch.Tensor] = None) -> DecodedSets:
    """Decode P prompt sets of T targets in ONE ``backend.decode_batch`` call.

    Args:
        backend: a :class:`refseg.runtime.backend.Backend`.
        embeddings: (T, 256, 64, 64) SAM image embeddings, or a T-image ``Sam2Embedding``.
        image_index: (P,) int64 target of each set.
        points: (P, M, 2) (x, y) target pixels; labels: (P, M) 1 / 0 / −1 (padding).
        input_sizes, original_sizes: per target (h, w) inside SAM's input and (H, W).
        multimask: three masks per set, the highest predicted IoU kept; else the single mask.
        boxes: (P, 4) XYXY target pixels, or None.
        own_width: (P,) int64 the width each set is padded to in its own target's call; columns past it
            are masked out of attention. None: all M columns take part.
        mask_input: (P, 1, 256, 256) low-res logits as mask prompts (SAM 2: (P, 1, S/4, S/4)), or None.
    """
    dev = points.device
    scale = _input_scale(original_sizes, input_sizes, dev)[image_index.to(dev)]  # (P, 2)
    coords = (points.double() * scale[:, None]).float()
    if boxes is not None:
        boxes = (boxes.double().view(-1, 2, 2) * scale[:, None]).float().view(-1, 4)
    point_mask = None
    if own_width is not None:
        point_mask = torch.arange(points.shape[1], device=dev)[None] < own_width.to(dev)[:, None]
    low_res, scores = backend.decode_batch(embeddings, image_index, coords, labels, point_mask, boxes,
                                           multimask, mask_input)
    low_res, scores = low_res.float(), scores.float()
    best = scores.argmax(dim=1)  # with single-mask output this is 0
    pick = torch.arange(low_res.shape[0], device=low_res.device)
    return DecodedSets(low_res[pick, best], scores[pick, best])


def upsample(backend, config: Optional[SegmenterConfig], low_res: torch.Tensor, input_size: Size,
             original_size: Size) -> torch.Tensor:
    """(n, h, w) low-res logits -> (n, H, W) logits in the target's frame: SAM's upscale to its padded
    ``backend.sam_size`` input, crop and resize; one bilinear step for MedSAM and SAM 2 (stretched inputs).
    ``config`` None: SAM's."""
    direct = config is not None and preprocessing_for(config.sam) in ("medsam", "sam2")
    return postprocess_masks(low_res[:, None], input_size, original_size, backend.sam_size, direct=direct)[:, 0]


def unite_by_owner(backend, config: SegmenterConfig, decoded: DecodedSets, image_index: list[int],
                   owner: list[int], num_classes: int, input_sizes: list[Size], original_sizes: list[Size],
                   live: Optional[torch.Tensor] = None) -> list[DecodedTarget]:
    """Per target and class, the union of the class's sets: logits (C, H, W) = max over its sets (−inf
    when none), iou (C,) = the largest predicted IoU among them (0 when none).

    Args:
        image_index, owner: host lists (P,): target and class index of each set (targets of one
            geometry are upsampled together; the grouping needs no device read).
        live: (P,) bool, the sets taking part (default all); a dead set counts as absent.
    """
    dev = decoded.low_res.device
    live = torch.ones(len(image_index), dtype=torch.bool, device=dev) if live is None else live.to(dev)
    groups: dict[tuple, list[int]] = defaultdict(list)  # targets of one geometry: one resize call
    for t in sorted(set(image_index)):
        groups[(input_sizes[t], original_sizes[t])].append(t)
    out = [DecodedTarget(torch.full((num_classes, h, w), float("-inf"), device=dev),
                         torch.zeros(num_classes, device=dev)) for h, w in original_sizes]
    for (input_size, original_size), targets in groups.items():
        rows = [p for p, t in enumerate(image_index) if t in targets]
        rows_t = to_device(rows, dev)
        up = upsample(backend, config, decoded.low_res[rows_t], input_size, original_size)
        up = torch.where(live[rows_t, None, None], up, float("-inf"))
        iou = torch.where(live[rows_t], decoded.iou[rows_t], float("-inf"))
        logits = up.new_full((len(targets) * num_classes, *original_size), float("-inf"))
        best = iou.new_full((len(targets) * num_classes,), float("-inf"))
        # (target, class) slot of each set; sets sharing a slot are merged layer by layer (a layer
        # holds each slot at most once), so one layer suffices for one set per class
        slots = [targets.index(image_index[p]) * num_classes + owner[p] for p in rows]
        seen: dict[int, int] = defaultdict(int)
        layer_of = []
        for slot in slots:
            layer_of.append(seen[slot])
            seen[slot] += 1
        for layer in range(max(layer_of, default=-1) + 1):
            idx = [i for i, k in enumerate(layer_of) if k == layer]
            at, pick = to_device([slots[i] for i in idx], dev), to_device(idx, dev)
            logits[at] = torch.maximum(logits[at], up[pick])
            best[at] = torch.maximum(best[at], iou[pick])
        best = torch.where(best == float("-inf"), 0.0, best)  # a class without any set: IoU 0
        for i, t in enumerate(targets):
            out[t] = DecodedTarget(logits[i * num_classes:(i + 1) * num_classes],
                                   best[i * num_classes:(i + 1) * num_classes])
    return out


def decode_batch(backend, embeddings: torch.Tensor, prompts: PromptBatch, num_classes: int,
                 input_sizes: list[Size], original_sizes: list[Size], config: SegmenterConfig
                 ) -> list[DecodedTarget]:
    """Decode the prompt sets of T targets (C classes each, one set per class) in one decoder call.

    Args:
        embeddings: (T, 256, 64, 64) SAM image embeddings (64 = ``backend.sam_size`` / 16), or a SAM 2
            ``Sam2Embedding`` of T images.
        prompts: T·C sets, target-major (set = t · C + c), points (x, y) in target pixels.
        input_sizes: per target (h, w) inside SAM's square input; original_sizes: per target (H, W).

    Returns:
        One :class:`DecodedTarget` per target; a class whose set is empty gets −inf logits, IoU 0.
    """
    t_count, c = len(original_sizes), num_classes
    dev = prompts.points.device
    counts = prompts.num_points
    own = counts.view(t_count, c).amax(1).repeat_interleave(c)  # each set's own target width
    if accelerator_path(dev):
        sel = list(range(t_count * c))  # every set, fixed shapes; empty ones masked afterwards
        live = counts > 0
    else:  # the CPU decodes image by image: empty sets are dropped first (one read)
        sel = [r for r, n in enumerate(counts.tolist()) if n > 0]
        live = None
        if not sel:
            return [DecodedTarget(torch.full((c, h, w), float("-inf")), torch.zeros(c)) for h, w in original_sizes]
    sel_t = to_device(sel, dev)
    image_index = [r // c for r in sel]
    index_t = sel_t // c
    boxes = prompts.boxes[sel_t] if config.use_box and prompts.boxes is not None else None
    decoded = decode_sets(backend, embeddings, index_t, prompts.points[sel_t], prompts.labels[sel_t],
                          input_sizes, original_sizes, config.multimask_output, boxes, own[sel_t])
    return unite_by_owner(backend, config, decoded, image_index, [r % c for r in sel], c, input_sizes,
                          original_sizes, live)


def decode_target(backend, embedding: torch.Tensor, prompts: PromptBatch, rows: list[int], input_size: Size,
                  original_size: Size, config: SegmenterConfig) -> DecodedTarget:
    """Decode the sets ``rows`` of ``prompts`` (one per class) against one (256, 64, 64) embedding (or one
    image's ``Sam2Embedding``): :func:`decode_batch` for one target."""
    rows_t = to_device(rows, prompts.points.device)
    own = PromptBatch(prompts.points[rows_t], prompts.labels[rows_t], prompts.num_points[rows_t],
                      None if prompts.boxes is None else prompts.boxes[rows_t])
    return decode_batch(backend, embedding[None], own, len(rows), [input_size], [original_size], config)[0]


def label_maps(decoded: list[DecodedTarget], classes: list[int], config: SegmenterConfig) -> list[torch.Tensor]:
    """Threshold, clean and merge per-class logits into one (H, W) uint8 label map per target, on the
    logits' device: every mask of the batch is cleaned in ONE :func:`~.postprocess.clean_masks` call,
    targets of other sizes padded at the bottom and right with background (which leaves components,
    their sizes and order, and the holes that touch no border as they are).

    Where classes overlap, the class with the larger logit wins; 0 is background.
    """
    if not decoded:
        return []
    h = max(int(d.logits.shape[-2]) for d in decoded)
    w = max(int(d.logits.shape[-1]) for d in decoded)
    c = len(classes)
    logits = decoded[0].logits.new_full((len(decoded), c, h, w), float("-inf"))
    for i, d in enumerate(decoded):
        logits[i, :, :d.logits.shape[-2], :d.logits.shape[-1]] = d.logits
    masks = clean_masks((logits > 0).view(-1, h, w), keep_largest=config.keep_largest_contour,
                        min_component_fraction=config.min_component_fraction,
                        holes=config.fill_holes).view(len(decoded), c, h, w)
    scored = torch.where(masks, logits, float("-inf"))
    values = to_device(classes, logits.device, torch.int64)
    maps = torch.where(masks.any(1), values[scored.argmax(1)], 0).to(torch.uint8)
    return [maps[i, :d.logits.shape[-2], :d.logits.shape[-1]] for i, d in enumerate(decoded)]
