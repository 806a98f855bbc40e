"""PIL's 8-bit resampling (``Image.resize`` with BICUBIC / BILINEAR) on torch tensors, bit for bit.

The CPU path resizes targets with PIL in the reader threads (DINOv2: bicubic to S×S; SAM: bilinear so
the longer side is 1024). The accelerator path ships the uint8 image to the device once and resizes
there for both encoders; to keep the reference masks, it computes exactly what PIL computes:

* per output pixel, PIL's filter window and weights (``precompute_coeffs``: support scaled by the
  reduction factor, weights normalised by their running sum), converted to 22-bit fixed point
  (``normalize_coeffs_8bpc``, rounding half away from zero);
* a horizontal pass, then a vertical pass (each only where that side changes), each summing
  ``pixel · weight`` in int32 from 2²¹ and keeping ``clip(sum >> 22, 0, 255)``, so the intermediate
  image is rounded to uint8 as in PIL.

The weights are built once per (input side, output side, filter) with numpy in float64, in PIL's
order of operations; the passes are K gathers (K = taps per output pixel, 3 for bilinear enlarging,
~9 for bicubic halving) accumulated in int32 on the device: exact integer arithmetic, so any device
and any accumulation order give PIL's bytes (tests/test_resample.py compares with PIL on random
images and sizes).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

PRECISION_BITS = 22  # PIL: 32 - 8 (result) - 2 (headroom for negative lobes)
FILTERS = ("bicubic", "bilinear")


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTER = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@functools.lru_cache(maxsize=64)
def pil_weights(in_size: int, out_size: int, filter: str) -> tuple[np.ndarray, np.ndarray]:
    """PIL's fixed-point weights for resizing one axis from ``in_size`` to ``out_size`` pixels.

    Returns:
        index (out_size, K) int64 input positions and weight (out_size, K) int32 fixed-point weights
        (scale 2²²; positions past the window carry weight 0 and a valid index).
    """
    if filter not in _FILTER:
        raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
    fn, base_support = _FILTER[filter]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    centre = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    inside = taps[None, :] < xmax[:, None]
    w = fn(((taps[None, :] + xmin[:, None]) - centre[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(inside, w, 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # PIL adds the weights left to right
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    fixed = np.trunc(np.where(w < 0, -0.5 + w * (1 << PRECISION_BITS), 0.5 + w * (1 << PRECISION_BITS)))
    fixed = np.where(inside, fixed, 0).astype(np.int32)
    index = np.minimum(xmin[:, None] + taps[None, :], in_size - 1)
    return index, fixed


@functools.lru_cache(maxsize=64)
def _device_weights(in_size: int, out_size: int, filter: str, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    index, weight = pil_weights(in_size, out_size, filter)
    return torch.from_numpy(index).to(device), torch.from_numpy(weight).to(device)


def _pass(x: torch.Tensor, out_size: int, filter: str, dim: int) -> torch.Tensor:
    """One PIL pass along ``dim`` of (..., H, W) int32 values 0..255 -> int32 values 0..255."""
    index, weight = _device_weights(x.shape[dim], out_size, filter, x.device)
    shape = [1] * x.dim()
    shape[dim] = out_size
    acc = None
    for k in range(index.shape[1]):
        term = x.index_select(dim, index[:, k]) * weight[:, k].view(shape)
        acc = term.add_(1 << (PRECISION_BITS - 1)) if acc is None else acc.add_(term)
    return (acc >> PRECISION_BITS).clamp_(0, 255)


def pil_resize(images: torch.Tensor, size: tuple[int, int], filter: str = "bicubic") -> torch.Tensor:
    """``Image.fromarray(image).resize((w, h), filter)`` for a batch of RGB images, on their device.

    Args:
        images: (B, H, W, C) uint8 pixels (RGB, or any channel count: channels are independent).
        size: (h, w) of the output.
        filter: ``bicubic`` (PIL's default for 8-bit images) or ``bilinear``.

    Returns:
        (B, C, h, w) float32 holding the integer values PIL returns (0..255), channels first for the
        encoders' normalisation.
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"pil_resize: images must be (B, H, W, C) uint8, got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).to(torch.int32)
    h, w = size
    if w != x.shape[-1]:
        x = _pass(x, w, filter, dim=-1)
    if h != x.shape[-2]:
        x = _pass(x, h, filter, dim=-2)
    return x.to(torch.float32)
