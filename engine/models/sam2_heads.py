"""SAM 2's prompt encoder and mask decoder (the "SAM heads"), built on SAM's own modules.

Parameter names follow the official checkpoints (``sam_prompt_encoder.*`` is SAM's prompt encoder;
``sam_mask_decoder.*`` is SAM's mask decoder plus ``obj_score_token``, ``pred_obj_score_head``,
``conv_s0`` and ``conv_s1``). What differs from SAM (ViT) and is handled here:

* box corners are passed as points with labels 2 and 3, which get their corner embeddings
  (SAM's encoder gives such points the positional encoding alone), and, with no ``boxes`` argument,
  one padding point is appended after them, as ``SAM2ImagePredictor`` does;
* the decoder has an object-score token (placed first) and head: a logit > 0 means "the object is
  in the image";
* the upscaling adds the high-resolution features of the image encoder (stride 8 and 4, already
  projected by ``conv_s1`` / ``conv_s0``, see :meth:`Sam2MaskDecoder.project_high_res`);
* the IoU head may end in a sigmoid (``iou_prediction_use_sigmoid``, SAM 2.1 and SAM 2 alike);
* with ``multimask_output=False``, "dynamic multimask via stability" may replace an unstable
  single-mask output by the best multimask one (what ``build_sam2(apply_postprocessing=True)``,
  the official default, switches on).

SAM's two-way transformer is the same except for the names of its token MLP's layers
(``mlp.layers.0/1`` in SAM 2 checkpoints, ``mlp.lin1/lin2`` in SAM's); the checkpoint loader
renames them (:mod:`refseg.models.sam2_state_dict`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .sam_mask_decoder import MLP, MaskDecoder
from .sam_prompt_encoder import PromptEncoder

STABILITY_DELTA, STABILITY_THRESH = 0.05, 0.98
"""The official dynamic-multimask stability test (``build_sam2(apply_postprocessing=True)``)."""


class Sam2PromptEncoder(PromptEncoder):
    """SAM's :class:`PromptEncoder` where labels 2 / 3 (box corners given as points) add the
    corner embeddings ``point_embeddings[2]`` / ``[3]``."""

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """coords (B, N, 2) (x, y) input-frame pixels, labels (B, N) in {-1, 0, 1, 2, 3}
        -> (B, N(+1), C); ``pad`` appends one padding point (label -1)."""
        emb = super().embed_points(coords, labels, pad)
        if pad:
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        lab = labels[..., None]
        zero = emb.new_zeros(())
        emb = emb + torch.where(lab == 2, self.point_embeddings[2].weight, zero)
        return emb + torch.where(lab == 3, self.point_embeddings[3].weight, zero)


class DecoderOutput(NamedTuple):
    """Every output token of :meth:`Sam2MaskDecoder.predict_all` for B prompt sets.

    masks: (B, 4, 4h, 4w) logits (index 0 the single-mask output, 1..3 the multimask ones);
    iou: (B, 4); tokens: (B, 4, C) the mask tokens after the transformer (SAM 2 turns one into the
    object pointer of its memory); object_score_logits: (B, 1).
    """

    masks: torch.Tensor
    iou: torch.Tensor
    tokens: torch.Tensor
    object_score_logits: torch.Tensor


class Sam2MaskDecoder(MaskDecoder):
    """SAM 2's mask decoder: SAM's, plus object score, high-resolution features and dynamic multimask.

    Args:
        transformer_dim: token width (256).
        use_high_res_features: add the stride-4 / stride-8 features in the upscaling (True in every
            release) and hold ``conv_s0`` / ``conv_s1``.
        pred_obj_scores, pred_obj_scores_mlp: object-score token and head (an MLP when True).
        iou_prediction_use_sigmoid: squash the IoU predictions with a sigmoid.
        dynamic_multimask_stability_delta, dynamic_multimask_stability_thresh: the stability test
            of :meth:`select_masks` (0.05 and 0.98, the official post-processing values).
    """

    def __init__(self, transformer_dim: int = 256, use_high_res_features: bool = True,
                 pred_obj_scores: bool = True, pred_obj_scores_mlp: bool = True,
                 iou_prediction_use_sigmoid: bool = True, dynamic_multimask_stability_delta: float = STABILITY_DELTA,
                 dynamic_multimask_stability_thresh: float = STABILITY_THRESH) -> None:
        super().__init__(transformer_dim=transformer_dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, transformer_dim)
            self.pred_obj_score_head = (MLP(transformer_dim, transformer_dim, 1, 3) if pred_obj_scores_mlp
                                        else nn.Linear(transformer_dim, 1))
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.iou_prediction_use_sigmoid = iou_prediction_use_sigmoid
        self.stability_delta = dynamic_multimask_stability_delta
        self.stability_thresh = dynamic_multimask_stability_thresh

    def project_high_res(self, level0: torch.Tensor, level1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The neck's stride-4 and stride-8 levels (B, C, 4h, 4w), (B, C, 2h, 2w) -> the decoder's
        high-resolution features (B, C/8, 4h, 4w), (B, C/4, 2h, 2w). Done once per image (the
        official ``forward_image`` does it in the image encoder step)."""
        return self.conv_s0(level0), self.conv_s1(level1)

    def predict_all(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                    sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                    high_res_features: tuple[torch.Tensor, torch.Tensor] | None = None,
                    prompt_mask: torch.Tensor | None = None) -> DecoderOutput:
        """Decode B prompt sets and return every output token (:class:`DecoderOutput`).

        Args:
            image_embeddings: (1 or B, C, h, w) (1: shared by all sets).
            image_pe: (1, C, h, w) from ``Sam2PromptEncoder.get_dense_pe()``.
            sparse_prompt_embeddings: (B, N, C); dense_prompt_embeddings: (B or 1, C, h, w).
            high_res_features: (feat_s0 (1 or B, C/8, 4h, 4w), feat_s1 (1 or B, C/4, 2h, 2w)) from
                :meth:`project_high_res`; required when ``use_high_res_features``.
            prompt_mask: (B, N) bool or None: False marks sparse tokens that only pad sets of
                different lengths (no token attends to them, see ``TwoWayTransformer``).
        """
        batch = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(f"Sam2MaskDecoder: image_embeddings batch {image_embeddings.shape[0]} must be "
                             f"1 or the number of prompt sets {batch}")
        if self.use_high_res_features and high_res_features is None:
            raise ValueError("Sam2MaskDecoder: high_res_features are required (use_high_res_features)")
        parts = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            parts.insert(0, self.obj_score_token.weight)
        output_tokens = torch.cat(parts, dim=0)
        first = 1 if self.pred_obj_scores else 0  # index of the IoU token
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1),
                            sparse_prompt_embeddings.to(output_tokens.dtype)], dim=1)
        src = (image_embeddings + dense_prompt_embeddings).expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        token_mask = None
        if prompt_mask is not None:
            token_mask = torch.cat([prompt_mask.new_ones(batch, output_tokens.shape[0]), prompt_mask.bool()], 1)
        hs, keys = self.transformer(src, image_pe, tokens, token_mask)
        iou_token_out = hs[:, first, :]
        mask_tokens_out = hs[:, first + 1:first + 1 + self.num_mask_tokens, :]

        src = keys.transpose(1, 2).reshape(b, c, h, w)
        if self.use_high_res_features:
            dc1, ln1, act1, dc2, act2 = self.output_upscaling
            feat_s0, feat_s1 = high_res_features
            upscaled = act1(ln1(dc1(src) + feat_s1))
            upscaled = act2(dc2(upscaled) + feat_s0)
        else:
            upscaled = self.output_upscaling(src)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                                for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou = self.iou_prediction_head(iou_token_out)
        if self.iou_prediction_use_sigmoid:
            iou = torch.sigmoid(iou)
        if self.pred_obj_scores:
            object_score = self.pred_obj_score_head(hs[:, 0, :])
        else:  # the official constant: sigmoid(10) ~ 1, "the object is there"
            object_score = iou.new_full((batch, 1), 10.0)
        return DecoderOutput(masks, iou, mask_tokens_out, object_score)

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                      prompt_mask: torch.Tensor | None = None,
                      high_res_features: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """All four mask outputs (B, 4, 4h, 4w) and IoU (B, 4), as ``MaskDecoder.predict_masks``."""
        out = self.predict_all(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                               high_res_features, prompt_mask)
        return out.masks, out.iou

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """(..., H, W) logits -> (...) stability scores (:func:`stability_scores` with this decoder's delta)."""
        return stability_scores(mask_logits, self.stability_delta)

    def select_masks(self, masks: torch.Tensor, iou: torch.Tensor, multimask_output: bool,
                     dynamic_multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`select_masks` with this decoder's stability delta and threshold."""
        return select_masks(masks, iou, multimask_output, dynamic_multimask, self.stability_delta,
                            self.stability_thresh)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool, prompt_mask: torch.Tensor | None = None,
                high_res_features: tuple[torch.Tensor, torch.Tensor] | None = None,
                dynamic_multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode and select (:meth:`predict_all` then :meth:`select_masks`).

        Returns:
            low_res_masks (B, M, 4h, 4w) logits, iou_predictions (B, M) (M = 3 or 1) and
            object_score_logits (B, 1).
        """
        out = self.predict_all(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                               high_res_features, prompt_mask)
        masks, iou = self.select_masks(out.masks, out.iou, multimask_output, dynamic_multimask)
        return masks, iou, out.object_score_logits



def stability_scores(mask_logits: torch.Tensor, delta: float = STABILITY_DELTA) -> torch.Tensor:
    """(..., H, W) logits -> (...) area(logit > delta) / area(logit > -delta) (1 where both are 0)."""
    flat = mask_logits.flatten(-2)
    inner = (flat > delta).sum(-1).float()
    outer = (flat > -delta).sum(-1).float()
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.ones_like(inner))


def select_masks(masks: torch.Tensor, iou: torch.Tensor, multimask_output: bool, dynamic_multimask: bool = False,
                 delta: float = STABILITY_DELTA, thresh: float = STABILITY_THRESH
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the returned outputs from all four mask tokens (masks (B, 4, H, W), iou (B, 4)): 1..3 when
    ``multimask_output``, else 0; with ``dynamic_multimask`` a single-mask output whose stability score is
    below ``thresh`` is replaced by the multimask output of highest predicted IoU (no host read).
    Returns (B, M, H, W), (B, M). Shared by the model and the exported backends (which get all four)."""
    if multimask_output:
        return masks[:, 1:], iou[:, 1:]
    if not dynamic_multimask:
        return masks[:, :1], iou[:, :1]
    best = iou[:, 1:].argmax(dim=-1, keepdim=True)  # (B, 1)
    index = (best + 1)[:, :, None, None].expand(-1, -1, masks.shape[-2], masks.shape[-1])
    best_masks, best_iou = masks.gather(1, index), iou.gather(1, best + 1)
    stable = stability_scores(masks[:, :1], delta) >= thresh  # (B, 1)
    return (torch.where(stable[..., None, None], masks[:, :1], best_masks),
            torch.where(stable, iou[:, :1], best_iou))
