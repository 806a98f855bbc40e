"""Stage 1: image -> the matching encoder's input (DINOv2 or DINOv3, S×S).

Images are resized to S×S with PIL's bicubic filter (PIL's default, as the GBMSeg release did) and
normalised with the ImageNet mean/std (both DINO families use it). The patch size, and so the grid S/P,
is the encoder's: :attr:`refseg.SegmenterConfig.patch_size`. Reference encodings are computed once by the
Segmenter and reused for every target; :func:`refseg.pipeline.feature_norm.encode_for_matching` encodes and
removes the positional component where the configuration asks for it.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from refseg.pipeline.accelerator import to_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 with PIL bicubic resampling."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def dinov2_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack RGB uint8 images (H, W, 3) into a normalised (B, 3, size, size) float32 tensor (the matching
    encoder's input, DINOv2 or DINOv3; ``size`` is checked against the patch size by the config)."""
    if size <= 0:
        raise ValueError(f"encoder input side must be positive, got {size}")
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
