"""Whole-slide image readers behind one small interface, and the processing-resolution view.

Readers (:func:`open_slide`):

* ``tifffile`` — generic tiled / pyramidal TIFF and OME-TIFF (pyramid as SubIFDs or as pages), read
  chunk by chunk (only the tiles a region touches are decoded). Default for ``.tif`` / ``.tiff``.
* ``openslide`` — openslide-python with the ``openslide-bin`` wheel (no system library): ``.svs .ndpi
  .mrxs .scn`` and the other vendor formats. Default for every other suffix.

Both are optional (``pip install 'refseg[slides]'``) and imported only when a slide is opened.

Coordinates: (x, y) pixels, origin top-left, ``x`` the column. ``read_region(level, x, y, w, h)`` takes
that level's pixels and returns (h, w, 3) uint8 RGB; pixels outside the slide (and transparent ones)
are white (255), the usual glass background. Level 0 is the full resolution; ``level_downsamples[k]``
is level-0 pixels per level-k pixel. ``mpp`` is microns per level-0 pixel (``None`` when the file
does not say).

:class:`SlideView` is the resolution the job works at: a level chosen by index, or by microns per pixel
(the coarsest level at least as fine as asked, resampled with a box filter down to the exact mpp).
"""
from __future__ import annotations

import abc
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from refseg.optional import require

log = logging.getLogger(__name__)

VENDOR_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
SLIDE_SUFFIXES = VENDOR_SUFFIXES | TIFF_SUFFIXES
"""Suffixes that may hold a whole-slide image (``.tif``/``.tiff`` only when pyramidal or huge, see
:func:`is_slide_file`)."""

# A .tif is treated as a slide (not a 2-D image) when tiled and pyramidal, or tiled and this large.
LARGE_TIFF_SIDE = 10000
# Relative tolerance when matching a requested mpp to a level (no resampling within it).
MPP_TOLERANCE = 0.05
_BACKGROUND = 255


class SlideReadError(ValueError):
    """A slide could not be opened or read; the message names the file and the problem."""


def _tifffile(purpose: str):
    return require("tifffile", extra="slides", purpose=purpose)


def is_slide_file(path: str | os.PathLike) -> bool:
    """True when ``path`` should be read as a whole-slide image rather than a 2-D image.

    Vendor suffixes (.svs .ndpi .mrxs .scn ...) always are. A ``.tif``/``.tiff`` is when it is tiled
    and either holds a pyramid (two or more resolution levels) or has a side longer than
    :data:`LARGE_TIFF_SIDE` px; a plain (strip or small) TIFF stays a 2-D image. Without tifffile
    installed, and for files tifffile cannot parse, TIFFs are not slides (the 2-D reader reports them).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VENDOR_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES or not path.is_file():
        return False
    try:
        import tifffile
    except ImportError:
        return False
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            page = series.levels[0].keyframe
            return bool(page.is_tiled) and (len(series.levels) > 1 or max(page.imagewidth,
                                                                         page.imagelength) > LARGE_TIFF_SIDE)
    except Exception:  # not parseable here: the 2-D reader gives the message
        return False


class SlideReader(abc.ABC):
    """Interface of the readers: level geometry, mpp and region reads (see the module docstring)."""

    path: Path
    level_dimensions: list[tuple[int, int]]  # (W, H) per level
    mpp: float | None

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (W, H) in pixels."""
        return self.level_dimensions[0]

    @property
    def level_downsamples(self) -> list[float]:
        """Level-0 pixels per level-k pixel (mean of x and y)."""
        w0, h0 = self.dimensions
        return [(w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions]

    @abc.abstractmethod
    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of level ``level`` at (x, y) of that level; outside the slide is white."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the file."""

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mpp_from_tiff(tf, page) -> float | None:
    if tf.is_ome and tf.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
        if match:
            factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm", 1.0)
            return float(match.group(1)) * factor
    match = re.search(r"\bMPP\s*=\s*([0-9.]+)", page.description or "")
    if match:  # Aperio ImageDescription
        return float(match.group(1))
    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres is not None and unit is not None and int(unit.value) in (2, 3):
        num, den = xres.value
        if num > 0:
            per_micron = num / den / (25400.0 if int(unit.value) == 2 else 1e4)
            return 1.0 / per_micron
    return None


class TiffSlideReader(SlideReader):
    """Pyramidal / tiled (OME-)TIFF through tifffile; only the chunks a region touches are decoded."""

    def __init__(self, path: str | os.PathLike):
        tifffile = _tifffile(f"Reading the slide {Path(path).name}")
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._tf = tifffile.TiffFile(self.path)
            series = self._tf.series[0]
            self._pages = [level.keyframe for level in series.levels]
            axes = [level.axes for level in series.levels]
        except Exception as exc:
            raise SlideReadError(f"{self.path}: not a readable TIFF slide ({exc})") from exc
        for level, (page, ax) in enumerate(zip(self._pages, axes)):
            if ax not in ("YX", "YXS") or (ax == "YXS" and page.samplesperpixel not in (3, 4)):
                raise SlideReadError(f"{self.path}: level {level} has axes {ax!r}; expected a 2-D grey or "
                                     f"RGB(A) image (YX or YXS with 3-4 samples)")
            if page.dtype != np.uint8:
                raise SlideReadError(f"{self.path}: level {level} stores {page.dtype} samples; only 8-bit "
                                     f"brightfield slides are supported")
            if page.planarconfig == 2 and page.samplesperpixel > 1:
                raise SlideReadError(f"{self.path}: level {level} uses planar (separate) sample storage, "
                                     f"which is not supported")
        self.level_dimensions = [(int(p.imagewidth), int(p.imagelength)) for p in self._pages]
        self.mpp = _mpp_from_tiff(self._tf, self._pages[0])
        self._size = os.path.getsize(self.path)
        for level, page in enumerate(self._pages):
            end = max((int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
            if end > self._size:
                raise SlideReadError(f"{self.path}: truncated file (level {level} tile data ends at byte {end}, "
                                     f"the file has {self._size})")

    def _chunk(self, page, index: int) -> np.ndarray | None:
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0:
            return None  # sparse tile: background
        if offset + count > self._size:
            raise SlideReadError(f"{self.path}: truncated file (chunk {index} ends at byte {offset + count}, "
                                 f"file has {self._size})")
        with self._lock:
            fh = self._tf.filehandle
            fh.seek(offset)
            data = fh.read(count)
        try:
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cannot decode chunk {index} ({type(exc).__name__}: {exc}); "
                                 f"corrupt data, or a codec that needs 'pip install imagecodecs'") from exc
        segment = np.asarray(segment)[0]
        return segment if segment.ndim == 3 else segment[..., None]

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        width, height = self.level_dimensions[level]
        out = np.full((h, w, 3), _BACKGROUND, np.uint8)
        ch = int(page.chunks[0])
        cw = int(page.chunks[1]) if page.is_tiled else width
        cols = math.ceil(width / cw)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        for row in range(y0 // ch, (y1 - 1) // ch + 1 if y1 > y0 else 0):
            for col in range(x0 // cw, (x1 - 1) // cw + 1 if x1 > x0 else 0):
                chunk = self._chunk(page, row * cols + col)
                if chunk is None:
                    continue
                cy, cx = row * ch, col * cw
                sy0, sy1 = max(y0, cy), min(y1, cy + chunk.shape[0])
                sx0, sx1 = max(x0, cx), min(x1, cx + chunk.shape[1])
                if sy1 <= sy0 or sx1 <= sx0:
                    continue
                part = chunk[sy0 - cy:sy1 - cy, sx0 - cx:sx1 - cx]
                if part.shape[2] == 1:
                    part = np.repeat(part, 3, axis=2)
                elif part.shape[2] == 4:
                    alpha = part[..., 3:4].astype(np.float32) / 255.0
                    part = np.rint(part[..., :3] * alpha + _BACKGROUND * (1.0 - alpha)).astype(np.uint8)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = part[..., :3]
        return out

    def close(self) -> None:
        self._tf.close()


class OpenSlideReader(SlideReader):
    """Vendor formats through openslide-python (library from the ``openslide-bin`` wheel)."""

    def __init__(self, path: str | os.PathLike):
        openslide = require("openslide", extra="slides", purpose=f"Reading the slide {Path(path).name}")
        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
            raise SlideReadError(f"{self.path}: not a readable slide ({type(exc).__name__}: {exc})") from exc
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
        mpp = self._slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        self._downsamples = [float(d) for d in self._slide.level_downsamples]

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._downsamples[level]
        try:
            rgba = np.asarray(self._slide.read_region((round(x * ds), round(y * ds)), level, (w, h)))
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cannot read level {level} at ({x}, {y}) ({exc})") from exc
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        return np.rint(rgba[..., :3] * alpha + _BACKGROUND * (1.0 - alpha)).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


READERS = {"tifffile": TiffSlideReader, "openslide": OpenSlideReader}


def open_slide(path: str | os.PathLike, reader: str = "auto") -> SlideReader:
    """Open a slide with ``reader`` (``auto``: tifffile for .tif/.tiff, openslide otherwise).

    Raises:
        SlideReadError: missing / empty / unreadable / truncated file, or unsupported layout.
        MissingDependencyError: the reader's package is not installed (names ``refseg[slides]``).
    """
    path = Path(path)
    if not path.exists():
        raise SlideReadError(f"{path}: file does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideReadError(f"{path}: file is empty (0 bytes)")
    if reader == "auto":
        reader = "tifffile" if path.suffix.lower() in TIFF_SUFFIXES else "openslide"
    if reader not in READERS:
        raise ValueError(f"slide reader: expected auto, {', '.join(READERS)}; got {reader!r}")
    return READERS[reader](path)


@dataclass
class SlideView:
    """A slide at the processing resolution.

    Attributes:
        reader: the open slide.
        level: the source level read from.
        scale: source-level pixels per view pixel (1.0 = the level as stored, > 1 = box-downsampled).
        size: (W, H) of the view in pixels.
    """

    reader: SlideReader
    level: int
    scale: float
    size: tuple[int, int]

    @classmethod
    def select(cls, reader: SlideReader, level: int | None = None, mpp: float | None = None) -> "SlideView":
        """The view at ``level`` (index), or at ``mpp`` microns per pixel, or level 0 when neither.

        For ``mpp``: the coarsest level whose mpp is at most ``mpp * (1 + 5 %)``, box-resampled to
        exactly ``mpp`` unless within 5 %. Raises ``ValueError`` naming the slide for a level that
        does not exist, an mpp finer than level 0, or an mpp asked of a slide without mpp metadata.
        """
        path, dims = reader.path, reader.level_dimensions
        if level is not None and mpp is not None:
            raise ValueError("give either a level or an mpp, not both")
        if mpp is None:
            level = 0 if level is None else int(level)
            if not 0 <= level < len(dims):
                raise ValueError(f"{path}: level {level} does not exist; the slide has levels 0..{len(dims) - 1} "
                                 f"({', '.join(f'{w}x{h}' for w, h in dims)})")
            return cls(reader, level, 1.0, dims[level])
        if not mpp > 0:
            raise ValueError(f"mpp: expected a positive number of microns per pixel, got {mpp}")
        if reader.mpp is None:
            raise ValueError(f"{path}: the slide stores no pixel size (mpp); choose a --level instead")
        level_mpp = [reader.mpp * d for d in reader.level_downsamples]
        usable = [k for k, m in enumerate(level_mpp) if m <= mpp * (1 + MPP_TOLERANCE)]
        if not usable:
            raise ValueError(f"{path}: mpp {mpp:g} is not available; the finest level has {level_mpp[0]:.4g} "
                             f"µm/px (levels: {', '.join(f'{m:.4g}' for m in level_mpp)})")
        level = max(usable, key=lambda k: level_mpp[k])
        scale = mpp / level_mpp[level]
        if abs(scale - 1.0) <= MPP_TOLERANCE:
            return cls(reader, level, 1.0, dims[level])
        w, h = dims[level]
        return cls(reader, level, scale, (max(1, round(w / scale)), max(1, round(h / scale))))

    @property
    def downsample(self) -> float:
        """Level-0 pixels per view pixel."""
        return self.reader.level_downsamples[self.level] * self.scale

    @property
    def mpp(self) -> float | None:
        """Microns per view pixel (``None`` without slide metadata)."""
        return None if self.reader.mpp is None else self.reader.mpp * self.downsample

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the view region at (x, y) view pixels; outside the slide is white."""
        if self.scale == 1.0:
            return self.reader.read_region(self.level, x, y, w, h)
        s = self.scale
        sx0, sy0 = math.floor(x * s), math.floor(y * s)
        sx1, sy1 = math.ceil((x + w) * s), math.ceil((y + h) * s)
        src = self.reader.read_region(self.level, sx0, sy0, sx1 - sx0, sy1 - sy0)
        box = (x * s - sx0, y * s - sy0, (x + w) * s - sx0, (y + h) * s - sy0)
        return np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BOX, box=box))

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """A downsampled RGB picture of the whole view and its scale (thumbnail px per view px, <= 1).

        Read from the coarsest level fine enough, in bands of rows, so memory stays at a few bands
        whatever the slide size.
        """
        vw, vh = self.size
        t = min(1.0, max_side / max(vw, vh))
        tw, th = max(1, round(vw * t)), max(1, round(vh * t))
        wanted = self.downsample / t  # level-0 px per thumbnail px
        levels = [k for k, d in enumerate(self.reader.level_downsamples) if d <= wanted * (1 + 1e-6)]
        level = max(levels, key=lambda k: self.reader.level_downsamples[k]) if levels else 0
        lw, lh = self.reader.level_dimensions[level]
        f = wanted / self.reader.level_downsamples[level]  # source px per thumbnail px
        out = np.empty((th, tw, 3), np.uint8)
        band = max(1, int(max(f, (1 << 20) / lw) // f))  # thumbnail rows per band: ~1 Mpx of source
        for r0 in range(0, th, band):
            r1 = min(th, r0 + band)
            sy0, sy1 = math.floor(r0 * f), min(lh, math.ceil(r1 * f))
            src = self.reader.read_region(level, 0, sy0, lw, max(1, sy1 - sy0))
            box = (0.0, r0 * f - sy0, min(lw, tw * f), min(src.shape[0], r1 * f - sy0))
            out[r0:r1] = np.asarray(Image.fromarray(src).resize((tw, r1 - r0), Image.Resampling.BOX, box=box))
        return out, tw / vw
