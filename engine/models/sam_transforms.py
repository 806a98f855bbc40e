"""SAM pre- and post-processing, equivalent to the official ``SamPredictor`` / ``ResizeLongestSide``.

Coordinate frames:

* original frame: the image as given, (H, W), points (x, y) in pixels, boxes XYXY in pixels;
* input frame: the image resized so its longer side is ``img_size`` (1024) -> (h, w), then
  zero-padded on the right and bottom to img_size × img_size; prompts given to the model are in this
  frame (scale x by w/W and y by h/H);
* low-resolution frame: the decoder's 256 × 256 logits cover the whole padded input.

Images are resized with PIL bilinear resampling (what the official code reaches through
torchvision's ``to_pil_image`` + ``resize``), so the pixels match the official ones exactly.

MedSAM (``preprocessing="medsam"``, :func:`preprocessing_for` ``"medsam"``) is pre-processed as in its
released inference script instead: the image is stretched to img_size × img_size (aspect ratio not kept,
so the input frame scales x by img_size/W and y by img_size/H and there is no padding), resized with a
cubic spline after a Gaussian anti-aliasing filter and cast to uint8 (scikit-image's ``resize(order=3,
anti_aliasing=True, preserve_range=True)``, computed here with ``scipy.ndimage``: ``pip install
'refseg[medsam]'``), then min-max scaled to [0, 1] over the whole image, without SAM's mean/std.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from refseg.optional import require

PIXEL_MEAN = (123.675, 116.28, 103.53)
"""RGB mean on the 0–255 scale used by every released SAM."""
PIXEL_STD = (58.395, 57.12, 57.375)
"""RGB standard deviation on the 0–255 scale."""


def preprocess_shape(height: int, width: int, long_side: int = 1024) -> tuple[int, int]:
    """(h, w) after scaling (height, width) so the longer side is ``long_side`` (rounded half up)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _as_rgb_uint8(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"{name}: expected an (H, W, 3) RGB, (H, W, 1) or (H, W) image, "
                         f"got shape {image.shape}")
    return np.ascontiguousarray(image)


def resize_image(image: np.ndarray, long_side: int = 1024) -> np.ndarray:
    """Resize an (H, W, 3) uint8 RGB image (grey (H, W) / (H, W, 1) is replicated to RGB) so that
    its longer side is ``long_side``; PIL bilinear, returns (h, w, 3) uint8."""
    image = _as_rgb_uint8(image, "resize_image(image)")
    new_h, new_w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    if (new_h, new_w) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))


def resize_coords(coords: np.ndarray | torch.Tensor, original_size: tuple[int, int],
                  long_side: int = 1024, input_size: tuple[int, int] | None = None
                  ) -> np.ndarray | torch.Tensor:
    """Map (..., 2) (x, y) pixel coordinates from the original (H, W) frame to the input frame.

    ``input_size``: (h, w) of the image inside the model input (as in :class:`PreparedImages`);
    None means SAM's longest-side resize to ``long_side``. NumPy input -> float64 array (as the
    official ``apply_coords``); tensor input -> float32 tensor on the same device, computed in float64.
    """
    old_h, old_w = original_size
    new_h, new_w = input_size if input_size is not None else preprocess_shape(old_h, old_w, long_side)
    if coords.shape[-1] != 2:
        raise ValueError(f"resize_coords: coords must be (..., 2) (x, y), got {tuple(coords.shape)}")
    if isinstance(coords, torch.Tensor):
        out = coords.to(torch.float64, copy=True)  # scalars, not a tensor: no host -> device copy to wait on
        out[..., 0] *= new_w / old_w
        out[..., 1] *= new_h / old_h
        return out.to(torch.float32)
    return np.asarray(coords, dtype=np.float64) * np.array([new_w / old_w, new_h / old_h])


def resize_boxes(boxes: np.ndarray | torch.Tensor, original_size: tuple[int, int],
                 long_side: int = 1024, input_size: tuple[int, int] | None = None
                 ) -> np.ndarray | torch.Tensor:
    """Map (..., 4) XYXY pixel boxes from the original (H, W) frame to the input frame
    (``input_size`` as in :func:`resize_coords`)."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"resize_boxes: boxes must be (..., 4) XYXY, got {tuple(boxes.shape)}")
    out = resize_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side, input_size)
    return out.reshape(*boxes.shape[:-1], 4)


@functools.lru_cache(maxsize=None)
def _channel_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor: usable both inside and outside inference mode
        return torch.tensor(values, dtype=torch.float32, device=device).view(len(values), 1, 1)


def channel_constant(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """(C, 1, 1) float32 ``values`` on ``device``, made once per device and reused: building it per call is a
    host -> device copy that makes the host wait for the work queued on a GPU."""
    return _channel_constant(tuple(float(v) for v in values), torch.device(device))


def normalize_pad(image: torch.Tensor, img_size: int = 1024,
                  pixel_mean: Sequence[float] = PIXEL_MEAN,
                  pixel_std: Sequence[float] = PIXEL_STD) -> torch.Tensor:
    """(B, 3, h, w) or (3, h, w) RGB on the 0–255 scale (any dtype) -> (B, 3, img_size, img_size)
    float32: ``(x − mean) / std``, then zero padding on the right and bottom."""
    if image.dim() == 3:
        image = image[None]
    h, w = image.shape[-2:]
    if image.dim() != 4 or image.shape[1] != 3 or h > img_size or w > img_size:
        raise ValueError(f"normalize_pad: image must be (B, 3, h, w) with h, w <= {img_size}, "
                         f"got {tuple(image.shape)}")
    mean, std = channel_constant(pixel_mean, image.device), channel_constant(pixel_std, image.device)
    x = (image.to(torch.float32) - mean) / std
    return F.pad(x, (0, img_size - w, 0, img_size - h))


@dataclass
class PreparedImages:
    """A batch ready for ``Sam.encode_image``.

    Attributes:
        pixels: (B, 3, img_size, img_size) float32, normalised and zero-padded.
        input_sizes: per image (h, w) of the resized image inside the padded input.
        original_sizes: per image (H, W) as given.
    """

    pixels: torch.Tensor
    input_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]


PREPROCESSING = ("sam", "medsam")
"""Image pre-processing modes: SAM's (longest side, mean/std, pad) and MedSAM's (stretch, min-max)."""


def preprocessing_for(sam_name: str) -> str:
    """The pre-processing a SAM-family model was trained with: ``"medsam"`` for MedSAM, ``"sam2"`` for SAM 2 /
    2.1 / MedSAM2 (stretched to its square input, ImageNet mean / std: :mod:`refseg.models.sam2_transforms`),
    else ``"sam"``."""
    from .sam2 import SAM2_SPECS  # the SAM 2 names (sam2 imports nothing of this module)

    if sam_name == "medsam":
        return "medsam"
    return "sam2" if sam_name in SAM2_SPECS else "sam"


def medsam_resize(image: np.ndarray, size: int = 1024) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (size, size, 3) uint8, as MedSAM's inference script resizes.

    Equivalent to ``skimage.transform.resize(image, (size, size), order=3, preserve_range=True,
    anti_aliasing=True).astype(np.uint8)``: a Gaussian filter of sigma max(0, (in/out - 1) / 2) per
    axis (only when shrinking), a cubic-spline zoom on pixel centres (``grid_mode``), both with
    mirror boundaries, the result clipped to the input's range and truncated to uint8.
    """
    ndimage = require("scipy.ndimage", extra="medsam", purpose="MedSAM pre-processing")
    image = _as_rgb_uint8(image, "medsam_resize(image)").astype(np.float64)
    factors = np.array([image.shape[0] / size, image.shape[1] / size, 1.0])
    sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
    filtered = ndimage.gaussian_filter(image, sigma, mode="mirror") if sigma.any() else image
    out = ndimage.zoom(filtered, (size / image.shape[0], size / image.shape[1], 1.0), order=3,
                       mode="mirror", grid_mode=True)
    return np.clip(out, image.min(), image.max()).astype(np.uint8)


def medsam_normalize(resized: np.ndarray) -> torch.Tensor:
    """(size, size, 3) uint8 -> (3, size, size) float32 min-max scaled to [0, 1] over the whole image
    (MedSAM's normalisation; a constant image gives zeros)."""
    values = resized.astype(np.float64)
    lo, hi = values.min(), values.max()
    scaled = (values - lo) / max(hi - lo, 1e-8)
    return torch.from_numpy(scaled).float().permute(2, 0, 1)


def prepare_images(images: Sequence[np.ndarray], img_size: int = 1024,
                   device: torch.device | str | None = None,
                   pixel_mean: Sequence[float] = PIXEL_MEAN,
                   pixel_std: Sequence[float] = PIXEL_STD, preprocessing: str = "sam") -> PreparedImages:
    """Resize, normalise (and pad) several RGB uint8 images of any sizes for the SAM image encoder.

    Each image is (H, W, 3) uint8 RGB (grey (H, W) is replicated). ``preprocessing="sam"``: longest side
    ``img_size``, ``(x - mean) / std``, zero padding. ``"medsam"``: MedSAM's (module docstring); the
    input size of every image is then (img_size, img_size). Returns :class:`PreparedImages` with the
    pixels on ``device``.
    """
    if len(images) == 0:
        raise ValueError("prepare_images: images is empty")
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"prepare_images: preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    batch, input_sizes, original_sizes = [], [], []
    for i, image in enumerate(images):
        image = _as_rgb_uint8(image, f"prepare_images(images[{i}])")
        if preprocessing == "medsam":
            batch.append(medsam_normalize(medsam_resize(image, img_size)).to(device)[None])
            input_sizes.append((img_size, img_size))
            original_sizes.append((image.shape[0], image.shape[1]))
            continue
        resized = resize_image(image, img_size)
        tensor = torch.tensor(resized, device=device).permute(2, 0, 1)  # copies: input may be read-only
        batch.append(normalize_pad(tensor, img_size, pixel_mean, pixel_std))
        input_sizes.append((resized.shape[0], resized.shape[1]))
        original_sizes.append((image.shape[0], image.shape[1]))
    return PreparedImages(torch.cat(batch), input_sizes, original_sizes)


def postprocess_masks(low_res_masks: torch.Tensor, input_size: tuple[int, int],
                      original_size: tuple[int, int], img_size: int = 1024, direct: bool = False) -> torch.Tensor:
    """Low-resolution logits (B, C, 256, 256) -> logits (B, C, H, W) in the original frame.

    Bilinear (``align_corners=False``) up to img_size², crop the (h, w) = ``input_size`` region
    (drops the padding), bilinear to ``original_size`` (H, W). ``direct``: one bilinear step from the
    low-resolution logits straight to (H, W), as MedSAM's inference script does (its input is the
    stretched square, with no padding to crop). Threshold at 0 (``Sam.mask_threshold``) for binary masks.
    """
    if low_res_masks.dim() != 4:
        raise ValueError(f"postprocess_masks: low_res_masks must be (B, C, h, w), "
                         f"got {tuple(low_res_masks.shape)}")
    if direct:
        return F.interpolate(low_res_masks, tuple(original_size), mode="bilinear", align_corners=False)
    masks = F.interpolate(low_res_masks, (img_size, img_size), mode="bilinear", align_corners=False)
    masks = masks[..., :input_size[0], :input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
