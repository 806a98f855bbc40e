"""Streaming vectoriser: a tiled label mask -> one exact polygon per 4-connected object, tile by tile.

A label mask (H, W) of integer classes (0 = background) is cut into a grid of ``tile`` x ``tile``
pixel tiles (edge tiles smaller). Each tile is traced on its own, in C (:mod:`refseg.io.outlines_trace`:
OpenCV's border follower turned into pixel edges, GDAL's polygonizer where pixels meet at corners):
exact pixel-edge polygons with holes, 4-connectivity. Pixel (i, j) is the unit square
[j, j + 1) x [i, i + 1) (x right, y down), so a polygon covers exactly the pixels of its object.

Seams. A traced piece that touches no seam between two tiles (only the tile's inside or the image
border) is a whole object: it is final at once. A piece that touches a seam waits there. When the tile
on the other side of a seam arrives, the two sides' edges on the seam line are matched as intervals:
two pieces of one class whose seam edges overlap by a positive length share a pixel edge, so they are
4-connected (pieces meeting at one corner are not). Matched pieces form one group (union-find); a group
with no piece left on a seam whose other side is still missing is final: its pieces are unioned (GEOS,
only those few pieces) into the object's polygon. Nothing is ever built for the whole slide.

Order. Tiles may be added in any order (a slide job's tiles finish out of order); they are processed in
row-major order, which makes the output deterministic (same input, same polygons in the same order,
however the tiles arrived). A tile that is not due yet is kept as given: a loader callable costs no
memory until its turn. Memory: the tiles waiting for their turn, one tile's pixels, and the pieces
waiting on open seams (about one row of tiles' worth of seam-crossing objects).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from refseg.io.outlines_trace import label_array, require_tracers, trace_arrays
from refseg.optional import require

log = logging.getLogger(__name__)

TileData = Union[np.ndarray, Callable[[], "np.ndarray | None"], None]
"""One tile's labels: an (h, w) integer array, ``None`` (all background), or a zero-argument callable
returning either (read when the tile's turn comes)."""

Sink = Callable[[np.ndarray, np.ndarray], None]
"""Receives final objects: (N,) shapely Polygons in mask pixels and (N,) int64 class values."""

def _shapely():
    return require("shapely", extra="slides", purpose="Label outline polygons")


def require_outlines() -> None:
    """Import what tracing and writing outlines need (OpenCV, rasterio, shapely >= 2.1), so that a job
    can refuse early, before any model loads. Raises :class:`refseg.optional.MissingDependencyError`
    naming ``pip install 'refseg[slides]'``."""
    require_tracers()
    if not hasattr(_shapely(), "orient_polygons"):
        from refseg.optional import MissingDependencyError

        raise MissingDependencyError("Label outlines need shapely >= 2.1 (orient_polygons): "
                                     "pip install 'refseg[slides]' (or pip install -U shapely)")


def trace_tile(labels: np.ndarray, offset: tuple[int, int] = (0, 0), traced: tuple | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact outlines of every 4-connected region of equal non-zero label in ``labels``.

    Args:
        labels: (h, w) integer labels, 0 = background.
        offset: (x, y) pixel position of ``labels[0, 0]``, added to every coordinate.
        traced: :func:`trace_arrays` of ``labels`` when already computed (e.g. by a worker process).

    Returns:
        polygons (N,) shapely Polygons (holes as interiors), values (N,) int64 class of each,
        coords (V, 2) float64 (x, y) vertices of all rings (closed: first == last),
        ring_of (V,) ring index of each vertex, poly_of_ring (R,) polygon index of each ring.
    """
    shapely = _shapely()
    coords, ring_sizes, rings_per_polygon, values = traced if traced is not None else trace_arrays(labels, offset)
    ring_offsets = np.concatenate([[0], np.cumsum(ring_sizes)]).astype(np.int64)
    polygon_offsets = np.concatenate([[0], np.cumsum(rings_per_polygon)]).astype(np.int64)
    polygons = (shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_offsets, polygon_offsets))
                if len(values) else np.empty(0, object))
    ring_of = np.repeat(np.arange(len(ring_sizes)), ring_sizes)
    poly_of_ring = np.repeat(np.arange(len(values)), rings_per_polygon)
    return polygons, values, coords, ring_of, poly_of_ring


def seam_edges(coords: np.ndarray, ring_of: np.ndarray, axis: int, line: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ring edges lying on the seam line ``coords[:, axis] == line`` (axis 0: a vertical line x = line,
    axis 1: a horizontal line y = line), as intervals along the line.

    Returns:
        start (E,), end (E,) float64 positions along the line (start < end), ring (E,) ring index.
    """
    on = coords[:, axis] == line
    edge = on[:-1] & on[1:] & (ring_of[:-1] == ring_of[1:])
    k = np.flatnonzero(edge)
    a, b = coords[k, 1 - axis], coords[k + 1, 1 - axis]
    return np.minimum(a, b), np.maximum(a, b), ring_of[k]


def overlapping(a_start: np.ndarray, a_end: np.ndarray, b_start: np.ndarray, b_end: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) whose intervals [a_start[i], a_end[i]) and [b_start[j], b_end[j]) overlap by a
    positive length. ``b`` must be disjoint intervals sorted by start (then the ends are sorted too)."""
    lo = np.searchsorted(b_end, a_start, side="right")
    hi = np.searchsorted(b_start, a_end, side="left")
    count = np.maximum(hi - lo, 0)
    i = np.repeat(np.arange(len(a_start)), count)
    j = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count) + np.repeat(lo, count)
    return i, j


@dataclass
class _Seam:
    """One side of a seam whose other side has not been traced yet: its pieces' edges on the line."""

    start: np.ndarray   # (E,) sorted, disjoint
    end: np.ndarray     # (E,)
    cls: np.ndarray     # (E,) class value of the edge's piece
    piece: np.ndarray   # (E,) global piece id
    pieces: np.ndarray  # unique piece ids touching the seam (each holds one open count for it)


class OutlineTracer:
    """Streams the objects of a (height, width) label mask given tile by tile to ``sink``.

    ``tracer = OutlineTracer(width, height, tile, sink)``; then ``tracer.add_tile(row, col, labels)`` once
    for every tile of the grid, in any order; then ``tracer.close()``. Tile (row, col) covers pixels
    [col * tile, min((col + 1) * tile, width)) x [row * tile, min((row + 1) * tile, height)); ``sink``
    receives each final object once, as an exact pixel-edge polygon in mask pixels (x, y), with its class.
    """

    def __init__(self, width: int, height: int, tile: int, sink: Sink, workers: int = 0):
        if width <= 0 or height <= 0 or tile <= 0:
            raise ValueError(f"OutlineTracer: width, height and tile must be > 0, got {width}, {height}, {tile}")
        self.width, self.height, self.tile = int(width), int(height), int(tile)
        self.rows, self.cols = -(-self.height // self.tile), -(-self.width // self.tile)
        self.sink = sink
        self.tiles_done = 0      # tiles whose objects went to the sink (row-major prefix)
        self._submitted = 0      # tiles read and handed to tracing (row-major prefix)
        self._in_flight: collections.deque = collections.deque()  # (index, traced arrays or future or None)
        self._pool = None
        if workers > 1 and self.rows * self.cols > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # GDAL's polygonizer holds the GIL: tiles are traced in worker processes (spawned: no fork of
            # a threaded parent), seams and writing stay here, in order
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self._window = 2 * workers if self._pool else 0
        self.objects = 0
        self._waiting: dict[int, TileData] = {}   # row-major index -> tile not yet due
        self._seams: dict[tuple[str, int, int], _Seam] = {}  # open seam -> the traced side's edges
        self._parent: dict[int, int] = {}          # union-find over pieces waiting on seams
        self._members: dict[int, list[int]] = {}   # group root -> its pieces
        self._open: dict[int, int] = {}            # group root -> (piece, open seam) incidences
        self._geometry: dict[int, object] = {}     # piece -> polygon
        self._class: dict[int, int] = {}           # piece -> class value
        self._next_id = 0

    # -- public
    def add_tile(self, row: int, col: int, labels: TileData) -> None:
        """Give tile (row, col): an (h, w) integer array (larger arrays are cropped to the tile), ``None``
        for an all-background tile, or a callable returning either when the tile's turn comes."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise ValueError(f"tile ({row}, {col}) is outside the {self.rows} x {self.cols} grid")
        index = row * self.cols + col
        if index < self._submitted or index in self._waiting:
            raise ValueError(f"tile ({row}, {col}) was given twice")
        self._waiting[index] = labels
        while self._submitted in self._waiting:
            due = self._waiting.pop(self._submitted)
            self._submit(self._submitted, due() if callable(due) else due)
            self._submitted += 1
            self._drain(keep=self._window)

    def _submit(self, index: int, labels: np.ndarray | None) -> None:
        row, col = divmod(index, self.cols)
        x0, y0 = col * self.tile, row * self.tile
        h, w = min(self.tile, self.height - y0), min(self.tile, self.width - x0)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim != 2 or labels.shape[0] < h or labels.shape[1] < w:
                raise ValueError(f"tile ({row}, {col}): expected ({h}, {w}) labels, got {labels.shape}")
            labels = label_array(labels[:h, :w], f"tile ({row}, {col})")
        if labels is None or not labels.any():
            job = None
        elif self._pool is not None:
            job = self._pool.submit(trace_arrays, np.ascontiguousarray(labels), (x0, y0))
        else:
            job = trace_arrays(labels, (x0, y0))
        self._in_flight.append((index, job))

    def _drain(self, keep: int) -> None:
        """Join seams for traced tiles in order, until at most ``keep`` are in flight (finished ones go
        on at once)."""
        while self._in_flight and (len(self._in_flight) > keep or not hasattr(self._in_flight[0][1], "done")
                                   or self._in_flight[0][1].done()):
            index, job = self._in_flight.popleft()
            traced = job.result() if hasattr(job, "done") else job
            self._process(*divmod(index, self.cols), traced)
            self.tiles_done += 1

    def __enter__(self) -> "OutlineTracer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the worker processes (if any); :meth:`close` does it too."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    @property
    def complete(self) -> bool:
        """True once every tile has been given and traced (every object sent to the sink)."""
        return self.tiles_done == self.rows * self.cols

    def close(self) -> int:
        """Check that every tile was given; returns the number of objects sent to the sink.

        Raises:
            ValueError: tiles were never given (the first one missing is named)."""
        try:
            self._drain(keep=0)
        finally:
            self.shutdown()
        if not self.complete:
            missing = next(i for i in range(self._submitted, self.rows * self.cols) if i not in self._waiting)
            raise ValueError(f"OutlineTracer: {self.rows * self.cols - self._submitted - len(self._waiting)} "
                             f"tile(s) never given, first ({missing // self.cols}, {missing % self.cols})")
        if self._members or self._seams:  # every seam has both sides once every tile is traced
            raise RuntimeError(f"OutlineTracer: {len(self._members)} object(s) still waiting after the last tile")
        return self.objects

    # -- union-find
    def _find(self, piece: int) -> int:
        parent = self._parent
        while parent[piece] != piece:
            parent[piece] = parent[parent[piece]]
            piece = parent[piece]
        return piece

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if len(self._members[ra]) < len(self._members[rb]):
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._members[ra].extend(self._members.pop(rb))
        self._open[ra] += self._open.pop(rb)

    # -- one tile
    def _process(self, row: int, col: int, traced: tuple | None) -> None:
        shapely = _shapely()
        x0, y0 = col * self.tile, row * self.tile
        x1, y1 = min(x0 + self.tile, self.width), min(y0 + self.tile, self.height)
        if traced is None:
            polygons, values = np.empty(0, object), np.empty(0, np.int64)
            coords, ring_of, poly_of_ring = np.empty((0, 2)), np.empty(0, np.int64), np.empty(0, np.int64)
        else:
            polygons, values, coords, ring_of, poly_of_ring = trace_tile(None, (x0, y0), traced=traced)
        ids = self._next_id + np.arange(len(polygons))
        self._next_id += len(polygons)
        bounds = shapely.bounds(polygons).reshape(-1, 4)
        # side: (neighbour, seam key, axis, line, pieces touching it)
        sides = [((row, col - 1), ("v", row, col - 1), 0, x0, bounds[:, 0] == x0),
                 ((row, col + 1), ("v", row, col), 0, x1, bounds[:, 2] == x1),
                 ((row - 1, col), ("h", row - 1, col), 1, y0, bounds[:, 1] == y0),
                 ((row + 1, col), ("h", row, col), 1, y1, bounds[:, 3] == y1)]
        sides = [s for s in sides if 0 <= s[0][0] < self.rows and 0 <= s[0][1] < self.cols]
        on_seam = np.zeros(len(polygons), bool)
        open_count = np.zeros(len(polygons), np.int64)
        for (r, c), _, _, _, touch in sides:
            on_seam |= touch
            if r * self.cols + c >= self.tiles_done:  # neighbour not traced yet: this seam stays open
                open_count += touch
        inside = ~on_seam
        for k in np.flatnonzero(on_seam):
            pid = int(ids[k])
            self._parent[pid] = pid
            self._members[pid] = [pid]
            self._open[pid] = int(open_count[k])
            self._geometry[pid] = polygons[k]
            self._class[pid] = int(values[k])
        candidates = [int(p) for p in ids[on_seam]]
        for (r, c), key, axis, line, touch in sides:
            if r * self.cols + c >= self.tiles_done:
                if touch.any():
                    start, end, piece = self._edges(coords, ring_of, poly_of_ring, axis, line)
                    self._seams[key] = _Seam(start, end, values[piece], ids[piece], np.unique(ids[piece]))
                continue
            other = self._seams.pop(key, None)
            if other is None:  # nothing of the neighbour reaches this seam
                continue
            if touch.any():
                start, end, piece = self._edges(coords, ring_of, poly_of_ring, axis, line)
                i, j = overlapping(start, end, other.start, other.end)
                same = values[piece[i]] == other.cls[j]
                for a, b in zip(ids[piece[i[same]]], other.piece[j[same]]):
                    self._union(int(a), int(b))
            for pid in other.pieces:
                self._open[self._find(int(pid))] -= 1
            candidates.extend(int(p) for p in other.pieces)
        groups = [self._finish_group(root) for root in dict.fromkeys(self._find(p) for p in candidates)
                  if self._open[root] == 0]
        groups.sort(key=lambda g: g[0])
        merged = np.array([g[1][0] for g in groups], object)
        several = np.flatnonzero([len(g[1]) > 1 for g in groups])
        if len(several):
            merged[several] = self._merge([groups[k][1] for k in several])
        out = np.concatenate([polygons[inside], merged]) if len(merged) else polygons[inside]
        if len(out):
            classes = np.concatenate([values[inside], np.array([g[2] for g in groups], np.int64)])
            bad = shapely.get_type_id(out) != shapely.GeometryType.POLYGON
            if bad.any():
                raise RuntimeError(f"OutlineTracer: {int(bad.sum())} object(s) of tile ({row}, {col}) did not merge "
                                   "into one polygon")
            self.sink(out, classes)
            self.objects += len(out)

    @staticmethod
    def _edges(coords, ring_of, poly_of_ring, axis, line):
        """This tile's edges on a seam line, sorted: start, end, local piece index."""
        start, end, ring = seam_edges(coords, ring_of, axis, line)
        order = np.argsort(start, kind="stable")
        return start[order], end[order], poly_of_ring[ring[order]]

    @staticmethod
    def _merge(groups: list[list]) -> np.ndarray:
        """One polygon per group of edge-sharing pieces, exact.

        A piece's holes never reach its tile's border (background touching the border is outside the piece
        in that tile), so they lie off every seam and stay holes of the object as they are: only the pieces'
        shells are merged, by GEOS's buffer(0) (their union; 2-3x faster than union_all on these inputs),
        and the pieces' holes are put back. GEOS is slow on polygons with many holes (a speckled object of
        69 pieces and 663 holes: 1.3 s with its holes, 0.04 s without). Any result that is not one polygon
        of the pieces' total area (integer areas: exact) is redone with union_all."""
        shapely = _shapely()
        sizes = [len(g) for g in groups]
        pieces = np.empty(sum(sizes), object)
        pieces[:] = [p for g in groups for p in g]
        group_of = np.repeat(np.arange(len(groups)), sizes)
        shells = shapely.polygons(shapely.get_exterior_ring(pieces))
        merged = shapely.buffer(shapely.multipolygons(shells, indices=group_of), 0.0)
        # the seams leave collinear vertices, which Douglas-Peucker at tolerance 0 drops (that cannot change
        # the shape, so the fast variant is safe); the pieces' holes have none (outlines_trace drops them)
        merged = shapely.simplify(merged, 0.0, preserve_topology=False)
        rings, ring_group = shapely.get_rings(merged, return_index=True)  # each result's exterior first
        piece_rings, ring_piece = shapely.get_rings(pieces, return_index=True)
        hole = np.ones(len(piece_rings), bool)
        hole[np.unique(ring_piece, return_index=True)[1]] = False  # each piece's first ring is its shell
        rings = np.concatenate([rings, piece_rings[hole]])
        ring_group = np.concatenate([ring_group, group_of[ring_piece[hole]]])
        order = np.argsort(ring_group, kind="stable")
        out = np.full(len(groups), None, object)  # a group without rings (not one polygon) stays None: redone
        shapely.polygons(rings[order], indices=ring_group[order], out=out)
        area = np.bincount(group_of, weights=shapely.area(pieces), minlength=len(groups))
        wrong = np.flatnonzero((shapely.get_type_id(merged) != shapely.GeometryType.POLYGON)
                               | (shapely.area(out) != area))
        if len(wrong):
            redone = np.empty(len(wrong), object)
            redone[:] = [shapely.union_all(groups[k]) for k in wrong]
            out[wrong] = shapely.simplify(redone, 0.0, preserve_topology=False)
        return out

    def _finish_group(self, root: int) -> tuple[int, list, int]:
        """Remove a final group; returns (its first piece id, its pieces' polygons, its class)."""
        pieces = self._members.pop(root)
        del self._open[root]
        geometries = [self._geometry.pop(p) for p in pieces]
        value = self._class[root]
        for p in pieces:
            del self._parent[p], self._class[p]
        return min(pieces), geometries, value
