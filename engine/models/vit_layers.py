"""Building blocks of the DINOv2 vision transformer (inference only).

Module and parameter names follow the official ``dinov2`` release so that an official checkpoint's
keys map one to one: ``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
``mlp.fc1``/``mlp.fc2`` (GELU MLP) or ``mlp.w12``/``mlp.w3`` (SwiGLU), ``ls2.gamma``, and
``patch_embed.proj`` for the patch projection.

Everything here is written for eval-mode inference: no dropout or drop-path (they are identities at
inference and carry no parameters), attention through ``F.scaled_dot_product_attention`` so the
fused/flash kernels are used where available, and no Python control flow on tensor values so that
``torch.compile`` and ONNX export trace straight through.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norms import LayerNorm32
from .onednn import linear

LAYER_NORM_EPS = 1e-6


def backbone_outputs(prenorm: torch.Tensor, normed: torch.Tensor, num_register_tokens: int,
                     masks: torch.Tensor | None) -> dict:
    """``forward_features``' dictionary of a ViT whose tokens are [cls, registers (R), patches (N)].

    Args:
        prenorm: (B, 1 + R + N, D) output of the last block; normed: the same after the final norm.

    Returns:
        ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens`` (B, N, D),
        ``x_prenorm`` (B, 1 + R + N, D), ``masks`` as given (DINOv2's and DINOv3's keys).
    """
    first_patch = 1 + num_register_tokens
    return {
        "x_norm_clstoken": normed[:, 0],
        "x_norm_regtokens": normed[:, 1:first_patch],
        "x_norm_patchtokens": normed[:, first_patch:],
        "x_prenorm": prenorm,
        "masks": masks,
    }


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: image (B, C, H, W) -> tokens (B, H/p * W/p, D).

    Tokens are in row-major (y, x) order of the patch grid, as in the official model.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    ``qkv`` output channels are laid out as (3, heads, head_dim), matching the official weights.
    Input and output (B, N, D).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = linear(x, self.qkv).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        # SDPA's default scale is head_dim ** -0.5, the same as the official model's.
        out = F.scaled_dot_product_attention(q, k, v)
        return linear(out.transpose(1, 2).reshape(batch, tokens, dim), self.proj)


class Mlp(nn.Module):
    """Two-layer GELU (erf) feed-forward network: D -> hidden -> D."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # applied by linear(..., "gelu"): fused into fc1 where oneDNN runs it
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.fc1, "gelu"), self.fc2)


def swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """Hidden width of the official fused SwiGLU FFN: 2/3 of ``dim * mlp_ratio``, rounded up to 8.

    For ViT-g/14 (dim 1536, ratio 4) this gives 4096.
    """
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward network: ``w3(silu(a) * b)`` with ``[a, b] = w12(x)`` split in halves."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = linear(x, self.w12).chunk(2, dim=-1)
        return linear(F.silu(gate) * value, self.w3)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``x * gamma``, gamma of shape (D,)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale: (B, N, D) -> (B, N, D).

    ``x + ls1(attn(norm1(x)))`` followed by ``x + ls2(mlp(norm2(x)))``.
    """

    def __init__(self, dim: int, num_heads: int, ffn: str, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = LayerNorm32(dim, eps=LAYER_NORM_EPS)
        if ffn == "mlp":
            self.mlp: nn.Module = Mlp(dim, int(dim * mlp_ratio))
        elif ffn == "swiglu":
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_dim(dim, mlp_ratio))
        else:
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))
