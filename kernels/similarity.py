"""Batched patch-token matching: forward best / top-k, farthest, and backward (cycle) best.

For every (reference, target) pair of a batch the similarity between each reference token and each target
token is computed, and reduced along both axes without ever storing the ``B x Nr x Nt`` matrix (Triton) or
with it (torch reference, :func:`match_reference`). The public entry :func:`match` picks the kernel when it
can run (see :mod:`refseg.kernels.dispatch`) and otherwise the reference.

Conventions shared by both implementations:

- ``ref`` (B, Nr, D) and ``tgt`` (B, Nt, D), float16 / bfloat16 / float32; math accumulates in float32.
- ``metric="cosine"``: score = cosine similarity of the two tokens, ``x / max(||x||, 1e-12)`` normalisation,
  higher is better (best = max, worst = min).
- ``metric="euclidean"``: score = Euclidean distance, lower is better (best = min, worst = max), as the
  GBMSeg release did with ``torch.cdist`` + argmin/argmax. Distances are ``sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0))``
  (the formula ``torch.cdist`` uses for matrices larger than 25 rows) and are compared after the ``sqrt``, as
  a ``torch.cdist`` + ``argmin`` chain does; the reference calls ``torch.cdist`` itself.
- Ties: the lowest index wins (as ``torch.argmax`` / ``argmin``); top-k lists are sorted best first with
  ties in index order.
- ``ref_valid`` (B, Nr) / ``tgt_valid`` (B, Nt) bool: invalid tokens are never chosen; their own outputs are
  ``idx = -1``, ``val = NaN``. A top-k slot with no valid candidate left is also ``-1`` / NaN. This lets
  pairs with different grid sizes share a padded batch.
- NaN or infinite features give unspecified results.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, launch_configs

tl = None  # triton.language, bound by dispatch.bind_triton on the first kernel call (triton is optional)

EPS = 1e-12
METRICS = ("cosine", "euclidean")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_K = 64
MAX_KERNEL_DIM = 8192


class MatchResult(NamedTuple):
    """Outputs of :func:`match` (all on the inputs' device).

    fwd_idx (B, Nr, k) int64 / fwd_val (B, Nr, k) float32: the k best target tokens of every reference token,
    best first. far_idx (B, Nr) int64 / far_val (B, Nr) float32: the worst (farthest) target token.
    bwd_idx (B, Nt) int64 / bwd_val (B, Nt) float32: the best reference token of every target token.
    """

    fwd_idx: Tensor
    fwd_val: Tensor
    far_idx: Tensor
    far_val: Tensor
    bwd_idx: Tensor
    bwd_val: Tensor


def _check_args(ref: Tensor, tgt: Tensor, metric: str, ref_valid: Optional[Tensor],
                tgt_valid: Optional[Tensor], k: int) -> None:
    where = "refseg.kernels.match"
    if not isinstance(ref, Tensor) or not isinstance(tgt, Tensor):
        raise TypeError(f"{where}: ref and tgt must be tensors, got {type(ref).__name__}, {type(tgt).__name__}")
    if ref.dim() != 3 or tgt.dim() != 3:
        raise ValueError(f"{where}: ref must be (B, Nr, D) and tgt (B, Nt, D), got shapes "
                         f"{tuple(ref.shape)} and {tuple(tgt.shape)}")
    if ref.device != tgt.device:
        raise ValueError(f"{where}: ref is on {ref.device} but tgt is on {tgt.device}")
    if ref.shape[0] != tgt.shape[0] or ref.shape[2] != tgt.shape[2]:
        raise ValueError(f"{where}: ref {tuple(ref.shape)} and tgt {tuple(tgt.shape)} must share B and D")
    if not ref.is_floating_point() or not tgt.is_floating_point():
        raise TypeError(f"{where}: ref/tgt must be floating point, got {ref.dtype} and {tgt.dtype}")
    if metric not in METRICS:
        raise ValueError(f"{where}: metric must be one of {METRICS}, got {metric!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: k must be an int >= 1, got {k!r}")
    for name, mask, full in (("ref_valid", ref_valid, ref.shape[:2]), ("tgt_valid", tgt_valid, tgt.shape[:2])):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(full):
            raise ValueError(f"{where}: {name} must be a bool tensor of shape {tuple(full)}, got "
                             f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
        if mask.device != ref.device:
            raise ValueError(f"{where}: {name} is on {mask.device} but ref is on {ref.device}")


def _pick(key: Tensor, keep: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of ``key`` (bigger is better) over the last axis among ``keep``; ties -> lowest index.

    Returns indices (..., k) int64 (-1 where fewer than k candidates) and a bool "found" mask.
    """
    n = key.shape[-1]
    lead = key.shape[:-1]
    if n == 0:
        empty = torch.full((*lead, k), -1, dtype=torch.int64, device=key.device)
        return empty, torch.zeros((*lead, k), dtype=torch.bool, device=key.device)
    masked = key.masked_fill(~keep, float("-inf"))
    if k == 1:
        idx = masked.argmax(dim=-1, keepdim=True)  # first occurrence on ties
    else:
        idx = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :k]
    n_keep = keep.expand_as(key).sum(dim=-1, keepdim=True)
    slot = torch.arange(k, device=key.device)
    found = slot < n_keep
    if idx.shape[-1] < k:  # k > n: pad
        idx = torch.cat([idx, idx.new_zeros((*lead, k - idx.shape[-1]))], dim=-1)
    return torch.where(found, idx, -1), found


def match_reference(ref: Tensor, tgt: Tensor, metric: str = "cosine", ref_valid: Optional[Tensor] = None,
                    tgt_valid: Optional[Tensor] = None, k: int = 1) -> MatchResult:
    """Plain-torch matching with the same signature and conventions as :func:`match` (see module doc).

    Materialises the full (B, Nr, Nt) float32 score matrix; Euclidean scores come from ``torch.cdist``.
    """
    _check_args(ref, tgt, metric, ref_valid, tgt_valid, k)
    a, b = ref.float(), tgt.float()
    B, Nr, Nt = a.shape[0], a.shape[1], b.shape[1]
    rv = ref_valid if ref_valid is not None else torch.ones(B, Nr, dtype=torch.bool, device=a.device)
    tv = tgt_valid if tgt_valid is not None else torch.ones(B, Nt, dtype=torch.bool, device=a.device)
    if metric == "cosine":
        score = F.normalize(a, dim=-1, eps=EPS) @ F.normalize(b, dim=-1, eps=EPS).transpose(1, 2)
        key = score
    else:
        score = torch.cdist(a, b) if Nr and Nt else a.new_zeros(B, Nr, Nt)
        key = -score  # negation is exact: ties stay ties
    if ref_valid is None and tgt_valid is None and k == 1 and Nr and Nt:
        # No masks, top-1: three reductions of the one score matrix, no masked copies
        # (torch.max / torch.min return the first index on ties, as the general path does).
        best, worst = (torch.max, torch.min) if metric == "cosine" else (torch.min, torch.max)
        fwd_val, fwd_idx = best(score, dim=-1)
        far_val, far_idx = worst(score, dim=-1)
        bwd_val, bwd_idx = best(score, dim=1)
        return MatchResult(fwd_idx[..., None], fwd_val[..., None], far_idx, far_val, bwd_idx, bwd_val)
    nan = float("nan")

    def gather(idx: Tensor, found: Tensor, scores: Tensor, valid_rows: Tensor) -> tuple[Tensor, Tensor]:
        found = found & valid_rows.unsqueeze(-1)
        val = scores.gather(-1, idx.clamp_min(0)) if scores.shape[-1] else idx.new_zeros(idx.shape).float()
        return torch.where(found, idx, -1), torch.where(found, val, nan)

    fi, ff = _pick(key, tv[:, None, :], k)
    fwd_idx, fwd_val = gather(fi, ff, score, rv)
    wi, wf = _pick(-key, tv[:, None, :], 1)
    far_idx, far_val = gather(wi, wf, score, rv)
    score_t, key_t = score.transpose(1, 2), key.transpose(1, 2)
    bi, bf = _pick(key_t, rv[:, None, :], 1)
    bwd_idx, bwd_val = gather(bi, bf, score_t, tv)
    return MatchResult(fwd_idx, fwd_val, far_idx[..., 0], far_val[..., 0], bwd_idx[..., 0], bwd_val[..., 0])


def _limits_reason(ref: Tensor, tgt: Tensor, k: int) -> Optional[str]:
    reason = dispatch.dtype_reason(ref, KERNEL_DTYPES, "ref") or dispatch.dtype_reason(tgt, KERNEL_DTYPES, "tgt")
    if reason:
        return reason
    if ref.dtype != tgt.dtype:
        return f"ref dtype {ref.dtype} differs from tgt dtype {tgt.dtype}"
    if k > MAX_KERNEL_K:
        return f"k={k} exceeds the kernel's limit {MAX_KERNEL_K}"
    if ref.shape[2] > MAX_KERNEL_DIM:
        return f"feature dim {ref.shape[2]} exceeds the kernel's limit {MAX_KERNEL_DIM}"
    if 0 in (ref.shape[0], ref.shape[1], tgt.shape[1], ref.shape[2]):
        return f"empty input (ref {tuple(ref.shape)}, tgt {tuple(tgt.shape)})"
    return None


def match_triton(ref: Tensor, tgt: Tensor, metric: str = "cosine", ref_valid: Optional[Tensor] = None,
                 tgt_valid: Optional[Tensor] = None, k: int = 1) -> MatchResult:
    """The Triton kernel directly (no fallback); raises :class:`~refseg.kernels.dispatch.KernelUnavailableError`
    when it cannot run here. Same signature and conventions as :func:`match`."""
    _check_args(ref, tgt, metric, ref_valid, tgt_valid, k)
    dispatch.choose_backend("match", "triton", _tensors(ref, tgt, ref_valid, tgt_valid),
                            _limits_reason(ref, tgt, k))
    return MatchResult(*launch_match(ref, tgt, ref_valid, tgt_valid, metric == "cosine", k))


def _tensors(*items: Optional[Tensor]) -> list[Tensor]:
    return [t for t in items if t is not None]


def reference_preferred(device_type: str, dtype: torch.dtype) -> Optional[str]:
    """Why ``backend="auto"`` runs the torch reference where the kernel could run too; None: the kernel.

    The rule, reasoned from the shapes (docs/attention.md, "Matching"): the kernel scores every pair twice
    (once per direction, so that no (Nr, Nt) matrix is stored), so it does twice the reference's
    multiply-adds. fp16 / bf16 tokens run them on tensor cores in one launch, while the reference upcasts
    to an fp32 GEMM plus three passes over the score matrix: the kernel wins. fp32 tokens on a GPU run
    the kernel's exact products on the FMA units, where cuBLAS's SGEMM has the same peak and half the work
    (and TF32 tensor cores where ``torch.backends.cuda.matmul.allow_tf32`` allows them); the matrix
    traffic (16 bytes per score, ~30 MB per 1369 x 1369 pair, ~10 us on an H100) does not close that gap:
    the reference wins. On the CPU the kernel only runs under Triton's interpreter (tests): no preference.
    """
    if device_type == "cuda" and dtype == torch.float32:
        return ("fp32 tokens on a GPU: cuBLAS (TF32 where allowed) beats the kernel's exact FMA products, "
                "which it computes twice")
    return None


@torch.library.custom_op("refseg::match", mutates_args=())
def _match_op(ref: Tensor, tgt: Tensor, ref_valid: Optional[Tensor], tgt_valid: Optional[Tensor],
              metric: str, k: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    preferred = reference_preferred(ref.device.type, ref.dtype) if backend == "auto" else None
    if preferred is not None:
        dispatch.log_once(f"refseg.kernels.match: using the torch reference: {preferred}", logging.DEBUG)
        chosen = "torch"
    else:
        chosen = dispatch.choose_backend("match", backend, _tensors(ref, tgt, ref_valid, tgt_valid),
                                         _limits_reason(ref, tgt, k) if backend != "torch" else None)
    if chosen == "triton":
        return launch_match(ref, tgt, ref_valid, tgt_valid, metric == "cosine", k)
    return tuple(match_reference(ref, tgt, metric, ref_valid, tgt_valid, k))


@_match_op.register_fake
def _match_fake(ref, tgt, ref_valid, tgt_valid, metric, k, backend):
    B, Nr, Nt = ref.shape[0], ref.shape[1], tgt.shape[1]
    i64, f32 = torch.int64, torch.float32
    return (ref.new_empty((B, Nr, k), dtype=i64), ref.new_empty((B, Nr, k), dtype=f32),
            ref.new_empty((B, Nr), dtype=i64), ref.new_empty((B, Nr), dtype=f32),
            ref.new_empty((B, Nt), dtype=i64), ref.new_empty((B, Nt), dtype=f32))


def match(ref: Tensor, tgt: Tensor, metric: str = "cosine", ref_valid: Optional[Tensor] = None,
          tgt_valid: Optional[Tensor] = None, k: int = 1, backend: str = "auto") -> MatchResult:
    """Match every reference token to the target tokens of the same pair, and back.

    Args:
        ref: (B, Nr, D) reference tokens, float16 / bfloat16 / float32.
        tgt: (B, Nt, D) target tokens, same dtype.
        metric: "cosine" (higher is better) or "euclidean" (lower is better); see the module doc.
        ref_valid / tgt_valid: optional (B, Nr) / (B, Nt) bool masks of real (non-padding) tokens.
        k: number of best target tokens kept per reference token (>= 1), sorted best first.
        backend: "auto" (Triton kernel when possible and faster, else torch, reason logged once: fp32
            tokens on a GPU take the reference, see :func:`reference_preferred`), "triton" (kernel or
            :class:`~refseg.kernels.dispatch.KernelUnavailableError`), "torch" (reference).

    Returns:
        :class:`MatchResult`. Runs as the custom op ``torch.ops.refseg.match`` so ``torch.compile`` can trace
        it. The kill switch ``REFSEG_DISABLE_MATCH=1`` forces the reference under "auto".
    """
    _check_args(ref, tgt, metric, ref_valid, tgt_valid, k)
    return MatchResult(*torch.ops.refseg.match(ref, tgt, ref_valid, tgt_valid, metric, k, backend))


# ----------------------------------------------------------------------------------------------- Triton kernel
# One launch per batch: grid (row tiles of ref + row tiles of tgt, B). A program of the first kind scans all
# target tiles for its block of reference tokens (top-k best + worst); one of the second kind scans all
# reference tiles for its block of target tokens (best). Scores live only in registers, one tile at a time.
# Index 2147483647 (int32 max) marks "no candidate" inside the kernel; it becomes -1 on store.


def _tl_merge_best(run_v, run_i, tile_v, tile_ok, cols, K: tl.constexpr, KP: tl.constexpr):
    # Merge a (BR, BT) tile of keys (bigger is better) into the running sorted top-K (BR, KP):
    # K rounds of "take the largest key, lowest index on ties". Running indices all precede the tile's.
    run_ok = run_i != 2147483647
    slot = tl.arange(0, KP)[None, :]
    new_v = tl.full(run_v.shape, float("-inf"), tl.float32)
    new_i = tl.full(run_i.shape, 2147483647, tl.int32)
    for j in range(K):  # a loop, not unrolled: k = 64 would otherwise cost 64 copies of the body
        m = tl.maximum(tl.max(tl.where(run_ok, run_v, float("-inf")), 1),
                       tl.max(tl.where(tile_ok, tile_v, float("-inf")), 1))
        hit_run = tl.where(run_ok & (run_v == m[:, None]), run_i, 2147483647)
        hit_tile = tl.where(tile_ok & (tile_v == m[:, None]), cols[None, :], 2147483647)
        ci = tl.minimum(tl.min(hit_run, 1), tl.min(hit_tile, 1))
        new_v = tl.where(slot == j, m[:, None], new_v)
        new_i = tl.where(slot == j, ci[:, None], new_i)
        run_ok = run_ok & (run_i != ci[:, None])
        tile_ok = tile_ok & (cols[None, :] != ci[:, None])
    return new_v, new_i


def _tl_scan_rows(x_ptr, y_ptr, xvalid_ptr, yvalid_ptr, best_i_ptr, best_v_ptr, far_i_ptr, far_v_ptr,
                  n_x, n_y, D, tile,
                  SIGN: tl.constexpr, COSINE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                  WITH_FAR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  X_MASKED: tl.constexpr, Y_MASKED: tl.constexpr):
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < n_x
    row_ok = row_in
    if X_MASKED:
        row_ok = row_in & (tl.load(xvalid_ptr + rows, mask=row_in, other=0) != 0)
    x_sq = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=row_in[:, None] & (dd < D)[None, :],
                    other=0.0).to(tl.float32)
        x_sq += tl.sum(x * x, 1)
    best_v = tl.full((BLOCK_R, KP), float("-inf"), tl.float32)
    best_i = tl.full((BLOCK_R, KP), 2147483647, tl.int32)
    far_v = tl.full((BLOCK_R, 2), float("-inf"), tl.float32)
    far_i = tl.full((BLOCK_R, 2), 2147483647, tl.int32)
    for t0 in range(0, n_y, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        col_in = cols < n_y
        col_ok = col_in
        if Y_MASKED:
            col_ok = col_in & (tl.load(yvalid_ptr + cols, mask=col_in, other=0) != 0)
        acc = tl.zeros((BLOCK_R, BLOCK_T), tl.float32)
        y_sq = tl.zeros((BLOCK_T,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = (dd < D)[None, :]
            x = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=row_in[:, None] & dm, other=0.0)
            y = tl.load(y_ptr + cols[:, None] * D + dd[None, :], mask=col_in[:, None] & dm, other=0.0)
            if UPCAST:  # interpreter only: it mis-multiplies bfloat16 in tl.dot (see match_launch_args)
                x = x.to(tl.float32)
                y = y.to(tl.float32)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
            yf = y.to(tl.float32)
            y_sq += tl.sum(yf * yf, 1)
        if COSINE:
            norm = tl.maximum(tl.sqrt(x_sq), 1e-12)[:, None] * tl.maximum(tl.sqrt(y_sq), 1e-12)[None, :]
            score = acc / norm
        else:
            score = tl.sqrt(tl.maximum(x_sq[:, None] + y_sq[None, :] - 2.0 * acc, 0.0))
        tile_ok = tl.broadcast_to(col_ok[None, :], (BLOCK_R, BLOCK_T))
        best_v, best_i = _tl_merge_best(best_v, best_i, score * SIGN, tile_ok, cols, K, KP)
        if WITH_FAR:
            far_v, far_i = _tl_merge_best(far_v, far_i, score * (-SIGN), tile_ok, cols, 1, 2)
    slot = tl.arange(0, KP)[None, :]
    found = (best_i != 2147483647) & row_ok[:, None]
    out = rows[:, None] * K + slot
    smask = row_in[:, None] & (slot < K)
    tl.store(best_i_ptr + out, tl.where(found, best_i, -1).to(tl.int64), mask=smask)
    tl.store(best_v_ptr + out, tl.where(found, best_v * SIGN, float("nan")), mask=smask)
    if WITH_FAR:
        slot2 = tl.arange(0, 2)[None, :]
        found2 = (far_i != 2147483647) & row_ok[:, None]
        out2 = rows[:, None] + slot2 * 0
        smask2 = row_in[:, None] & (slot2 == 0)
        tl.store(far_i_ptr + out2, tl.where(found2, far_i, -1).to(tl.int64), mask=smask2)
        tl.store(far_v_ptr + out2, tl.where(found2, far_v * (-SIGN), float("nan")), mask=smask2)


def _tl_match_kernel(ref_ptr, tgt_ptr, rvalid_ptr, tvalid_ptr, fwd_i_ptr, fwd_v_ptr, far_i_ptr, far_v_ptr,
                     bwd_i_ptr, bwd_v_ptr, Nr, Nt, D, n_ref_tiles,
                     SIGN: tl.constexpr, COSINE: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr, REF_MASKED: tl.constexpr,
                     TGT_MASKED: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if tile < n_ref_tiles:  # forward: reference rows against all target tokens
        _tl_scan_rows(ref_ptr + b * Nr * D, tgt_ptr + b * Nt * D, rvalid_ptr + b * Nr, tvalid_ptr + b * Nt,
                      fwd_i_ptr + b * Nr * K, fwd_v_ptr + b * Nr * K, far_i_ptr + b * Nr, far_v_ptr + b * Nr,
                      Nr, Nt, D, tile, SIGN, COSINE, K, KP, True, BLOCK_R, BLOCK_T, BLOCK_D, PRECISION, UPCAST,
                      REF_MASKED, TGT_MASKED)
    else:  # backward: target rows against all reference tokens (scores are symmetric)
        _tl_scan_rows(tgt_ptr + b * Nt * D, ref_ptr + b * Nr * D, tvalid_ptr + b * Nt, rvalid_ptr + b * Nr,
                      bwd_i_ptr + b * Nt, bwd_v_ptr + b * Nt, bwd_i_ptr, bwd_v_ptr,
                      Nt, Nr, D, tile - n_ref_tiles, SIGN, COSINE, 1, 2, False, BLOCK_R, BLOCK_T, BLOCK_D,
                      PRECISION, UPCAST, TGT_MASKED, REF_MASKED)


@functools.lru_cache(maxsize=None)
def _build_match_kernel():
    """Define the Triton kernel on first use (triton is optional and imported lazily)."""
    return dispatch.bind_triton(globals(), ("_tl_merge_best", "_tl_scan_rows", "_tl_match_kernel"))


def _mask_bytes(mask: Optional[Tensor], like: Tensor) -> Tensor:
    # A missing mask is never read by the kernel (constexpr flag); any pointer will do.
    return like if mask is None else mask.to(torch.uint8).contiguous()


def match_launch_args(ref: Tensor, tgt: Tensor, ref_valid: Optional[Tensor], tgt_valid: Optional[Tensor],
                      cosine: bool, k: int, block_r: Optional[int] = None, block_t: Optional[int] = None,
                      block_d: Optional[int] = None, on_gpu: Optional[bool] = None):
    """Grid, positional args, keyword args (constexprs and launch options) and outputs of one launch.

    ``on_gpu`` defaults to "the inputs are on a CUDA device"; :mod:`refseg.kernels.compile_check` passes
    ``True`` with CPU tensors to compile exactly what a GPU launch would. Block sizes and warps come from
    :func:`refseg.kernels.launch_configs.match_launch` unless given (tests pass small ones, >= 16, powers
    of two, to exercise partial tiles).
    """
    B, Nr, D = ref.shape
    Nt = tgt.shape[1]
    dev = ref.device
    on_gpu = dev.type == "cuda" if on_gpu is None else on_gpu
    cfg = launch_configs.match_launch(ref.dtype, k, on_gpu)
    block_r, block_t, block_d = block_r or cfg.block_r, block_t or cfg.block_t, block_d or cfg.block_d
    kp = max(2, 1 << (k - 1).bit_length())
    out = tuple(torch.empty(shape, dtype=dtype, device=dev)
                for shape in ((B, Nr, k), (B, Nr), (B, Nt)) for dtype in (torch.int64, torch.float32))
    n_ref_tiles = -(-Nr // block_r)
    grid = (n_ref_tiles + -(-Nt // block_r), B)
    # fp32 inputs use exact fp32 products (no TF32) so indices agree with torch.cdist / matmul references.
    # fp16 / bf16 inputs use the tensor cores (fp32 accumulation). Triton's interpreter mis-multiplies
    # bfloat16 in tl.dot, so there (only) bf16 operands are widened to fp32 inside the kernel after the
    # bf16 loads: bf16 x bf16 products are exact in fp32, so this computes what the tensor cores compute
    # up to the summation order.
    upcast = ref.dtype == torch.bfloat16 and not on_gpu and dispatch.interpreter_enabled()
    precision = "ieee" if ref.dtype == torch.float32 or upcast else None
    args = (ref, tgt, _mask_bytes(ref_valid, ref), _mask_bytes(tgt_valid, ref), *out, Nr, Nt, D, n_ref_tiles)
    kwargs = dict(SIGN=1.0 if cosine else -1.0, COSINE=cosine, K=k, KP=kp, BLOCK_R=block_r,
                  BLOCK_T=block_t, BLOCK_D=block_d, PRECISION=precision, UPCAST=upcast,
                  REF_MASKED=ref_valid is not None, TGT_MASKED=tgt_valid is not None,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
    return grid, args, kwargs, out


def launch_match(ref: Tensor, tgt: Tensor, ref_valid: Optional[Tensor], tgt_valid: Optional[Tensor],
                 cosine: bool, k: int, block_r: Optional[int] = None, block_t: Optional[int] = None,
                 block_d: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the Triton kernel on validated inputs; returns the six :class:`MatchResult` fields.

    The launch configuration comes from :mod:`refseg.kernels.launch_configs` (block sizes may be overridden).
    """
    kernel = _build_match_kernel()
    ref, tgt = ref.contiguous(), tgt.contiguous()
    grid, args, kwargs, out = match_launch_args(ref, tgt, ref_valid, tgt_valid, cosine, k,
                                                block_r, block_t, block_d)
    dev = ref.device
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **kwargs)
    return out
