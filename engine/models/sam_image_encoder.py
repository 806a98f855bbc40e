"""SAM image encoder: a ViT with windowed and global attention blocks and a convolutional neck.

Layout and parameter names follow the official ``segment_anything`` checkpoints
(``image_encoder.patch_embed.proj.*``, ``image_encoder.pos_embed``,
``image_encoder.blocks.<i>.{norm1, attn.qkv, attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2,
mlp.lin1, mlp.lin2}``,
``image_encoder.neck.{0,1,2,3}``), so an official file loads with ``strict=True``.

Differences from the official code, none of which change the result beyond float rounding:

* attention (:mod:`refseg.models.sam_attention`) runs through ``F.scaled_dot_product_attention``:
  either with the decomposed relative positions (MViTv2 / ViTDet) folded into queries and keys, so no
  score or bias matrix is formed (``fused``, the default on accelerators and in exports), or with them
  as an additive attention bias (``bias``); ``REFSEG_SAM_ATTENTION`` overrides the choice;
* on the CPU, linear layers may run on oneDNN GEMMs instead (:mod:`refseg.models.onednn`: chosen by rule from the CPU's features, inference only, same numbers to
  float rounding);
* LayerNorms compute in fp32 and cast back (:mod:`refseg.models.norms`), so fp16/bf16 runs do not
  overflow;
* ``forward`` has no data-dependent control flow (window padding and table sizes follow from static
  shapes), so ``torch.compile`` and ONNX export trace it as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norms import LayerNorm2d, LayerNorm32
from .onednn import linear
from .sam_attention import Attention


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them: (..., C) -> (..., C)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act) is nn.GELU and self.act.approximate == "none":  # fused into lin1 where oneDNN runs it
            return linear(linear(x, self.lin1, "gelu"), self.lin2)
        return linear(self.act(linear(x, self.lin1)), self.lin2)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B·nH·nW, window, window, C); H, W zero-padded to multiples of window."""
    b, h, w, c = x.shape
    # Only non-negative operands: traced integer division must not depend on rounding direction.
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    n_h, n_w = (h + pad_h) // window, (w + pad_w) // window
    x = x.reshape(b, n_h, window, n_w, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * n_h * n_w, window, window, c)


def window_unpartition(windows: torch.Tensor, window: int, hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B·nH·nW, window, window, C) -> (B, H, W, C)."""
    h, w = hw
    n_h, n_w = (h + window - 1) // window, (w + window - 1) // window
    c = windows.shape[-1]
    x = windows.reshape(-1, n_h, n_w, window, window, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, n_h * window, n_w * window, c)
    return x[:, :h, :w, :]


class Block(nn.Module):
    """Pre-norm transformer block; ``window_size`` 0 means global attention over the whole grid."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int,
                 grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = LayerNorm32(dim, eps=1e-6)
        attn_size = grid_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(dim, num_heads, attn_size)
        self.norm2 = LayerNorm32(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window_size > 0:  # a constant of the module, not of the data
            hw = (y.shape[1], y.shape[2])
            y = window_unpartition(self.attn(window_partition(y, self.window_size)),
                                   self.window_size, hw)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches: (B, 3, H, W) -> (B, H/p, W/p, C) through one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder.

    Args:
        img_size: side of the square input (1024 for every released SAM).
        patch_size: patch side in pixels (16).
        embed_dim, depth, num_heads: ViT width, number of blocks, attention heads.
        global_attn_indexes: blocks that attend globally; the others use ``window_size`` windows.
        window_size: side of the attention windows in patches (14).
        out_chans: channels of the output embedding (256).

    ``forward(x)``: x (B, 3, img_size, img_size), normalised and zero-padded (see
    ``refseg.models.sam_transforms``) -> embeddings (B, out_chans, img_size/16, img_size/16),
    in x's dtype.
    """

    def __init__(self, *, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, out_chans: int = 256, window_size: int = 14,
                 global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"ImageEncoderViT: img_size {img_size} is not a multiple of "
                             f"patch_size {patch_size}")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"ImageEncoderViT: global_attn_indexes {bad} outside 0..{depth - 1}")
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio,
                  0 if i in global_attn_indexes else window_size, (grid, grid))
            for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.img_size \
                or x.shape[3] != self.img_size:
            raise ValueError(f"ImageEncoderViT: input must be (B, 3, {self.img_size}, "
                             f"{self.img_size}), got {tuple(x.shape)}")
        x = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
