"""Label mask files read band by band, and a whole file vectorised into QuPath GeoJSON.

:class:`LabelRaster` reads rows [y0, y1) of a label mask without ever holding the whole image:

- TIFF, BigTIFF and OME-TIFF, tiled or striped (the slide job's own ``<stem>.ome.tif`` pyramid included:
  its full-resolution level is read), through tifffile, one TIFF tile or strip at a time;
- any other single-band raster GDAL opens (PNG ...), through rasterio windows.

Everything that can be checked before work is checked on opening (single channel, integer type,
segments inside the file, the first segment decodable), and each problem is a :class:`LabelReadError`
naming the file. :func:`outline_file` strings reader, :class:`refseg.io.outlines.OutlineTracer` and
:class:`refseg.io.geojson.FeatureWriter` together (``refseg outlines``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from refseg.io.geojson import FeatureWriter
from refseg.io.outlines import OutlineTracer, require_outlines
from refseg.optional import require

log = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PROGRESS_EVERY_S = 10.0
TRACE_TILE = 1024  # default tracing tile side (px)


class LabelReadError(ValueError):
    """A label mask file that cannot be used: unreadable, truncated, not a label image."""


def _check_dtype(path: Path, dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype != bool and not np.issubdtype(dtype, np.integer):
        raise LabelReadError(f"{path}: not a label image: pixels are {dtype}, labels are integers "
                             "(0 = background, 1..K = classes)")
    if dtype.itemsize > 4 or dtype == np.uint32:
        raise LabelReadError(f"{path}: {dtype} labels are not supported (uint8, uint16, int16 or int32)")
    return dtype


class LabelRaster:
    """A label mask file, read band by band. ``width``, ``height``, ``dtype``, ``tile`` (the file's
    tile or strip height, a good band height) are known after opening; use as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stack = contextlib.ExitStack()
        try:
            with open(self.path, "rb") as handle:
                magic = handle.read(4)
        except OSError as exc:
            raise LabelReadError(f"{self.path}: cannot be read ({exc.strerror or exc})") from exc
        try:
            if magic in _TIFF_MAGIC:
                self._open_tiff()
            else:
                self._open_gdal()
        except BaseException:
            self._stack.close()
            raise

    # -- TIFF (tifffile): segments decoded one by one
    def _open_tiff(self) -> None:
        tifffile = require("tifffile", extra="slides", purpose="Reading TIFF label masks")
        try:
            tif = self._stack.enter_context(tifffile.TiffFile(self.path))
            series = tif.series[0]
            page = series.levels[0].pages[0] if series.levels[0].pages else tif.pages[0]
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ...
            raise LabelReadError(f"{self.path}: not a readable TIFF ({exc})") from exc
        if page.samplesperpixel > 1 or len(page.shaped) != 5 or page.shaped[0] * page.shaped[1] > 1:
            raise LabelReadError(f"{self.path}: not a label image: {page.samplesperpixel} samples per pixel "
                                 f"(RGB or multi-channel); labels have one channel")
        if int(np.prod(series.levels[0].shape)) != page.imagelength * page.imagewidth:
            raise LabelReadError(f"{self.path}: not a label image: the first series has shape "
                                 f"{series.levels[0].shape} ({series.levels[0].axes}); labels are one 2-D plane")
        self.dtype = _check_dtype(self.path, page.dtype)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        offsets, counts = np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64)
        size = self.path.stat().st_size
        if len(offsets) and int((offsets + counts).max()) > size:
            first = int(np.argmax(offsets + counts > size))
            raise LabelReadError(f"{self.path}: truncated: segment {first} of {len(offsets)} ends at byte "
                                 f"{int(offsets[first] + counts[first])}, the file has {size}")
        if page.is_tiled:
            self._seg_h, self._seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self._seg_h, self._seg_w = int(page.rowsperstrip or self.height), self.width
        self._per_row = -(-self.width // self._seg_w)
        # tracing tiles of ~1024 px: GDAL's per-call cost and the seam unions of smaller tiles make 512 px
        # tiles ~1.6x slower, larger ones gain little and hold more rows in memory
        self.tile = self._seg_h * max(1, TRACE_TILE // self._seg_h) if page.is_tiled else TRACE_TILE
        self._page, self._fh = page, tif.filehandle
        self._cached: tuple[int, np.ndarray] | None = None
        self._segment_row(0)  # decodable? (compression, data type) before any work

    def _segment(self, index: int) -> np.ndarray | None:
        offset, count = int(self._page.dataoffsets[index]), int(self._page.databytecounts[index])
        if count == 0 or offset == 0:
            return None  # an empty (all-zero) segment
        self._fh.seek(offset)
        data = self._fh.read(count)
        try:
            segment, _, shape = self._page.decode(data, index)
        except Exception as exc:
            raise LabelReadError(f"{self.path}: segment {index} cannot be decoded ({exc}; other compressions "
                                 "than deflate/LZW/packbits need: pip install imagecodecs)") from exc
        return segment.reshape(segment.shape[-3], segment.shape[-2])

    def _segment_row(self, row: int) -> np.ndarray:
        """Rows [row * seg_h, ...) of the image, full width, (seg_h', W)."""
        if self._cached is not None and self._cached[0] == row:
            return self._cached[1]
        rows = min(self._seg_h, self.height - row * self._seg_h)
        band = np.zeros((rows, self.width), self.dtype)
        for k in range(self._per_row):
            segment = self._segment(row * self._per_row + k)
            if segment is not None:
                x = k * self._seg_w
                part = segment[:rows, :self.width - x]
                band[:part.shape[0], x:x + part.shape[1]] = part
        self._cached = (row, band)
        return band

    def _read_tiff(self, y0: int, y1: int) -> np.ndarray:
        out = np.empty((y1 - y0, self.width), self.dtype)
        for row in range(y0 // self._seg_h, (y1 - 1) // self._seg_h + 1):
            top = row * self._seg_h
            band = self._segment_row(row)
            a, b = max(y0, top), min(y1, top + band.shape[0])
            out[a - y0:b - y0] = band[a - top:b - top]
        return out

    # -- anything else GDAL opens (PNG ...): rasterio windows
    def _open_gdal(self) -> None:
        rasterio = require("rasterio", extra="slides", purpose="Reading PNG and other label masks")
        self._stack.enter_context(rasterio.Env(GDAL_CACHEMAX=64))  # MB: the block cache stays small
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                dataset = self._stack.enter_context(rasterio.open(self.path))
        except rasterio.errors.RasterioIOError as exc:
            raise LabelReadError(f"{self.path}: not a readable image ({exc})") from exc
        if dataset.count != 1:
            raise LabelReadError(f"{self.path}: not a label image: {dataset.count} bands (RGB or multi-channel); "
                                 "labels have one channel")
        self.dtype = _check_dtype(self.path, dataset.dtypes[0])
        self.width, self.height = int(dataset.width), int(dataset.height)
        self.tile = TRACE_TILE  # PNG and the like have no tiles
        self._dataset = dataset

    def _read_gdal(self, y0: int, y1: int) -> np.ndarray:
        from rasterio.windows import Window

        try:
            return self._dataset.read(1, window=Window(0, y0, self.width, y1 - y0))
        except Exception as exc:
            raise LabelReadError(f"{self.path}: rows {y0}..{y1} cannot be read ({exc})") from exc

    # -- public
    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows [y0, y1) of the mask: (y1 - y0, width) array of ``dtype``."""
        if not 0 <= y0 < y1 <= self.height:
            raise ValueError(f"{self.path}: rows {y0}..{y1} outside 0..{self.height}")
        return self._read_tiff(y0, y1) if hasattr(self, "_page") else self._read_gdal(y0, y1)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "LabelRaster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_output(output: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output file that cannot be written (a folder, an unwritable or missing parent folder, or
    one of ``inputs``) before any work. Raises ValueError naming the file."""
    output = Path(output)
    if output.name in ("", ".", "..") or str(output).endswith(os.sep):
        raise ValueError(f"{output}: not a file name; give the GeoJSON file to write")
    if output.is_dir():
        raise ValueError(f"{output}: is a folder; give the GeoJSON file to write")
    for path in inputs:
        if output.exists() and output.samefile(path):
            raise ValueError(f"{output}: would overwrite the input")
    parent = output.parent if str(output.parent) else Path(".")
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{output}: cannot be written ({existing} is not a writable folder)")
    if output.exists() and not os.access(output, os.W_OK):
        raise ValueError(f"{output}: cannot be written (read-only file)")
    return output


def outline_file(labels: str | os.PathLike, output: str | os.PathLike, *, simplify: float = 1.0,
                 names: dict[int, tuple[str, tuple[int, int, int]]] | None = None, tile: int | None = None,
                 scale: float = 1.0, bounds: tuple[float, float] | None = None, workers: int = 0) -> dict:
    """Vectorise the label mask file ``labels`` into the QuPath GeoJSON ``output``, streamed.

    One feature per 4-connected object of each class (holes as interiors), in output pixels (x right,
    y down): mask pixels times ``scale``; ``simplify`` is the tolerance in output pixels (0 = exact
    pixel-edge outlines); ``tile`` the tracing tile side (default: about 1024 px, a multiple of the
    file's tile height); ``names`` class value -> (name, RGB colour); ``workers`` > 1 traces tiles in that
    many processes (same output). The mask is read one band of tiles at a time; ``output`` is written
    atomically. Returns ``{"width", "height", "tile", "features", "seconds"}``.

    Raises:
        LabelReadError / ValueError: naming the file, before any work where it can be known then.
    """
    require_outlines()
    output = check_output(output, (labels,))
    started = time.perf_counter()
    with LabelRaster(labels) as raster:
        tile = int(tile or raster.tile)
        if tile <= 0:
            raise ValueError(f"tile: must be > 0, got {tile}")
        top = np.iinfo(raster.dtype).max if raster.dtype != bool else 1
        for value in names or {}:
            if not 0 < value <= top:
                raise ValueError(f"{raster.path}: class {value} of --names cannot occur in {raster.dtype} "
                                 f"labels (1..{top})")
        log.info("%s: %d x %d px %s labels, tiles of %d px -> %s", raster.path, raster.width, raster.height,
                 raster.dtype, tile, output)
        with FeatureWriter(output, names=names, scale=scale, simplify=simplify, bounds=bounds,
                           namespace=str(Path(labels).resolve())) as writer:
            with OutlineTracer(raster.width, raster.height, tile, writer.write, workers=workers) as tracer:
                last = time.perf_counter()
                for row in range(tracer.rows):
                    y0 = row * tile
                    band = raster.read_rows(y0, min(y0 + tile, raster.height))
                    for col in range(tracer.cols):
                        tracer.add_tile(row, col, band[:, col * tile:(col + 1) * tile])
                    now = time.perf_counter()
                    if now - last >= PROGRESS_EVERY_S:
                        log.info("%s: %d/%d rows of tiles, %d objects", raster.path.name, row + 1, tracer.rows,
                                 tracer.objects)
                        last = now
                tracer.close()
    summary = {"width": raster.width, "height": raster.height, "tile": tile, "features": writer.count,
               "seconds": round(time.perf_counter() - started, 3)}
    return summary
