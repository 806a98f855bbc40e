"""Kernel dispatch: when a Triton kernel may run, and why it falls back to plain torch.

Every kernel in :mod:`refseg.kernels` sits beside a plain-torch reference with the same signature. The
public functions pick one of the two through :func:`choose_backend`:

- ``backend="torch"`` always runs the reference;
- ``backend="triton"`` runs the kernel or raises :class:`KernelUnavailableError` naming the reason;
- ``backend="auto"`` runs the kernel when the guard passes and otherwise falls back to the reference,
  logging the reason once per distinct reason (``logging``, logger ``refseg.kernels.dispatch``; DEBUG for
  CPU tensors and kill switches, WARNING when triton is missing, INFO otherwise).

The guard checks, in order: the kill switch ``REFSEG_DISABLE_<NAME>=1`` (e.g. ``REFSEG_DISABLE_MATCH``),
that the tensors live on a CUDA device (or on the CPU while ``TRITON_INTERPRET=1``, Triton's interpreter),
the kernel's own dtype and shape limits, and last that ``triton`` imports (it is optional:
``pip install 'refseg[gpu]'``).

Triton is imported lazily, on the first kernel call, so ``import refseg.kernels`` works without it and
so ``TRITON_INTERPRET`` may be set any time before that first call.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from types import ModuleType
from typing import Iterable, Optional

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")
_logged: set[str] = set()
_logged_lock = threading.Lock()


class KernelUnavailableError(RuntimeError):
    """``backend="triton"`` was requested but the kernel cannot run here; the message says why."""


def log_once(message: str, level: int = logging.INFO) -> None:
    """Log ``message`` the first time it is seen in this process (fallback reasons repeat per call)."""
    with _logged_lock:
        if message in _logged:
            return
        _logged.add(message)
    log.log(level, message)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kill_switch(name: str) -> Optional[str]:
    """Reason string when ``REFSEG_DISABLE_<NAME>`` is set to a true value, else None."""
    var = f"REFSEG_DISABLE_{name.upper()}"
    if os.environ.get(var, "0").strip().lower() in ("1", "true", "yes", "on"):
        return f"{var} is set"
    return None


@functools.lru_cache(maxsize=None)
def _import_triton() -> tuple[Optional[ModuleType], Optional[ModuleType], Optional[str]]:
    try:
        triton = importlib.import_module("triton")
        tl = importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install failing at import time
        return None, None, (f"triton is not importable ({type(exc).__name__}: {exc}); "
                            f"install the GPU extra: pip install 'refseg[gpu]'")
    return triton, tl, None


def import_triton() -> tuple[ModuleType, ModuleType]:
    """Return ``(triton, triton.language)``; raises :class:`KernelUnavailableError` when absent."""
    triton, tl, reason = _import_triton()
    if reason is not None:
        raise KernelUnavailableError(reason)
    return triton, tl


def triton_reason() -> Optional[str]:
    """None when triton imports, else the reason (naming the ``refseg[gpu]`` extra)."""
    return _import_triton()[2]


def device_reason(tensors: Iterable[torch.Tensor]) -> Optional[str]:
    """None when all tensors sit on one device a Triton kernel can use, else the reason."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"tensors are on several devices {sorted(str(d) for d in devices)}"
    device = devices.pop()
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    if device.type == "cpu":
        return "tensors are on the CPU and TRITON_INTERPRET is not 1"
    return f"device type '{device.type}' has no Triton backend here"


def choose_backend(name: str, backend: str, tensors: Iterable[torch.Tensor],
                   limits_reason: Optional[str]) -> str:
    """Resolve ``backend`` ("auto" | "triton" | "torch") to "triton" or "torch" for kernel ``name``.

    ``limits_reason`` is the kernel's own dtype/shape check (None when the inputs are supported).
    The first failing check decides; under "auto" it is logged once and "torch" is returned.
    """
    if backend not in BACKENDS:
        raise ValueError(f"refseg.kernels.{name}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    # Cheap checks first: triton is imported only when the inputs could run on it.
    quiet_reason = kill_switch(name) or device_reason(tensors)  # expected: CPU run or the user's choice
    reason = quiet_reason or limits_reason or triton_reason()
    if reason is None:
        return "triton"
    if backend == "triton":
        raise KernelUnavailableError(f"refseg.kernels.{name}: Triton kernel unavailable: {reason}")
    # A CPU run (or a kill switch) is not news: DEBUG. A GPU without triton is worth a warning.
    level = (logging.DEBUG if quiet_reason else
             logging.WARNING if "refseg[gpu]" in reason else logging.INFO)
    log_once(f"refseg.kernels.{name}: using the torch reference: {reason}", level)
    return "torch"


def dtype_reason(tensor: torch.Tensor, allowed: tuple[torch.dtype, ...], arg: str) -> Optional[str]:
    """None when ``tensor.dtype`` is in ``allowed``, else a reason naming the argument."""
    if tensor.dtype in allowed:
        return None
    return f"{arg} dtype {tensor.dtype} is not one of {[str(d) for d in allowed]}"


def bind_triton(namespace: dict, names: tuple[str, ...]):
    """JIT-compile the kernel functions ``names`` of a module namespace on first use; return the last.

    Kernel modules define their Triton functions as plain module-level functions (annotations stay strings,
    ``tl`` is a module global that starts as None) so that the module imports without triton. This binds
    ``tl`` to ``triton.language`` and replaces each function by ``triton.jit(fn)`` in place, so the kernels
    resolve each other by name, as Triton (compiler and interpreter) requires. ``TRITON_INTERPRET`` is read
    here, at the first kernel call.
    """
    triton, language = import_triton()
    namespace["tl"] = language
    for name in names:
        fn = namespace[name]
        if not hasattr(fn, "run"):  # not yet a Triton kernel object
            namespace[name] = triton.jit(fn)
    return namespace[names[-1]]
