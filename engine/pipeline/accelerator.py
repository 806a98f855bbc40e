"""Which code path a run takes: the accelerator path (CUDA) or the CPU shortcuts.

On a GPU every stage stays on the device: batched encoders, the torch prompt engine on padded and masked
tensors with a bounded number of host reads per batch, one padded decoder call for the whole batch,
batched post-processing and one device -> host transfer at the end. On the CPU some stages take
shortcuts that are faster there and give the same results: the C++ prompt engine (``refseg._C``), the
greedy walk on numpy, oneDNN GEMMs, encoders and decoder image by image.

``REFSEG_ACCELERATOR_PATH=1`` makes a CPU run take exactly the code a CUDA run takes, so CI tests it
(masks against the CPU path, host reads per batch: ``tests/test_accelerator_path.py``).
"""
from __future__ import annotations

import torch

from refseg.models.code_path import ACCELERATOR_ENV, accelerator_path, forced  # noqa: F401 (re-exported)

def to_device(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data (a list, array or CPU tensor) as a tensor on ``device``, without stalling a GPU.

    ``torch.tensor(values, device="cuda")`` copies synchronously: the host waits until the GPU has run
    everything queued before it. Here the values go through pinned memory with a non-blocking copy
    (ordered on the current stream; the caching host allocator keeps the buffer until the copy ran).
    A run of consecutive integers becomes an ``arange`` on the device (no copy at all).
    """
    device = torch.device(device)
    host = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=dtype)
    host = host if dtype is None else host.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    if host.dim() == 1 and host.numel() and not host.is_floating_point() and host.dtype != torch.bool:
        first = int(host[0])
        if torch.equal(host, torch.arange(first, first + host.numel(), dtype=host.dtype)):
            return torch.arange(first, first + host.numel(), dtype=host.dtype, device=device)
    return host.pin_memory().to(device, non_blocking=True)
