"""The PyTorch backend: DINOv2 and SAM modules run eagerly (optionally in fp16/bf16), or compiled.

Every backend implements :class:`refseg.runtime.backend.Backend`, with the same tensors as the
exported graphs (names in :mod:`refseg.runtime.io_names`):

- ``encode_dinov2(images (B, 3, S, S) float32) -> tokens (B, N, D)``, float32, or float16 / bfloat16 when
  the encoders run in that precision: the match kernel then gets them as they are (tensor cores on a GPU)
- ``encode_sam(images (B, 3, 1024, 1024) float32) -> embeddings (B, 256, 64, 64) float32``; with a SAM 2
  model a :class:`refseg.models.sam2.Sam2Embedding` batch (fp32; it indexes by image like the tensor)
- ``decode(embedding (256, 64, 64), coords (P, N, 2), labels (P, N), boxes (P, 4) | None,
  multimask, mask_input (P, 1, 256, 256) | None) -> (low_res_logits (P, C, 256, 256), iou (P, C))``,
  coordinates in SAM's 1024 frame, (x, y) order, labels 1 = positive, 0 = negative, -1 = padding;
  ``mask_input`` are low-res logits of an earlier decode (mask prompt, e.g. PerSAM's cascade). SAM 2:
  coordinates in its S x S input frame, low-res logits (P, C, S/4, S/4); a single mask falls back to the
  best multimask one when unstable (dynamic multimask, the official default), mask prompts enter clamped to
  [-32, 32] (the range ``SAM2ImagePredictor`` returns low-res logits in), and with ``drop_absent`` a
  prompt set whose object-score logit is <= 0 gets no mask (:func:`refseg.models.sam2.drop_absent`).

and ``decode_batch`` (prompt sets of several images; one padded, masked call on the accelerator path,
image by image on the CPU path, see :mod:`refseg.pipeline.decode`).

Precision: ``fp32`` (default), ``fp16``, ``bf16`` or ``auto`` (:func:`resolve_precision`). On CUDA
fp16/bf16 run the encoders in half precision with LayerNorms in fp32 (inside the models) and
softmax accumulated in fp32 (SDPA kernels). On the CPU bf16 pays only where the CPU has native
bf16 arithmetic (AVX512-BF16 or AMX); elsewhere it is emulated and slower than fp32, so ``auto``
keeps fp32 there and an explicit ``bf16`` is warned about.

``compile=True`` (or :meth:`TorchBackend.compile`) wraps both encoders in ``torch.compile``: inductor fuses
the LayerNorms, GELUs and residual adds into the GEMMs' neighbours; on CUDA mode ``reduce-overhead``
also captures CUDA graphs. Graphs are per input shape, so a compiled backend pads every encoder call on
the accelerator path to the next power of two up to ``fixed_batch`` images (the configured batch size):
a few fixed shapes (1, 2, 4, ... 16), a graph each, and no recompilation for the odd-sized last batch of
a stream while batch 1 keeps its own small graph.
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from refseg.models.sam2 import LOW_RES_LIMIT, Sam2, Sam2Embedding, drop_absent
from refseg.pipeline.accelerator import accelerator_path
from refseg.runtime.backend import decode_image_by_image

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


def compile_mode(device: torch.device, backend=None, mode: str | None = "auto") -> tuple[object, str | None]:
    """The (torch.compile backend, mode) :func:`compile_module` uses: ``backend`` or
    ``$REFSEG_COMPILE_BACKEND`` or inductor; ``mode="auto"`` is CUDA graphs (``reduce-overhead``) on CUDA
    with inductor, the default mode elsewhere (modes are inductor's: other backends get None)."""
    backend = backend or os.environ.get("REFSEG_COMPILE_BACKEND") or "inductor"
    if mode in ("auto", "default"):
        mode = "reduce-overhead" if mode == "auto" and device.type == "cuda" and backend == "inductor" else None
    return backend, (mode if backend == "inductor" else None)


def compile_module(module, device: torch.device, backend=None, mode: str | None = "auto"):
    """``torch.compile`` an encoder (a module or its bound ``forward_features``) for ``device``, static
    shapes; backend and mode as :func:`compile_mode` resolves them (e.g. backend ``eager`` checks tracing
    without a C++ toolchain; a callable backend sees every captured graph)."""
    backend, mode = compile_mode(device, backend, mode)
    return torch.compile(module, backend=backend, mode=mode, dynamic=False)


class TorchBackend:
    """Runs the modules with PyTorch on one device.

    Args:
        dinov2: DINOv2 module (``forward_features``).
        sam: SAM module (``image_encoder``, ``prompt_encoder``, ``mask_decoder``) or SAM 2
            (:class:`refseg.models.sam2.Sam2`); None: a matching-only backend (``encode_dinov2`` alone;
            ``refseg segment --propagate`` decodes with SAM 2).
        device: torch device.
        precision: ``fp32``, ``fp16``, ``bf16`` or ``auto`` for the encoders (the decoder and all
            outputs stay fp32; LayerNorms compute in fp32 inside the models). The resolved choice
            is :attr:`precision`.
        feature_key: which ``forward_features`` entry to use as tokens; ``encode_dinov2`` returns its
            (B, G·G, D) patch rows only (``x_prenorm`` also holds the class and register tokens).
        compile: ``torch.compile`` both encoders (:func:`compile_module`; see :meth:`compile`).
        drop_absent: SAM 2 only: prompt sets whose object score says "absent" give no mask.
    """

    name = "torch"
    fixed_batch: int | None = None  # compiled encoders: calls padded to power-of-two sizes up to this

    def __init__(self, dinov2: nn.Module, sam: nn.Module | None, device: torch.device,
                 precision: str = "fp32", feature_key: str = "x_norm_patchtokens",
                 compile: bool = False, drop_absent: bool = True):
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.dtype = DTYPES[self.precision]
        self.dinov2 = dinov2.to(device=device, dtype=self.dtype).eval()
        self.sam = None if sam is None else sam.eval().to(device=device)  # prompt encoder, decoder stay fp32
        if sam is not None:
            self.sam.image_encoder.to(dtype=self.dtype)
        self.feature_key = feature_key
        self.drop_absent = drop_absent
        # side of SAM's square input (1024 for every released SAM and SAM 2; MedSAM2 512)
        self.sam_size = 1024 if sam is None else sam.image_size if self.is_sam2 else sam.img_size
        self.compiled = False
        self.compile_mode: str | None = None
        self._dinov2_features = self.dinov2.forward_features
        self._sam_encoder = None if sam is None else self.sam.image_encoder
        if compile:
            self.compile()

    def compile(self, mode: str | None = "auto", backend=None) -> "TorchBackend":
        """Wrap the encoder calls this backend makes in ``torch.compile`` (:func:`compile_module`), in place.

        Args:
            mode: ``auto`` (CUDA graphs on CUDA), ``None`` / ``default``, ``reduce-overhead``, ...
            backend: torch.compile backend (name or callable; default inductor or ``$REFSEG_COMPILE_BACKEND``).
        """
        self._dinov2_features = compile_module(self.dinov2.forward_features, self.device, backend, mode)
        if self.sam is not None:
            self._sam_encoder = compile_module(self.sam.image_encoder, self.device, backend, mode)
        self.compiled = True
        self.compile_mode = compile_mode(self.device, backend, mode)[1]
        log.info("torch backend: encoders compiled (mode %s)", self.compile_mode or "default")
        return self

    def _chunks(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The encoder calls of a batch: all at once on the accelerator path; image by image on the CPU
        path, where the encoders are compute-bound and a batch only enlarges the working set (SAM-B at
        batch 4 took 9 % longer than four single calls on a 2-core EPYC; the results are the same either
        way). Compiled encoders get batches padded to a power of two (at most :attr:`fixed_batch`)."""
        x = images.to(self.device, self.dtype, non_blocking=True)
        if not accelerator_path(self.device) and len(x) > 1:
            return x.split(1)
        if self.compiled and self.fixed_batch and len(x) < self.fixed_batch:
            size = min(self.fixed_batch, 1 << (len(x) - 1).bit_length())
            if size > len(x):
                return (torch.cat([x, x.new_zeros(size - len(x), *x.shape[1:])]),)
        return (x,)

    def _keep(self, out: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` rows of an encoder output; a copy under CUDA graphs (whose output buffers
        the next replay overwrites)."""
        out = out[:n]
        return out.clone() if self.compiled and self.compile_mode == "reduce-overhead" else out

    @torch.inference_mode()
    def encode_dinov2(self, images: torch.Tensor) -> torch.Tensor:
        parts, left = [], len(images)
        for x in self._chunks(images):
            out = self._dinov2_features(x)
            tokens = out[self.feature_key]  # encoder dtype: no fp32 copy before matching
            # x_prenorm starts with the class (and register) tokens: every backend returns patch tokens only
            parts.append(self._keep(tokens[:, tokens.shape[1] - out["x_norm_patchtokens"].shape[1]:],
                                    min(left, len(x))))
            left -= len(x)
        return torch.cat(parts)

    @property
    def is_sam2(self) -> bool:
        """Whether the SAM stage is SAM 2 / 2.1 / MedSAM2 (from the model itself)."""
        return isinstance(self.sam, Sam2)

    @torch.inference_mode()
    def encode_sam(self, images: torch.Tensor) -> torch.Tensor | Sam2Embedding:
        parts, left = [], len(images)
        for x in self._chunks(images):
            out, n = self._sam_encoder(x), min(left, len(x))
            if self.is_sam2:  # neck levels in the encoder's dtype -> the fp32 embedding the decoder takes
                parts.append(self.sam.embed_levels([self._keep(level, n).float() for level in out]))
            else:
                parts.append(self._keep(out, n).float())
            left -= len(x)
        if len(parts) == 1:
            return parts[0]
        return Sam2Embedding.cat(parts) if self.is_sam2 else torch.cat(parts)

    def _decode(self, embeddings, coords: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None,
                mask_input: torch.Tensor | None, multimask: bool, point_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's decode on device tensors (1 or P embeddings, P sets) -> (low-res logits, IoU)."""
        dev = self.device
        kwargs = dict(mask_input=None if mask_input is None else mask_input.to(dev, torch.float32),
                      multimask_output=multimask, point_mask=None if point_mask is None else point_mask.to(dev))
        boxes = None if boxes is None else boxes.to(dev, torch.float32)
        if not self.is_sam2:
            return self.sam.decode(embeddings, coords.to(dev, torch.float32), labels.to(dev), boxes, **kwargs)
        if mask_input is not None:  # as SAM2ImagePredictor returns the low-res logits a caller feeds back
            kwargs["mask_input"] = kwargs["mask_input"].clamp(-LOW_RES_LIMIT, LOW_RES_LIMIT)
        low_res, iou, score = self.sam.decode(embeddings, coords.to(dev, torch.float32), labels.to(dev), boxes,
                                              dynamic_multimask=True, **kwargs)
        return drop_absent(low_res, iou, score) if self.drop_absent else (low_res, iou)

    @torch.inference_mode()
    def decode_batch(self, embeddings: torch.Tensor, image_index: torch.Tensor, coords: torch.Tensor,
                     labels: torch.Tensor, point_mask: torch.Tensor | None = None,
                     boxes: torch.Tensor | None = None, multimask: bool = False,
                     mask_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode P prompt sets of several images (:meth:`refseg.runtime.backend.Backend.decode_batch`).

        On the accelerator path: ONE decoder call for all sets, padding columns masked out of attention.
        On the CPU path: one call per image (compute-bound: one call buys nothing there), each trimmed
        to its own sets' width, so the masks do not depend on which images share the batch.

        Returns:
            low-res logits (P, C, 256, 256) and predicted IoU (P, C), C = 3 or 1 (SAM 2: (P, C, S/4, S/4)).
        """
        if not accelerator_path(self.device):
            return decode_image_by_image(self, embeddings, image_index, coords, labels, point_mask, boxes,
                                         multimask, mask_input)
        emb = embeddings.to(self.device, torch.float32)[image_index.to(self.device)]  # one embedding per set
        return self._decode(emb, coords, labels, boxes, mask_input, multimask, point_mask)

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
               boxes: torch.Tensor | None = None, multimask: bool = False,
               mask_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self._decode(embedding.to(self.device, torch.float32)[None], coords, labels, boxes, mask_input,
                            multimask)
