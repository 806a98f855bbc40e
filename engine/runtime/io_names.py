"""Fixed input/output names of the exported graphs.

The exporters (:mod:`refseg.export`) name the tensors of the ONNX graphs (and so of the TensorRT
engines) with these constants, and the ONNX Runtime / TensorRT backends feed and read tensors by
them; ``manifest.json`` lists them for callers outside Python. Shapes use ``B`` (images), ``P`` (prompt sets), ``N``
(points per set), ``S`` (DINOv2 input side), ``T`` (patch tokens = (S/14)²), ``D`` (token width).
"""
from __future__ import annotations

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
