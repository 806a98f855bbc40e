"""SAM 2 pre- and post-processing, equivalent to the official ``SAM2Transforms`` / ``SAM2ImagePredictor``.

Coordinate frames:

* original frame: the image as given, (H, W); points (x, y) and boxes XYXY in pixels;
* input frame: the image stretched to ``image_size`` x ``image_size`` (1024 for SAM 2 / 2.1, 512 for
  MedSAM2), aspect ratio NOT kept and no padding (unlike SAM's longest-side resize): x scales by
  image_size / W and y by image_size / H;
* low-resolution frame: the decoder's (image_size/4)² logits cover the whole input frame.

Images are scaled to [0, 1], resized with antialiased bilinear interpolation (``align_corners=False``,
what torchvision's ``Resize`` does on tensors), then normalised with the ImageNet mean / std. Masks go
back to the original frame with one bilinear step from the low-resolution logits.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .sam_transforms import PreparedImages, _as_rgb_uint8, channel_constant

PIXEL_MEAN = (0.485, 0.456, 0.406)
"""RGB mean of SAM 2's input normalisation, on the 0–1 scale."""
PIXEL_STD = (0.229, 0.224, 0.225)
"""RGB standard deviation on the 0–1 scale."""


def normalize_resize(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 3, H, W) RGB on the 0–255 scale (any dtype) -> (B, 3, image_size, image_size) float32:
    divided by 255, resized (bilinear, antialiased), then ``(x - mean) / std``."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"normalize_resize: image must be (B, 3, H, W), got {tuple(image.shape)}")
    x = image.to(torch.float32).div(255)
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=True)
    return (x - channel_constant(PIXEL_MEAN, x.device)) / channel_constant(PIXEL_STD, x.device)


def prepare_images(images: Sequence[np.ndarray], image_size: int = 1024,
                   device: torch.device | str | None = None) -> PreparedImages:
    """Stretch, scale and normalise RGB uint8 images of any sizes for the SAM 2 image encoder.

    Each image is (H, W, 3) uint8 RGB (grey (H, W) / (H, W, 1) is replicated). Returns
    :class:`~refseg.models.sam_transforms.PreparedImages` with pixels (B, 3, image_size, image_size)
    float32 on ``device``, every input size (image_size, image_size) and the original sizes (H, W).
    """
    if len(images) == 0:
        raise ValueError("prepare_images: images is empty")
    batch, original_sizes = [], []
    for i, image in enumerate(images):
        image = _as_rgb_uint8(image, f"prepare_images(images[{i}])")
        tensor = torch.tensor(image, device=device).permute(2, 0, 1)[None]  # copies: input may be read-only
        batch.append(normalize_resize(tensor, image_size))
        original_sizes.append((image.shape[0], image.shape[1]))
    return PreparedImages(torch.cat(batch), [(image_size, image_size)] * len(batch), original_sizes)


def transform_coords(coords: torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """(..., 2) (x, y) pixels of the original (H, W) frame -> the input frame, float32
    (x / W · image_size, y / H · image_size, computed in that order as the official code does)."""
    if coords.shape[-1] != 2:
        raise ValueError(f"transform_coords: coords must be (..., 2) (x, y), got {tuple(coords.shape)}")
    h, w = original_size
    coords = coords.to(torch.float32)
    norm = torch.stack([coords[..., 0] / w, coords[..., 1] / h], dim=-1)
    return norm * image_size


def transform_boxes(boxes: torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """(..., 4) XYXY pixel boxes of the original frame -> (..., 2, 2) corners in the input frame."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"transform_boxes: boxes must be (..., 4) XYXY, got {tuple(boxes.shape)}")
    return transform_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, image_size)


def postprocess_masks(low_res_masks: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Low-resolution logits (B, C, h, w) -> logits (B, C, H, W) in the original frame (one
    bilinear step, ``align_corners=False``, fp32). Threshold at 0 for binary masks."""
    if low_res_masks.dim() != 4:
        raise ValueError(f"postprocess_masks: low_res_masks must be (B, C, h, w), got {tuple(low_res_masks.shape)}")
    return F.interpolate(low_res_masks.float(), tuple(original_size), mode="bilinear", align_corners=False)
