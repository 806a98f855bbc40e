"""2-D raster input: reading images and masks from PNG / JPEG / TIFF / BMP files.

Pixels are returned exactly as stored in the file (no EXIF rotation, no colour management), so that a mask
and the image it belongs to always share the same pixel grid. Arrays are row-major: ``array[y, x]`` with
``y`` the row and ``x`` the column, i.e. the (x, y) pixel convention used for prompts.

Decoding uses Pillow. The optional ``tifffile`` package (``pip install 'refseg[io]'``) is imported only for
TIFF files Pillow cannot decode losslessly (several samples per pixel at 16 or 32 bits, e.g. 16-bit RGB).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from refseg.io.intensity import Window, auto_window, needs_window
from refseg.optional import require

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
"""Lower-case file suffixes accepted as 2-D images (matched case-insensitively)."""

_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
_EXIF_ORIENTATION = 0x0112


class ImageReadError(ValueError):
    """A file could not be read as an image or mask; the message names the file and the problem."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has one of :data:`IMAGE_SUFFIXES` (case-insensitive); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(path: str | os.PathLike) -> list[Path]:
    """Image files named by ``path``.

    A file gives ``[file]`` (its suffix must be in :data:`IMAGE_SUFFIXES`). A folder gives its image files
    (not recursive), sorted by file name, skipping hidden files (names starting with ``.``) and sub-folders.
    Raises ``FileNotFoundError`` when ``path`` does not exist and ``ValueError`` when a folder holds no image
    or a file has an unsupported suffix.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if not is_image_file(path):
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; "
                             f"expected one of {sorted(IMAGE_SUFFIXES)}")
        return [path]
    found = sorted((p for p in path.iterdir()
                    if not p.name.startswith(".") and p.is_file() and is_image_file(p)),
                   key=lambda p: p.name)
    if not found:
        raise ValueError(f"{path}: folder holds no image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(f"{path}: file does not exist")
    if not path.is_file():
        raise ImageReadError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes)")


def _tiff_needs_tifffile(im: Image.Image) -> bool:
    """True for TIFFs with several samples per pixel wider than 8 bits, which Pillow reduces to 8 bits."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return False
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    samples = int(tags.get(277, 1))
    return samples > 1 and max(bits) > 8


def _read_tifffile(path: Path) -> np.ndarray:
    tifffile = require("tifffile", extra="io", purpose=f"Reading {path.name} (TIFF with >8-bit colour samples)")
    try:
        array = np.asarray(tifffile.imread(str(path), key=0))
    except Exception as exc:  # tifffile raises many types; report them as one read error
        raise ImageReadError(f"{path}: corrupt or unsupported TIFF ({exc})") from exc
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) storage
    return array


def _pil_to_array(im: Image.Image, path: Path, keep_palette: bool) -> np.ndarray:
    """Convert a loaded Pillow image to (H, W) or (H, W, C) numpy, C in {3, 4}."""
    mode = im.mode
    if mode == "P" and keep_palette:
        return np.asarray(im, dtype=np.uint8)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode == "LA":
        im = im.convert("RGBA")  # keeps the grey value in R=G=B and the alpha
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        im = im.convert("RGB")
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=bool)
    if mode in ("L", "RGB", "RGBA"):
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)  # big-endian variants become native uint16
    if mode == "I":
        array = np.asarray(im, dtype=np.int32)
        if array.size and array.min() >= 0 and array.max() <= np.iinfo(np.uint16).max:
            return array.astype(np.uint16)
        return array
    if mode == "F":
        return np.asarray(im, dtype=np.float32)
    raise ImageReadError(f"{path}: unsupported image mode {mode!r}")


def _read_array(path: str | os.PathLike, keep_palette: bool = False) -> tuple[np.ndarray, str]:
    """Decode ``path`` fully; return (array as stored, Pillow format name such as 'PNG' or 'JPEG')."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as im:
            fmt = im.format or ""
            if getattr(im, "n_frames", 1) > 1:
                log.warning("%s: holds %d frames/pages; reading the first only", path, im.n_frames)
            if fmt == "TIFF" and _tiff_needs_tifffile(im):
                return _read_tifffile(path), fmt
            if fmt == "PNG" and im.mode in ("RGB", "RGBA") and im.tile and ";16" in str(im.tile[0][3]):
                log.warning("%s: 16-bit colour PNG is reduced to 8 bits per channel by Pillow", path)
            im.load()  # Pillow is lazy: decode now so truncated data fails here
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            if orientation not in (0, 1):
                log.warning("%s: EXIF orientation %s is ignored; pixels are used as stored",
                            path, orientation)
            array = _pil_to_array(im, path, keep_palette)
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path}: not a recognised image file (corrupt or wrong suffix)") from exc
    except Image.DecompressionBombError as exc:  # Pillow refuses > 2 x MAX_IMAGE_PIXELS
        raise ImageReadError(f"{path}: image too large for a 2-D read ({exc}); use the slide reader") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{path}: corrupt or truncated image data ({exc})") from exc
    return array, fmt


def _check_size(array: np.ndarray, path: Path, min_side: int) -> None:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageReadError(f"{path}: unsupported array shape {array.shape}; expected (H, W) or (H, W, 3|4)")
    height, width = array.shape[:2]
    if min(height, width) < min_side:
        raise ImageReadError(f"{path}: image too small ({width}x{height} px, W x H); "
                             f"each side must be at least {min_side} px")


def read_image(path: str | os.PathLike, min_side: int = 2) -> np.ndarray:
    """Read a 2-D image as stored.

    Returns (H, W) for grayscale (dtype bool for 1-bit, uint8, uint16, int32 for 32-bit integers outside
    the uint16 range, float32) or (H, W, C) uint8 / uint16 with C = 3 (RGB) or 4 (RGBA). Palette images
    become RGB/RGBA, grey+alpha becomes RGBA, CMYK/YCbCr become RGB. Raises :class:`ImageReadError` for a
    missing, empty, corrupt or truncated file, an unsupported mode, or a side shorter than ``min_side``.
    """
    path = Path(path)
    array, _ = _read_array(path)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    _check_size(array, path, min_side)
    return array


def to_rgb_uint8(image: np.ndarray, window: Window | None = None) -> np.ndarray:
    """Convert an image array to (H, W, 3) uint8 RGB for the models and overlays.

    Accepts (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). Rules, applied to all channels jointly:

    * uint8: unchanged; grayscale is repeated to 3 channels. bool: False -> 0, True -> 255.
    * other integers (uint16, int16 CT, int32, ...) and floats: mapped through ``window``
      (:class:`refseg.io.intensity.Window`, in the units of the file) when given. Without one, the image's
      own automatic window (:func:`refseg.io.intensity.auto_window`): integers [p0.5, p99.5] (0.5th and
      99.5th percentiles, inverted-CDF definition, i.e. actual data values; min..max when that is empty),
      floats min..max of the finite values; a constant image gives zeros. NaN -> 0, +inf -> 255,
      -inf -> 0. :class:`refseg.Segmenter` passes its reference's window so that reference and targets
      share one contrast.
    * RGBA: the alpha channel is dropped (colour values are kept as stored, not composited on a
      background, so transparent pixels keep their colour).
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    if image.dtype == np.uint8:
        out = image
    elif image.dtype == bool:
        out = image.astype(np.uint8) * np.uint8(255)
    elif needs_window(image):
        window = window if window is not None else auto_window(image)
        out = window.apply(image) if window is not None else np.zeros(image.shape, np.uint8)
        if window is None and np.issubdtype(image.dtype, np.floating):
            out[np.isposinf(image)] = 255
    else:
        raise ValueError(f"image: unsupported dtype {image.dtype}")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out)


def read_label_map(path: str | os.PathLike, threshold: float = 128, min_side: int = 2,
                   binarise_at: float | None = None) -> np.ndarray:
    """Read a mask file as (H, W) int64 labels as stored (two-valued masks keep their values); JPEG files
    are binarised at ``value >= threshold``, and every file at ``value >= binarise_at`` when that is given.
    :func:`read_mask` adds the binary rule; evaluation uses this to decide binary vs label masks over a
    whole folder."""
    from refseg.io.masks import label_map  # masks imports this module's ImageReadError

    path = Path(path)
    array, fmt = _read_array(path, keep_palette=True)
    lossy = fmt == "JPEG" or path.suffix.lower() in _JPEG_SUFFIXES
    labels = label_map(array, str(path), threshold, lossy=lossy, binarise_at=binarise_at)
    _check_size(labels, path, min_side)
    return labels


def read_mask(path: str | os.PathLike, threshold: float = 128, min_side: int = 2) -> np.ndarray:
    """Read a segmentation mask as (H, W) int64 labels (0 = background).

    Rules, in order:

    1. Palette ("P") PNGs: the palette indices are the values (PASCAL-VOC style).
    2. Colour masks: if R == G == B everywhere (alpha, if any, ignored) the first channel is used;
       otherwise :class:`ImageReadError` (colour-coded classes must be converted to integer labels first).
       JPEG masks may differ by up to 48 grey levels between channels (compression noise); the channel
       mean is then used.
    3. JPEG masks (lossy, so never exactly binary): binary, ``value >= threshold`` -> 1. A warning is
       logged when more than 1 % of the pixels lie in the ambiguous middle band [threshold/2,
       threshold + (255 - threshold)/2), i.e. when the mask does not form two clusters near 0 and 255.
    4. Float masks must hold whole numbers, or values in [0, 1] which are thresholded at 0.5.
    5. A mask with exactly two values, 0 and v (0/1, 0/63, 0/255, 0/65535, a two-entry palette, 1-bit):
       binary, v -> class 1.
    6. Otherwise the stored values are the labels (multi-class masks keep their values).

    The same rules apply to arrays given to the Python API (:func:`refseg.io.masks.mask_from_array`), where
    a JPEG-decoded mask is recognised from its values instead of its file format.
    """
    from refseg.io.masks import binary_if_two_valued

    return binary_if_two_valued(read_label_map(path, threshold, min_side))
