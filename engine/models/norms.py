"""The models' LayerNorms, computed in fp32 whatever the activations' dtype.

In fp16 the variance of activations of a few hundred already exceeds the fp16 range (65504); computing
the statistics in fp32 avoids that overflow, and for fp32 inputs these are exactly ``nn.LayerNorm``.
Both export to ONNX as Cast -> LayerNormalization -> Cast (:mod:`refseg.export.fp16` keeps that
LayerNormalization in fp32 when it converts a graph to fp16).

- :class:`LayerNorm32`: over the last dimension of (..., C) tokens (DINOv2, SAM's ViT and decoder).
- :class:`LayerNorm2d`: over the channel axis of a (B, C, H, W) map (SAM's neck, prompt encoder and
  mask upscaling), with the official parameter names ``weight`` / ``bias``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm32(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension that always computes in fp32.

    Input of any float dtype, shape (..., C); output has the input's dtype. Works with and without
    ``elementwise_affine``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor, computed in fp32.

    Parameters ``weight`` and ``bias`` have shape (C,), as in the official SAM checkpoints.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.num_channels = num_channels  # a Python int keeps traced graphs static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last lets one fused layer_norm kernel (ONNX LayerNormalization) do the work.
        y = F.layer_norm(x.float().permute(0, 2, 3, 1), (self.num_channels,), self.weight.float(),
                         self.bias.float(), self.eps)
        return y.permute(0, 3, 1, 2).to(x.dtype)
