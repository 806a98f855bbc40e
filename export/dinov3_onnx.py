"""Export the DINOv3 encoder to ONNX with the graph contract of the DINOv2 graph.

``images`` (B, 3, H, W) float32, ImageNet-normalised -> ``patch_tokens`` (B, T, D) (``x_norm_patchtokens``,
T = (H/16)(W/16)) and ``cls_token`` (B, D): the tensor names of :mod:`refseg.runtime.io_names`, so a
runtime that feeds the DINOv2 graph feeds this one the same way. H and W are fixed when the wrapper is
built: the RoPE sine/cosine tables are computed once (:class:`refseg.export.wrappers.Dinov3Export`) and enter
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
from refseg.export.wrappers import Dinov3Export, image_hw
from refseg.models.dinov3 import Dinov3VisionTransformer

__all__ = ["Dinov3Export", "export_dinov3"]  # the wrapper lives in refseg.export.wrappers (AOTI uses it too)

log = logging.getLogger(__name__)


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
    record.update(model=model.spec.name, image_size=list(image_hw(image_size)))
    log.info("DINOv3 %s exported at %s to %s (%s)", model.spec.name, record["image_size"], path, precision)
    return record
