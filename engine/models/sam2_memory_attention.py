"""SAM 2's memory attention: the current frame's features attend to the memory bank.

Parameter names follow the official checkpoints (``memory_attention.layers.<i>.{self_attn,
cross_attn_image}.{q,k,v,out}_proj``, ``.linear1``, ``.linear2``, ``.norm{1,2,3}``,
``memory_attention.norm``). Every release (SAM 2, SAM 2.1, MedSAM2) uses the same layout: 4 layers,
width 256, one head, FFN 2048 with ReLU, and

* the input is the frame's stride-16 features plus 0.1 x their sine position encoding;
* each layer: pre-norm self-attention with 2-D axial rotary position encoding (RoPE) on queries and
  keys (no additive position); pre-norm cross-attention to the memory tokens (keys = memory +
  memory position, values = memory, queries without position), keys and values of width ``mem_dim``
  = 64; RoPE rotates the queries and every spatial memory key (``rope_k_repeat``: the memory holds
  several frames of the same grid, each rotated like the query grid) but not the object-pointer
  tokens at the end of the memory (``num_k_exclude_rope``); pre-norm FFN;
* a final LayerNorm.

RoPE here rotates (even, odd) channel pairs with real arithmetic (cos / sin tables), the same
rotation the official complex multiplication performs, so ONNX export needs no complex type.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sam_image_encoder import LayerNorm32
from .sam_transformer import Attention


def axial_rope_angles(head_dim: int, height: int, width: int, theta: float = 10000.0,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 2-D axial rotary angles of an (height, width) grid, row-major (x fastest).

    Returns two (height·width, head_dim/2) fp32 tables: the first head_dim/4 angles rotate by the x
    index, the last head_dim/4 by the y index, each with frequencies theta^(-4k/head_dim).
    """
    if head_dim % 4:
        raise ValueError(f"axial_rope_angles: head_dim must be a multiple of 4, got {head_dim}")
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 4, device=device)[:head_dim // 4].float() / head_dim)
    index = torch.arange(height * width, device=device, dtype=torch.float32)
    xs, ys = index % width, torch.div(index, width, rounding_mode="floor")
    angles = torch.cat([torch.outer(xs, freqs), torch.outer(ys, freqs)], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (even, odd) channel pairs of x (..., N, head_dim) by the angles of (N, head_dim/2)
    tables, in fp32; returns x's dtype. N may be a multiple of the table length: the table repeats
    (several memory frames of one grid)."""
    n = x.shape[-2]
    if n != cos.shape[0]:
        repeat = n // cos.shape[0]
        if repeat * cos.shape[0] != n:
            raise ValueError(f"apply_rope: {n} tokens are not a whole number of {cos.shape[0]}-token grids")
        cos, sin = cos.repeat(repeat, 1), sin.repeat(repeat, 1)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class RoPEAttention(Attention):
    """:class:`~refseg.models.sam_transformer.Attention` with axial RoPE on queries and keys.

    Args:
        embedding_dim: query width (256); num_heads: heads (1 in every release).
        kv_in_dim: key / value input width (64 for cross-attention to memories; None: embedding_dim).

    ``forward(q (B, Nq, C), k (B, Nk, kv), v (B, Nk, kv), rope (cos, sin), num_k_exclude_rope)``:
    the last ``num_k_exclude_rope`` keys (object pointers) are not rotated; the others must be a
    whole number of query grids.
    """

    def __init__(self, embedding_dim: int = 256, num_heads: int = 1, kv_in_dim: int | None = None) -> None:
        super().__init__(embedding_dim, num_heads)
        kv_in_dim = kv_in_dim or embedding_dim
        internal = self.q_proj.out_features
        self.k_proj = nn.Linear(kv_in_dim, internal)
        self.v_proj = nn.Linear(kv_in_dim, internal)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], num_k_exclude_rope: int = 0) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        q = apply_rope(q, *rope)
        spatial = k.shape[-2] - num_k_exclude_rope
        k = torch.cat([apply_rope(k[..., :spatial, :], *rope), k[..., spatial:, :]], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v)
        b, heads, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, heads * c))


class MemoryAttentionLayer(nn.Module):
    """Self-attention (RoPE), cross-attention to memories (RoPE on spatial keys), ReLU FFN; pre-norm."""

    def __init__(self, d_model: int = 256, mem_dim: int = 64, dim_feedforward: int = 2048,
                 num_heads: int = 1) -> None:
        super().__init__()
        self.self_attn = RoPEAttention(d_model, num_heads)
        self.cross_attn_image = RoPEAttention(d_model, num_heads, kv_in_dim=mem_dim)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = LayerNorm32(d_model), LayerNorm32(d_model), LayerNorm32(d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], num_obj_ptr_tokens: int) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y, rope)
        y = self.norm2(x)
        x = x + self.cross_attn_image(y, memory + memory_pos, memory, rope, num_obj_ptr_tokens)
        return x + self.linear2(F.relu(self.linear1(self.norm3(x))))


class MemoryAttention(nn.Module):
    """Condition a frame's features on the memory bank.

    Args:
        d_model: feature width (256); mem_dim: memory width (64); num_layers: 4.
    """

    def __init__(self, d_model: int = 256, mem_dim: int = 64, num_layers: int = 4,
                 dim_feedforward: int = 2048, num_heads: int = 1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MemoryAttentionLayer(d_model, mem_dim, dim_feedforward, num_heads)
                                    for _ in range(num_layers))
        self.norm = LayerNorm32(d_model)
        self.head_dim = d_model // num_heads

    def forward(self, curr: torch.Tensor, curr_pos: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, grid: tuple[int, int], num_obj_ptr_tokens: int = 0) -> torch.Tensor:
        """Attend.

        Args:
            curr: (B, h·w, d_model) frame features, row-major over the (h, w) ``grid``.
            curr_pos: (1 or B, h·w, d_model) their sine position encoding.
            memory: (B, M, mem_dim) memory tokens: spatial memories (k frames of h·w tokens each)
                followed by ``num_obj_ptr_tokens`` object-pointer tokens.
            memory_pos: (B, M, mem_dim) their position (spatial + temporal) encodings.

        Returns:
            (B, h·w, d_model) conditioned features.
        """
        if curr.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"MemoryAttention: {curr.shape[1]} tokens for a {grid} grid")
        rope = axial_rope_angles(self.head_dim, grid[0], grid[1], device=curr.device)
        x = curr + 0.1 * curr_pos
        for layer in self.layers:
            x = layer(x, memory, memory_pos, rope, num_obj_ptr_tokens)
        return self.norm(x)
