"""One whole-slide job: tissue tiles through the stream, stitched into a pyramidal mask and GeoJSON.

Steps for a slide (see :mod:`refseg.runtime.tiling` for the grid, the tissue rule and the merge rule):

1. open it at the processing resolution (``level`` or ``mpp``) and lay a :class:`TileGrid` on it;
2. detect tissue on a thumbnail; background tiles are skipped (their output is 0);
3. stream the tissue tiles through :func:`refseg.runtime.stream.stream_segment`; each finished tile's
   core is saved at once as a PNG in ``OUTDIR/<stem>.tiles/`` (atomic), which is what ``resume``
   reuses: a killed run recomputes only unfinished tiles. The store records a fingerprint of the
   settings, reference and slide; a store made with other settings is discarded;
4. stitch the stored cores into ``<stem>.ome.tif`` (tiled pyramidal OME-TIFF labels), trace them into
   ``<stem>.geojson`` (QuPath features, level-0 pixels) and draw ``<stem>_overlay.png`` (preview);
5. return the slide's summary (tiles total / background skipped / resumed / segmented / failed, times).

Memory is bounded by the tiles in flight (the stream's batches) and a few output tiles, never by the
slide: nothing holds a whole level. The store is removed once every output is written and no tile
failed (kept with ``keep_tiles`` or when tiles failed, so that ``resume`` retries only those).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from refseg.io import geojson, pyramid, raster, writers
from refseg.io.slide import SlideView, open_slide
from refseg.runtime.stream import StreamItem, segment_items
from refseg.runtime.tiling import TileGrid, default_overlap, tissue_mask, tissue_tiles

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class SlideJobOptions:
    """Settings of a slide job.

    Attributes:
        level, mpp: processing resolution (a level index, or microns per pixel; neither = level 0).
        tile_size: tile side in processing-level pixels; ``overlap``: pixels shared by neighbours
            (``None`` = :func:`default_overlap`); ``tile_size - overlap`` must be a multiple of 16.
        detect_tissue: skip background tiles; ``min_tissue``: tissue share of a tile's core needed.
        thumbnail_size: longer side (px) of the tissue-detection thumbnail.
        preview_size: longer side (px) of ``<stem>_overlay.png``.
        simplify: polygon tolerance in level-0 pixels (``None`` = one processing-level pixel, 0 = off).
        class_names: label value -> (QuPath class name, RGB colour); missing values get "class k".
        reader: slide reader (``auto``, ``tifffile``, ``openslide``).
        resume: reuse finished tiles (and skip a slide whose outputs are all written).
        keep_tiles: keep ``<stem>.tiles/`` after a complete run.
    """

    level: int | None = None
    mpp: float | None = None
    tile_size: int = 512
    overlap: int | None = None
    detect_tissue: bool = True
    min_tissue: float = 0.01
    thumbnail_size: int = 2048
    preview_size: int = 2048
    simplify: float | None = None
    class_names: dict[int, tuple[str, tuple[int, int, int]]] = field(default_factory=dict)
    reader: str = "auto"
    resume: bool = False
    keep_tiles: bool = False


@dataclass(frozen=True)
class SlideOutputs:
    """Files of one slide in the output folder."""

    mask: Path
    geojson: Path
    preview: Path
    tiles: Path

    @classmethod
    def for_stem(cls, outdir: Path, stem: str) -> "SlideOutputs":
        return cls(outdir / f"{stem}.ome.tif", outdir / f"{stem}.geojson", outdir / f"{stem}_overlay.png",
                   outdir / f"{stem}.tiles")

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.mask, self.geojson, self.preview)) and not self.tiles.exists()


def slide_stem(path: Path) -> str:
    """Output stem of a slide: its name without the suffix (and without a trailing ``.ome``)."""
    stem = path.stem
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _TileStore:
    """Finished tile cores as ``r<row>_c<col>.png`` plus ``params.json`` (the run fingerprint)."""

    def __init__(self, folder: Path, fingerprint: str, resume: bool):
        self.folder = folder
        params = folder / "params.json"
        if folder.exists():
            old = None
            try:
                old = json.loads(params.read_text()).get("fingerprint")
            except (OSError, ValueError):
                pass
            if not resume or old != fingerprint:
                if resume:
                    log.warning("%s: made with other settings or reference; starting the slide over", folder)
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not params.exists():
            writers.write_json(params, {"fingerprint": fingerprint})

    def path(self, row: int, col: int) -> Path:
        return self.folder / f"r{row}_c{col}.png"

    def done(self, row: int, col: int) -> bool:
        return writers.is_done(self.path(row, col))

    def save(self, row: int, col: int, core: np.ndarray) -> None:
        writers.write_png(self.path(row, col), core)

    def load(self, row: int, col: int) -> np.ndarray | None:
        file = self.path(row, col)
        if not file.is_file():
            return None
        with Image.open(file) as im:
            return np.asarray(im, dtype=np.uint8)


_OPEN_LOCK = threading.Lock()
_OPEN: dict[tuple, Any] = {}  # this process's one open slide of read_slide_region: key -> (reader, view)


def read_slide_region(path: str, reader: str, level: int | None, mpp: float | None,
                      x: int, y: int, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8 RGB of view region (x, y, w, h) of the slide file ``path`` at ``level`` / ``mpp``
    (as :meth:`SlideView.read`; outside the slide is white).

    The picklable tile loader of remote runs (a worker reads its tiles itself): the last slide opened is
    kept open per process, so a batch of tiles of one slide opens it once.
    """
    key = (path, reader, level, mpp)
    with _OPEN_LOCK:
        if key not in _OPEN:
            for old, _ in _OPEN.values():
                old.close()
            _OPEN.clear()
            opened = open_slide(path, reader)
            _OPEN[key] = (opened, SlideView.select(opened, level=level, mpp=mpp))
        view = _OPEN[key][1]
    return view.read(x, y, w, h)


def _tile_loader(segmenter, view: SlideView, slide_path: Path, options: SlideJobOptions, box):
    if getattr(segmenter, "remote", False):  # runs on another process / machine: path + box, no open file
        return functools.partial(read_slide_region, str(slide_path), options.reader, options.level, options.mpp,
                                 *box)
    return functools.partial(view.read, *box)


def _fingerprint(view: SlideView, grid: TileGrid, options: SlideJobOptions, config: dict, reference_key: str) -> str:
    stat = view.reader.path.stat()
    blob = json.dumps({"slide": [str(view.reader.path.resolve()), stat.st_size, stat.st_mtime_ns],
                       "view": [view.level, view.scale, view.size], "grid": asdict(grid),
                       "tissue": [options.detect_tissue, options.min_tissue, options.thumbnail_size],
                       "config": config, "reference": reference_key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _names(options: SlideJobOptions, values) -> dict[int, tuple[str, tuple[int, int, int]]]:
    return {int(v): options.class_names.get(int(v), (f"class {int(v)}", writers.class_colour(int(v))))
            for v in values}


def run_slide(segmenter, slide_path: str | Path, outdir: str | Path, options: SlideJobOptions = SlideJobOptions(),
              reference_key: str = "", stem: str | None = None) -> dict[str, Any]:
    """Segment one slide into ``outdir`` (see the module docstring); returns its summary dict.

    Args:
        segmenter: a :class:`refseg.Segmenter` with its reference set.
        reference_key: identifies the reference (e.g. a digest of its pixels) for the resume fingerprint.
        stem: output stem (default :func:`slide_stem`).

    Raises:
        SlideReadError / ValueError: the slide cannot be opened, or the level / mpp does not exist.
        Tile read or model errors do not raise: those tiles are listed under ``failed_tiles``.
    """
    slide_path, outdir = Path(slide_path), Path(outdir)
    outputs = SlideOutputs.for_stem(outdir, stem or slide_stem(slide_path))
    if any(p.exists() and p.samefile(slide_path) for p in (outputs.mask, outputs.geojson, outputs.preview)):
        raise ValueError(f"{slide_path}: an output in {outdir} would overwrite the slide; choose another folder")
    started = time.perf_counter()
    times: dict[str, float] = {}
    summary: dict[str, Any] = {"slide": str(slide_path), "outputs": {k: str(v) for k, v in asdict(outputs).items()
                                                                    if k != "tiles"}}
    if options.resume and outputs.complete():
        log.info("%s: outputs already written (resume); skipped", slide_path)
        return {**summary, "status": "done earlier"}
    with open_slide(slide_path, options.reader) as reader:
        view = SlideView.select(reader, level=options.level, mpp=options.mpp)
        overlap = default_overlap(options.tile_size) if options.overlap is None else options.overlap
        grid = TileGrid(view.size[0], view.size[1], options.tile_size, overlap)
        summary.update(level=view.level, resample=round(view.scale, 6), mpp=view.mpp,
                       downsample=round(view.downsample, 6), size=list(view.size), tile_size=grid.tile,
                       overlap=grid.overlap, level0_size=list(reader.dimensions))
        # -- tissue
        t0 = time.perf_counter()
        if options.detect_tissue:
            thumb, thumb_scale = view.thumbnail(options.thumbnail_size)
            tissue, threshold = tissue_mask(thumb)
            keep = tissue_tiles(grid, tissue, thumb_scale, options.min_tissue)
            summary["tissue_threshold"] = round(threshold, 4)
            del thumb, tissue
        else:
            keep = np.ones((grid.rows, grid.cols), bool)
        times["tissue_s"] = time.perf_counter() - t0
        store = _TileStore(outputs.tiles, _fingerprint(view, grid, options, segmenter.config.to_dict(),
                                                       reference_key), options.resume)
        tissue_cells = [(int(r), int(c)) for r, c in zip(*np.nonzero(keep))]
        todo = [(r, c) for r, c in tissue_cells if not (options.resume and store.done(r, c))]
        summary.update(tiles_total=len(grid), tiles_background=len(grid) - len(tissue_cells),
                       tiles_tissue=len(tissue_cells), tiles_resumed=len(tissue_cells) - len(todo))
        log.info("%s: %dx%d px at level %d (x%.3g), %d tiles, %d background skipped, %d already done, %d to run",
                 slide_path.name, *view.size, view.level, view.scale, len(grid), len(grid) - len(tissue_cells),
                 len(tissue_cells) - len(todo), len(todo))
        # -- segmentation
        failed: list[dict[str, str]] = []
        segmented = 0
        t0 = last = time.perf_counter()
        items = (StreamItem(key=f"{slide_path.name}@(x={grid.read_box(r, c)[0]},y={grid.read_box(r, c)[1]})",
                            load=_tile_loader(segmenter, view, slide_path, options, grid.read_box(r, c)),
                            meta=(r, c))
                 for r, c in todo)
        m, k = grid.margin, grid.core
        for out in segment_items(segmenter, items):
            row, col = out.item.meta
            if out.error is not None:
                failed.append({"tile": out.item.key, "error": f"{type(out.error).__name__}: {out.error}"})
            else:
                try:
                    store.save(row, col, np.ascontiguousarray(out.result.mask[m:m + k, m:m + k], np.uint8))
                    segmented += 1
                except Exception as exc:
                    failed.append({"tile": out.item.key, "error": f"{type(exc).__name__}: {exc}"})
            now = time.perf_counter()
            done = segmented + len(failed)
            if now - last >= PROGRESS_EVERY_S or done == len(todo):
                rate = done / max(now - t0, 1e-9)
                log.info("%s: %d/%d tiles, %.2f tiles/s, ETA %s", slide_path.name, done, len(todo), rate,
                         _eta((len(todo) - done) / rate if rate > 0 else 0.0))
                last = now
        times["segment_s"] = time.perf_counter() - t0
        for failure in failed:
            log.error("%s", failure["tile"] + ": " + failure["error"])
        # -- outputs
        t0 = time.perf_counter()

        def tile_source(row: int, col: int) -> np.ndarray | None:
            return store.load(row, col) if keep[row, col] else None

        levels = pyramid.write_label_pyramid(outputs.mask, tile_source, grid.width, grid.height, grid.core,
                                             outputs.tiles / "pyramid", pixel_size_um=view.mpp)
        times["stitch_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        shapes: dict[int, list] = {}
        for row, col in tissue_cells:
            core = store.load(row, col)
            if core is None:
                continue
            x, y, w, h = grid.core_box(row, col)
            core = core[:h, :w]
            for value in np.unique(core[core > 0]):
                geom = geojson.mask_polygons(core, int(value), offset=(x, y))
                shapes.setdefault(int(value), []).append(geom)
        merged = {v: geojson.union(parts) for v, parts in shapes.items()}
        simplify = view.downsample if options.simplify is None else options.simplify
        features = geojson.write_geojson(outputs.geojson, geojson.to_features(
            merged, view.downsample, simplify, _names(options, merged), reader.dimensions,
            namespace=str(slide_path.resolve())))
        del merged, shapes
        times["geojson_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        thumb, _ = view.thumbnail(options.preview_size)
        labels, _ = pyramid.read_label_level(outputs.mask, max_pixels=4 * thumb.shape[0] * thumb.shape[1])
        labels = np.asarray(Image.fromarray(labels).resize((thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST))
        writers.write_png(outputs.preview, writers.overlay(raster.to_rgb_uint8(thumb), labels))
        times["preview_s"] = time.perf_counter() - t0
    if not failed and not options.keep_tiles:
        shutil.rmtree(outputs.tiles, ignore_errors=True)
    times["total_s"] = time.perf_counter() - started
    summary.update(status="failed tiles" if failed else "ok", tiles_segmented=segmented, tiles_failed=len(failed),
                   failed_tiles=failed, features=features, mask_levels=[list(s) for s in levels],
                   tiles_per_second=round(segmented / times["segment_s"], 4) if segmented and times["segment_s"] > 0 else 0.0,
                   times={k: round(v, 4) for k, v in times.items()})
    return summary
