"""SAM mask decoder: image embedding + prompt embeddings -> low-resolution mask logits and IoU scores.

Parameter names follow the official checkpoints (``mask_decoder.{iou_token, mask_tokens, transformer.*,
output_upscaling.{0,1,3}, output_hypernetworks_mlps.<i>.layers.<j>, iou_prediction_head.layers.<j>}``).

Batching prompt sets: B prompt sets can be decoded against ONE image embedding (batch 1). The
official decoder ``repeat_interleave``s the embedding and its positional encoding B times; here the
embedding is broadcast in the single ``image + dense_prompt`` addition (which has to produce B
copies anyway: the transformer updates the image tokens separately for every prompt set) and the
positional encoding is never repeated. An image batch of size B, one prompt set per image, is also
accepted (pairs: set i is decoded against image i). To decode several sets per image for several
images, index the embeddings first (``embeddings[image_index]``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norms import LayerNorm2d
from .sam_transformer import TwoWayTransformer


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them: (..., input_dim) -> (..., output_dim)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class MaskDecoder(nn.Module):
    """Predicts masks from image and prompt embeddings with a two-way transformer.

    Args:
        transformer_dim: token width (256).
        num_multimask_outputs: masks predicted for ambiguous prompts (3); one more token predicts
            the single-mask output.
        iou_head_depth, iou_head_hidden_dim: the IoU-prediction MLP (3 layers of 256).
        transformer: the two-way transformer; SAM's (depth 2, 8 heads, MLP 2048) by default.
    """

    def __init__(self, transformer_dim: int = 256, num_multimask_outputs: int = 3,
                 iou_head_depth: int = 3, iou_head_hidden_dim: int = 256,
                 transformer: nn.Module | None = None) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer if transformer is not None else TwoWayTransformer(
            depth=2, embedding_dim=transformer_dim, num_heads=8, mlp_dim=2048)
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens,
                                       iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool, prompt_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompt sets.

        Args:
            image_embeddings: (1 or B, C, h, w) from the image encoder (1: shared by all sets).
            image_pe: (1, C, h, w) from ``PromptEncoder.get_dense_pe()``.
            sparse_prompt_embeddings: (B, N, C); dense_prompt_embeddings: (B, C, h, w).
            multimask_output: True -> the 3 ambiguity masks, False -> the single-mask output.
            prompt_mask: (B, N) bool or None: False marks sparse tokens that only pad sets of
                different lengths to one tensor (ignored by attention; see ``TwoWayTransformer``).

        Returns:
            low_res_masks (B, M, 4h, 4w) logits (256×256 for SAM) and iou_pred (B, M), M = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings, prompt_mask)
        if multimask_output:  # a Python bool: a static choice for tracing
            return masks[:, 1:], iou_pred[:, 1:]
        return masks[:, :1], iou_pred[:, :1]

    def predict_masks(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                      sparse_prompt_embeddings: torch.Tensor,
                      dense_prompt_embeddings: torch.Tensor, prompt_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` outputs: masks (B, 4, 4h, 4w) and IoU (B, 4); see :meth:`forward`."""
        batch = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, batch):
            raise ValueError(f"MaskDecoder: image_embeddings batch {image_embeddings.shape[0]} must be "
                             f"1 or the number of prompt sets {batch}")
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1),
                            sparse_prompt_embeddings.to(output_tokens.dtype)], dim=1)
        src = image_embeddings + dense_prompt_embeddings  # broadcasts a shared embedding
        src = src.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape
        token_mask = None
        if prompt_mask is not None:
            token_mask = torch.cat([prompt_mask.new_ones(batch, output_tokens.shape[0]), prompt_mask], 1)
        hs, keys = self.transformer(src, image_pe, tokens, token_mask)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                                for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)


def select_best_mask(masks: torch.Tensor, iou_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per prompt set, the mask with the highest predicted IoU.

    Args:
        masks: (B, M, H, W) logits or binary masks; iou_pred: (B, M).

    Returns:
        (B, 1, H, W) masks and (B, 1) scores (ties go to the lowest index, as ``argmax`` does).
    """
    best = iou_pred.argmax(dim=1, keepdim=True)  # (B, 1)
    index = best[:, :, None, None].expand(-1, -1, masks.shape[2], masks.shape[3])
    return masks.gather(1, index), iou_pred.gather(1, best)
