"""The stateful Segmenter: set the reference once, segment many targets.

    seg = Segmenter.from_preset("sat", sam_checkpoint="sam_vit_b_01ec64.pth",
                                dinov2_checkpoint="dinov2_vitb14_pretrain.pth")
    # or DINOv3 (file or Hugging Face folder; the sat-v3 preset, or any preset at S rounded to 16):
    # Segmenter.from_preset("sat-v3", dinov3_checkpoint="dinov3-vitb16-pretrain-lvd1689m/", ...)
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
import logging
import os
from typing import Iterable, Iterator

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.io.intensity import Window, auto_window, needs_window
from refseg.models.sam_transforms import preprocessing_for
from refseg.pipeline import methods
from refseg.pipeline.feature_norm import encode_for_matching
from refseg.pipeline.features import dinov2_batch
from refseg.pipeline.grid import FG, grids_from_config
from refseg.pipeline.inputs import PreparedTarget, prepare_target
from refseg.pipeline.reference import check_reference, reference_digest
from refseg.pipeline.results import BATCH_STAGES, SegmentationResult, finish
from refseg.runtime.select import create_backend
from refseg.runtime.timing import StageTimer

__all__ = ["BATCH_STAGES", "PreparedTarget", "SegmentationResult", "Segmenter", "check_reference",
           "reference_digest"]

log = logging.getLogger(__name__)


class Segmenter:
    """One-shot reference-guided segmentation (DINOv2 / DINOv3 matching -> prompts -> SAM or SAM 2).

    Args:
        config: the configuration (see :class:`refseg.SegmenterConfig` and its presets).
        sam_checkpoint, dinov2_checkpoint: official checkpoint files; ``None`` looks them up by
            their official names (``$REFSEG_CHECKPOINT_DIR``, ``~/.cache/refseg``, download).
        dinov3_checkpoint: an official DINOv3 ``.pth`` or a Hugging Face folder; selects DINOv3 as the
            matching encoder (``config.encoder="dinov3"`` looks its files up instead; gated weights are
            never downloaded).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ...
        backend: ``"torch"``, ``"onnxruntime"``, ``"tensorrt"`` or ``"auto"`` (TensorRT -> ONNX
            Runtime -> torch, each step down logged with its reason).
        engine_dir: folder written by ``refseg export`` for the exported backends; ``None`` uses
            (and on first use fills) the export cache under ``~/.cache/refseg/exports``.
        compile: ``torch.compile`` both encoders (torch backend; CUDA graphs on CUDA).
        with_sam: False loads the matching encoder alone (torch backend): the Segmenter matches and prompts
            (:meth:`match_prompts`) but cannot decode (``refseg segment --propagate`` decodes with SAM 2).
    """

    def __init__(self, config: SegmenterConfig, sam_checkpoint: str | os.PathLike | None = None,
                 dinov2_checkpoint: str | os.PathLike | None = None, device: str = "auto",
                 backend: str = "torch", engine_dir: str | os.PathLike | None = None,
                 compile: bool = False, dinov3_checkpoint: str | os.PathLike | None = None,
                 with_sam: bool = True):
        if device == "auto" and config.device is not None:
            device = config.device  # an explicit device argument wins over the config's
        from refseg.export.cache_fill import fill_export_folder  # the runtime never imports export

        self.backend = create_backend(backend, config, sam_checkpoint=sam_checkpoint,
                                      dinov2_checkpoint=dinov2_checkpoint, device=device,
                                      engine_dir=engine_dir, compile=compile,
                                      exporter=fill_export_folder, dinov3_checkpoint=dinov3_checkpoint,
                                      with_sam=with_sam)
        self.with_sam = with_sam
        self.config = self.backend.config  # model names as actually loaded
        self.device = self.backend.device
        self.sam_size = self.backend.sam_size  # SAM's square input side
        self._sam_preprocessing = preprocessing_for(self.config.sam)  # sam, medsam or sam2
        self.profile = False  # True: stage timings synchronise around each stage (serialises the GPU)
        self._ref_tokens: list[torch.Tensor] = []   # each (T, D)
        self._ref_grids: list[dict[int, torch.Tensor]] = []  # each class -> (T,) int8 {1, 0, -1}
        self._pooled: tuple[torch.Tensor, torch.Tensor] | None = None  # cache of _reference()
        self.reference_digests: list[str] = []  # reference_digest() of each reference, in order
        self._ref_images: list[tuple[np.ndarray, np.ndarray]] = []  # (rgb, mask) for the method family
        self._method_state = None  # cache of methods.prepare()
        self._window: Window | None = None      # explicit (set_window) ...
        self._ref_window: Window | None = None  # ... or the first reference's automatic window

    @classmethod
    def from_preset(cls, name: str = "sat", sam_checkpoint=None, dinov2_checkpoint=None,
                    device: str = "auto", backend: str = "torch", engine_dir=None,
                    compile: bool = False, dinov3_checkpoint=None, **overrides) -> "Segmenter":
        """Build from a named preset (``sat``, ``sat-v3``, ``gbmseg``, ...) with field overrides."""
        return cls(SegmenterConfig.from_preset(name, **overrides), sam_checkpoint=sam_checkpoint,
                   dinov2_checkpoint=dinov2_checkpoint, device=device, backend=backend,
                   engine_dir=engine_dir, compile=compile, dinov3_checkpoint=dinov3_checkpoint)

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
                f"{source}: class(es) {empty} cover no whole {self.config.patch_size}x{self.config.patch_size} "
                f"patch at image_size "
                f"{self.config.image_size}; use a larger image_size or grid_rule='fraction'/'any'")
        tokens = encode_for_matching(self.backend, dinov2_batch([rgb], self.config.image_size), self.config)[0]
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
    def segment(self, image: np.ndarray, fallback: bool | None = None) -> SegmentationResult:
        """Segment one target image (see :meth:`segment_batch`)."""
        return self.segment_batch([image], fallback=fallback)[0]

    def segment_batch(self, images: list[np.ndarray], fallback: bool | None = None) -> list[SegmentationResult]:
        """Segment several targets through the streaming runtime (:mod:`refseg.runtime.stream`):
        both encoders and the decoder run on batches of ``config.batch_size``.

        ``fallback``: None = ``config.fallback``; False = a class whose prompt set ends up empty gets no
        mask instead of one forced point (what volume runs want), True = the opposite.

        Raises:
            ValueError: ``images[i]: ...``, e.g. an image smaller than one encoder patch or not
                2-D/3-D (the first failing image; the others are not returned).
        """
        from refseg.runtime.stream import StreamItem

        items = [StreamItem(key=f"images[{i}]", load=functools.partial(np.asarray, image))
                 for i, image in enumerate(images)]
        results = []
        for out in self.stream(items, fallback=fallback):
            if out.error is not None:
                raise out.error
            results.append(out.result)
        return results

    def stream(self, items: Iterable, batch_size: int | None = None, fallback: bool | None = None) -> Iterator:
        """:func:`refseg.runtime.stream.stream_segment` with this Segmenter: ``StreamItem`` in,
        ``StreamOutput`` out, in order (the jobs' local runner calls this; :mod:`refseg.jobs.ray_pool` streams
        batches to Ray actors instead)."""
        from refseg.runtime.stream import stream_segment

        return stream_segment(self, items, batch_size=batch_size, fallback=fallback)

    def prepare_target(self, image: np.ndarray, source: str = "image") -> PreparedTarget:
        """Validate one target and prepare it for the encoders (the stream's reader threads run this;
        :func:`refseg.pipeline.inputs.prepare_target`: on the accelerator path its pixels start moving to
        the device here, so the copies of the next batches overlap the batch on the models).

        Raises:
            ValueError: naming ``source``: not (H, W)/(H, W, C), or smaller than one encoder patch.
        """
        return prepare_target(image, image_size=self.config.image_size, patch_size=self.config.patch_size,
                              sam_size=self.sam_size, preprocessing=self._sam_preprocessing, device=self.device,
                              window=self.window, source=source)

    @torch.inference_mode()
    def segment_prepared(self, targets: list[PreparedTarget], fallback: bool | None = None
                         ) -> list[SegmentationResult]:
        """Segment one batch of :meth:`prepare_target` outputs with ``config.method``: ONE call per
        encoder, the prompt stage on the device, ONE decoder call for every prompt set of the batch
        (match method), label maps on the device, ONE copy to the host.

        ``fallback``: as in :meth:`segment_batch`; this run's setting, the Segmenter's config is unchanged.
        Runs in inference mode: every tensor of the batch is an inference tensor, so compiled encoders see
        one kind of input (a plain tensor here and an inference tensor there would recompile them).
        """
        if not targets:
            return []
        if not self.with_sam:
            raise RuntimeError("this Segmenter was built with_sam=False: it matches and prompts (match_prompts) "
                               "but holds no SAM to decode")
        config = self.config
        if fallback is not None and fallback != config.fallback:
            config = config.replace(fallback=fallback)
        timer = StageTimer(self.device, synchronize=self.profile)
        outputs = methods.segment_chunk(self._prepared_method(), targets, self.backend, config, timer)
        results = finish(outputs, self.classes, config, timer)
        shared = {k: v / len(targets) for k, v in timer.totals.items()}
        for result in results:
            result.timings = dict(shared)
        return results

    @torch.inference_mode()
    def match_prompts(self, images: list[np.ndarray], fallback: bool | None = None) -> list[dict]:
        """The match method's prompts for each image, without decoding: the very prompts
        :meth:`segment_batch` decodes (:func:`refseg.pipeline.match_method.class_prompts`: one DINOv2 call,
        matching with the cycle check, the physical-space stage), SAM not run (nor needed: a Segmenter
        built ``with_sam=False`` answers this).

        Args:
            images: (H, W) or (H, W, C) arrays, as :meth:`segment`; ``fallback``: as there.

        Returns:
            Per image, class value -> :class:`refseg.pipeline.match_method.ClassPrompts` (points in the
            image's (x, y) pixels, labels, box, and the class's number of cycle-consistent positive matches).

        Raises:
            ValueError: ``config.method`` is not ``match`` (the other methods make their prompts from
                prototype or decoded masks), or an image smaller than one patch.
        """
        from refseg.pipeline.match_method import class_prompts

        config = self.config if fallback is None else self.config.replace(fallback=fallback)
        if config.method != "match":
            raise ValueError(f"match_prompts: method {config.method!r} makes no matching prompts (method 'match')")
        targets = [self.prepare_target(image, f"images[{i}]") for i, image in enumerate(images)]
        if not targets:
            return []
        return class_prompts(self._prepared_method(), targets, self.backend, config, StageTimer(self.device))

    def _prepared_method(self):
        """``methods.prepare`` of ``config.method`` for the current references (cached)."""
        if self._method_state is None:
            _, labels = self._reference()
            refs = methods.ReferenceSet([r for r, _ in self._ref_images], [m for _, m in self._ref_images],
                                        list(self._ref_tokens), labels, self.classes)
            self._method_state = methods.prepare(refs, self.backend, self.config)
        return self._method_state
