"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Parameter names follow the official checkpoints (``mask_decoder.transformer.layers.<i>.{self_attn,
norm1, cross_attn_token_to_image, norm2, mlp.lin1, mlp.lin2, norm3, norm4, cross_attn_image_to_token}``,
``mask_decoder.transformer.{final_attn_token_to_image, norm_final_attn}``; attention layers hold
``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

Attention runs through ``F.scaled_dot_product_attention``; LayerNorms compute in fp32 (eps 1e-5, the
``nn.LayerNorm`` default the official model uses here).  The image-side positional encoding may have
batch 1 and is broadcast against B prompt sets instead of being repeated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norms import LayerNorm32
from .sam_image_encoder import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by ``downsample_rate``.

    ``forward(q (B, Nq, C), k (B|1, Nk, C), v (B|1, Nk, C), key_mask (B, Nk) bool | None) -> (B, Nq, C)``;
    keys where ``key_mask`` is False get no weight (None: every key counts).
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = embedding_dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"Attention: internal width {internal} is not divisible by "
                             f"num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, heads, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * c))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token→image cross-attention, token MLP, image→token cross-attention.

    ``skip_first_layer_pe``: the first block's self-attention sees the raw tokens (no positional
    encoding added) and has no residual connection, as in the official model.
    """

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = LayerNorm32(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads,
                                                   attention_downsample_rate)
        self.norm2 = LayerNorm32(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = LayerNorm32(embedding_dim)
        self.norm4 = LayerNorm32(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads,
                                                   attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Nq, C), keys (B, Nk, C), query_pe like queries, key_pe (B|1, Nk, C);
        ``token_mask`` (B, Nq) bool: False marks batch-padding tokens that no other token sees."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        # keys have not changed since k was formed, so k is still keys + key_pe.
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries,
                                                                token_mask))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` plus a final token→image attention and LayerNorm.

    Args:
        depth: number of blocks (2 in SAM).
        embedding_dim: token width (256).
        num_heads: attention heads (8).
        mlp_dim: hidden width of the token MLP (2048).
        attention_downsample_rate: width reduction inside the cross-attentions (2).
    """

    def __init__(self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8,
                 mlp_dim: int = 2048, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads,
                                                   attention_downsample_rate)
        self.norm_final_attn = LayerNorm32(embedding_dim)

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor, token_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Args:
            image_embedding: (B, C, h, w) image tokens (one copy per prompt set).
            image_pe: (B or 1, C, h, w) positional encoding of the image tokens.
            point_embedding: (B, N, C) output tokens followed by prompt tokens.
            token_mask: (B, N) bool or None; False = a padding token added only to batch prompt sets
                of different lengths: no token attends to it, so each set's outputs are those of
                the set decoded alone (its own queries are computed and ignored).

        Returns:
            queries (B, N, C) and keys (B, h·w, C), the processed tokens and image tokens.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, token_mask)
        out = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + out), keys
