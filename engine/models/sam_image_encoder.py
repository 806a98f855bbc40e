"""SAM image encoder: a ViT with windowed and global attention blocks and a convolutional neck.

Layout and parameter names follow the official ``segment_anything`` checkpoints
(``image_encoder.patch_embed.proj.*``, ``image_encoder.pos_embed``,
``image_encoder.blocks.<i>.{norm1, attn.qkv, attn.proj, attn.rel_pos_h, attn.rel_pos_w, norm2,
mlp.lin1, mlp.lin2}``,
``image_encoder.neck.{0,1,2,3}``), so an official file loads with ``strict=True``.

Differences from the official code, none of which change the result beyond float rounding:

* attention runs through ``F.scaled_dot_product_attention``; the decomposed relative positions
  (MViTv2 / ViTDet) enter as an additive attention bias of shape (B·windows, heads, N, N) built from
  the per-row and per-column terms, instead of being added to an explicitly formed score matrix;
* on the CPU, linear layers and the global blocks' attention may run on oneDNN GEMMs instead
  (:mod:`refseg.models.onednn`: where measured faster, inference only, same numbers to float rounding);
* LayerNorm and LayerNorm2d compute in fp32 and cast back, so fp16/bf16 runs do not overflow;
* ``forward`` has no data-dependent control flow (window padding and table sizes follow from static
  shapes), so ``torch.compile`` and ONNX export trace it as it is.

Also holds :class:`LayerNorm2d` and :class:`LayerNorm32`, which the prompt encoder and the mask
decoder use too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .onednn import attention_rel_pos, linear, tracing


class LayerNorm32(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension that always computes in fp32.

    Input of any float dtype, shape (..., C); output has the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                           self.bias.float(), self.eps)
        return out.to(x.dtype)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor, computed in fp32.

    Parameters ``weight`` and ``bias`` have shape (C,), as in the official checkpoints.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.num_channels = num_channels  # a Python int keeps traced graphs static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last lets one fused layer_norm kernel (ONNX LayerNormalization) do the work.
        y = F.layer_norm(x.float().permute(0, 2, 3, 1), (self.num_channels,), self.weight.float(),
                         self.bias.float(), self.eps)
        return y.permute(0, 3, 1, 2).to(x.dtype)


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


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis.

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: table (L, C); when ``L != 2·max(q_size, k_size) − 1`` it is resized with 1-D
            linear interpolation (``align_corners=False``), as the official code does.

    Returns:
        (q_size, k_size, C): entry [i, j] is the embedding of the offset between query i and key j;
        when the two sizes differ, the shorter axis' coordinates are scaled up to the longer one.
    """
    length = 2 * max(q_size, k_size) - 1
    table = rel_pos
    if rel_pos.shape[0] != length:
        table = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear")
        table = table.squeeze(0).t()
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    offsets = (q_coords - k_coords) + (k_size - 1) * k_scale
    return table[offsets.long()]


def decomposed_rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                             q_size: tuple[int, int], k_size: tuple[int, int]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the decomposed relative-position bias (MViTv2 / ViTDet / SAM).

    Args:
        q: unscaled queries (B, heads, q_h·q_w, C), row-major over the (q_h, q_w) grid.
        rel_pos_h, rel_pos_w: tables (L_h, C) and (L_w, C).
        q_size, k_size: query and key grids as (height, width).

    Returns:
        rel_h (B·heads, q_h, q_w, k_h) = q(y, x)·R_h[y, y'] and rel_w (B·heads, q_h, q_w, k_w) =
        q(y, x)·R_w[x, x'], in q's dtype.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    r_h = get_rel_pos(q_h, k_h, rel_pos_h).to(q.dtype)
    r_w = get_rel_pos(q_w, k_w, rel_pos_w).to(q.dtype)
    b, heads, _, dim = q.shape
    grid = q.reshape(b * heads, q_h, q_w, dim)
    return torch.einsum("byxc,ykc->byxk", grid, r_h), torch.einsum("byxc,xkc->byxk", grid, r_w)


def decomposed_rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                            q_size: tuple[int, int], k_size: tuple[int, int]) -> torch.Tensor:
    """Additive attention bias (B, heads, q_h·q_w, k_h·k_w) in q's dtype:
    bias[.., (y, x), (y', x')] = q(y, x)·R_h[y, y'] + q(y, x)·R_w[x, x'] (see
    :func:`decomposed_rel_pos_terms` for the arguments)."""
    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    b, heads = q.shape[:2]
    if tracing():
        bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    else:  # the einsum outputs are strided: a plain add would lay the bias out as they are, then copy
        bias = torch.add(rel_h[:, :, :, :, None], rel_w[:, :, :, None, :],
                         out=rel_h.new_empty(*rel_h.shape, rel_w.shape[-1]))
    return bias.reshape(b, heads, q_size[0] * q_size[1], k_size[0] * k_size[1])


# Global attention over more tokens than this runs in chunks of query rows (eager mode only): the
# bias of a 64x64 grid is (heads, 4096, 4096), 805 MB per image in fp32; one reused chunk buffer
# avoids that allocation and its page faults and gives the same numbers (~25 % faster on a CPU).
CHUNKED_ATTENTION_MIN_TOKENS = 1024
_CHUNK_BIAS_ELEMENTS = 1 << 25


def attention_in_row_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                            rel_w: torch.Tensor) -> torch.Tensor:
    """SDPA with the decomposed bias built chunk by chunk of query grid rows into one buffer.

    Args:
        q, k, v: (B, heads, N, C) with N = q_h·q_w (keys on the same grid).
        rel_h, rel_w: factors from :func:`decomposed_rel_pos_terms`.

    Returns:
        (B, heads, N, C), equal to SDPA with the full :func:`decomposed_rel_pos_bias`.
    """
    fast = attention_rel_pos(q, k, v, rel_h, rel_w)
    if fast is not None:  # oneDNN GEMMs on the CPU, where they beat SDPA's
        return fast
    b, heads, n, _ = q.shape
    bh, q_h, q_w, k_h = rel_h.shape
    k_w = rel_w.shape[-1]
    rows = max(1, min(q_h, _CHUNK_BIAS_ELEMENTS // (bh * q_w * k_h * k_w)))
    buf = q.new_empty(bh, rows, q_w, k_h, k_w)
    out = torch.empty_like(q)
    for y0 in range(0, q_h, rows):
        y1 = min(y0 + rows, q_h)
        bias = torch.add(rel_h[:, y0:y1, :, :, None], rel_w[:, y0:y1, :, None, :], out=buf[:, :y1 - y0])
        out[:, :, y0 * q_w:y1 * q_w] = F.scaled_dot_product_attention(
            q[:, :, y0 * q_w:y1 * q_w], k, v,
            attn_mask=bias.view(b, heads, (y1 - y0) * q_w, k_h * k_w))
    return out


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions.

    ``input_size`` (H, W) sizes the tables ``rel_pos_h`` (2H−1, C/heads) and
    ``rel_pos_w`` (2W−1, C/heads).
    """

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int],
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = linear(x, self.qkv).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, C/heads)
        if h * w > CHUNKED_ATTENTION_MIN_TOKENS and not tracing():
            rel_h, rel_w = decomposed_rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            out = attention_in_row_chunks(q, k, v, rel_h, rel_w)
        else:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return linear(out.transpose(1, 2).reshape(b, h, w, c), self.proj)


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
