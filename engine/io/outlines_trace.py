"""Exact pixel-edge outlines of one label tile: every 4-connected region of one class, holes kept.

Pixel (i, j) is the unit square [j, j + 1) x [i, i + 1) (x right, y down); an outline runs along pixel
edges ("cracks"), so the polygon covers exactly the pixels of its object. Per class of the tile:

1. OpenCV (``cv2.findContours(RETR_CCOMP, CHAIN_APPROX_NONE)``, C++) follows every outer border and hole
   border as a chain of border pixel centres. :func:`chain_to_cracks` turns the chains into pixel-edge
   rings exactly, vectorised: at each border pixel, turning from the previous chain pixel to the next
   one in the tracer's search direction, every 4-neighbour passed over is outside, and the pixel edge
   facing it is an outline edge.
2. OpenCV joins a class's pixels by 8-connectivity. Where two pixels meet only at a corner, the rings
   of that OpenCV polygon pass the corner twice (and only there): those few polygons are rebuilt valid
   by GEOS (``buffer(0)``, checked against the rings' area), which splits them at the corner: objects
   meeting at a corner become separate polygons (4-connectivity), a pinched object keeps a hole that
   touches its shell at one point.
3. A class with more such polygons in the tile than :data:`CORNER_LIMIT` (speckle) is traced by GDAL's
   polygonizer instead (``rasterio.features.shapes``, 4-connectivity, pixel edges natively; 30-60 ns per
   pixel on the benchmark's tiles, 1.5-2x the OpenCV path).

All paths return the same arrays (:func:`trace_arrays`), cheap to send between processes; which path a
class takes depends on its pixels only.
"""
from __future__ import annotations

import itertools

import numpy as np

from refseg.optional import require

_LABEL_DTYPES = (np.uint8, np.uint16, np.int32)  # read as they are by both tracers

# the 8 neighbour directions k (angle 45k degrees, x right, y down): E, SE, S, SW, W, NW, N, NE
_DX = np.array([1, 1, 0, -1, -1, -1, 0, 1])
_DY = np.array([0, 1, 1, 1, 0, -1, -1, -1])
_CODE = np.full(9, -1, np.int64)  # step (dx, dy) in -1..1 -> direction, at (dy + 1) * 3 + dx + 1
_CODE[(_DY + 1) * 3 + _DX + 1] = np.arange(8)
_SEARCH = -1  # the rotation sense in which OpenCV's border follower passes over the outside neighbours


def _corner_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For a border pixel entered from direction ``back`` and left after turning ``turn`` eighths (9: a
    lone pixel), indexed ``back * 10 + turn``: how many outline corners it adds (count (80,)), their
    (x, y) offsets from the pixel's top-left corner (dx, dy (80, 4)) in order, and the direction of the
    neighbour each one's edge faces (face (80, 4)). Turning from ``back``, every 4-neighbour passed over
    is outside; the edge facing it ends at the corner 45 degrees further on."""
    count = np.zeros(80, np.int64)
    dx, dy, face = (np.zeros((80, 4), np.int64) for _ in range(3))
    for back in range(8):
        for turn in range(1, 10):
            at = back * 10 + turn
            for step in range(1, min(turn, 9)):
                direction = (back + _SEARCH * step) % 8
                if direction % 2 == 0:
                    corner = (direction + _SEARCH) % 8
                    k = count[at]
                    dx[at, k], dy[at, k], face[at, k] = (_DX[corner] + 1) // 2, (_DY[corner] + 1) // 2, direction
                    count[at] += 1
    return count, dx, dy, face


_CORNER_COUNT, _CORNER_DX, _CORNER_DY, _CORNER_FACE = _corner_table()


def _features():
    return require("rasterio.features", extra="slides", purpose="Tracing label outlines")


def _cv2():
    return require("cv2", extra="slides", purpose="Tracing label outlines", package="opencv-python-headless")


def require_tracers() -> None:
    """Import OpenCV and rasterio (GDAL), or raise MissingDependencyError naming ``refseg[slides]``."""
    _cv2()
    _features()


def label_array(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    """``labels`` as a 2-D array of uint8, uint16 or int32 (other integer types converted to int32).

    Raises:
        ValueError: naming ``what``: not 2-D, not an integer (or bool) type, negative or > 2**31 - 1.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{what}: a label mask has one channel, got an array of shape {labels.shape}")
    if labels.dtype == bool:
        return labels.view(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}: not a label mask (dtype {labels.dtype}; labels are integers)")
    if labels.dtype.type in _LABEL_DTYPES and not (labels.dtype == np.int32 and labels.size and labels.min() < 0):
        return labels
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what}: label values must lie in 0..{np.iinfo(np.int32).max}")
    return labels.astype(np.int32)


def chain_to_cracks(chains: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-edge rings from OpenCV border chains (CHAIN_APPROX_NONE); where a chain passes a corner contact
    (8-connectivity) its ring touches itself there (see :func:`trace_arrays`).

    Args:
        chains: closed chains of 8-adjacent border pixels, each (n, 1, 2) int (x, y) pixel indices.

    Returns:
        coords (V, 2) float64 ring vertices at pixel corners, each ring closed (first == last) and without
        collinear vertices; ring_sizes (R,) int64, one ring per chain.
    """
    lengths = np.array([len(c) for c in chains], np.int64)
    points = np.concatenate(chains).reshape(-1, 2)
    first = np.cumsum(lengths) - lengths
    last = first + lengths - 1
    ahead = np.empty_like(points)
    ahead[:-1] = points[1:] - points[:-1]
    ahead[last] = points[first] - points[last]            # chains are closed
    k_ahead = _CODE[(ahead[:, 1] + 1) * 3 + ahead[:, 0] + 1]  # chain neighbours are 8-adjacent
    k_back = np.empty_like(k_ahead)
    k_back[1:] = k_ahead[:-1]
    k_back[first] = k_ahead[last]
    k_back = (k_back + 4) % 8                             # towards the previous chain pixel
    turn = (k_ahead - k_back) * _SEARCH % 8
    turn[turn == 0] = 8                                   # back the way it came: all the way round
    lone = first[lengths == 1]
    turn[lone], k_back[lone] = 9, 0                       # a lone pixel: all four edges
    at = k_back * 10 + turn
    count = _CORNER_COUNT[at]
    emit = np.arange(4) < count[:, None]
    vx = (points[:, 0, None] + _CORNER_DX[at])[emit]
    vy = (points[:, 1, None] + _CORNER_DY[at])[emit]
    face = _CORNER_FACE[at][emit]
    # a corner between two edges facing the same way is collinear: keep the others (cyclically per ring)
    sizes = np.add.reduceat(count, first)
    start = np.cumsum(sizes) - sizes
    following = np.empty_like(face)
    following[:-1] = face[1:]
    following[start + sizes - 1] = face[start]
    keep = face != following
    ring = np.repeat(np.arange(len(chains)), sizes)[keep]
    vx, vy = vx[keep], vy[keep]
    sizes = np.bincount(ring, minlength=len(chains))
    start = np.cumsum(sizes) - sizes
    coords = np.empty((len(vx) + len(sizes), 2), np.float64)  # each ring closed by its first vertex again
    at = np.arange(len(vx)) + ring
    coords[at, 0], coords[at, 1] = vx, vy
    end = start + sizes + np.arange(len(sizes))
    coords[end, 0], coords[end, 1] = vx[start], vy[start]
    return coords, sizes + 1


def _opencv_class(labels: np.ndarray, value: int) -> tuple[list[np.ndarray], np.ndarray, int]:
    """OpenCV border chains of the pixels of class ``value`` in (h, w) ``labels``, ordered polygon by
    polygon (outer border, then its holes): chains, rings per polygon (N,), N."""
    cv2 = _cv2()
    h, w = labels.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)  # a frame of background: border pixels are traced too
    np.equal(labels, value, out=padded[1:-1, 1:-1].view(bool))
    chains, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE, offset=(-1, -1))
    if not chains:
        return [], np.empty(0, np.int64), 0
    parent = hierarchy.reshape(-1, 4)[:, 3]
    outer = np.flatnonzero(parent < 0)
    polygon = np.empty(len(chains), np.int64)
    polygon[outer] = np.arange(len(outer))
    polygon[parent >= 0] = polygon[parent[parent >= 0]]
    order = np.lexsort((np.arange(len(chains)), parent >= 0, polygon))  # by polygon, its outer border first
    return [chains[i] for i in order], np.bincount(polygon, minlength=len(outer)), len(outer)


def _gdal_class(labels: np.ndarray) -> tuple[list, list[int], list[int], list[int]]:
    """GDAL's polygons of the non-zero labels: points (list of (x, y)), ring sizes, rings per polygon, values."""
    points: list = []
    ring_sizes: list[int] = []
    rings_per_polygon: list[int] = []
    values: list[int] = []
    for geometry, value in _features().shapes(labels, mask=labels > 0, connectivity=4):
        rings = geometry["coordinates"]
        for ring in rings:
            points.extend(ring)
            ring_sizes.append(len(ring))
        rings_per_polygon.append(len(rings))
        values.append(int(value))
    return points, ring_sizes, rings_per_polygon, values


def _split_corners(coords: np.ndarray, ring_sizes: np.ndarray, rings: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Polygons (ragged arrays, as :func:`trace_arrays` returns them) whose rings meet a corner contact,
    rebuilt valid by GEOS: a ring that passes a corner twice is split there, so that objects meeting at a
    corner become separate polygons (4-connectivity) and a pinched object one polygon whose hole touches
    its shell."""
    shapely = require("shapely", extra="slides", purpose="Label outline polygons")
    offsets = (np.concatenate([[0], np.cumsum(ring_sizes)]), np.concatenate([[0], np.cumsum(rings)]))
    polygons = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, offsets)
    # buffer(0) rebuilds them ~2.5x faster than make_valid; a result that is not polygons of the rings'
    # (shoelace) area is redone by make_valid's "structure" method
    valid = shapely.buffer(polygons, 0.0)
    wrong = (shapely.area(valid) != shapely.area(polygons)) | ~np.isin(
        shapely.get_type_id(valid), [shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON])
    if wrong.any():
        valid[wrong] = shapely.make_valid(polygons[wrong], method="structure", keep_collapsed=False)
    fixed = shapely.get_parts(valid)
    fixed = fixed[shapely.get_type_id(fixed) == shapely.GeometryType.POLYGON]
    if not len(fixed):
        return np.empty((0, 2)), np.empty(0, np.int64), np.empty(0, np.int64)
    _, xy, (ring_offsets, polygon_offsets) = shapely.to_ragged_array(fixed)
    return xy, np.diff(ring_offsets), np.diff(polygon_offsets)


CORNER_LIMIT = 256
"""A class with more OpenCV polygons holding corner contacts in one tile than this (speckle) is traced by
GDAL instead of being fixed polygon by polygon; the choice depends on the pixels only."""


def trace_arrays(labels: np.ndarray, offset: tuple[int, int] = (0, 0)
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact outlines of every 4-connected region of equal non-zero label in ``labels`` (h, w).

    Returns:
        coords (V, 2) float64 (x, y) vertices of all rings (each closed, shifted by ``offset`` (x, y)),
        ring_sizes (R,) vertices per ring, rings (N,) rings per polygon (its exterior first, then its
        holes), values (N,) int64 class of each polygon. The order is fixed by the pixels.
    """
    labels = np.ascontiguousarray(label_array(labels))
    if labels.dtype == np.uint8:
        present = np.flatnonzero(_cv2().calcHist([labels], [0], None, [256], [0, 256]).ravel()[1:]) + 1
    else:
        present = np.unique(labels[labels > 0])
    parts: list[tuple] = []
    slow: list[int] = []
    for value in (int(v) for v in present):
        chains, per_polygon, count = _opencv_class(labels, value)
        if not count:
            continue
        xy, sizes = chain_to_cracks(chains)
        # a corner contact is a vertex met twice by the rings of one OpenCV polygon (never otherwise)
        polygon = np.repeat(np.repeat(np.arange(count), per_polygon), sizes)
        last = np.cumsum(sizes) - 1                     # the closing vertices repeat their ring's first
        inner = np.ones(len(xy), bool)
        inner[last] = False
        keys = (xy[inner, 1] * (labels.shape[1] + 1) + xy[inner, 0]).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        twice = np.flatnonzero(keys[order][1:] == keys[order][:-1])
        bad = np.unique(polygon[inner][order[twice]])
        if len(bad) > CORNER_LIMIT:
            slow.append(value)
            continue
        if len(bad):
            good = np.ones(count, bool)
            good[bad] = False
            ring_good = np.repeat(good, per_polygon)
            fixed = _split_corners(xy[~good[polygon]], sizes[~ring_good], per_polygon[~good])
            parts.append((xy[good[polygon]], sizes[ring_good], per_polygon[good], np.full(good.sum(), value)))
            parts.append((*fixed, np.full(len(fixed[2]), value)))
        else:
            parts.append((xy, sizes, per_polygon, np.full(count, value)))
    if slow:  # one GDAL pass over the speckled classes
        points, sizes, per_polygon, found = _gdal_class(np.where(np.isin(labels, slow), labels, 0)
                                                        .astype(labels.dtype))
        parts.append((np.fromiter(itertools.chain.from_iterable(points), np.float64,
                                  2 * len(points)).reshape(-1, 2), sizes, per_polygon, found))
    if not parts:
        return np.empty((0, 2)), np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    xy = np.concatenate([p[0] for p in parts]).astype(np.float64)
    xy += offset
    return (xy, np.concatenate([np.asarray(p[1], np.int64) for p in parts]),
            np.concatenate([np.asarray(p[2], np.int64) for p in parts]),
            np.concatenate([np.asarray(p[3], np.int64) for p in parts]))
