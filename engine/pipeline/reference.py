"""A labelled reference pair: validation before any model work, and its identity in run fingerprints."""
from __future__ import annotations

import hashlib

import numpy as np

from refseg.io.intensity import Window
from refseg.io.masks import mask_from_array
from refseg.io.raster import to_rgb_uint8


def check_reference(image: np.ndarray, mask: np.ndarray, source: str = "reference",
                    window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a reference pair before any model work (``window``: see :func:`refseg.io.to_rgb_uint8`).

    ``mask`` is what ``np.array(Image.open(path))`` gives: (H, W) or (H, W, 3 | 4) with equal
    channels; it is read by :func:`refseg.io.masks.mask_from_array` (the rules of
    :func:`refseg.read_mask`: a two-valued mask such as 0/255 is binary, class 1; a JPEG-decoded mask
    is binarised at 128 with a warning; label maps keep their values).

    Returns:
        (RGB uint8 image (H, W, 3), mask (H, W) int64 labels).

    Raises:
        ValueError: naming ``source``: mask of an unsupported shape or colour-coded, size differs
            from the image, mask empty or all foreground.
    """
    rgb = to_rgb_uint8(np.asarray(image), window)
    mask = mask_from_array(mask, f"{source}: reference mask")
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{source}: reference mask size {mask.shape[1]}x{mask.shape[0]} differs "
                         f"from its image {rgb.shape[1]}x{rgb.shape[0]} (W x H)")
    if not mask.any():
        raise ValueError(f"{source}: reference mask is empty (no foreground pixel)")
    if mask.all():
        raise ValueError(f"{source}: reference mask is all foreground (no background pixel)")
    if mask.min() < 0 or mask.max() > 255:
        raise ValueError(f"{source}: class values must lie in 0..255 (the output is a uint8 label map), "
                         f"got {mask.min()}..{mask.max()}")
    return rgb, mask


def reference_digest(image: np.ndarray, mask: np.ndarray) -> str:
    """sha256 (hex) of a reference pair as checked by :func:`check_reference` (RGB uint8 image and
    mask, shapes included): identifies the reference in run fingerprints."""
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(image), np.ascontiguousarray(mask)):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
