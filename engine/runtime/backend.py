"""The one interface every runtime backend implements: torch, ONNX Runtime and TensorRT.

The pipeline calls backends only through :class:`Backend`; nothing probes for optional methods. Tensors
are those of :mod:`refseg.runtime.torch_backend` and of the exported graphs (names in
:mod:`refseg.runtime.io_names`): images in, float32 embeddings out, prompts in SAM's input frame, (x, y)
order, labels 1 positive / 0 negative / −1 padding.

Backends without a batched decoder graph (the exported ones, and the torch backend on the CPU path,
where one call per image is as fast and keeps every image's masks independent of its batch) decode
image by image with :func:`refseg.pipeline.decode.decode_image_by_image`, each image's sets trimmed to
their own width.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

from refseg.config import SegmenterConfig
from refseg.pipeline.decode import decode_image_by_image

__all__ = ["Backend", "decode_image_by_image"]


@runtime_checkable
class Backend(Protocol):
    """What the pipeline needs from a backend.

    Attributes:
        name: ``torch``, ``onnxruntime`` or ``tensorrt``.
        device: where the backend's outputs live.
        config: the configuration, with the model names actually loaded.
        precision: the encoders' precision (``fp32``, ``fp16``, ``bf16``).
        sam_size: side of SAM's square input (1024 for every released SAM).
    """

    name: str
    device: torch.device
    config: SegmenterConfig
    precision: str
    sam_size: int

    def encode_dinov2(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-normalised float32 -> patch tokens (B, (S/14)², D) (float32, or the
        encoders' fp16 / bf16)."""

    def encode_sam(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, sam_size, sam_size) normalised, zero-padded float32 -> embeddings (B, 256, 64, 64) float32."""

    def decode(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
               boxes: Optional[torch.Tensor] = None, multimask: bool = False,
               mask_input: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """P prompt sets against one (256, 64, 64) embedding: coords (P, N, 2), labels (P, N), boxes
        (P, 4) | None, mask_input (P, 1, 256, 256) | None -> (low-res logits (P, M, 256, 256), IoU (P, M)),
        M = 3 with ``multimask`` else 1."""

    def decode_batch(self, embeddings: torch.Tensor, image_index: torch.Tensor, coords: torch.Tensor,
                     labels: torch.Tensor, point_mask: Optional[torch.Tensor] = None,
                     boxes: Optional[torch.Tensor] = None, multimask: bool = False,
                     mask_input: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """P prompt sets of several images: embeddings (T, 256, 64, 64), image_index (P,) int64, the
        rest as :meth:`decode`; point_mask (P, N) bool, False = padding beyond a set's own width that
        attention ignores (None: every column counts)."""
