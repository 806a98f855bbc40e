"""Stage 2: reference mask -> labels on the encoder's patch grid (1 = FG, 0 = BG, -1 = ignored).

The mask is resized to S×S first. The GBMSeg release resized it with PIL's default filter (bicubic for
8-bit images since Pillow 7) and then thresholded "non-zero", so a bicubic resize of a 0/255 mask
followed by ``> 0`` is the default here; ``resample="nearest"`` is available. Label masks are split
into one binary 0/255 mask per class value before resizing (interpolating label values would invent
classes), giving one grid per class.

Grid cells are P×P pixels of the S×S mask, P the matching encoder's patch size
(:attr:`refseg.SegmenterConfig.patch_size`: 14 for DINOv2, 16 for DINOv3), indexed row-major like the
encoder's patch tokens: cell ``i = row · G + col`` with G = S/P has its centre at
(x, y) = (P·col + P/2, P·row + P/2) in S space.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..config import SegmenterConfig
from . import native

log = logging.getLogger(__name__)

FG, BG, IGNORE = 1, 0, -1
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST,
             "bilinear": Image.Resampling.BILINEAR}
_RULES = ("all", "any", "fraction")


def _as_label_array(mask, name: str = "mask") -> np.ndarray:
    """Accept a PIL image, numpy array or torch tensor (H, W) or (H, W, C) with equal channels."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask)
    elif isinstance(mask, torch.Tensor):
        arr = mask.detach().cpu().numpy()
    else:
        arr = np.asarray(mask)
    if arr.ndim == 3:
        if arr.shape[2] > 1 and not (arr == arr[..., :1]).all():
            raise ValueError(f"{name}: (H, W, C) mask must have identical channels, got shape {arr.shape} "
                             "with differing channels (pass a single-channel label mask)")
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name}: expected an (H, W) mask, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def resize_binary_mask(mask: np.ndarray, image_size: int, resample: str = "bicubic") -> np.ndarray:
    """(H, W) bool/0-1 mask -> (S, S) bool, via a 0/255 uint8 image resized with PIL then ``> 0``."""
    if resample not in _RESAMPLE:
        raise ValueError(f"resample={resample!r} is not one of {', '.join(_RESAMPLE)}")
    img = Image.fromarray(np.where(np.asarray(mask) != 0, 255, 0).astype(np.uint8))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), _RESAMPLE[resample])
    return np.asarray(img) > 0


def binary_to_grid(mask: torch.Tensor, *, patch_size: int, rule: str = "all", fraction: float = 0.95,
                   skip_last: bool = False) -> torch.Tensor:
    """Reduce (..., S, S) boolean masks to (..., G, G) int8 cell labels, G = S / ``patch_size`` (vectorised).

    Rules: ``all`` — FG when all P² pixels of a cell are FG, BG when none is, else ignored (-1);
    ``any`` — FG when any pixel is FG, else BG; ``fraction`` — FG when the FG share is
    ≥ ``fraction``, BG when the BG share is ≥ ``fraction``, else ignored.
    ``skip_last`` marks the last grid row and column ignored (GBMSeg release quirk: its scan stopped
    one cell early).
    """
    if rule not in _RULES:
        raise ValueError(f"grid rule {rule!r} is not one of {', '.join(_RULES)}")
    s, p = mask.shape[-1], int(patch_size)
    if p < 1 or mask.shape[-2] != s or s % p:
        raise ValueError(f"mask must be (..., S, S) with S a multiple of the patch size {p}, got {tuple(mask.shape)}")
    if rule == "fraction" and not 0.5 <= fraction <= 1.0:
        raise ValueError(f"grid fraction must lie in [0.5, 1], got {fraction}")
    fast = native.grid_labels(mask, rule, fraction, skip_last, p)
    if fast is not None:  # the C++ prompt engine (refseg._C) on the CPU: identical results
        return fast
    g = s // p
    cells = mask.reshape(*mask.shape[:-2], g, p, g, p)
    count = cells.to(torch.int32).sum(dim=(-1, -3))  # (..., G, G) FG pixels per cell
    full = p * p
    if rule == "all":
        fg, bg = count == full, count == 0
    elif rule == "any":
        fg = count > 0
        bg = ~fg
    else:
        if not 0.5 <= fraction <= 1.0:
            raise ValueError(f"grid fraction must lie in [0.5, 1], got {fraction}")
        share = count.to(torch.float64) / full
        fg = share >= fraction
        bg = ((1.0 - share) >= fraction) & ~fg
    labels = torch.full(count.shape, IGNORE, dtype=torch.int8, device=mask.device)
    labels[fg] = FG
    labels[bg] = BG
    if skip_last:
        labels[..., -1, :] = IGNORE
        labels[..., :, -1] = IGNORE
    return labels


def mask_to_grid(mask, image_size: int, *, patch_size: int, rule: str = "all", fraction: float = 0.95,
                 skip_last: bool = False, resample: str = "bicubic") -> torch.Tensor:
    """Binary reference mask (H, W) (non-zero = FG) -> (G, G) int8 labels {1, 0, -1}, G = S / ``patch_size``.

    ``mask`` may be a numpy array, torch tensor or PIL image, (H, W) or (H, W, C) with equal
    channels. It is resized to ``image_size``² with PIL (``resample``) and thresholded ``> 0``.
    """
    arr = _as_label_array(mask)
    resized = torch.from_numpy(resize_binary_mask(arr, image_size, resample))
    return binary_to_grid(resized, patch_size=patch_size, rule=rule, fraction=fraction, skip_last=skip_last)


def label_mask_to_grids(mask, image_size: int, *, patch_size: int, classes: Sequence[int] | None = None,
                        background: int = 0, rule: str = "all", fraction: float = 0.95,
                        skip_last: bool = False, resample: str = "bicubic"
                        ) -> tuple[list[int], torch.Tensor]:
    """Multi-class label mask (H, W) -> one grid per class.

    Args:
        mask: integer label image (H, W) (numpy / torch / PIL).
        classes: class values to produce grids for; default = every value present except
            ``background``, ascending.
        background: label value that is never a class of its own.

    Returns:
        (class_values, grids) with grids (C, G, G) int8: for class c, FG = pixels equal to c,
        BG = every other pixel (other classes included), under ``rule`` as in :func:`binary_to_grid`.
    """
    arr = _as_label_array(mask)
    if classes is None:
        classes = [int(v) for v in np.unique(arr) if v != background]
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("mask: no foreground class found (all pixels equal the background value "
                         f"{background}); pass classes= explicitly")
    # one PIL resize per class (host side, once per reference), then one vectorised reduction
    stack = np.stack([resize_binary_mask(arr == c, image_size, resample) for c in classes])
    grids = binary_to_grid(torch.from_numpy(stack), patch_size=patch_size, rule=rule, fraction=fraction,
                           skip_last=skip_last)
    for c, grid in zip(classes, grids):
        if not (grid == FG).any():
            log.warning("class %d has no foreground cell under grid rule %r at S=%d", c, rule, image_size)
    return classes, grids


def grids_from_config(mask, config: SegmenterConfig, classes: Sequence[int] | None = None,
                      background: int = 0) -> tuple[list[int], torch.Tensor]:
    """:func:`label_mask_to_grids` with S, the patch size, rule, fraction and the skip-last quirk from ``config``.

    A binary 0/255 mask gives ``([255], (1, G, G))``; pass ``classes=[c]`` to pick one value.
    """
    return label_mask_to_grids(mask, config.image_size, patch_size=config.patch_size, classes=classes,
                               background=background,
                               rule=config.grid_rule, fraction=config.grid_fraction,
                               skip_last=config.gbmseg_skip_last)


def cell_centres(indices: torch.Tensor, grid_size: int, patch_size: int) -> torch.Tensor:
    """Flat patch indices (...,) -> (..., 2) float64 (x, y) centres in S space: (P·col + P/2, P·row + P/2),
    P = ``patch_size`` ((14·col+7, 14·row+7) for DINOv2, (16·col+8, 16·row+8) for DINOv3).

    Index -1 maps to row -1, column G-1 (Python negative indexing in the release) — the origin of the
    off-image point (553, -7) at S = 560.
    """
    idx = indices.to(torch.int64)
    row = torch.div(idx, grid_size, rounding_mode="floor")
    col = idx - row * grid_size
    return torch.stack([col, row], dim=-1).to(torch.float64) * patch_size + patch_size / 2


def cells_to_pixels(indices: torch.Tensor, grid_size: int, image_size: int, target_size) -> torch.Tensor:
    """Flat patch indices (P, N) or (N,) -> (..., 2) int64 (x, y) pixel coordinates of the target.

    ``target_size``: (H, W) for all, or a (P, 2) tensor of per-row (H, W). The patch size is S / G.
    Centre (x, y) in S space scaled as ``x · W / S`` and ``y · H / S`` in float64 and rounded
    half-to-even like Python's ``round`` (as the release).
    """
    if grid_size < 1 or image_size % grid_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the grid size {grid_size}")
    centres = cell_centres(indices, grid_size, image_size // grid_size)
    hw = torch.as_tensor(target_size, dtype=torch.float64, device=centres.device)
    wh = hw.flip(-1)
    if wh.dim() == 2:
        if indices.dim() != 2 or wh.shape[0] != indices.shape[0]:
            raise ValueError(f"target_size: {tuple(wh.shape)} sizes do not match indices {tuple(indices.shape)}")
        wh = wh[:, None, :]
    return torch.round(centres * wh / image_size).to(torch.int64)
