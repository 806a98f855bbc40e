"""The one switch between the accelerator code path and the CPU shortcuts, read by every layer.

On a GPU every stage takes the accelerator path (fused attention, ``F.linear``, the batched and padded
pipeline of :mod:`refseg.pipeline.accelerator`); on the CPU some stages take shortcuts that are faster there
(oneDNN GEMMs, SAM's bias-form attention, the C++ prompt engine). ``REFSEG_ACCELERATOR_PATH=1`` makes a CPU
run take exactly the code a CUDA run takes, so CI tests it. It lives in ``models`` (the lowest layer) so
that the models and the pipeline read the same switch.
"""
from __future__ import annotations

import os

import torch

ACCELERATOR_ENV = "REFSEG_ACCELERATOR_PATH"
_TRUE = ("1", "true", "yes", "on")


def forced() -> bool:
    """True when ``REFSEG_ACCELERATOR_PATH`` is set to a true value."""
    return os.environ.get(ACCELERATOR_ENV, "").strip().lower() in _TRUE


def accelerator_path(device: torch.device | str | None) -> bool:
    """True when work on ``device`` takes the accelerator path: any non-CPU device, or the CPU while
    ``REFSEG_ACCELERATOR_PATH`` is set."""
    if device is None:
        return forced()
    return torch.device(device).type != "cpu" or forced()
