"""Export the DINOv3 encoder to ONNX with the graph contract of the DINOv2 graph.

``images`` (B, 3, H, W) float32, ImageNet-normalised -> ``patch_tokens`` (B, T, D) (``x_norm_patchtokens``,
T = (H/16)(W/16)) and ``cls_token`` (B, D): the tensor names of :mod:`refseg.runtime.io_names`, so a
runtime that feeds the DINOv2 graph feeds this one the same way. H and W are fixed when the wrapper is
built: the RoPE sine/cosine tables are computed once here (``Dinov3VisionTransformer.rope``) and enter
the graph as constants; the batch is dynamic. Tracing, fp16 conversion, shape stamping and
``onnx.checker`` are :func:`refseg.export.onnx_export.export_graph`'s.

Usage::

    from refseg.export.dinov3_onnx import export_dinov3
    record = export_dinov3("dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", "exports/dinov3.onnx", 512)
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn

from refseg.export.onnx_export import DEFAULT_OPSET, export_graph
from refseg.export.wrappers import GraphIO
from refseg.models.dinov3 import Dinov3VisionTransformer
from refseg.runtime import io_names as io

log = logging.getLogger(__name__)


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = (int(v) for v in image_size)
    return height, width


class Dinov3Export(nn.Module):
    """DINOv3 -> (``patch_tokens`` (B, T, D), ``cls_token`` (B, D)) at a fixed input size.

    Args:
        model: a :class:`Dinov3VisionTransformer` (eval mode; its parameters are shared, not copied).
        image_size: S (square) or (H, W), multiples of 16.

    The forward pass is the model's ``prepare_tokens`` + ``features_from_tokens`` (its
    ``forward_features`` for ``masks=None``) with the RoPE tables held as buffers.
    """

    def __init__(self, model: Dinov3VisionTransformer, image_size: int | tuple[int, int]) -> None:
        super().__init__()
        height, width = _size(image_size)
        patch = model.patch_size
        if min(height, width) <= 0 or height % patch or width % patch:
            raise ValueError(f"Dinov3Export: image size {height}x{width} (HxW) is not a positive multiple of "
                             f"the patch size {patch}")
        self.model = model
        self.image_size = (height, width)
        with torch.no_grad():
            sin, cos = model.rope((height // patch, width // patch))
        self.register_buffer("rope_sin", sin.clone(), persistent=False)
        self.register_buffer("rope_cos", cos.clone(), persistent=False)
        self.num_tokens = (height // patch) * (width // patch)
        self.io = GraphIO(
            inputs=(io.DINOV2_INPUT,), outputs=io.DINOV2_OUTPUTS,
            shapes={io.DINOV2_INPUT: ["batch", 3, height, width],
                    io.DINOV2_PATCH_TOKENS: ["batch", self.num_tokens, model.embed_dim],
                    io.DINOV2_CLS_TOKEN: ["batch", model.embed_dim]})

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Random ``images`` of the export size (batch 2 keeps the traced batch symbolic)."""
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, 3, *self.image_size, generator=gen),)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.prepare_tokens(images)
        features = self.model.features_from_tokens(tokens, (self.rope_sin, self.rope_cos))
        return features["x_norm_patchtokens"], features["x_norm_clstoken"]


def export_dinov3(model: Dinov3VisionTransformer | str | os.PathLike, path: str | os.PathLike,
                  image_size: int | tuple[int, int], precision: str = "fp32", opset: int = DEFAULT_OPSET,
                  device: str | torch.device = "cpu") -> dict:
    """Export a DINOv3 encoder (a built model, or a checkpoint file / Hugging Face folder) to ``path``.

    Args:
        model: :class:`Dinov3VisionTransformer`, or what :func:`refseg.models.build_dinov3` accepts.
        path: output ``.onnx`` file (``<name>.onnx.data`` beside it over ~1.8 GB: ViT-H+).
        image_size: S or (H, W), multiples of 16, fixed in the graph.
        precision: ``fp32`` or ``fp16`` (LayerNorm and Softmax kept in fp32; float32 I/O).

    Returns:
        :func:`export_graph`'s record, plus ``"model"`` (the spec name) and ``"image_size"`` [H, W].
    """
    if not isinstance(model, nn.Module):
        from refseg.models.build import build_dinov3

        model = build_dinov3(checkpoint=model)
    model = model.float().eval()
    record = export_graph(Dinov3Export(model, image_size), path, precision, opset, device)
    record.update(model=model.spec.name, image_size=list(_size(image_size)))
    log.info("DINOv3 %s exported at %s to %s (%s)", model.spec.name, record["image_size"], path, precision)
    return record
