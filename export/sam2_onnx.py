"""Export the SAM 2 / 2.1 / MedSAM2 image encoder and prompt decoder to ONNX.

Usage::

    records = export_sam2("exports/sam2_t", sam_checkpoint="sam2.1_hiera_tiny.pt")

writes ``sam2_encoder.onnx`` and ``sam2_decoder.onnx`` (graphs traced with
:func:`refseg.export.onnx_export.export_graph`: TorchScript exporter, opset >= 17, fp32, checked by
``onnx.checker``). The graphs call the model's own methods (:class:`refseg.models.sam2.Sam2`):

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

The graph names live here until the runtime reads SAM 2 graphs (then they move to
``refseg.runtime.io_names`` beside SAM's).
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

log = logging.getLogger(__name__)

GRAPH_FILES = {"sam2_encoder": "sam2_encoder.onnx", "sam2_decoder": "sam2_decoder.onnx"}
ENCODER_INPUT = "images"
ENCODER_OUTPUTS = ("image_embed", "high_res_feats_0", "high_res_feats_1")
DECODER_INPUTS = ENCODER_OUTPUTS + ("point_coords", "point_labels", "mask_input", "has_mask_input")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions", "object_score_logits")


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
        return tuple(self.model.encode_image(images))


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
            shapes={"image_embed": [1, dim, grid, grid], "high_res_feats_0": [1, dim // 8, low, low],
                    "high_res_feats_1": [1, dim // 4, 2 * grid, 2 * grid],
                    "point_coords": ["prompt_sets", "points", 2], "point_labels": ["prompt_sets", "points"],
                    "mask_input": ["mask_sets", 1, low, low], "has_mask_input": [1],
                    "low_res_masks": ["prompt_sets", 4, low, low], "iou_predictions": ["prompt_sets", 4],
                    "object_score_logits": ["prompt_sets", 1]})

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
        low = shapes["mask_input"][-1]
        return (*features, coords, labels, torch.zeros(1, 1, low, low), torch.zeros(1))

    def forward(self, image_embed: torch.Tensor, high_res_feats_0: torch.Tensor, high_res_feats_1: torch.Tensor,
                point_coords: torch.Tensor, point_labels: torch.Tensor, mask_input: torch.Tensor,
                has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self.model.embed_packed_prompts(point_coords, point_labels)
        dense = self.model.embed_mask_prompt(mask_input, has_mask_input)
        out = self.model.decode_all(Sam2Embedding(image_embed, high_res_feats_0, high_res_feats_1), sparse, dense,
                                    self.dense_pe)
        return out.masks, out.iou, out.object_score_logits


def export_sam2(out_dir: str | os.PathLike, sam_checkpoint: str | os.PathLike | None = None, *,
                sam: str | None = None, model: nn.Module | None = None, opset: int = DEFAULT_OPSET,
                device: str | torch.device = "cpu") -> dict:
    """Export the SAM 2 encoder and decoder graphs of one checkpoint into ``out_dir``.

    Args:
        out_dir: output folder (created).
        sam_checkpoint: an official SAM 2 / 2.1 / MedSAM2 file; None looks up the official file of ``sam``.
        sam: model name (``sam2.1_hiera_t``, ..., ``medsam2``), inferred from the file when None.
        model: an already built :class:`~refseg.models.sam2.Sam2` to export instead (tests; any input size).
        opset: ONNX opset, >= 17.
        device: where the trace runs.

    Returns:
        ``{"sam2_encoder": record, "sam2_decoder": record}`` with the records of ``export_graph``
        (files, precision, input and output shapes).
    """
    if model is None:
        from refseg.models.build import build_sam2

        model = build_sam2(sam, sam_checkpoint)
    model = model.float().eval()
    out_dir = Path(out_dir)
    records = {
        "sam2_encoder": export_graph(Sam2EncoderExport(model), out_dir / GRAPH_FILES["sam2_encoder"], "fp32",
                                     opset, device),
        "sam2_decoder": export_graph(Sam2DecoderExport(model), out_dir / GRAPH_FILES["sam2_decoder"], "fp32",
                                     opset, device),
    }
    log.info("SAM 2 export of %s (input %d) written to %s", model.spec.name, model.spec.image_size, out_dir)
    return records
