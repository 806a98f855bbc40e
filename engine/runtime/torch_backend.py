"""The PyTorch backend: DINOv2 and SAM modules run eagerly (optionally in fp16/bf16).

Every backend offers the same three calls, with the same tensors as the exported graphs
(names in :mod:`refseg.runtime.io_names`):

- ``encode_dinov2(images (B, 3, S, S) float32) -> tokens (B, N, D)``, float32, or float16 / bfloat16 when
  the encoders run in that precision: the match kernel then gets them as they are (tensor cores on a GPU)
- ``encode_sam(images (B, 3, 1024, 1024) float32) -> embeddings (B, 256, 64, 64) float32``
- ``decode(embedding (256, 64, 64), coords (P, N, 2), labels (P, N), boxes (P, 4) | None,
  multimask) -> (low_res_logits (P, C, 256, 256), iou (P, C))``, coordinates in SAM's 1024 frame,
  (x, y) order, labels 1 = positive, 0 = negative, -1 = padding.
"""
from __future__ import annotations

import logging

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


class TorchBackend:
    """Runs the modules with PyTorch on one device.

    Args:
        dinov2: DINOv2 module (``forward_features``).
        sam: SAM module with ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.
        device: torch device.
        precision: ``fp32``, ``fp16`` or ``bf16`` for the encoders (the decoder and all outputs
            stay fp32; LayerNorms compute in fp32 inside the models).
        feature_key: which ``forward_features`` entry to use as tokens.
    """

    name = "torch"

    def __init__(self, dinov2: nn.Module, sam: nn.Module, device: torch.device,
                 precision: str = "fp32", feature_key: str = "x_norm_patchtokens"):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        self.device = device
        self.dtype = DTYPES[precision]
        if self.dtype == torch.float16 and device.type == "cpu":
            log.warning("fp16 on the CPU is slow and partly unsupported; consider bf16 or fp32")
        self.dinov2 = dinov2.to(device=device, dtype=self.dtype).eval()
        self.sam = sam.eval()
        self.sam.image_encoder.to(device=device, dtype=self.dtype)
        self.sam.prompt_encoder.to(device=device)
        self.sam.mask_decoder.to(device=device)
        self.feature_key = feature_key

    @torch.inference_mode()
    def encode_dinov2(self, images: torch.Tensor) -> torch.Tensor:
        out = self.dinov2.forward_features(images.to(self.device, self.dtype))
        return out[self.feature_key]  # encoder dtype: no fp32 copy before matching

    @torch.inference_mode()
    def encode_sam(self, images: torch.Tensor) -> torch.Tensor:
        return self.sam.image_encoder(images.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
               boxes: torch.Tensor | None = None, multimask: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        return self.sam.decode(embedding.to(dev, torch.float32)[None], coords.to(dev, torch.float32),
                               labels.to(dev), None if boxes is None else boxes.to(dev, torch.float32),
                               multimask_output=multimask)
