"""The slide job: tissue tiles of whole-slide images through the stream, stitched into a pyramidal mask and
GeoJSON outlines.

    refseg segment -r SLIDE -m ANNOTATIONS.geojson -i SLIDES/ -o OUT/ --mpp 2.0 [--resume]

Per slide (see :mod:`refseg.runtime.tiling` for the grid, the tissue rule and the merge rule):

1. open it at the processing resolution (``--level`` or ``--mpp``) and lay a :class:`TileGrid` on it;
2. detect tissue on a thumbnail; background tiles are skipped (their output is 0);
3. stream the tissue tiles; each tile's core is written to ``OUT/<stem>.tiles/`` (atomic PNG) the moment it
   leaves the stream, so a killed run keeps every finished tile and ``--resume`` computes only the others
   (on a CPU device the stream runs one tile per model call unless ``--batch-size`` is given: a batch of
   16 tiles would hold minutes of work in memory);
4. while the tiles finish, their cores go to the streaming vectoriser
   (:class:`refseg.io.outlines.OutlineTracer`, grid cells = the cores, which tile the view without overlap),
   whose final objects a :class:`refseg.io.geojson.FeatureWriter` appends to ``<stem>.geojson`` (QuPath
   features, level-0 pixels) at once: the outlines cost is paid inside the progress line, tile by tile, and
   no pass over all tiles is left for the end. Cells are joined in row-major order whatever the finishing
   order, so a resumed run writes the same file byte for byte as an uninterrupted one;
5. stitch the stored cores into ``<stem>.ome.tif`` (tiled pyramidal OME-TIFF labels), close the GeoJSON
   (renamed onto its name only now: a killed run leaves a temporary file, removed by the next run) and draw
   ``<stem>_overlay.png`` (preview);
6. record the slide's tiles (total / background / resumed / segmented / failed) and stage times under
   ``slides`` in the job's ``summary.json`` (``segment_s`` without the outlines work done between tiles,
   which is ``geojson_s``).

Memory is bounded by the tiles in flight, a few output tiles and the objects waiting on open tile seams,
never by the slide. The tile store is
removed once every output is written and no tile failed (kept with ``--keep-tiles`` or when tiles failed,
so that ``--resume`` retries only those); it is reused only when the job's settings match
(:mod:`refseg.jobs.resume`) and the slide file is the one it was made from.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from refseg.io import pyramid, raster, writers
from refseg.jobs.base import ItemPass, Job, Unit, job_arguments, job_files
from refseg.jobs.references import is_slide, load_references
from refseg.jobs.resume import fingerprint
from refseg.jobs.segmenter_spec import LocalRunner, SegmenterSpec
from refseg.jobs.summary import RunSummary
from refseg.runtime.tiling import TileGrid, default_overlap, tissue_mask, tissue_tiles

log = logging.getLogger(__name__)

DEFAULTS = {"min_tissue": 0.01, "thumbnail_size": 2048, "preview_size": 2048, "slide_reader": "auto"}


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
    stem = Path(path).stem
    return stem[:-4] if stem.lower().endswith(".ome") else stem


def slide_inputs(args) -> list[Path]:
    """The slides of ``-i``: a slide file, or the slides of a folder (by name)."""
    path = Path(args.input)
    if path.is_dir():
        return sorted((p for p in path.iterdir() if not p.name.startswith(".") and is_slide(p, args.slide)),
                      key=lambda p: p.name)
    return [path] if path.exists() and is_slide(path, args.slide) else []


class TileStore:
    """Finished tile cores as ``r<row>_c<col>.png`` plus ``slide.json`` (the slide file and grid they
    belong to); a store of another slide file or grid, or any store when not ``reuse``, is discarded."""

    def __init__(self, folder: Path, stamp: str, reuse: bool):
        import json

        self.folder = folder
        record = folder / "slide.json"
        if folder.exists():
            try:
                old = json.loads(record.read_text()).get("stamp")
            except (OSError, ValueError):
                old = None
            if not reuse or old != stamp:
                if reuse:
                    log.warning("%s: made from another slide file or grid; starting the slide over", folder)
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        writers.remove_temporaries([folder])
        if not record.exists():
            writers.write_json(record, {"stamp": stamp})

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
    """(h, w, 3) uint8 RGB of view region (x, y, w, h) of the slide file ``path`` at ``level`` / ``mpp`` (as
    :meth:`refseg.io.slide.SlideView.read`; outside the slide is white).

    The picklable tile loader of Ray runs (an actor reads its tiles itself): the last slide opened is kept
    open per process, so a batch of tiles of one slide opens it once.
    """
    from refseg.io.slide import SlideView, open_slide

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


class SlideJob(Job):
    """``refseg segment`` on whole-slide images (see the module docstring)."""

    mode = "slide"

    def option(self, name: str):
        value = getattr(self.args, name)
        return DEFAULTS.get(name) if value is None else value

    def prepare(self) -> None:
        from refseg.io.slide import SlideView, open_slide

        args = self.args
        self.references, self.class_names = load_references(args)
        slides = slide_inputs(args)
        if not slides:
            raise ValueError(f"{args.input}: no whole-slide image found (use --slide to read a .tif as one)")
        tile = args.tile_size or max(16, 16 * round(self.config.image_size / 16))
        overlap = default_overlap(tile) if args.overlap is None else args.overlap
        TileGrid(tile, tile, tile, overlap)  # a bad tile / overlap pair stops here
        self.tile, self.overlap = tile, overlap
        outdir = writers.prepare_output_folder(args.output)
        self.files = job_files(outdir)
        problems = []
        for path in slides:  # every target opened before any model loads: bad ones are named now
            try:
                with open_slide(path, self.option("slide_reader")) as reader:
                    SlideView.select(reader, level=args.level, mpp=args.mpp)
            except (ValueError, OSError) as exc:
                problems.append((path, exc))
        if len(problems) == len(slides):
            raise ValueError("; ".join(str(exc) for _, exc in problems))
        self.early_failures += problems
        bad = {p for p, _ in problems}
        stems = writers.unique_stems(slides)
        for path in slides:
            if path not in bad:
                outputs = SlideOutputs.for_stem(outdir, slide_stem(Path(stems[path] + path.suffix)))
                if any(p.exists() and p.samefile(path) for p in (outputs.mask, outputs.geojson, outputs.preview)):
                    raise ValueError(f"{path}: an output in {outdir} would overwrite the slide; choose another folder")
                self.units.append(Unit(path, [outputs.mask, outputs.geojson, outputs.preview], outputs))
        self.spec = SegmenterSpec.from_args(args, self.config)

    def reference_digests(self) -> list[str]:
        from refseg.segmenter import reference_digest

        if not self.references:
            return list(getattr(self.runner.segmenter, "reference_digests", []))
        return [reference_digest(np.asarray(image), mask) for image, mask, _ in self.references]

    def mode_settings(self) -> dict:
        a = self.args
        return {"tile": self.tile, "overlap": self.overlap, "level": a.level, "mpp": a.mpp,
                "tissue": [not a.no_tissue_detection, self.option("min_tissue"), self.option("thumbnail_size")],
                "reader": self.option("slide_reader"), "simplify": a.simplify, "classes": self.class_names,
                "preview_size": self.option("preview_size")}

    def unit_done(self, unit: Unit) -> bool:
        return unit.data.complete()

    def batch_size(self) -> int | None:
        if self.args.batch_size is None and self.runner.models.get("device") == "cpu":
            return 1  # each tile is written as it leaves the models: at most one tile of work is at risk
        return self.args.batch_size

    def passes(self, units: list[Unit]) -> Iterator[ItemPass]:
        from refseg.io.slide import open_slide

        if self.references:
            self.runner.set_references(self.references)
        for unit in units:
            try:
                with open_slide(unit.path, self.option("slide_reader")) as reader:
                    self.current = run = _SlideRun(self, unit, reader)
                    with run:  # leaving early (an error, a kill) discards the unfinished GeoJSON
                        yield run.item_pass()
                        record = run.finish()
            except (ValueError, OSError) as exc:
                self.summary.add_failure(unit.path, exc)
                continue
            self.summary.records.append(record)
            if record["tiles_failed"]:
                self.summary.add_failure(unit.path, f"{record['tiles_failed']} tile(s) failed (kept for --resume): "
                                         + "; ".join(f"{f['tile']}: {f['error']}" for f in record["failed_tiles"][:3]))
            else:
                self.summary.add_success(unit.path)

    def consume(self, out) -> None:
        self.current.consume(out)


class _SlideRun:
    """One slide of a :class:`SlideJob`: grid, tissue, tile store, items traced into the GeoJSON as they
    finish, then the stitched outputs. A context manager: the GeoJSON is discarded unless :meth:`finish`
    completed it."""

    def __init__(self, job: SlideJob, unit: Unit, reader):
        from refseg.io.slide import SlideView

        args = job.args
        self.job, self.unit, self.reader, self.outputs = job, unit, reader, unit.data
        self.started = time.perf_counter()
        self.times: dict[str, float] = {}
        self.view = view = SlideView.select(reader, level=args.level, mpp=args.mpp)
        self.grid = grid = TileGrid(view.size[0], view.size[1], job.tile, job.overlap)
        t0 = time.perf_counter()
        self.record: dict[str, Any] = {
            "path": str(unit.path), "outputs": {k: str(v) for k, v in asdict(self.outputs).items() if k != "tiles"},
            "level": view.level, "resample": round(view.scale, 6), "mpp": view.mpp,
            "downsample": round(view.downsample, 6), "size": list(view.size), "tile_size": grid.tile,
            "overlap": grid.overlap, "level0_size": list(reader.dimensions)}
        if args.no_tissue_detection:
            self.keep = np.ones((grid.rows, grid.cols), bool)
        else:
            thumb, thumb_scale = view.thumbnail(job.option("thumbnail_size"))
            tissue, threshold = tissue_mask(thumb)
            self.keep = tissue_tiles(grid, tissue, thumb_scale, job.option("min_tissue"))
            self.record["tissue_threshold"] = round(threshold, 4)
        self.times["tissue_s"] = time.perf_counter() - t0
        stat = reader.path.stat()
        stamp = fingerprint({"slide": [str(reader.path.resolve()), stat.st_size, stat.st_mtime_ns],
                             "view": [view.level, view.scale, list(view.size)], "grid": asdict(grid)})
        self.store = TileStore(self.outputs.tiles, stamp, job.reuse)
        self.cells = [(int(r), int(c)) for r, c in zip(*np.nonzero(self.keep))]
        self.todo = [(r, c) for r, c in self.cells if not (job.reuse and self.store.done(r, c))]
        self.failed: list[dict[str, str]] = []
        self.segmented = 0
        self.times["geojson_s"] = 0.0
        self.outline_error: BaseException | None = None
        self._outputs = contextlib.ExitStack()  # the GeoJSON writer and the tracer, open while tiles finish
        self.record.update(tiles_total=len(grid), tiles_background=len(grid) - len(self.cells),
                           tiles_tissue=len(self.cells), tiles_resumed=len(self.cells) - len(self.todo))
        log.info("%s: %dx%d px at level %d (x%.3g), %d tiles, %d background skipped, %d already done, %d to run",
                 unit.path.name, *view.size, view.level, view.scale, len(grid), len(grid) - len(self.cells),
                 len(self.cells) - len(self.todo), len(self.todo))

    def _loader(self, box):
        args = self.job.args
        if self.job.runner.remote:  # an actor reads the tile: path + box, no open file
            return functools.partial(read_slide_region, str(self.unit.path), self.job.option("slide_reader"),
                                     args.level, args.mpp, *box)
        return functools.partial(self.view.read, *box)

    def __enter__(self) -> "_SlideRun":
        return self

    def __exit__(self, *exc) -> bool:
        return self._outputs.__exit__(*exc)

    def start_outlines(self) -> None:
        """Open ``<stem>.geojson`` (a temporary file until :meth:`finish`) and the outline tracer over the
        grid's cores, and give it every cell that will not come out of the stream: background cells (empty)
        and cells stored by an earlier run (read when their turn comes)."""
        from refseg.io.geojson import FeatureWriter
        from refseg.io.outlines import OutlineTracer

        job, view, grid = self.job, self.view, self.grid
        simplify = view.downsample if job.args.simplify is None else job.args.simplify
        writer = self._outputs.enter_context(FeatureWriter(
            self.outputs.geojson, names=job.class_names, scale=view.downsample, simplify=simplify,
            bounds=self.reader.dimensions, namespace=str(self.unit.path.resolve())))
        self.tracer = self._outputs.enter_context(OutlineTracer(grid.width, grid.height, grid.core, writer.write))
        coming = set(self.todo)
        for row in range(grid.rows):
            for col in range(grid.cols):
                if (row, col) not in coming:
                    self.trace(row, col, self.stored(row, col) if self.keep[row, col] else None)
        if len(self.cells) > len(self.todo):  # those before the first tile to run are traced now
            log.info("%s: %d stored tiles given to the outlines (%.2f s)", self.unit.path.name,
                     len(self.cells) - len(self.todo), self.times["geojson_s"])

    def stored(self, row: int, col: int):
        """The loader of a stored core: the tracer reads it when the cell's turn comes (no memory before)."""
        return functools.partial(self.store.load, row, col)

    def trace(self, row: int, col: int, labels) -> None:
        """Give cell (row, col) to the outline tracer (``None``: no objects), timed as ``geojson_s``. An
        error here fails the slide at :meth:`finish` (its tiles are kept for ``--resume``), not the job."""
        if self.outline_error is not None:
            return
        t0 = time.perf_counter()
        try:
            self.tracer.add_tile(row, col, labels)
        except Exception as exc:
            self.outline_error = exc
            log.error("%s: outlines stopped at tile (%d, %d): %s: %s", self.unit.path.name, row, col,
                      type(exc).__name__, exc)
        self.times["geojson_s"] += time.perf_counter() - t0

    def item_pass(self) -> ItemPass:
        from refseg.runtime.stream import StreamItem

        grid, name = self.grid, self.unit.path.name
        self.start_outlines()
        self.t0, self.traced_before = time.perf_counter(), self.times["geojson_s"]
        items = (StreamItem(key=f"{name}@(x={grid.read_box(r, c)[0]},y={grid.read_box(r, c)[1]})",
                            load=self._loader(grid.read_box(r, c)), meta=(r, c)) for r, c in self.todo)
        return ItemPass(items, len(self.todo))

    def consume(self, out) -> None:
        row, col = out.item.meta
        m, k = self.grid.margin, self.grid.core
        if out.error is not None:
            self.failed.append({"tile": out.item.key, "error": f"{type(out.error).__name__}: {out.error}"})
            self.trace(row, col, None)
            return
        try:  # written now: a kill after this tile keeps it
            self.store.save(row, col, np.ascontiguousarray(out.result.mask[m:m + k, m:m + k], np.uint8))
            self.segmented += 1
        except Exception as exc:
            self.failed.append({"tile": out.item.key, "error": f"{type(exc).__name__}: {exc}"})
            self.trace(row, col, None)
            return
        self.trace(row, col, self.stored(row, col))  # read back only when due: out-of-order tiles cost no memory

    def finish(self) -> dict[str, Any]:
        grid, view, store, outputs, times = self.grid, self.view, self.store, self.outputs, self.times
        times["segment_s"] = time.perf_counter() - self.t0 - (times["geojson_s"] - self.traced_before)
        for failure in self.failed:
            log.error("%s: %s", failure["tile"], failure["error"])
        if self.outline_error is not None:
            raise ValueError(f"{outputs.geojson}: outlines failed ({type(self.outline_error).__name__}: "
                             f"{self.outline_error}); the tiles are kept for --resume") from self.outline_error
        t0 = time.perf_counter()
        features = self.tracer.close()  # every cell was given: every object is written
        self._outputs.close()  # the GeoJSON is complete: renamed onto its name
        times["geojson_s"] += time.perf_counter() - t0
        log.info("%s: %d outline features, %.2f s of outlines for %.2f s of segmentation", self.unit.path.name,
                 features, times["geojson_s"], times["segment_s"])
        t0 = time.perf_counter()
        levels = pyramid.write_label_pyramid(
            outputs.mask, lambda r, c: store.load(r, c) if self.keep[r, c] else None, grid.width, grid.height,
            grid.core, outputs.tiles / "pyramid", pixel_size_um=view.mpp)
        times["stitch_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        thumb, _ = view.thumbnail(self.job.option("preview_size"))
        labels, _ = pyramid.read_label_level(outputs.mask, max_pixels=4 * thumb.shape[0] * thumb.shape[1])
        labels = np.asarray(Image.fromarray(labels).resize((thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST))
        writers.write_png(outputs.preview, writers.overlay(raster.to_rgb_uint8(thumb), labels))
        times["preview_s"] = time.perf_counter() - t0
        if not self.failed and not self.job.args.keep_tiles:
            shutil.rmtree(outputs.tiles, ignore_errors=True)
        times["total_s"] = time.perf_counter() - self.started
        seconds = times["segment_s"]
        self.record.update(status="failed tiles" if self.failed else "ok", tiles_segmented=self.segmented,
                           tiles_failed=len(self.failed), failed_tiles=self.failed, features=features,
                           mask_levels=[list(s) for s in levels],
                           tiles_per_second=round(self.segmented / seconds, 4) if self.segmented and seconds > 0 else 0.0,
                           times={k: round(v, 4) for k, v in times.items()})
        return self.record


def run_slides(segmenter, inputs, outdir, **options) -> RunSummary:
    """The slide job from Python with a Segmenter whose reference is set: the slides of ``inputs`` (a
    slide or a folder) -> ``outdir``. ``options``: the ``refseg segment`` slide options by their argument
    names (``tile_size=256``, ``mpp=2.0``, ``resume=True``, ``batch_size=3`` ...).

    Returns:
        The run summary (also written to ``outdir/summary.json``).
    """
    args = job_arguments(input=inputs, output=outdir, reference=[], reference_mask=[], **options)
    job = SlideJob(args, segmenter.config, runner=LocalRunner(segmenter=segmenter))
    job.run()
    return job.summary
