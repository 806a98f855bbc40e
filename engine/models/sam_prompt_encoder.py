"""SAM prompt encoder: points, boxes and low-resolution masks -> sparse and dense prompt embeddings.

Parameter names follow the official checkpoints
(``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``,
``prompt_encoder.point_embeddings.<0..3>.weight``, ``prompt_encoder.not_a_point_embed.weight``,
``prompt_encoder.mask_downscaling.{0,1,3,4,6}.*``, ``prompt_encoder.no_mask_embed.weight``).

Coordinates are (x, y) pixels in the model's input frame (the 1024×1024 padded image; see
``refseg.models.sam_transforms.resize_coords``). Point labels: 1 foreground, 0 background,
−1 "not a point" (padding: lets prompt sets with different point counts share one tensor; its
embedding does not depend on the coordinates). Any other label gets the positional encoding alone,
as in the official ``PromptEncoder``.

The label handling uses ``torch.where`` instead of boolean-mask assignment, so the forward pass has
no data-dependent shapes (``torch.compile`` / ONNX friendly); the numbers are the same.
Positional encodings are computed in fp32 whatever the module dtype, then cast.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .norms import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding of (x, y) coordinates.

    Buffer ``positional_encoding_gaussian_matrix`` (2, num_pos_feats) maps normalised coordinates in
    [0, 1]² to ``num_pos_feats`` frequencies; the encoding is [sin, cos] -> 2·num_pos_feats channels.
    """

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix",
                             scale * torch.randn((2, num_pos_feats)))

    def encode_unit(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) coordinates in [0, 1] (x, y) -> (..., 2·num_pos_feats) fp32 encoding."""
        proj = (2 * coords.float() - 1) @ self.positional_encoding_gaussian_matrix.float()
        proj = (2 * math.pi) * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (h, w) grid: (2·num_pos_feats, h, w), fp32."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self.encode_unit(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) (x, y) pixel coordinates in an image of ``image_size`` (H, W) -> (B, N, C) fp32."""
        # Division (not multiplication by the reciprocal) keeps the official rounding.
        norm = torch.stack([coords[..., 0].float() / image_size[1],
                            coords[..., 1].float() / image_size[0]], dim=-1)
        return self.encode_unit(norm)


class PromptEncoder(nn.Module):
    """Encodes point, box and mask prompts for the SAM mask decoder.

    Args:
        embed_dim: prompt embedding width (256).
        image_embedding_size: (h, w) of the image embedding (64, 64).
        input_image_size: (H, W) of the padded model input (1024, 1024).
        mask_in_chans: hidden channels of the mask-downscaling convolutions (16).
    """

    def __init__(self, embed_dim: int = 256, image_embedding_size: tuple[int, int] = (64, 64),
                 input_image_size: tuple[int, int] = (1024, 1024), mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2 / 3: box top-left / bottom-right corner.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the module's parameters (outputs are cast to it)."""
        return self.no_mask_embed.weight.dtype

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every image-embedding cell: (1, embed_dim, h, w), module dtype."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0).to(self.dtype)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """Point embeddings: coords (B, N, 2) (x, y) input-frame pixels, labels (B, N) -> (B, N(+1), C).

        ``pad`` appends one "not a point" (label −1), as the official encoder does without a box.
        """
        coords = coords.float() + 0.5  # pixel centres
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.forward_with_coords(coords, self.input_image_size).to(self.dtype)
        lab = labels[..., None]
        zero = emb.new_zeros(())
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(lab == 0, self.point_embeddings[0].weight, zero)
        return emb + torch.where(lab == 1, self.point_embeddings[1].weight, zero)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Box embeddings: boxes (B, 4) XYXY input-frame pixels -> (B, 2, C) (two corners)."""
        corners = boxes.float().reshape(-1, 2, 2) + 0.5
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size).to(self.dtype)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return emb + corner_embed

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, 1, 4h, 4w) (256×256 for SAM) -> dense embedding (B, C, h, w)."""
        expected = self.mask_input_size
        if masks.dim() != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != expected:
            raise ValueError(f"PromptEncoder: masks must be (B, 1, {expected[0]}, {expected[1]}), "
                             f"got {tuple(masks.shape)}")
        return self.mask_downscaling(masks.to(self.dtype))

    def forward(self, points: tuple[torch.Tensor, torch.Tensor] | None,
                boxes: torch.Tensor | None,
                masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed one batch of B prompt sets.

        Args:
            points: (coords (B, N, 2) (x, y) input-frame pixels, labels (B, N)) or None.
            boxes: (B, 4) XYXY input-frame pixels, or None.
            masks: (B, 1, 256, 256) low-resolution mask logits, or None.

        Returns:
            sparse (B, N', C) with N' = N + 1 (padding point) without a box, N + 2 with a box;
            dense (B, C, h, w) (``no_mask_embed`` broadcast when ``masks`` is None; an expanded view).
        """
        if points is not None:
            batch = points[0].shape[0]
        elif boxes is not None:
            batch = boxes.shape[0]
        elif masks is not None:
            batch = masks.shape[0]
        else:
            batch = 1
        parts = []
        if points is not None:
            coords, labels = points
            if coords.dim() != 3 or coords.shape[-1] != 2 \
                    or tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(f"PromptEncoder: points must be coords (B, N, 2) and labels (B, N), "
                                 f"got {tuple(coords.shape)} and {tuple(labels.shape)}")
            parts.append(self.embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            if boxes.shape[-1] != 4:
                raise ValueError(f"PromptEncoder: boxes must be (B, 4) XYXY, got {tuple(boxes.shape)}")
            parts.append(self.embed_boxes(boxes))
        if parts:
            sparse = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        else:
            sparse = self.no_mask_embed.weight.new_empty((batch, 0, self.embed_dim))
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense
