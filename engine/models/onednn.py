"""Linear layers and rel-pos attention on the CPU through oneDNN, when this machine runs them faster.

``F.linear`` on the CPU goes to the BLAS torch was built with (MKL on x86 wheels), which on some CPUs
(AMD EPYC among them) runs fp32 GEMMs at about half the speed of oneDNN's own kernels; oneDNN can also
apply the bias and a GELU in the GEMM's epilogue instead of two more passes over the output. The
encoders' linear layers call :func:`linear`, which picks oneDNN's ``mkldnn._linear_pointwise`` where
it pays and falls back to ``F.linear`` (+ ``F.gelu``) everywhere else. SAM's global attention with
its decomposed relative-position bias (:func:`attention_rel_pos`) runs on the same GEMMs: the scores of
a few query rows at a time, the two bias terms added in place by broadcasting (the (N, N) bias is
never formed), softmax, then the value GEMM; SDPA's CPU kernel runs its GEMMs through the BLAS.

The choice is measured, once per process and dtype, on a ViT-sized GEMM (both paths timed, best of
three each), not assumed from one machine's result; it is logged once. Both paths compute in the
input dtype with fp32 accumulation, so results agree to float rounding (not bit for bit).

Only inference on CPU tensors takes the oneDNN path: autograd (the op has no backward), tracing,
ONNX export and ``torch.compile`` (whose inductor does its own oneDNN fusion) always see ``F.linear``.
``REFSEG_DISABLE_ONEDNN=1`` turns both oneDNN paths off, and so does ``REFSEG_ACCELERATOR_PATH=1`` (the
CPU run of the GPU code path, :mod:`refseg.pipeline.accelerator`).
"""
from __future__ import annotations

import logging
import os
import threading
import time

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KILL_SWITCH = "REFSEG_DISABLE_ONEDNN"
DTYPES = (torch.float32, torch.bfloat16)
_PROBE_SHAPE = (1024, 768, 3072)  # tokens x in x out of a ViT-B MLP layer (about 4.8 GFLOP)

_choice: dict[torch.dtype, bool] = {}
_lock = threading.Lock()


def _onednn_op():
    ops = getattr(torch.ops, "mkldnn", None)
    return getattr(ops, "_linear_pointwise", None) if ops is not None else None


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    return _onednn_op()(x, weight, bias, act, [None], "none")


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return F.gelu(y) if act == "gelu" else y


def _best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(dtype: torch.dtype) -> dict:
    """Time both paths on the probe GEMM in ``dtype``: ``{"onednn_s", "default_s", "onednn"}``
    (``onednn`` True when it is at least 10 % faster). Raises RuntimeError when the op fails."""
    n, k, m = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, generator=gen).to(dtype)
    w = (torch.randn(m, k, generator=gen) * k ** -0.5).to(dtype)
    b = torch.randn(m, generator=gen).to(dtype)
    with torch.inference_mode():
        for fn in (_onednn, _reference):  # warm-up: first calls build kernels / pack weights
            fn(x, w, b, "gelu")
        onednn_s = _best_of(lambda: _onednn(x, w, b, "gelu"))
        default_s = _best_of(lambda: _reference(x, w, b, "gelu"))
    return {"onednn_s": onednn_s, "default_s": default_s, "onednn": onednn_s < 0.9 * default_s}


def use_onednn(dtype: torch.dtype) -> bool:
    """Whether CPU linear layers in ``dtype`` take the oneDNN path (decided on first use, then cached)."""
    if os.environ.get(KILL_SWITCH, "") not in ("", "0") or dtype not in DTYPES:
        return False
    if os.environ.get("REFSEG_ACCELERATOR_PATH", "").strip().lower() in ("1", "true", "yes", "on"):
        return False  # the accelerator path runs exactly the GPU's code: F.linear, SDPA
    if dtype not in _choice:
        with _lock:
            if dtype not in _choice:
                _choice[dtype] = _decide(dtype)
    return _choice[dtype]


def _decide(dtype: torch.dtype) -> bool:
    if _onednn_op() is None or not torch.backends.mkldnn.is_available():
        log.info("CPU linear layers (%s): F.linear (this torch has no oneDNN linear)", dtype)
        return False
    try:
        m = measure(dtype)
    except RuntimeError as exc:
        log.info("CPU linear layers (%s): F.linear (oneDNN linear failed: %s)", dtype, exc)
        return False
    log.info("CPU linear layers (%s): %s (probe GEMM+GELU: oneDNN %.1f ms, F.linear %.1f ms; %s=1 turns "
             "oneDNN off)", dtype, "oneDNN" if m["onednn"] else "F.linear", m["onednn_s"] * 1e3,
             m["default_s"] * 1e3, KILL_SWITCH)
    return m["onednn"]


def tracing() -> bool:
    """True while TorchScript/ONNX tracing, ``torch.compile`` or ``torch.export`` records the model."""
    compiler = getattr(torch, "compiler", None)
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or any(bool(getattr(compiler, name, lambda: False)()) for name in ("is_compiling", "is_exporting")))


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != weight.dtype or x.dim() < 2:
        return False
    if tracing():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return use_onednn(x.dtype)


def linear(x: torch.Tensor, layer: torch.nn.Linear, activation: str | None = None) -> torch.Tensor:
    """``layer(x)``, followed by exact (erf) GELU when ``activation == "gelu"``.

    Args:
        x: (..., in_features) in the layer's dtype.
        layer: the ``nn.Linear`` whose weight (out, in) and bias (out,) are used.
        activation: None or ``"gelu"``.

    Returns:
        (..., out_features), through oneDNN where :func:`use_onednn` says so, else ``F.linear``.
    """
    act = "gelu" if activation == "gelu" else "none"
    if layer.weight.is_contiguous() and _eligible(x, layer.weight):
        return _onednn(x, layer.weight, layer.bias, act)
    return _reference(x, layer.weight, layer.bias, act)


# Query rows per score block in attention_rel_pos: ~1M scores (4 MB in fp32) stay in a CPU's caches.
_SCORE_BLOCK_ELEMENTS = 1 << 20


def attention_rel_pos(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                      rel_w: torch.Tensor) -> torch.Tensor | None:
    """softmax(q·kᵀ·C^-½ + bias)·v with SAM's decomposed bias, through oneDNN GEMMs; None where not used.

    Args:
        q, k, v: (B, heads, N, C) fp32, N = q_h·q_w, keys on the same grid as the queries.
        rel_h, rel_w: (B·heads, q_h, q_w, k_h) and (B·heads, q_h, q_w, k_w), the bias terms
            (bias[(y, x), (y', x')] = rel_h[y, x, y'] + rel_w[y, x, x']).

    Returns:
        (B, heads, N, C), equal to SDPA with the full bias up to float rounding; None when the inputs
        are not fp32 CPU inference tensors or oneDNN is not the faster path here (the caller then runs SDPA).
    """
    if q.dtype != torch.float32 or not _eligible(q, k):
        return None
    b, heads, n, c = q.shape
    bh, q_h, q_w, k_h = rel_h.shape
    k_w = rel_w.shape[-1]
    rows = max(1, min(q_h, _SCORE_BLOCK_ELEMENTS // (q_w * n)))
    scaled = q.reshape(bh, n, c) * c ** -0.5
    keys = k.reshape(bh, n, c).contiguous()  # a strided "weight" sends oneDNN down a very slow path
    values = v.reshape(bh, n, c)
    out = torch.empty(bh, n, c, dtype=q.dtype)
    for i in range(bh):
        values_t = values[i].t().contiguous()  # (C, N): the "weight" of the value GEMM
        for y0 in range(0, q_h, rows):
            y1 = min(y0 + rows, q_h)
            scores = _onednn(scaled[i, y0 * q_w:y1 * q_w], keys[i], None, "none")  # (rows·q_w, N)
            grid = scores.view(y1 - y0, q_w, k_h, k_w)
            grid += rel_h[i, y0:y1, :, :, None]
            grid += rel_w[i, y0:y1, :, None, :]
            out[i, y0 * q_w:y1 * q_w] = _onednn(torch.softmax(scores, dim=-1), values_t, None, "none")
    return out.view(b, heads, n, c)
