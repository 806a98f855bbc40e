"""Linear layers on the CPU through oneDNN, chosen by rule from the CPU's features.

``F.linear`` on the CPU goes to the BLAS torch was built with (MKL on x86 wheels); oneDNN's own GEMM
kernels can also apply the bias and a GELU in their epilogue instead of two more passes over the output.
The encoders' linear layers call :func:`linear`, which takes oneDNN's ``mkldnn._linear_pointwise`` where
:func:`use_onednn` says so and ``F.linear`` (+ ``F.gelu``) everywhere else. (SAM's global attention
once ran on these GEMMs too, in score blocks; SDPA's CPU kernel with the bias in row chunks measured 3-4x
faster, so attention stays on SDPA: docs/attention.md.)

The choice is a rule, never a timing, so two runs of one job on one machine take the same path and
give the same numbers whatever the load (:func:`decide`, from :func:`cpu_features`):

* fp32: oneDNN on x86 CPUs with AVX-512 (on a 2-core AMD EPYC with AVX-512 it was 0.75-1.0x the time of
  ``F.linear`` on ViT GEMMs, never slower beyond noise; docs/attention.md), ``F.linear`` elsewhere;
* bf16: oneDNN wherever its bf16 inner-product primitive runs here (:func:`primitive_runs`, a
  functional probe: one small GEMM compared with ``F.linear``, not timed). Where it does not (AVX2-only
  CPUs), :func:`bf16_supported` is False and the runtime runs fp32 instead, with one warning.

Both paths compute in the input dtype with fp32 accumulation, so they agree to float rounding (not bit
for bit). Only inference on CPU tensors takes the oneDNN path: autograd (the op has no backward),
tracing, ONNX export and ``torch.compile`` (whose inductor does its own oneDNN fusion) always see
``F.linear``. ``REFSEG_DISABLE_ONEDNN=1`` turns the oneDNN path off, and so does ``REFSEG_ACCELERATOR_PATH=1`` (the CPU
run of the GPU code path, :mod:`refseg.pipeline.accelerator`). The decision is logged once per dtype.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .code_path import forced as accelerator_forced

log = logging.getLogger(__name__)

KILL_SWITCH = "REFSEG_DISABLE_ONEDNN"
DTYPES = (torch.float32, torch.bfloat16)

_choice: dict[torch.dtype, bool] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class CpuFeatures:
    """What the fp32 rule looks at: ``machine`` (``platform.machine()``, e.g. ``x86_64``) and
    ``capability`` (the vector ISA torch dispatches to: ``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""

    machine: str
    capability: str


def cpu_features() -> CpuFeatures:
    """This CPU's :class:`CpuFeatures`, as torch detects them (tests replace this function)."""
    return CpuFeatures(platform.machine().lower(), torch.backends.cpu.get_cpu_capability())


def _onednn_op():
    ops = getattr(torch.ops, "mkldnn", None)
    return getattr(ops, "_linear_pointwise", None) if ops is not None else None


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    return _onednn_op()(x, weight, bias, act, [None], "none")


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return F.gelu(y) if act == "gelu" else y


@functools.lru_cache(maxsize=None)
def primitive_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear primitive runs here in ``dtype`` and agrees with ``F.linear``.

    One (33, 40) x (40, 24) GEMM + bias + GELU, checked against ``F.linear`` (fp32 tolerance 1e-4,
    bf16 5e-2); an exception (no such primitive on this CPU, e.g. bf16 without AVX-512) means False.
    Cached per process; deterministic (nothing is timed).
    """
    if _onednn_op() is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((33, 40), (24, 40), (24,)))
    try:
        with torch.inference_mode():
            got = _onednn(x, w, b, "gelu").float()
            want = _reference(x.float(), w.float(), b.float(), "gelu")
    except RuntimeError as exc:
        log.debug("oneDNN %s linear does not run here: %s", dtype, exc)
        return False
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=tol, atol=tol))


def bf16_supported() -> bool:
    """Whether bf16 runs on this CPU through oneDNN's bf16 primitive (else the runtime keeps fp32)."""
    return primitive_runs(torch.bfloat16)


@functools.lru_cache(maxsize=None)
def cpu_bf16_or_fp32() -> str:
    """``"bf16"`` where :func:`bf16_supported`, else ``"fp32"`` with one warning per process: what a CPU
    run asked to compute in bf16 computes in."""
    if bf16_supported():
        return "bf16"
    log.warning("bf16 asked for on a CPU without oneDNN's bf16 primitive (%s): running fp32 instead",
                cpu_features())
    return "fp32"


def decide(dtype: torch.dtype, features: CpuFeatures | None = None) -> bool:
    """The rule: whether CPU linear layers in ``dtype`` take oneDNN (see the module doc)."""
    if dtype not in DTYPES or not primitive_runs(dtype):
        return False
    if dtype == torch.bfloat16:
        return True
    features = features or cpu_features()
    return features.machine in ("x86_64", "amd64") and features.capability.startswith("AVX512")


def use_onednn(dtype: torch.dtype) -> bool:
    """Whether CPU linear layers in ``dtype`` take the oneDNN path (decided on first use, then cached)."""
    if os.environ.get(KILL_SWITCH, "") not in ("", "0") or dtype not in DTYPES:
        return False
    if accelerator_forced():
        return False  # the accelerator path runs exactly the GPU's code: F.linear, SDPA
    if dtype not in _choice:
        with _lock:
            if dtype not in _choice:
                _choice[dtype] = decide(dtype)
                log.info("CPU linear layers (%s): %s (%s; %s=1 turns oneDNN off)", dtype,
                         "oneDNN" if _choice[dtype] else "F.linear", cpu_features(), KILL_SWITCH)
    return _choice[dtype]


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
