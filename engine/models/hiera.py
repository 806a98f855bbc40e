"""Hiera: the hierarchical image trunk of SAM 2 / SAM 2.1 (tiny, small, base_plus, large).

Layout and parameter names follow the official ``sam2`` checkpoints (``image_encoder.trunk.``
``{pos_embed, pos_embed_window, patch_embed.proj.*, blocks.<i>.{norm1, attn.qkv, attn.proj, norm2,
mlp.layers.0, mlp.layers.1, proj}}``), so an official file loads with ``strict=True``.

Four stages of blocks; the first block of stages 2-4 doubles the width and the heads and halves the
grid by max-pooling its queries (and its shortcut) with a 2 x 2 stride. Attention is windowed
(``window_spec`` per stage; a block changing stage still uses the window of the stage before, as in
the official code) except in ``global_att_blocks``. There are no relative positions: a background
position table (``pos_embed``, bicubically resized to the grid) plus a tiled per-window table
(``pos_embed_window``) is added once after the patch embedding.

Differences from the official code, none of which change the result beyond float rounding:
LayerNorms compute in fp32 (fp16/bf16 safe); linear layers may run on oneDNN GEMMs on the CPU
(:mod:`refseg.models.onednn`); ``forward`` has no data-dependent control flow, so ``torch.compile``
and ONNX export trace it as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .onednn import linear
from .norms import LayerNorm32
from .sam_image_encoder import window_partition, window_unpartition
from .sam_mask_decoder import MLP

NORM_EPS = 1e-6


class GeluMLP(MLP):
    """:class:`MLP` (keys ``layers.<j>``) with GELU (erf) between the layers instead of ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = linear(x, layer, "gelu")  # GELU fused into the GEMM where oneDNN runs it
        return linear(x, self.layers[-1])


def pool_grid(x: torch.Tensor, stride: int) -> torch.Tensor:
    """2-D max pooling of a channels-last grid: (B, H, W, C) -> (B, H/stride, W/stride, C) (floor)."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), stride, stride).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Self-attention over each (B, H, W, dim) window, queries optionally max-pooled.

    ``qkv`` maps dim -> 3·dim_out laid out as (3, heads, dim_out/heads); with ``q_stride`` the
    output grid is (H/q_stride, W/q_stride). Returns (B, H', W', dim_out).
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: int | None = None) -> None:
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"MultiScaleAttention: dim_out {dim_out} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = linear(x, self.qkv).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # each (B, H·W, heads, head_dim)
        if self.q_stride:
            q = pool_grid(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1], q.shape[2]
            q = q.reshape(b, h * w, self.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return linear(out.transpose(1, 2).reshape(b, h, w, -1), self.proj)


class MultiScaleBlock(nn.Module):
    """Pre-norm Hiera block on a (B, H, W, dim) grid -> (B, H', W', dim_out).

    ``window_size`` 0 means global attention. With ``q_stride`` the block pools: the shortcut is
    ``proj(norm1(x))`` max-pooled, the attention windows shrink by ``q_stride``.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, mlp_ratio: float = 4.0,
                 q_stride: int | None = None, window_size: int = 0) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = LayerNorm32(dim, eps=NORM_EPS)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride)
        self.norm2 = LayerNorm32(dim_out, eps=NORM_EPS)
        self.mlp = GeluMLP(dim_out, int(dim_out * mlp_ratio), dim_out, 2)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        shortcut = x
        if self.dim != self.dim_out:
            shortcut = linear(y, self.proj)
            if self.q_stride:
                shortcut = pool_grid(shortcut, self.q_stride)
        out_hw = (shortcut.shape[1], shortcut.shape[2])
        if self.window_size > 0:  # constants of the module, not of the data
            window_out = self.window_size // self.q_stride if self.q_stride else self.window_size
            y = window_unpartition(self.attn(window_partition(y, self.window_size)), window_out, out_hw)
        else:
            y = self.attn(y)
        x = shortcut + y
        return x + self.mlp(self.norm2(x))


class HieraPatchEmbed(nn.Module):
    """Overlapping patch embedding: conv 7 x 7, stride 4, padding 3: (B, 3, S, S) -> (B, S/4, S/4, C)."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Hiera(nn.Module):
    """The Hiera trunk.

    Args:
        embed_dim: width of stage 1 (96 tiny/small, 112 base_plus, 144 large); doubled per stage.
        num_heads: heads of stage 1 (1 or 2); doubled per stage.
        stages: blocks per stage, e.g. (1, 2, 7, 2) for tiny.
        global_att_blocks: indexes of the blocks with global attention.
        window_pos_embed_bkg_spatial_size: (h, w) of the background position table.
        window_spec: attention window side per stage.
        q_pool: number of stage changes that pool (3: every one).
        q_stride: pooling stride at a stage change (2).
        mlp_ratio: MLP width over block width (4).

    ``forward(x)``: x (B, 3, S, S) normalised images -> the output of every stage, channels first,
    high resolution first: [(B, C, S/4, S/4), (B, 2C, S/8, S/8), (B, 4C, S/16, S/16),
    (B, 8C, S/32, S/32)], in x's dtype.
    """

    def __init__(self, embed_dim: int = 96, num_heads: int = 1, stages: tuple[int, ...] = (2, 3, 16, 3),
                 global_att_blocks: tuple[int, ...] = (12, 16, 20),
                 window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
                 window_spec: tuple[int, ...] = (8, 4, 14, 7), q_pool: int = 3, q_stride: int = 2,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if len(stages) != len(window_spec):
            raise ValueError(f"Hiera: {len(stages)} stages but {len(window_spec)} window sizes")
        depth = sum(stages)
        self.stage_ends = tuple(sum(stages[:i]) - 1 for i in range(1, len(stages) + 1))
        if not 0 <= q_pool <= len(stages) - 1:
            raise ValueError(f"Hiera: q_pool {q_pool} outside 0..{len(stages) - 1}")
        pool_blocks = [end + 1 for end in self.stage_ends[:-1]][:q_pool]
        self.patch_embed = HieraPatchEmbed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window_spec[0], window_spec[0]))
        self.blocks = nn.ModuleList()
        dim, heads, stage = embed_dim, num_heads, 0
        for i in range(depth):
            # The window lags a block: a stage's first block still uses the previous stage's window.
            window = 0 if i in global_att_blocks else window_spec[stage]
            dim_out = dim
            if i - 1 in self.stage_ends:
                dim_out, heads, stage = dim * 2, heads * 2, stage + 1
            self.blocks.append(MultiScaleBlock(dim, dim_out, heads, mlp_ratio,
                                               q_stride if i in pool_blocks else None, window))
            dim = dim_out
        self.channel_list = tuple(self.blocks[i].dim_out for i in self.stage_ends)

    def position_embedding(self, hw: tuple[int, int]) -> torch.Tensor:
        """(1, h, w, C) table added after the patch embedding: the background table resized
        bicubically (``align_corners=False``) plus the window table tiled over the grid."""
        table = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
        window = self.pos_embed_window
        reps = (hw[0] // window.shape[-2], hw[1] // window.shape[-1])
        return (table + window.tile(1, 1, *reps)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self.position_embedding((x.shape[1], x.shape[2])).to(x.dtype)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
