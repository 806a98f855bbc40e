"""The stateful Segmenter: set the reference once, segment many targets.

    seg = Segmenter.from_preset("sat", sam_checkpoint="sam_vit_b_01ec64.pth",
                                dinov2_checkpoint="dinov2_vitb14_pretrain.pth")
    seg.set_reference(ref_image, ref_mask)       # encodes the reference once
    result = seg.segment(target_image)           # SegmentationResult
    results = seg.segment_batch([img1, img2])    # both encoders batched

Images are numpy arrays (H, W) or (H, W, C) of uint8/uint16/float (grayscale and RGBA are
converted to RGB); masks are (H, W) (or equal-channel (H, W, 3/4)) integer/bool arrays,
0 = background, other values = classes (a two-valued mask is binary: class 1).
All point coordinates are (x, y) pixels of the image they refer to.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.io.masks import mask_from_array
from refseg.io.intensity import Window, auto_window, needs_window
from refseg.io.raster import to_rgb_uint8
from refseg.models.sam_transforms import (medsam_normalize, medsam_resize, normalize_pad, preprocessing_for,
                                          resize_image)
from refseg.pipeline.decode import decode_batch, to_label_map
from refseg.pipeline.features import PATCH, dinov2_batch, normalize_resized, resize_rgb
from refseg.pipeline import methods
from refseg.pipeline.grid import FG, grids_from_config
from refseg.pipeline.matching import match_candidates
from refseg.pipeline.prompts import prompts_from_candidates
from refseg.runtime.select import create_backend
from refseg.runtime.timing import StageTimer

log = logging.getLogger(__name__)


BATCH_STAGES = ("dinov2", "matching", "prompts", "sam_encoder", "decoder")
"""Stages that run once per batch; a result's timing for them is the batch's time / batch size."""


@dataclass
class PreparedTarget:
    """One target ready for the encoders (:meth:`Segmenter.prepare_target`).

    Attributes:
        rgb: (H, W, 3) uint8, the target in its own geometry.
        dinov2: (S, S, 3) uint8, resized for DINOv2 (bicubic).
        sam: (h, w, 3) uint8, resized so the longer side is SAM's input side (1024; before padding).
    """

    rgb: np.ndarray
    dinov2: np.ndarray
    sam: np.ndarray


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
        timings: stage name -> seconds for this image. Stages run once per image are this image's
            own time (``load``: decode + prepare, when it came through the stream;
            ``postprocess``); the stages in :data:`BATCH_STAGES` run once per batch and hold the
            batch's time divided by ``batch_size``.
        batch_size: number of images in the batch this image was segmented in.
    """

    mask: np.ndarray
    class_masks: dict[int, np.ndarray] = field(default_factory=dict)
    points: dict[int, np.ndarray] = field(default_factory=dict)
    point_labels: dict[int, np.ndarray] = field(default_factory=dict)
    boxes: dict[int, np.ndarray | None] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1

    def to_json(self, source: str | None = None) -> dict:
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


@dataclass
class ClassPrompts:
    """The match method's prompts for one class on one image, without decoding (:meth:`Segmenter.match_prompts`).

    Attributes:
        points: (N, 2) float32 (x, y) pixels of the image; labels: (N,) int64, 1 positive / 0 negative.
        box: (4,) float32 (x0, y0, x1, y1) pixels, or None.
        matches: cycle-consistent positive matches: reference foreground patches whose nearest target patch
            matches back into the foreground (before the physical-space stage thins them to points).
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None
    matches: int

    @property
    def positives(self) -> int:
        """Positive points."""
        return int((np.asarray(self.labels) == 1).sum())


def check_reference(image: np.ndarray, mask: np.ndarray, source: str = "reference",
                    window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a reference pair before any model work (``window``: see :func:`refseg.io.to_rgb_uint8`).

    ``mask`` is what ``np.array(Image.open(path))`` gives: (H, W) or (H, W, 3 | 4) with equal
    channels; it is read by :func:`refseg.io.masks.mask_from_array` (the rules of
    :func:`refseg.read_mask`: a two-valued mask such as 0/255 is binary, class 1; a JPEG-decoded mask
    is binarised at 128 with a warning; label maps keep their values).

    Returns:
        (RGB uint8 image (H, W, 3), mask (H, W) int64 labels).

    Raises:
        ValueError: naming ``source``: mask of an unsupported shape or colour-coded, size differs
            from the image, mask empty or all foreground.
    """
    rgb = to_rgb_uint8(np.asarray(image), window)
    mask = mask_from_array(mask, f"{source}: reference mask")
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{source}: reference mask size {mask.shape[1]}x{mask.shape[0]} differs "
                         f"from its image {rgb.shape[1]}x{rgb.shape[0]} (W x H)")
    if not mask.any():
        raise ValueError(f"{source}: reference mask is empty (no foreground pixel)")
    if mask.all():
        raise ValueError(f"{source}: reference mask is all foreground (no background pixel)")
    if mask.min() < 0 or mask.max() > 255:
        raise ValueError(f"{source}: class values must lie in 0..255 (the output is a uint8 label map), "
                         f"got {mask.min()}..{mask.max()}")
    return rgb, mask


def reference_digest(image: np.ndarray, mask: np.ndarray) -> str:
    """sha256 (hex) of a reference pair as checked by :func:`check_reference` (RGB uint8 image and
    mask, shapes included): identifies the reference in run fingerprints."""
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(image), np.ascontiguousarray(mask)):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class Segmenter:
    """One-shot reference-guided segmentation (DINOv2 matching -> prompts -> SAM).

    Args:
        config: the configuration (see :class:`refseg.SegmenterConfig` and its presets).
        sam_checkpoint, dinov2_checkpoint: official checkpoint files; ``None`` looks them up by
            their official names (``$REFSEG_CHECKPOINT_DIR``, ``~/.cache/refseg``, download).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ...
        backend: ``"torch"``, ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"`` (TensorRT -> ONNX
            Runtime -> torch, each step down logged with its reason).
        engine_dir: folder written by ``refseg export`` for the exported backends; ``None`` uses
            (and on first use fills) the export cache under ``~/.cache/refseg/exports``.
        compile: ``torch.compile`` both encoders (torch backend; CUDA graphs on CUDA).
        with_sam: False loads DINOv2 alone (torch backend): the Segmenter matches and prompts
            (:meth:`match_prompts`) but cannot decode; ``refseg segment --propagate`` decodes with SAM 2.
    """

    def __init__(self, config: SegmenterConfig, sam_checkpoint: str | os.PathLike | None = None,
                 dinov2_checkpoint: str | os.PathLike | None = None, device: str = "auto",
                 backend: str = "torch", engine_dir: str | os.PathLike | None = None,
                 compile: bool = False, with_sam: bool = True):
        if device == "auto" and config.device is not None:
            device = config.device  # an explicit device argument wins over the config's
        from refseg.export.cache_fill import fill_export_folder  # the runtime never imports export

        self.backend = create_backend(backend, config, sam_checkpoint=sam_checkpoint,
                                      dinov2_checkpoint=dinov2_checkpoint, device=device,
                                      engine_dir=engine_dir, compile=compile,
                                      exporter=fill_export_folder, with_sam=with_sam)
        self.config = self.backend.config  # model names as actually loaded
        self.device = self.backend.device
        self.sam_size = getattr(self.backend, "sam_size", 1024)  # SAM's square input side
        self._medsam = preprocessing_for(self.config.sam) == "medsam"  # MedSAM's own pre-processing
        self._ref_tokens: list[torch.Tensor] = []   # each (T, D)
        self._ref_grids: list[dict[int, torch.Tensor]] = []  # each class -> (T,) int8 {1, 0, -1}
        self._pooled: tuple[torch.Tensor, torch.Tensor] | None = None  # cache of _reference()
        self.reference_digests: list[str] = []  # reference_digest() of each reference, in order
        self._ref_images: list[tuple[np.ndarray, np.ndarray]] = []  # (rgb, mask) for the method family
        self._method_state = None  # cache of methods.prepare() (config.method != "match")
        self._window: Window | None = None      # explicit (set_window) ...
        self._ref_window: Window | None = None  # ... or the first reference's automatic window

    @classmethod
    def from_preset(cls, name: str = "sat", sam_checkpoint=None, dinov2_checkpoint=None,
                    device: str = "auto", backend: str = "torch", engine_dir=None,
                    compile: bool = False, **overrides) -> "Segmenter":
        """Build from a named preset (``sat``, ``gbmseg``) with field overrides."""
        return cls(SegmenterConfig.from_preset(name, **overrides), sam_checkpoint=sam_checkpoint,
                   dinov2_checkpoint=dinov2_checkpoint, device=device, backend=backend,
                   engine_dir=engine_dir, compile=compile)

    # ------------------------------------------------------------------ reference
    @property
    def classes(self) -> list[int]:
        """Class values present in the reference mask(s), ascending."""
        return sorted({c for grid in self._ref_grids for c in grid})

    @property
    def window(self) -> Window | None:
        """Intensity window for 16-bit / signed / float images (reference and every target alike): the one
        given to :meth:`set_window`, else the automatic window of the first reference image
        (:func:`refseg.io.intensity.auto_window`: p0.5..p99.5 for integers, min..max for floats), else
        ``None`` (8-bit references: other images get their own automatic window)."""
        return self._window if self._window is not None else self._ref_window

    def set_window(self, window: Window | None) -> "Segmenter":
        """Fix the intensity window (units of the files, e.g. ``parse_window("40,400")`` for CT) used for
        every later reference and target; ``None`` returns to the reference's automatic window. Call
        before :meth:`set_reference`."""
        self._window = window
        return self

    def set_reference(self, image: np.ndarray, mask: np.ndarray, source: str = "reference") -> "Segmenter":
        """Forget earlier references and encode this one (cached for every later target)."""
        self._ref_tokens.clear()
        self._ref_grids.clear()
        self.reference_digests.clear()
        self._ref_images.clear()
        self._pooled = None
        self._method_state = None
        self._ref_window = None
        return self.add_reference(image, mask, source)

    def add_reference(self, image: np.ndarray, mask: np.ndarray, source: str = "reference") -> "Segmenter":
        """Add one more labelled reference (n-shot: reference patches are pooled).

        Raises:
            ValueError: naming ``source``: mask size differs from the image, the mask is empty or
                all foreground, or no patch of a class survives the grid rule.
        """
        if self.window is None and needs_window(image):
            self._ref_window = auto_window(np.asarray(image), source=f"{source} automatic")
        rgb, mask = check_reference(image, mask, source, self.window)
        classes, stacked = grids_from_config(mask, self.config)
        grids = {c: g.flatten() for c, g in zip(classes, stacked)}
        empty = [c for c, g in grids.items() if not bool((g == FG).any())]
        if empty:
            raise ValueError(
                f"{source}: class(es) {empty} cover no whole {PATCH}x{PATCH} patch at image_size "
                f"{self.config.image_size}; use a larger image_size or grid_rule='fraction'/'any'")
        tokens = self.backend.encode_dinov2(dinov2_batch([rgb], self.config.image_size))[0]
        self._ref_tokens.append(tokens)
        self._ref_grids.append({c: g.to(tokens.device) for c, g in grids.items()})
        self.reference_digests.append(reference_digest(rgb, mask))
        self._ref_images.append((rgb, mask))
        self._pooled = None
        self._method_state = None
        return self

    def reference_state(self) -> dict:
        """The encoded reference(s) as CPU tensors, to share with other Segmenters of the same config
        (e.g. Ray actors through the object store): ``{"tokens": [(T, D)], "grids": [{class: (T,)}],
        "images": [(rgb, mask)], "digests": [str], "window": Window | None}``."""
        return {"tokens": [t.cpu() for t in self._ref_tokens],
                "grids": [{c: g.cpu() for c, g in grid.items()} for grid in self._ref_grids],
                "images": list(self._ref_images), "digests": list(self.reference_digests),
                "window": self.window}

    def load_reference_state(self, state: dict) -> "Segmenter":
        """Use references encoded elsewhere (:meth:`reference_state`) instead of encoding them again."""
        if not state["tokens"]:
            raise ValueError("reference state holds no reference")
        self._ref_tokens = [t.to(self.device) for t in state["tokens"]]
        self._ref_grids = [{c: g.to(self.device) for c, g in grid.items()} for grid in state["grids"]]
        self._ref_images = list(state["images"])
        self.reference_digests = list(state["digests"])
        self._ref_window = state["window"]
        self._pooled = None
        self._method_state = None
        return self

    def _reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled reference tokens (Nr, D) and grid labels (C, Nr) in :attr:`classes` order."""
        if not self._ref_tokens:
            raise RuntimeError("call set_reference(image, mask) before segment()")
        if self._pooled is None:
            labels = [torch.stack([g[c] if c in g else torch.zeros_like(next(iter(g.values())))
                                   for c in self.classes]) for g in self._ref_grids]
            self._pooled = (torch.cat(self._ref_tokens), torch.cat(labels, dim=1))  # absent class = bg
        return self._pooled

    # ------------------------------------------------------------------ volumes
    def segment_volume(self, volume, reference_labels, reference=None, labels=None, axis: int = 2,
                       slices=None, reference_slices=None, pool_references: bool = False, chunks: int = 3,
                       window: Window | None = None, batch_size: int | None = None):
        """Segment a 3-D volume slice by slice from labelled slices of ``reference`` (or of ``volume``).

        Args:
            volume: :class:`refseg.io.volume.Volume` (from ``read_volume``) or an (I, J, K) array (identity
                affine); any dtype, values in the units of the file (HU for CT).
            reference_labels: label map (Volume or array) of the same shape as ``reference``; 0 =
                background, label values 1..255.
            reference: the labelled volume; ``None`` = same-volume mode (``reference_labels`` marks a few
                slices of ``volume``; those are copied to the output, the others segmented).
            labels: label values to segment (default: all in ``reference_labels``); one prompt set per
                label, one SAM encode per slice.
            axis: slicing axis of the closest RAS+ canonical orientation: 0 sagittal, 1 coronal,
                2 axial (default). ``slices`` (``slice``, ``"A:B"`` or indices) and ``reference_slices``
                count along it (axial: from the feet up).
            pool_references: every labelled slice as one n-shot reference instead of the relative-position
                (ProtoSAM) choice among ``chunks`` reference chunks.
            window: intensity window (:func:`refseg.io.intensity.parse_window`); default p0.5..p99.5 of the
                reference volume; used for reference and target slices alike.

        Returns:
            :class:`refseg.jobs.volume_plan.VolumeSegmentation`: ``labels`` (I, J, K) uint8 in ``volume``'s
            stored voxel order, label values kept. A slice where a label gets no positive prompt has no
            voxel of it (build the Segmenter with ``fallback=False``, as ``refseg segment`` does for volumes,
            so that no positive point is forced either). The reference set by :meth:`set_reference` is
            replaced.
        """
        from refseg.jobs.volume import segment_volume

        return segment_volume(self, volume, reference_labels, reference=reference, labels=labels, axis=axis,
                              slices=slices, reference_slices=reference_slices,
                              pool_references=pool_references, chunks=chunks, window=window,
                              batch_size=batch_size)

    # ------------------------------------------------------------------ targets
    def segment(self, image: np.ndarray) -> SegmentationResult:
        """Segment one target image (see :meth:`segment_batch`)."""
        return self.segment_batch([image])[0]

    def segment_batch(self, images: list[np.ndarray]) -> list[SegmentationResult]:
        """Segment several targets through the streaming runtime (:mod:`refseg.runtime.stream`):
        both encoders and the decoder run on batches of ``config.batch_size``.

        Raises:
            ValueError: ``images[i]: ...``, e.g. an image smaller than one 14-px patch or not
                2-D/3-D (the first failing image; the others are not returned).
        """
        from refseg.runtime.stream import StreamItem, stream_segment

        items = [StreamItem(key=f"images[{i}]", load=functools.partial(np.asarray, image))
                 for i, image in enumerate(images)]
        results = []
        for out in stream_segment(self, items):
            if out.error is not None:
                raise out.error
            results.append(out.result)
        return results

    def prepare_target(self, image: np.ndarray, source: str = "image") -> PreparedTarget:
        """Validate and resize one target for both encoders (CPU work the stream's readers do).

        Raises:
            ValueError: naming ``source``: not (H, W)/(H, W, C), or smaller than one 14-px patch.
        """
        try:
            rgb = to_rgb_uint8(np.asarray(image), self.window)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        if min(rgb.shape[:2]) < PATCH:
            raise ValueError(f"{source}: {rgb.shape[1]}x{rgb.shape[0]} (W x H) is smaller than one "
                             f"{PATCH}x{PATCH} patch")
        # Writable C arrays: torch.from_numpy needs them (resizing returns read-only PIL views).
        sam = medsam_resize(rgb, self.sam_size) if self._medsam else resize_image(rgb, self.sam_size)
        return PreparedTarget(rgb, np.require(resize_rgb(rgb, self.config.image_size), requirements="CW"),
                              np.require(sam, requirements="CW"))

    def segment_prepared(self, targets: list[PreparedTarget]) -> list[SegmentationResult]:
        """Segment one batch of :meth:`prepare_target` outputs: ONE call per encoder, matching and
        prompt engineering on the device, ONE decoder call for every prompt set of the batch."""
        if not targets:
            return []
        if self.backend.sam is None:
            raise RuntimeError("this Segmenter was built with_sam=False: it matches and prompts (match_prompts) "
                               "but holds no SAM to decode")
        return self._segment_chunk(targets)

    @torch.inference_mode()
    def match_prompts(self, images: list[np.ndarray]) -> list[dict[int, ClassPrompts]]:
        """The match method's prompts for each image, without decoding: ONE DINOv2 call for the images,
        matching with the cycle check against the reference(s), the physical-space stage, exactly as
        :meth:`segment_batch` makes them (the configuration's ``fallback`` included).

        Args:
            images: (H, W) or (H, W, C) arrays (as :meth:`segment`).

        Returns:
            Per image, class value -> :class:`ClassPrompts` (points in the image's (x, y) pixels, and the
            class's number of cycle-consistent positive matches: a confidence that needs no decoder).

        Raises:
            ValueError: ``config.method`` is not ``match`` (the other methods make their prompts from
                decoded or prototype masks), or an image smaller than one patch.
        """
        cfg, classes = self.config, self.classes
        if cfg.method != "match":
            raise ValueError(f"match_prompts: method {cfg.method!r} has no matching prompts (use method 'match')")
        targets = [self.prepare_target(image, f"images[{i}]") for i, image in enumerate(images)]
        if not targets:
            return []
        rgbs = [t.rgb for t in targets]
        ref_tokens, ref_labels = self._reference()
        tokens = self.backend.encode_dinov2(self._to_device(normalize_resized(np.stack([t.dinov2 for t in targets]))))
        cand = match_candidates(ref_tokens, ref_labels, tokens, cfg)
        prompts = prompts_from_candidates(cand, cfg, [r.shape[:2] for r in rgbs], device=tokens.device)
        matches = cand.positives.sum(-1).cpu()  # (B, C)
        out = []
        for i in range(len(rgbs)):
            found = {}
            for j, c in enumerate(classes):
                row = i * len(classes) + j
                points, labels = prompts.prompt(row)
                box = None if prompts.boxes is None else prompts.boxes[row].cpu().numpy()
                found[c] = ClassPrompts(points, labels, None if box is None or np.isnan(box).any() else box,
                                        int(matches[i, j]))
            out.append(found)
        return out

    def _to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Host array -> device tensor; pinned memory and a non-blocking copy on CUDA."""
        tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _segment_chunk(self, targets: list[PreparedTarget]) -> list[SegmentationResult]:
        if self.config.method != "match":
            return self._segment_method([t.rgb for t in targets])
        cfg, classes = self.config, self.classes
        timer = StageTimer(self.device)
        ref_tokens, ref_labels = self._reference()
        sizes = [tuple(t.rgb.shape[:2]) for t in targets]
        with timer("dinov2"):
            pixels = self._to_device(normalize_resized(np.stack([t.dinov2 for t in targets])))
            tgt_tokens = self.backend.encode_dinov2(pixels)
        with timer("matching"):
            cand = match_candidates(ref_tokens, ref_labels, tgt_tokens, cfg)
        with timer("prompts"):
            prompts = prompts_from_candidates(cand, cfg, sizes, device=tgt_tokens.device)
        with timer("sam_encoder"):
            if self._medsam:  # MedSAM: min-max to [0, 1] of the stretched square, no mean/std
                pixels = torch.stack([self._to_device(medsam_normalize(t.sam)) for t in targets])
            else:
                pixels = torch.cat([normalize_pad(self._to_device(t.sam).permute(2, 0, 1), self.sam_size)
                                    for t in targets])
            embeddings = self.backend.encode_sam(pixels)
        input_sizes = [tuple(t.sam.shape[:2]) for t in targets]
        with timer("decoder"):
            decoded = decode_batch(self.backend, embeddings, prompts, len(classes), input_sizes, sizes, cfg)
        shared = {k: v / len(targets) for k, v in timer.totals.items()}
        results = []
        for i, target in enumerate(decoded):
            own = StageTimer(self.device)
            with own("postprocess"):
                label_map, class_masks = to_label_map(target, classes, cfg)
            result = SegmentationResult(mask=label_map, class_masks=class_masks, batch_size=len(targets))
            for j, c in enumerate(classes):
                row = i * len(classes) + j
                result.points[c], result.point_labels[c] = prompts.prompt(row)
                box = None if prompts.boxes is None else prompts.boxes[row].cpu().numpy()
                result.boxes[c] = None if box is None or np.isnan(box).any() else box
                result.scores[c] = float(target.iou[j])
            result.timings = {**shared, **own.totals}
            results.append(result)
        return results

    def _segment_method(self, rgbs: list[np.ndarray]) -> list[SegmentationResult]:
        """``config.method`` other than ``match``: the stage modules of :mod:`refseg.pipeline.methods`."""
        timer = StageTimer(self.device)
        _, labels = self._reference()
        if self._method_state is None:
            refs = methods.ReferenceSet([r for r, _ in self._ref_images], [m for _, m in self._ref_images],
                                        list(self._ref_tokens), labels, self.classes)
            self._method_state = methods.prepare(refs, self.backend, self.config)
        outputs = methods.segment_chunk(self._method_state, rgbs, self.backend, self.config, timer)
        results = []
        for out in outputs:
            with timer("postprocess"):
                label_map, class_masks = to_label_map(out.decoded, self.classes, self.config)
            scores = {c: float(out.decoded.iou[j]) for j, c in enumerate(self.classes)}
            results.append(SegmentationResult(mask=label_map, class_masks=class_masks, points=out.points,
                                              point_labels=out.labels, boxes=out.boxes, scores=scores))
        per_image = {k: v / len(rgbs) for k, v in timer.totals.items()}
        for r in results:
            r.timings = dict(per_image)
        return results
