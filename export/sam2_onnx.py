"""Export the SAM 2 / 2.1 / MedSAM2 image encoder and prompt decoder to ONNX.

Usage::

    records = export_sam2("exports/sam2_t", sam_checkpoint="sam2.1_hiera_tiny.pt")

writes ``sam2_encoder.onnx`` and ``sam2_decoder.onnx`` (graphs traced with
:func:`refseg.export.onnx_export.export_graph`: TorchScript exporter, opset >= 17, checked by
``onnx.checker``; the encoder fp32 or fp16 (LayerNorm and Softmax kept in fp32), the decoder fp32). The graphs call the model's own methods (:class:`refseg.models.sam2.Sam2`):

* encoder: ``images`` (B, 3, S, S) float32, normalised as ``refseg.models.sam2_transforms`` does ->
  ``image_embed`` (B, 256, S/16, S/16), ``high_res_feats_0`` (B, 32, S/4, S/4), ``high_res_feats_1``
  (B, 64, S/8, S/8) (S = 1024; 512 for MedSAM2). Batch dynamic.
* decoder: P prompt sets against one image: ``image_embed``, ``high_res_feats_0``, ``high_res_feats_1``
  (batch 1), ``point_coords`` (P, N, 2) (x, y) pixels of the S x S input frame, ``point_labels`` (P, N)
  float (1 positive, 0 negative, -1 padding, 2 / 3 box corners), ``mask_input`` (M, 1, S/4, S/4) with
  M = 1 or P, ``has_mask_input`` (1,) -> ``low_res_masks`` (P, 4, S/4, S/4) logits of all four mask
  tokens (index 0 the single-mask output, 1..3 the multimask ones), ``iou_predictions`` (P, 4),
  ``object_score_logits`` (P, 1) (``Sam2.embed_packed_prompts``, ``Sam2.embed_mask_prompt``,
  ``Sam2.decode_all``). Prompts are packed by ``Sam2.pack_prompts``: box corners first,
  then the points, then ONE padding point, always (unlike SAM's graph, where a box replaces the
  padding point). Multimask and dynamic-multimask selection are left to the caller
  (``Sam2MaskDecoder.select_masks`` on the outputs).

File and tensor names are :mod:`refseg.runtime.io_names`' (``SAM2_*``), which the ONNX Runtime backend reads:
``refseg export`` of a SAM 2 checkpoint writes these two graphs beside ``dinov2.onnx`` under the graph keys
``sam_encoder`` / ``sam_decoder`` (records marked ``"family": "sam2"``), see
:func:`refseg.export.onnx_export.export_models`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from refseg.export.onnx_export import DEFAULT_OPSET, export_graph
from refseg.export.wrappers import GraphIO
from refseg.models.sam2 import Sam2Embedding
from refseg.runtime import io_names as io

log = logging.getLogger(__name__)

ENCODER_INPUT, ENCODER_OUTPUTS = io.SAM2_ENCODER_INPUT, io.SAM2_ENCODER_OUTPUTS
DECODER_INPUTS, DECODER_OUTPUTS = io.SAM2_DECODER_INPUTS, io.SAM2_DECODER_OUTPUTS


class Sam2EncoderExport(nn.Module):
    """``images`` (B, 3, S, S) -> (``image_embed``, ``high_res_feats_0``, ``high_res_feats_1``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        size, grid, dim = model.spec.image_size, model.spec.embedding_size, model.spec.d_model
        self.io = GraphIO(
            inputs=(ENCODER_INPUT,), outputs=ENCODER_OUTPUTS,
            shapes={ENCODER_INPUT: ["batch", 3, size, size],
                    ENCODER_OUTPUTS[0]: ["batch", dim, grid, grid],
                    ENCODER_OUTPUTS[1]: ["batch", dim // 8, 4 * grid, 4 * grid],
                    ENCODER_OUTPUTS[2]: ["batch", dim // 4, 2 * grid, 2 * grid]})

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        size = self.model.spec.image_size
        return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.encode_image(images).parts()


class Sam2DecoderExport(nn.Module):
    """Prompt encoder + mask decoder of P packed prompt sets against one image (see module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.register_buffer("dense_pe", model.sam_prompt_encoder.get_dense_pe().clone(), persistent=False)
        grid, dim = model.spec.embedding_size, model.spec.d_model
        low = 4 * grid
        self.io = GraphIO(
            inputs=DECODER_INPUTS, outputs=DECODER_OUTPUTS,
            shapes={io.SAM2_IMAGE_EMBED: [1, dim, grid, grid], io.SAM2_HIGH_RES_0: [1, dim // 8, low, low],
                    io.SAM2_HIGH_RES_1: [1, dim // 4, 2 * grid, 2 * grid],
                    io.SAM_DECODER_COORDS: ["prompt_sets", "points", 2],
                    io.SAM_DECODER_LABELS: ["prompt_sets", "points"],
                    io.SAM_DECODER_MASK_INPUT: ["mask_sets", 1, low, low], io.SAM_DECODER_HAS_MASK: [1],
                    io.SAM_DECODER_MASKS: ["prompt_sets", 4, low, low], io.SAM_DECODER_IOU: ["prompt_sets", 4],
                    io.SAM2_OBJECT_SCORE: ["prompt_sets", 1]})

    def example_inputs(self, prompt_sets: int = 2, points: int = 4) -> tuple[torch.Tensor, ...]:
        """Random features, a box and points per set (packed, with the padding point), a zero mask."""
        gen = torch.Generator().manual_seed(0)
        shapes = self.io.shapes
        features = [torch.randn(*shapes[name], generator=gen) for name in ENCODER_OUTPUTS]
        size = self.model.spec.image_size
        coords = torch.rand(prompt_sets, points, 2, generator=gen) * size
        labels = torch.randint(0, 2, (prompt_sets, points), generator=gen).float()
        labels[:, :2] = torch.tensor([2.0, 3.0])
        labels[:, -1] = -1
        low = shapes[io.SAM_DECODER_MASK_INPUT][-1]
        return (*features, coords, labels, torch.zeros(1, 1, low, low), torch.zeros(1))

    def forward(self, image_embed: torch.Tensor, high_res_feats_0: torch.Tensor, high_res_feats_1: torch.Tensor,
                point_coords: torch.Tensor, point_labels: torch.Tensor, mask_input: torch.Tensor,
                has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self.model.embed_packed_prompts(point_coords, point_labels)
        dense = self.model.embed_mask_prompt(mask_input, has_mask_input)
        out = self.model.decode_all(Sam2Embedding(image_embed, high_res_feats_0, high_res_feats_1), sparse, dense,
                                    self.dense_pe)
        return out.masks, out.iou, out.object_score_logits


def export_sam2_graphs(model: nn.Module, out_dir: str | os.PathLike, precision: str = "fp32",
                       opset: int = DEFAULT_OPSET, device: str | torch.device = "cpu") -> dict:
    """Trace the SAM 2 encoder (in ``precision``: fp32, or fp16 with LayerNorm / Softmax in fp32) and the
    decoder (fp32) of ``model`` into ``out_dir`` (:data:`refseg.runtime.io_names.SAM2_GRAPH_FILES`).

    Returns:
        ``{"sam_encoder": record, "sam_decoder": record}``: the records of ``export_graph`` (files,
        precision, input and output shapes) marked ``"family": "sam2"``, as the manifest holds them.
    """
    model = model.float().eval()
    out_dir = Path(out_dir)
    records = {
        "sam_encoder": export_graph(Sam2EncoderExport(model), out_dir / io.SAM2_GRAPH_FILES["sam_encoder"],
                                    precision, opset, device),
        "sam_decoder": export_graph(Sam2DecoderExport(model), out_dir / io.SAM2_GRAPH_FILES["sam_decoder"], "fp32",
                                    opset, device),
    }
    records["sam_decoder"]["mask_outputs"] = "all"
    for record in records.values():
        record[io.SAM_FAMILY_KEY] = io.SAM2_FAMILY
    log.info("SAM 2 graphs of %s (input %d, encoder %s) written to %s", model.spec.name, model.spec.image_size,
             precision, out_dir)
    return records


def export_sam2(out_dir: str | os.PathLike, sam_checkpoint: str | os.PathLike | None = None, *,
                sam: str | None = None, model: nn.Module | None = None, opset: int = DEFAULT_OPSET,
                device: str | torch.device = "cpu", precision: str = "fp32") -> dict:
    """Export the SAM 2 encoder and decoder graphs of one checkpoint into ``out_dir`` (no manifest: a folder
    the backends run comes from :func:`refseg.export.onnx_export.export_models`, ``refseg export``).

    Args:
        out_dir: output folder (created).
        sam_checkpoint: an official SAM 2 / 2.1 / MedSAM2 file; None looks up the official file of ``sam``.
        sam: model name (``sam2.1_hiera_t``, ..., ``medsam2``), inferred from the file when None.
        model: an already built :class:`~refseg.models.sam2.Sam2` to export instead (tests; any input size).
        opset: ONNX opset, >= 17.
        device: where the trace runs.
        precision: the encoder's (``fp32`` / ``fp16``); the decoder is fp32.

    Returns:
        :func:`export_sam2_graphs`' records.
    """
    if model is None:
        from refseg.models.build import build_sam2

        model = build_sam2(sam, sam_checkpoint)
    return export_sam2_graphs(model, out_dir, precision, opset, device)
