"""Stage 1: image -> DINOv2 patch tokens on the 14-px grid.

Images are resized to S×S with PIL's bicubic filter (PIL's default, as the GBMSeg release did) and
normalised with the ImageNet mean/std. Reference encodings are computed once by the Segmenter and
reused for every target.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from refseg.pipeline.accelerator import to_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH = 14


def check_grid_size(size: int) -> int:
    """Return the number of patches per side for an S×S DINOv2 input, or raise ValueError."""
    if size <= 0 or size % PATCH:
        raise ValueError(f"DINOv2 input side must be a positive multiple of {PATCH}, got {size}")
    return size // PATCH


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with PIL bicubic resampling."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def dinov2_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack RGB uint8 images (H, W, 3) into a normalised (B, 3, size, size) float32 tensor."""
    check_grid_size(size)
    return normalize_resized(np.stack([resize_rgb(im, size) for im in images]))


def normalize_resized(resized: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 already resized by :func:`resize_rgb` -> (B, 3, S, S) float32, ImageNet
    mean/std normalised (what :func:`dinov2_batch` returns)."""
    return normalize_dinov2(torch.from_numpy(np.ascontiguousarray(resized)).permute(0, 3, 1, 2).float())


def normalize_dinov2(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) float32 RGB values 0..255 -> ImageNet-normalised float32 ``(x / 255 − mean) / std``,
    on the pixels' device (the one normalisation of both paths)."""
    mean = to_device(IMAGENET_MEAN, pixels.device, torch.float32).view(1, 3, 1, 1)
    std = to_device(IMAGENET_STD, pixels.device, torch.float32).view(1, 3, 1, 1)
    return ((pixels / 255.0 - mean) / std).contiguous()
