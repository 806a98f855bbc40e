"""Mask arrays -> class labels: the rules shared by mask files (:func:`refseg.io.raster.read_mask`) and by
masks given to the Python API (``Segmenter.set_reference``, :func:`mask_from_array`).

Arrays are (H, W), (H, W, 1) or (H, W, 3 | 4) with equal R, G, B (alpha ignored), row-major ``[y, x]``.
A two-valued mask (0 and one value v: 0/1, 0/63, 0/255, a two-entry palette) is binary, class 1. A lossy
(JPEG-decoded) binary mask is binarised at a threshold (128 by default); label maps keep their values. A mask
marked with :func:`as_label_map` (e.g. a volume slice holding label 5 alone) always keeps its values.
"""
from __future__ import annotations

import logging

import numpy as np

from refseg.io.raster import ImageReadError

log = logging.getLogger(__name__)

# Largest R/G/B difference accepted in a grey JPEG mask (compression noise), in grey levels.
_JPEG_CHANNEL_TOLERANCE = 48
# Lossy (JPEG) binary masks seen as arrays: the two most frequent values straddle the threshold, at least
# _SMEARED_MIN_COVER of the pixels lie within _SMEARED_BAND grey levels of one of them, and compression noise
# adds values (at least _SMEARED_MIN_VALUES in all).
_SMEARED_MIN_COVER = 0.95
_SMEARED_BAND = 32
_SMEARED_MIN_VALUES = 5


def _collapse_channels(array: np.ndarray, source: str, lossy: bool | None) -> tuple[np.ndarray, bool | None]:
    """(H, W, 1|3|4) -> (H, W): equal R, G, B (alpha ignored) give the first channel; channels that differ
    by at most ``_JPEG_CHANNEL_TOLERANCE`` grey levels are averaged when the data may be lossy (``lossy``
    True or unknown; an unknown source then counts as lossy)."""
    if array.ndim != 3:
        return array, lossy
    if array.shape[2] == 1:
        return array[..., 0], lossy
    if array.shape[2] not in (3, 4):
        raise ImageReadError(f"{source}: unsupported mask shape {array.shape}; expected (H, W), (H, W, 1), "
                             f"(H, W, 3) or (H, W, 4)")
    colour = array[..., :3]
    spread = float(np.ptp(colour.astype(np.float64), axis=2).max()) if colour.size else 0.0
    if spread == 0:
        return colour[..., 0], lossy
    if lossy is False or spread > _JPEG_CHANNEL_TOLERANCE:
        raise ImageReadError(
            f"{source}: colour mask with differing R, G, B channels (up to {spread:g} grey levels apart); "
            f"masks must be grayscale or integer label images (convert colour-coded classes to "
            f"labels 1..K first)")
    # JPEG colour conversion and chroma subsampling make grey masks differ slightly between channels.
    mean = colour.astype(np.float64).mean(axis=2)
    if np.issubdtype(colour.dtype, np.integer):
        mean = np.rint(mean).astype(colour.dtype)
    return mean, True


def _binarise_lossy(array: np.ndarray, source: str, threshold: float, always_warn: bool) -> np.ndarray:
    lo_band, hi_band = threshold / 2.0, threshold + (255 - threshold) / 2.0
    ambiguous = np.count_nonzero((array >= lo_band) & (array < hi_band))
    if always_warn:
        log.warning("%s: mask looks lossy (JPEG-like: %d distinct values around two levels); binarised at "
                    ">= %g", source, np.unique(array).size, threshold)
    elif ambiguous > 0.01 * array.size:
        log.warning("%s: JPEG mask is not clearly binary (%.1f %% of pixels in [%g, %g)); thresholded "
                    "at %g", source, 100.0 * ambiguous / array.size, lo_band, hi_band, threshold)
    return (array >= threshold).astype(np.int64)


def _looks_smeared(array: np.ndarray, threshold: float) -> bool:
    """A lossy binary mask: >= 5 distinct values, the two most frequent on either side of ``threshold``,
    and >= 95 % of the pixels within 32 grey levels of one of those two (Kvasir's JPEG masks: 16-18 values,
    99 %). Genuine label maps have few values, or classes between their two most frequent values."""
    if array.dtype == bool or array.size == 0:
        return False
    values, counts = np.unique(array, return_counts=True)
    if values.size < _SMEARED_MIN_VALUES:
        return False
    top = np.argsort(counts)[-2:]
    lo, hi = sorted(float(v) for v in values[top])
    near = (np.abs(values - lo) <= _SMEARED_BAND) | (np.abs(values - hi) <= _SMEARED_BAND)
    return lo < threshold <= hi and counts[near].sum() >= _SMEARED_MIN_COVER * array.size


def label_map(array: np.ndarray, source: str = "mask", threshold: float = 128,
              lossy: bool | None = None, binarise_at: float | None = None) -> np.ndarray:
    """Labels as stored in a mask array, as (H, W) int64; two-valued masks keep their values (see
    :func:`mask_from_array` for the binary rule). ``lossy``: True for JPEG data (always binarised at
    ``value >= threshold``), False for lossless files, None when unknown (arrays: a JPEG-like mask is
    detected, binarised at ``threshold`` and one warning is logged). ``binarise_at``: when given, every
    mask (any dtype or format) becomes ``value >= binarise_at`` -> 1, else 0.

    Raises:
        ImageReadError: naming ``source``: colour-coded channels, unsupported shape, NaN/inf or fractional
            float values outside [0, 1].
    """
    array = np.asarray(array)
    array, lossy = _collapse_channels(array, source, lossy)
    if array.ndim != 2:
        raise ImageReadError(f"{source}: unsupported mask shape {array.shape}; expected (H, W), (H, W, 1), "
                             f"(H, W, 3) or (H, W, 4)")
    if array.dtype == bool:
        return array.astype(np.int64)
    if binarise_at is not None:
        return (array >= binarise_at).astype(np.int64)
    if lossy:
        return _binarise_lossy(array, source, threshold, always_warn=False)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageReadError(f"{source}: float mask holds NaN or infinite values")
        if np.array_equal(array, np.round(array)):
            return array.astype(np.int64)
        if array.min() >= 0.0 and array.max() <= 1.0:
            return (array >= 0.5).astype(np.int64)
        raise ImageReadError(f"{source}: float mask with fractional values outside [0, 1]; cannot tell labels")
    if not np.issubdtype(array.dtype, np.integer):
        raise ImageReadError(f"{source}: unsupported mask dtype {array.dtype}")
    if lossy is None and _looks_smeared(array, threshold):
        return _binarise_lossy(array, source, threshold, always_warn=True)
    return array.astype(np.int64)


class LabelMap(np.ndarray):
    """An integer mask whose values are label values as they are: :func:`mask_from_array` applies no
    two-valued rule to it (``as_label_map(m)`` with m holding 0 and 5 stays class 5)."""


def as_label_map(mask: np.ndarray) -> LabelMap:
    """View ``mask`` as a :class:`LabelMap` (no copy): the Segmenter then keeps its values as classes."""
    return np.asarray(mask).view(LabelMap)


def binary_if_two_valued(labels: np.ndarray) -> np.ndarray:
    """A mask holding 0 and one other value v (0/1, 0/63, 0/255, 0/65535, a two-entry palette) -> 0/1
    int64; anything else is returned unchanged."""
    values = np.unique(labels)
    if values.size == 2 and values[0] == 0:
        return (labels != 0).astype(np.int64)
    return labels


def mask_from_array(mask: np.ndarray, source: str = "mask", threshold: float = 128) -> np.ndarray:
    """A mask as the Python API receives it (e.g. ``np.array(Image.open(path))``) -> (H, W) int64 labels.

    Accepts (H, W), (H, W, 1) and (H, W, 3 | 4) with equal R, G, B (alpha ignored), any integer, bool or
    float dtype. A two-valued mask (0 and one value v) is binary: v -> class 1. A lossy (JPEG-decoded)
    binary mask is detected (see ``_looks_smeared``), binarised at ``value >= threshold`` and one warning is
    logged. Other masks keep their values as class labels. Same rules as :func:`read_mask`. A
    :class:`LabelMap` (:func:`as_label_map`) keeps its values, two-valued or not, and is never binarised.
    """
    if isinstance(mask, LabelMap):
        return label_map(mask.view(np.ndarray), source, threshold, lossy=False)
    return binary_if_two_valued(label_map(mask, source, threshold, lossy=None))
