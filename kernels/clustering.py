"""Batched k-means for many small problems (point prompts), one Triton program per problem.

Conventions shared by :func:`kmeans` (kernel when possible) and :func:`kmeans_reference` (plain torch):

- ``points`` (P, N, d) float (any float dtype; computed in float32), ``counts`` (P,) int: problem ``p`` uses
  rows ``0 .. counts[p]-1``; the rest is padding and gets label -1. Counts outside [0, N] raise when they
  sit on the CPU; on a GPU (no host sync is spent on checking) they are clamped to [0, N].
- ``K_eff = min(K, counts[p])`` centres are fitted; centres ``K_eff .. K-1`` are NaN and never assigned.
  ``counts[p] == 0`` gives all-NaN centres, all labels -1 and inertia 0.
- ``init="first"``: the first ``K_eff`` points. ``init="k-means++"``: D^2 sampling driven by a counter-based
  hash of ``(seed, draw)`` (:func:`kmeans_draws`), computed identically by kernel and reference, so both
  start from the same centres. The draws do not depend on the problem's position in the batch, so a
  problem gives the same result alone or batched with others. Details that make the draw exactly reproducible: the first centre is row
  ``(r0 * count) >> 24``; squared distances are summed coordinate by coordinate without fused multiply-add;
  the weights are ``floor(D^2 * 2^(20 - e))`` (``2^e`` the largest D^2's power of two, so weights < 2^21 and
  points with ``D^2 < max D^2 / 2^21`` get weight 0), summed in int64; the next centre is the first row whose
  running weight exceeds ``(r * total) >> 24``. If every weight is 0 (all remaining points coincide with
  centres) draw ``j`` takes row ``j``, a duplicate centre.
- Lloyd iterations: assign (lowest centre index wins ties), then move each centre to its members' mean; a
  centre with no member keeps its previous position. Stop after ``iters`` updates or when an update changes
  no label. Returned labels are always the nearest centre of the returned centres, and ``inertia`` (P,) is
  the sum of squared distances of the valid points to their centre.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, launch_configs

tl = None  # triton.language, bound by dispatch.bind_triton on the first kernel call (triton is optional)

INITS = ("k-means++", "first")
MAX_KERNEL_N = 4096
MAX_KERNEL_D = 64
MAX_KERNEL_K = 64
_M32 = 0xFFFFFFFF


def kmeans_draws(seed: int, P: int, K: int, device: torch.device | str = "cpu") -> Tensor:
    """(P, K) int64 in [0, 2^24): draw ``j`` (a lowbias32 hash of (seed, j)), the same row for every problem.

    Independent of the problem index on purpose: batching must not change any problem's clustering.
    """
    j = torch.arange(K, dtype=torch.int64, device=device)
    x = ((int(seed) & _M32) * 0x9E3779B1 + j * 0xC2B2AE3D + 0x27D4EB2F) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32  # int64 products wrap; the low 32 bits stay exact
    x = x ^ (x >> 16)
    return (x >> 8).expand(P, K).contiguous()


def _check_args(points: Tensor, counts: Tensor, k: int, iters: int, init: str) -> None:
    where = "refseg.kernels.kmeans"
    if not isinstance(points, Tensor) or points.dim() != 3 or not points.is_floating_point():
        raise ValueError(f"{where}: points must be a float tensor (P, N, d), got "
                         f"{getattr(points, 'dtype', type(points))} {tuple(getattr(points, 'shape', ()))}")
    P, N = points.shape[:2]
    if not isinstance(counts, Tensor) or tuple(counts.shape) != (P,) or counts.is_floating_point() \
            or counts.dtype == torch.bool:
        raise ValueError(f"{where}: counts must be an integer tensor of shape ({P},), got "
                         f"{getattr(counts, 'dtype', type(counts))} {tuple(getattr(counts, 'shape', ()))}")
    # Value check only where it costs no device sync and no graph break; elsewhere counts are clamped to [0, N].
    if counts.device.type == "cpu" and counts.numel() and not torch.compiler.is_compiling() \
            and (int(counts.min()) < 0 or int(counts.max()) > N):
        raise ValueError(f"{where}: counts must lie in [0, N={N}], got min {int(counts.min())} "
                         f"max {int(counts.max())}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: k must be an int >= 1, got {k!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{where}: iters must be an int >= 0, got {iters!r}")
    if init not in INITS:
        raise ValueError(f"{where}: init must be one of {INITS}, got {init!r}")


def _seq_sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """(P, N) squared distances of x (P, N, d) to c (P, d), summed coordinate by coordinate (no FMA)."""
    acc = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
    for j in range(x.shape[2]):
        diff = x[:, :, j] - c[:, None, j]
        acc = acc + diff * diff
    return acc


def _pp_weights(d2: Tensor) -> Tensor:
    """Integer k-means++ weights floor(d2 * 2^(20 - e)) (P, N) int64, where 2^e <= max(d2) < 2^(e+1)."""
    top = d2.amax(dim=1)
    expo = (top.view(torch.int32) >> 23) & 255
    ok = (expo >= 20) & (expo < 255)
    scale = ((torch.where(ok, 274 - expo, 127)) << 23).to(torch.int32).view(torch.float32)
    w = torch.floor(d2 * scale[:, None]).to(torch.int64)
    return torch.where(ok[:, None], w, 0)


def _init_centres(x: Tensor, counts: Tensor, k: int, seed: int, init: str) -> Tensor:
    P, N, d = x.shape
    keff = counts.clamp(max=k)
    centres = torch.full((P, k, d), float("nan"), dtype=torch.float32, device=x.device)
    prob = torch.arange(P, device=x.device)
    if init == "first":
        take = min(k, N)
        centres[:, :take] = x[:, :take]
        return torch.where((torch.arange(k, device=x.device) < keff[:, None])[..., None], centres, float("nan"))
    draws = kmeans_draws(seed, P, k, x.device)
    rows_ok = torch.arange(N, device=x.device)[None, :] < counts[:, None]
    idx = ((draws[:, 0] * counts) >> 24).clamp(max=max(N - 1, 0))
    first = x[prob, idx]
    centres[:, 0] = torch.where((keff > 0)[:, None], first, float("nan"))
    d2 = _seq_sq_dist(x, first)
    for j in range(1, k):
        w = _pp_weights(torch.where(rows_ok, d2, 0.0))
        cum = torch.cumsum(w, dim=1)
        total = cum[:, -1]
        t = (draws[:, j] * total) >> 24
        idx = torch.where(total > 0, (cum <= t[:, None]).sum(dim=1), j).clamp(max=N - 1)
        chosen = x[prob, idx]
        active = j < keff
        centres[:, j] = torch.where(active[:, None], chosen, float("nan"))
        d2 = torch.where(active[:, None], torch.minimum(d2, _seq_sq_dist(x, chosen)), d2)
    return centres


def _assign(x: Tensor, centres: Tensor, keff: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centre (lowest index on ties) and its squared distance, (P, N) int64 / float32."""
    P, N, _ = x.shape
    k = centres.shape[1]
    dist = torch.empty((P, N, k), dtype=torch.float32, device=x.device)
    for c in range(k):
        dist[:, :, c] = ((x - centres[:, None, c]) ** 2).sum(dim=-1)
    dist = dist.masked_fill(torch.arange(k, device=x.device)[None, None, :] >= keff[:, None, None], float("inf"))
    best, labels = dist.min(dim=-1)
    return labels, best


def kmeans_reference(points: Tensor, counts: Tensor, k: int, iters: int = 100, seed: int = 0,
                     init: str = "k-means++") -> tuple[Tensor, Tensor, Tensor]:
    """Plain-torch batched k-means with the conventions of the module doc; same signature as :func:`kmeans`.

    Returns centres (P, k, d) float32, labels (P, N) int64 (-1 on padding), inertia (P,) float32.
    """
    _check_args(points, counts, k, iters, init)
    x = points.float()
    P, N, d = x.shape
    counts = counts.to(device=x.device, dtype=torch.int64).clamp(0, N)
    if N == 0:
        return (torch.full((P, k, d), float("nan"), device=x.device), torch.empty((P, 0), dtype=torch.int64,
                device=x.device), torch.zeros(P, device=x.device))
    keff = counts.clamp(max=k)
    rows_ok = torch.arange(N, device=x.device)[None, :] < counts[:, None]
    x = torch.where(rows_ok[..., None], x, 0.0)  # padding never contributes (and NaN padding is harmless)
    centres = _init_centres(x, counts, k, seed, init)
    labels, best = _assign(x, centres, keff)
    done = torch.zeros(P, dtype=torch.bool, device=x.device)
    for _ in range(iters):
        if bool(done.all()):
            break
        onehot = torch.nn.functional.one_hot(labels, k).to(torch.float32) * rows_ok[..., None]
        sums = onehot.transpose(1, 2) @ x  # (P, k, d)
        cnt = onehot.sum(dim=1)  # (P, k)
        moved = torch.where(cnt[..., None] > 0, sums / cnt.clamp_min(1.0)[..., None], centres)
        centres = torch.where(done[:, None, None], centres, moved)
        new_labels, new_best = _assign(x, centres, keff)
        changed = ((new_labels != labels) & rows_ok).any(dim=1)
        labels = torch.where(done[:, None], labels, new_labels)
        best = torch.where(done[:, None], best, new_best)
        done = done | ~changed
    inertia = torch.where(rows_ok, best, 0.0).sum(dim=1)
    return centres, torch.where(rows_ok, labels, -1), inertia


def _limits_reason(points: Tensor, k: int) -> Optional[str]:
    P, N, d = points.shape
    if points.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"points dtype {points.dtype} is not float16/bfloat16/float32"
    if N > MAX_KERNEL_N or d > MAX_KERNEL_D or k > MAX_KERNEL_K:
        return (f"problem size N={N}, d={d}, k={k} exceeds the kernel's limits "
                f"N<={MAX_KERNEL_N}, d<={MAX_KERNEL_D}, k<={MAX_KERNEL_K}")
    if 0 in (P, N, d):
        return f"empty input {tuple(points.shape)}"
    return None


def _tl_seq_sq_dist(x_base, rows, rows_ok, c_ptr, d, NP: tl.constexpr):
    # Coordinate-by-coordinate sum of squares: bit-identical to the torch reference (launched without
    # FMA contraction), which k-means++ needs to draw the same centres.
    acc = tl.zeros((NP,), tl.float32)
    for j in range(d):
        diff = tl.load(x_base + rows * d + j, mask=rows_ok, other=0.0) - tl.load(c_ptr + j)
        acc = acc + diff * diff
    return acc


def _tl_lloyd_pass(x_base, c_base, l_base, d, count, keff,
                   KP: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr):
    # Assign every valid point to its nearest centre, store the labels, and accumulate what the next
    # centre update needs (per-centre sums and counts), the number of changed labels and the inertia.
    tl.debug_barrier()  # centres / labels written by other threads of this program must be visible
    kk = tl.arange(0, KP)
    dd = tl.arange(0, DP)
    dm = dd < d
    sums = tl.zeros((KP, DP), tl.float32)
    cnts = tl.zeros((KP,), tl.float32)
    changed = tl.zeros((BLOCK_N,), tl.int32)
    inertia = tl.zeros((BLOCK_N,), tl.float32)
    for n0 in range(0, count, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rm = rows < count
        x = tl.load(x_base + rows[:, None] * d + dd[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        lab = tl.zeros((BLOCK_N,), tl.int32)
        for c in range(keff):
            cen = tl.load(c_base + c * d + dd, mask=dm, other=0.0)
            diff = x - cen[None, :]
            dist = tl.sum(diff * diff, 1)
            closer = dist < best  # strict: the lowest centre index wins ties
            best = tl.where(closer, dist, best)
            lab = tl.where(closer, c, lab)
        old = tl.load(l_base + rows, mask=rm, other=-1)
        changed += (rm & (old != lab)).to(tl.int32)
        inertia += tl.where(rm, best, 0.0)
        tl.store(l_base + rows, lab.to(tl.int64), mask=rm)
        for c in range(keff):
            sel = rm & (lab == c)
            part = tl.sum(tl.where(sel[:, None], x, 0.0), 0)
            sums = tl.where((kk == c)[:, None], sums + part[None, :], sums)
            cnts = tl.where(kk == c, cnts + tl.sum(sel.to(tl.float32), 0), cnts)
    return tl.sum(changed, 0), tl.sum(inertia, 0), sums, cnts


def _tl_kmeans_kernel(x_ptr, counts_ptr, draws_ptr, cent_ptr, labels_ptr, inertia_ptr, N, d, K, iters,
                      PLUS_PLUS: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, DP: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    x_base = x_ptr + p * N * d
    c_base = cent_ptr + p * K * d
    l_base = labels_ptr + p * N
    count = tl.minimum(tl.maximum(tl.load(counts_ptr + p).to(tl.int32), 0), N)
    keff = tl.minimum(count, K)
    dd = tl.arange(0, DP)
    dm = dd < d
    # ---- initial centres (the host filled the buffer with NaN; rows >= keff stay NaN)
    if PLUS_PLUS:
        if keff > 0:
            rows = tl.arange(0, NP)
            rows_ok = rows < count
            pick = ((tl.load(draws_ptr + p * K).to(tl.int64) * count) >> 24).to(tl.int32)
            tl.store(c_base + dd, tl.load(x_base + pick * d + dd, mask=dm), mask=dm)
            d2 = _tl_seq_sq_dist(x_base, rows, rows_ok, x_base + pick * d, d, NP)
            for j in range(1, keff):
                d2v = tl.where(rows_ok, d2, 0.0)
                expo = (tl.max(d2v, 0).to(tl.int32, bitcast=True) >> 23) & 255
                ok = (expo >= 20) & (expo < 255)
                scale = (tl.where(ok, 274 - expo, 127) << 23).to(tl.float32, bitcast=True)
                w = tl.where(ok, tl.floor(d2v * scale).to(tl.int64), 0)
                cum = tl.cumsum(w, 0)
                total = tl.sum(w, 0)
                t = (tl.load(draws_ptr + p * K + j).to(tl.int64) * total) >> 24
                pick = tl.where(total > 0, tl.sum((cum <= t).to(tl.int32), 0), j)
                tl.store(c_base + j * d + dd, tl.load(x_base + pick * d + dd, mask=dm), mask=dm)
                d2 = tl.minimum(d2, _tl_seq_sq_dist(x_base, rows, rows_ok, x_base + pick * d, d, NP))
    else:
        for j in range(keff):
            tl.store(c_base + j * d + dd, tl.load(x_base + j * d + dd, mask=dm), mask=dm)
    # ---- Lloyd iterations
    kk = tl.arange(0, KP)
    cmask = (kk < keff)[:, None] & dm[None, :]
    changed, inertia, sums, cnts = _tl_lloyd_pass(x_base, c_base, l_base, d, count, keff, KP, DP, BLOCK_N)
    for _ in range(iters):  # fixed trip count plus a convergence flag: no data-dependent while loop
        if changed > 0:
            old = tl.load(c_base + kk[:, None] * d + dd[None, :], mask=cmask, other=0.0)
            moved = tl.where(cnts[:, None] > 0, sums / tl.maximum(cnts, 1.0)[:, None], old)
            tl.debug_barrier()
            tl.store(c_base + kk[:, None] * d + dd[None, :], moved, mask=cmask)
            changed, inertia, sums, cnts = _tl_lloyd_pass(x_base, c_base, l_base, d, count, keff,
                                                          KP, DP, BLOCK_N)
    tl.store(inertia_ptr + p, inertia)


@functools.lru_cache(maxsize=None)
def _build_kmeans_kernel():
    """Define the Triton kernel on first use (triton is optional and imported lazily)."""
    return dispatch.bind_triton(globals(), ("_tl_seq_sq_dist", "_tl_lloyd_pass", "_tl_kmeans_kernel"))


def kmeans_launch_args(points: Tensor, counts: Tensor, k: int, iters: int, seed: int, init: str,
                       on_gpu: Optional[bool] = None):
    """Grid, positional args, keyword args and outputs (centres, labels, inertia) of one launch.

    ``on_gpu`` defaults to "the points are on a CUDA device"; :mod:`refseg.kernels.compile_check` passes
    ``True`` with CPU tensors. Launch options come from :func:`refseg.kernels.launch_configs.kmeans_launch`.
    """
    x = points.float().contiguous()
    P, N, d = x.shape
    dev = x.device
    counts = counts.to(device=dev, dtype=torch.int32).contiguous()
    centres = torch.full((P, k, d), float("nan"), dtype=torch.float32, device=dev)
    labels = torch.full((P, N), -1, dtype=torch.int64, device=dev)
    inertia = torch.zeros(P, dtype=torch.float32, device=dev)
    plus_plus = init == "k-means++"
    draws = kmeans_draws(seed, P, k, dev) if plus_plus else labels  # not read by init="first"

    np2 = lambda v: max(2, 1 << (v - 1).bit_length())  # noqa: E731
    NP, KP, DP = np2(N), np2(k), np2(d)
    cfg = launch_configs.kmeans_launch(NP, DP, dev.type == "cuda" if on_gpu is None else on_gpu)
    args = (x, counts, draws, centres, labels, inertia, N, d, k, iters)
    kwargs = dict(PLUS_PLUS=plus_plus, NP=NP, KP=KP, DP=DP, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, enable_fp_fusion=False)
    return (P,), args, kwargs, (centres, labels, inertia)


def launch_kmeans(points: Tensor, counts: Tensor, k: int, iters: int, seed: int,
                  init: str) -> tuple[Tensor, Tensor, Tensor]:
    """Run the Triton kernel on validated inputs (one program per problem)."""
    kernel = _build_kmeans_kernel()
    grid, args, kwargs, out = kmeans_launch_args(points, counts, k, iters, seed, init)
    kernel[grid](*args, **kwargs)
    return out


def kmeans_triton(points: Tensor, counts: Tensor, k: int, iters: int = 100, seed: int = 0,
                  init: str = "k-means++") -> tuple[Tensor, Tensor, Tensor]:
    """The Triton kernel directly (no fallback); raises
    :class:`~refseg.kernels.dispatch.KernelUnavailableError` when it cannot run here."""
    _check_args(points, counts, k, iters, init)
    dispatch.choose_backend("kmeans", "triton", [points, counts], _limits_reason(points, k))
    return launch_kmeans(points, counts, k, iters, seed, init)


@torch.library.custom_op("refseg::kmeans", mutates_args=())
def _kmeans_op(points: Tensor, counts: Tensor, k: int, iters: int, seed: int, init: str,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    chosen = dispatch.choose_backend("kmeans", backend, [points, counts],
                                     _limits_reason(points, k) if backend != "torch" else None)
    if chosen == "triton":
        return launch_kmeans(points, counts, k, iters, seed, init)
    return kmeans_reference(points, counts, k, iters, seed, init)


@_kmeans_op.register_fake
def _kmeans_fake(points, counts, k, iters, seed, init, backend):
    P, N, d = points.shape
    return (points.new_empty((P, k, d), dtype=torch.float32), points.new_empty((P, N), dtype=torch.int64),
            points.new_empty((P,), dtype=torch.float32))


def kmeans(points: Tensor, counts: Tensor, k: int, iters: int = 100, seed: int = 0, init: str = "k-means++",
           backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Fit k-means to P independent point sets at once (see the module doc for the exact semantics).

    Args:
        points: (P, N, d) float points (e.g. (x, y) pixel coordinates of prompt candidates); computed in fp32.
        counts: (P,) int, valid rows per problem (rows >= counts[p] are padding).
        k: centres per problem (K_eff = min(k, counts[p]) are fitted, the rest are NaN).
        iters: maximum number of Lloyd updates; seed: k-means++ seed; init: "k-means++" or "first".
        backend: "auto" | "triton" | "torch", as for :func:`refseg.kernels.match`; kill switch
            ``REFSEG_DISABLE_KMEANS=1``.

    Returns:
        centres (P, k, d) float32, labels (P, N) int64 (-1 on padding), inertia (P,) float32. Runs as the
        custom op ``torch.ops.refseg.kmeans``.
    """
    _check_args(points, counts, k, iters, init)
    counts = counts.to(points.device, non_blocking=True)
    return tuple(torch.ops.refseg.kmeans(points, counts, k, iters, seed, init, backend))
