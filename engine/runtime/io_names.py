"""Fixed names of the exported files and graphs: where :mod:`refseg.export` and the runtime meet.

The exporters (:mod:`refseg.export`) name the files of an export folder and the tensors of the ONNX
graphs (and so of the TensorRT engines) with these constants, and the ONNX Runtime / TensorRT
backends read files and feed tensors by them; ``manifest.json`` lists them for callers outside
Python. :func:`pack_prompts` is the decoder graph's prompt convention, used by the backends and by
the export's own checks. This is the only runtime module that :mod:`refseg.export` imports. Shapes use ``B`` (images), ``P`` (prompt sets), ``N``
(points per set), ``S`` (DINOv2 input side; SAM 2's input side in the SAM 2 names), ``T`` (patch tokens =
(S/14)²), ``D`` (token width).
"""
from __future__ import annotations

import torch

# An export folder: the graphs by these file names plus MANIFEST_NAME (written last, format FORMAT_VERSION).
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
GRAPH_FILES = {"dinov2": "dinov2.onnx", "sam_encoder": "sam_encoder.onnx",
               "sam_decoder": "sam_decoder.onnx"}
# The positional basis of a DINOv3 export (refseg.pipeline.feature_norm.positional_basis of the encoder graph's
# patch tokens of the blank image at S): raw little-endian float32, row-major (D, rank), column j the j-th basis
# vector. The manifest's FEATURE_DEBIAS_KEY record says the mode ("none" / "project") and, for "project", the
# file, its shape, rank and dtype; the C++ pipeline projects reference and target tokens with it.
POSITIONAL_BASIS_FILE = "positional_basis.f32"
FEATURE_DEBIAS_KEY = "feature_debias"

# DINOv2: images (B, 3, S, S) float, ImageNet-normalised.
DINOV2_INPUT = "images"
DINOV2_PATCH_TOKENS = "patch_tokens"    # (B, T, D), x_norm_patchtokens
DINOV2_CLS_TOKEN = "cls_token"          # (B, D), x_norm_clstoken
DINOV2_OUTPUTS = (DINOV2_PATCH_TOKENS, DINOV2_CLS_TOKEN)

# SAM image encoder: images (B, 3, 1024, 1024) float, normalised and zero-padded.
SAM_ENCODER_INPUT = "images"
SAM_ENCODER_OUTPUT = "image_embeddings"  # (B, 256, 64, 64)

# SAM prompt encoder + mask decoder for P prompt sets against one image embedding.
SAM_DECODER_EMBEDDINGS = "image_embeddings"  # (1, 256, 64, 64)
SAM_DECODER_COORDS = "point_coords"          # (P, N, 2) float, (x, y) in the 1024 frame
SAM_DECODER_LABELS = "point_labels"          # (P, N) float: 1 pos, 0 neg, -1 pad, 2/3 box corners
SAM_DECODER_MASK_INPUT = "mask_input"        # (P, 1, 256, 256) float logits
SAM_DECODER_HAS_MASK = "has_mask_input"      # (1,) float: 1 when mask_input is used
SAM_DECODER_INPUTS = (SAM_DECODER_EMBEDDINGS, SAM_DECODER_COORDS, SAM_DECODER_LABELS,
                      SAM_DECODER_MASK_INPUT, SAM_DECODER_HAS_MASK)
SAM_DECODER_MASKS = "low_res_masks"          # (P, C, 256, 256) logits, C = 3 multimask else 1
# refseg export writes the decoder with all four mask tokens (C = 4: index 0 the single-mask output,
# 1..3 the multimask ones; manifest "mask_outputs": "all"); the backends slice C = 3 or 1 from it.
SAM_DECODER_IOU = "iou_predictions"          # (P, C)
SAM_DECODER_OUTPUTS = (SAM_DECODER_MASKS, SAM_DECODER_IOU)

# SAM 2 / 2.1 / MedSAM2: the same two graph keys ("sam_encoder", "sam_decoder"), other files and tensors.
# Their manifest records say SAM_FAMILY_KEY: SAM2_FAMILY (SAM's records: "sam" or nothing). S is the SAM 2
# input side (1024; MedSAM2 512; the encoder graph's input shape says which).
SAM_FAMILY_KEY = "family"
SAM2_FAMILY = "sam2"
SAM2_GRAPH_FILES = {"sam_encoder": "sam2_encoder.onnx", "sam_decoder": "sam2_decoder.onnx"}
SAM2_ENCODER_INPUT = "images"                 # (B, 3, S, S) float: stretched, ImageNet-normalised
SAM2_IMAGE_EMBED = "image_embed"              # (B, 256, S/16, S/16), no_mem_embed added
SAM2_HIGH_RES_0 = "high_res_feats_0"          # (B, 32, S/4, S/4)
SAM2_HIGH_RES_1 = "high_res_feats_1"          # (B, 64, S/8, S/8)
SAM2_ENCODER_OUTPUTS = (SAM2_IMAGE_EMBED, SAM2_HIGH_RES_0, SAM2_HIGH_RES_1)
# The decoder: P prompt sets against one image (the three features with batch 1); prompts packed by
# refseg.models.sam2.Sam2.pack_prompts (box corners first, then the points, then ONE padding point);
# mask_input (M, 1, S/4, S/4), M = 1 or P.
SAM2_DECODER_INPUTS = SAM2_ENCODER_OUTPUTS + (SAM_DECODER_COORDS, SAM_DECODER_LABELS, SAM_DECODER_MASK_INPUT,
                                              SAM_DECODER_HAS_MASK)
SAM2_OBJECT_SCORE = "object_score_logits"     # (P, 1): > 0 = the object is present
SAM2_DECODER_OUTPUTS = (SAM_DECODER_MASKS, SAM_DECODER_IOU, SAM2_OBJECT_SCORE)  # masks (P, 4, S/4, S/4): all tokens


def pack_prompts(coords: torch.Tensor, labels: torch.Tensor,
                 boxes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn SAM's (points, boxes) prompts into the decoder graph's ``point_coords``/``point_labels``.

    Args:
        coords: (P, N, 2) (x, y) pixels of the 1024 frame; labels: (P, N) 1 / 0 / -1.
        boxes: (P, 4) XYXY pixels of the 1024 frame, or None.

    Returns:
        coords (P, N + 2, 2) with the box corners (labels 2, 3) appended when ``boxes`` is given,
        else (P, N + 1, 2) with one padding point (0, 0) of label -1, both float32 — the same
        sparse prompt SAM's prompt encoder builds from (points, boxes).
    """
    coords = coords.float()
    labels = labels.float()
    sets = coords.shape[0]
    if boxes is None:
        extra = coords.new_zeros(sets, 1, 2)
        extra_labels = labels.new_full((sets, 1), -1.0)
    else:
        extra = boxes.float().reshape(sets, 2, 2).to(coords.device)
        extra_labels = torch.tensor([2.0, 3.0], device=labels.device).expand(sets, 2)
    return torch.cat([coords, extra], dim=1), torch.cat([labels, extra_labels], dim=1)
