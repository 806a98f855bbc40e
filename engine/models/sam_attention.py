"""SAM's image-encoder attention with decomposed relative positions (MViTv2 / ViTDet), in two exact forms.

The official model computes, per head, for queries q and keys k on grids of (height, width) positions::

    scores[(y, x), (y', x')] = C^-½·q(y, x)·k(y', x') + q(y, x)·R_h[y, y'] + q(y, x)·R_w[x, x']

(``R_h``, ``R_w`` from :func:`get_rel_pos`, C the head width), then softmax over the keys and the value
average. Two ways to run it here, both equal to the official result up to float rounding:

* ``fused`` (:func:`fused_rel_pos_attention`): the two rel-pos terms are folded into the dot product.
  Each query gets its own rel-pos terms appended, ``q' = [C^-½·q, q·R_h[y, :], q·R_w[x, :]]``, and each
  key a one-hot code of its row and column, ``k' = [k, e(y'), e(x')]``, so that ``q'·k'`` IS the score
  above; SDPA then runs with ``scale=1`` and no mask, i.e. on its flash / memory-efficient kernels
  (CUDA, and the CPU's flash kernel), and no (N, N) score or bias tensor exists anywhere. Head widths
  grow from C to C + k_h + k_w (rounded up to a multiple of 8; v is zero-padded to the same width
  because flash kernels need equal widths): 64 -> 192 for SAM-B's 64x64 global blocks, 64 -> 96 for
  its 14x14 windows. Traced (ONNX, torch.export, torch.compile) it is plain MatMul-Softmax-MatMul
  attention with Q pre-scaled, the pattern TensorRT fuses.
* ``bias``: the (N, N) bias is formed from the two terms and handed to SDPA as an additive mask, in
  row chunks for large grids (:func:`attention_in_row_chunks`), so SDPA takes its masked kernels.

``REFSEG_SAM_ATTENTION=fused|bias`` picks one for every device; unset, :func:`attention_form` decides:
``fused`` on accelerators and in traced / compiled graphs, ``bias`` in eager CPU runs (measured faster
there: docs/attention.md).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .code_path import accelerator_path
from .onednn import linear, tracing

ATTENTION_ENV = "REFSEG_SAM_ATTENTION"
ATTENTION_FORMS = ("fused", "bias")
# The CPU's eager default (fp32 and bf16): SDPA's CPU kernels with the bias in row chunks measured 1.5-2x
# faster than the fused form there, whose head widths triple (docs/attention.md has the numbers).
CPU_FORM = "bias"


def attention_form(device: torch.device, traced: bool | None = None) -> str:
    """The attention form for tensors on ``device``: ``"fused"`` or ``"bias"``.

    ``$REFSEG_SAM_ATTENTION`` wins when set; otherwise ``fused`` on every accelerator (and on the CPU's run
    of the accelerator path, :mod:`refseg.models.code_path`) and whenever the model is being traced or compiled (``traced``, default :func:`~refseg.models.onednn.tracing`:
    exports must show plain attention), and :data:`CPU_FORM` on the CPU in eager mode, whatever the
    dtype. A fixed rule, never a per-process timing, so results do not depend on machine load.

    Raises:
        ValueError: ``$REFSEG_SAM_ATTENTION`` holds something else than ``fused`` or ``bias``.
    """
    chosen = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if chosen:
        if chosen not in ATTENTION_FORMS:
            raise ValueError(f"{ATTENTION_ENV}={chosen!r}: must be one of {', '.join(ATTENTION_FORMS)}")
        return chosen
    if accelerator_path(device) or (tracing() if traced is None else traced):
        return "fused"
    return CPU_FORM


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
    """The two factors of the decomposed relative-position bias.

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


# Bias-form global attention over more tokens than this runs in chunks of query rows (eager mode only):
# the bias of a 64x64 grid is (heads, 4096, 4096), 805 MB per image in fp32; one reused chunk buffer
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


def fused_width(head_dim: int, k_size: tuple[int, int]) -> int:
    """Head width of the fused form: C + k_h + k_w rounded up to a multiple of 8 (flash kernels)."""
    # Non-negative operands only: a traced head_dim is a graph value, and ONNX's Div truncates.
    return (head_dim + k_size[0] + k_size[1] + 7) // 8 * 8


def key_position_codes(k_size: tuple[int, int], width: int, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """One-hot row and column codes of the keys: (k_h·k_w, width).

    Row j = y'·k_w + x' has a 1 in column y' and in column k_h + x', zeros elsewhere (columns past
    k_h + k_w are padding). Exact in every float dtype.
    """
    k_h, k_w = k_size
    ys = torch.arange(k_h, device=device).repeat_interleave(k_w)
    xs = torch.arange(k_w, device=device).repeat(k_h) + k_h
    cols = torch.arange(width, device=device)
    return ((cols[None, :] == ys[:, None]) | (cols[None, :] == xs[:, None])).to(dtype)


def fused_rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                            rel_pos_w: torch.Tensor, q_size: tuple[int, int],
                            k_size: tuple[int, int]) -> torch.Tensor:
    """Attention with SAM's decomposed rel-pos bias, folded into q and k (no mask, no (N, N) tensor).

    Args:
        q: (B, heads, q_h·q_w, C) unscaled queries, row-major over the (q_h, q_w) grid.
        k, v: (B, heads, k_h·k_w, C) keys and values, row-major over the (k_h, k_w) grid.
        rel_pos_h, rel_pos_w: tables (L_h, C) and (L_w, C), as in :func:`get_rel_pos`.
        q_size, k_size: (height, width) of the query and key grids.

    Returns:
        (B, heads, q_h·q_w, C) in q's dtype: softmax(C^-½·q·kᵀ + bias)·v with the bias of
        :func:`decomposed_rel_pos_bias`, equal to it up to float rounding (the products with the
        one-hot codes are exact; only the summation order differs).
    """
    b, heads, n_q, c = q.shape
    k_h, k_w = k_size
    width = fused_width(c, k_size)
    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    pad = width - c - k_h - k_w  # zero columns, padded on here (no zeros of a traced, dynamic shape)
    q_ext = torch.cat([q * c ** -0.5, rel_h.reshape(b, heads, n_q, k_h),
                       F.pad(rel_w.reshape(b, heads, n_q, k_w), (0, pad))], dim=-1)
    codes = key_position_codes(k_size, width - c, q.dtype, q.device)
    k_ext = torch.cat([k, codes.expand(b, heads, k_h * k_w, width - c)], dim=-1)
    v_ext = F.pad(v, (0, width - c))
    return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=1.0)[..., :c]


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions.

    ``input_size`` (H, W) sizes the tables ``rel_pos_h`` (2H−1, C/heads) and
    ``rel_pos_w`` (2W−1, C/heads). The form (fused or bias) follows :func:`attention_form`.
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
        if attention_form(x.device) == "fused":
            out = fused_rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        elif h * w > CHUNKED_ATTENTION_MIN_TOKENS and not tracing():
            rel_h, rel_w = decomposed_rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            out = attention_in_row_chunks(q, k, v, rel_h, rel_w)
        else:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return linear(out.transpose(1, 2).reshape(b, h, w, c), self.proj)
