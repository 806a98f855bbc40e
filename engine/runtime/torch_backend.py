"""The PyTorch backend: DINOv2 and SAM modules run eagerly (optionally in fp16/bf16).

Every backend offers the same three calls, with the same tensors as the exported graphs
(names in :mod:`refseg.runtime.io_names`):

- ``encode_dinov2(images (B, 3, S, S) float32) -> tokens (B, N, D)``, float32, or float16 / bfloat16 when
  the encoders run in that precision: the match kernel then gets them as they are (tensor cores on a GPU)
- ``encode_sam(images (B, 3, 1024, 1024) float32) -> embeddings (B, 256, 64, 64) float32``
- ``decode(embedding (256, 64, 64), coords (P, N, 2), labels (P, N), boxes (P, 4) | None,
  multimask, mask_input (P, 1, 256, 256) | None) -> (low_res_logits (P, C, 256, 256), iou (P, C))``,
  coordinates in SAM's 1024 frame, (x, y) order, labels 1 = positive, 0 = negative, -1 = padding;
  ``mask_input`` are low-res logits of an earlier decode (mask prompt, e.g. PerSAM's cascade).

The torch backend adds ``decode_batch`` (prompt sets of several images in one call, see
:mod:`refseg.pipeline.decode`).

Precision: ``fp32`` (default), ``fp16``, ``bf16`` or ``auto`` (:func:`resolve_precision`). On CUDA
fp16/bf16 run the encoders in half precision with LayerNorms in fp32 (inside the models) and
softmax accumulated in fp32 (SDPA kernels). On the CPU bf16 pays only where the CPU has native
bf16 arithmetic (AVX512-BF16 or AMX); elsewhere it is emulated and slower than fp32, so ``auto``
keeps fp32 there and an explicit ``bf16`` is warned about.

``compile=True`` wraps both encoders in ``torch.compile``; on CUDA with mode ``reduce-overhead``
(CUDA graphs: one graph per batch shape, so fixed batch sizes pay most), elsewhere the default
inductor mode.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), as torch detects it."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to run: ``auto`` becomes bf16 (CUDA with bf16), fp16 (older CUDA GPUs) or fp32 (CPUs,
    even with native bf16: bf16 there changes masks against the fp32 reference; docs/attention.md).
    Explicit choices are kept (with a warning where they are slow), except bf16 on a CPU without
    oneDNN's bf16 primitive, which runs fp32 (:func:`refseg.models.onednn.cpu_bf16_or_fp32`)."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in DTYPES:
        raise ValueError(f"precision must be auto or one of {sorted(DTYPES)}, got {precision!r}")
    if device.type == "cpu" and precision == "fp16":
        log.warning("fp16 on the CPU is slow and partly unsupported; consider bf16 or fp32")
    if device.type == "cpu" and precision == "bf16":
        from refseg.models.onednn import cpu_bf16_or_fp32

        precision = cpu_bf16_or_fp32()
    if device.type == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
        log.warning("bf16 on this CPU is emulated (no AVX512-BF16/AMX): expect it to be slower than fp32")
    return precision


def compile_module(module: nn.Module, device: torch.device, backend: str | None = None) -> nn.Module:
    """``torch.compile`` for an encoder: CUDA graphs (``reduce-overhead``) on CUDA, default elsewhere.

    ``backend`` (or ``$REFSEG_COMPILE_BACKEND``) picks the torch.compile backend, e.g. ``eager`` to
    check tracing without a C++ toolchain.
    """
    backend = backend or os.environ.get("REFSEG_COMPILE_BACKEND") or "inductor"
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    return torch.compile(module, backend=backend, mode=mode, dynamic=False)


class TorchBackend:
    """Runs the modules with PyTorch on one device.

    Args:
        dinov2: DINOv2 module (``forward_features``).
        sam: SAM module with ``image_encoder``, ``prompt_encoder``, ``mask_decoder``; None for a
            matching-only backend (``encode_dinov2`` alone: ``refseg segment --propagate`` decodes with SAM 2).
        device: torch device.
        precision: ``fp32``, ``fp16``, ``bf16`` or ``auto`` for the encoders (the decoder and all
            outputs stay fp32; LayerNorms compute in fp32 inside the models). The resolved choice
            is :attr:`precision`.
        feature_key: which ``forward_features`` entry to use as tokens; ``encode_dinov2`` returns its
            (B, G·G, D) patch rows only (``x_prenorm`` also holds the class and register tokens).
        compile: ``torch.compile`` both encoders (:func:`compile_module`).
    """

    name = "torch"

    def __init__(self, dinov2: nn.Module, sam: nn.Module | None, device: torch.device,
                 precision: str = "fp32", feature_key: str = "x_norm_patchtokens",
                 compile: bool = False):
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.dtype = DTYPES[self.precision]
        self.dinov2 = dinov2.to(device=device, dtype=self.dtype).eval()
        self.sam = None if sam is None else sam.eval()
        if sam is not None:
            self.sam.image_encoder.to(device=device, dtype=self.dtype)
            self.sam.prompt_encoder.to(device=device)
            self.sam.mask_decoder.to(device=device)
        self.feature_key = feature_key
        self.sam_size = 1024 if sam is None else sam.img_size  # side of SAM's square input (1024 for every SAM)
        self.compiled = compile
        self._dinov2_features = self.dinov2.forward_features
        self._sam_encoder = None if sam is None else self.sam.image_encoder
        if compile:
            self._dinov2_features = compile_module(self.dinov2.forward_features, device)
            if sam is not None:
                self._sam_encoder = compile_module(self.sam.image_encoder, device)

    def _chunks(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The encoder calls of a batch: all at once on a GPU; image by image on the CPU, where the
        encoders are compute-bound and a batch only enlarges the working set (SAM-B at batch 4 took 9 %
        longer than four single calls on a 2-core EPYC; the results are the same either way)."""
        x = images.to(self.device, self.dtype, non_blocking=True)
        return x.split(1) if self.device.type == "cpu" and len(x) > 1 else (x,)

    @torch.inference_mode()
    def encode_dinov2(self, images: torch.Tensor) -> torch.Tensor:
        parts = []
        for x in self._chunks(images):
            out = self._dinov2_features(x)
            tokens = out[self.feature_key]  # encoder dtype: no fp32 copy before matching
            # x_prenorm starts with the class (and register) tokens: every backend returns patch tokens only
            parts.append(tokens[:, tokens.shape[1] - out["x_norm_patchtokens"].shape[1]:])
        return torch.cat(parts)

    @torch.inference_mode()
    def encode_sam(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._sam_encoder(x).float() for x in self._chunks(images)])

    @torch.inference_mode()
    def decode_batch(self, embeddings: torch.Tensor, image_index: torch.Tensor, coords: torch.Tensor,
                     labels: torch.Tensor, point_mask: torch.Tensor | None = None,
                     boxes: torch.Tensor | None = None, multimask: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode P prompt sets of several images in one call.

        Args:
            embeddings: (T, 256, 64, 64); image_index: (P,) int64, the image of each set.
            coords, labels, boxes: as :meth:`decode`; point_mask: (P, N) bool, False = batch
                padding that attention ignores (None: all points count).

        Returns:
            low-res logits (P, C, 256, 256) and predicted IoU (P, C), C = 3 or 1.
        """
        dev = self.device
        index = image_index.to(dev)
        coords, labels = coords.to(dev, torch.float32), labels.to(dev)
        boxes = None if boxes is None else boxes.to(dev, torch.float32)
        point_mask = None if point_mask is None else point_mask.to(dev)
        if dev.type == "cpu" and point_mask is not None:
            # One call per image on the CPU (compute-bound: one call buys nothing there), each trimmed to
            # its own sets' width: the very call the image alone makes, so the masks do not depend on
            # which images share its batch.
            low_res, iou, emb = [], [], embeddings.to(dev, torch.float32)
            groups = [(index == t).nonzero().flatten() for t in index.unique_consecutive()]
            for rows in groups:
                width = int(point_mask[rows].sum(1).max())
                pm = point_mask[rows, :width]
                low, score = self.sam.decode(
                    emb[index[rows]], coords[rows, :width], labels[rows, :width],
                    None if boxes is None else boxes[rows], multimask_output=multimask,
                    point_mask=None if bool(pm.all()) else pm)
                low_res.append(low)
                iou.append(score)
            order = torch.cat(groups).argsort()
            return torch.cat(low_res)[order], torch.cat(iou)[order]
        emb = embeddings.to(dev, torch.float32)[index]
        return self.sam.decode(emb, coords, labels, boxes, multimask_output=multimask, point_mask=point_mask)

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
               boxes: torch.Tensor | None = None, multimask: bool = False,
               mask_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        return self.sam.decode(embedding.to(dev, torch.float32)[None], coords.to(dev, torch.float32),
                               labels.to(dev), None if boxes is None else boxes.to(dev, torch.float32),
                               mask_input=None if mask_input is None else mask_input.to(dev, torch.float32),
                               multimask_output=multimask)
