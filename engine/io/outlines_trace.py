"""Exact pixel-edge outlines of one label tile: every 4-connected region of one class, holes kept.

Pixel (i, j) is the unit square [j, j + 1) x [i, i + 1) (x right, y down); an outline runs along pixel
edges ("cracks"), so the polygon covers exactly the pixels of its object. Two tracers, both in C:

- OpenCV (fast path, ~15x GDAL's speed): ``cv2.findContours(RETR_CCOMP, CHAIN_APPROX_NONE)`` on the class's
  binary mask gives, for each outer border and each hole, the chain of border pixel centres. OpenCV joins
  foreground pixels by 8-connectivity (holes by 4): for a class with no 2 x 2 "saddle" (two pixels of the
  class meeting only at a corner) 8- and 4-connectivity give the same objects and holes, and the crack
  outline follows from the chain exactly: at each border pixel, turning from the previous chain pixel to
  the next one in the tracer's search direction, every 4-neighbour passed over is outside, and the pixel
  edge facing it is an outline edge (:func:`chain_to_cracks`, vectorised over all chains of the tile).
- GDAL (``rasterio.features.shapes``, 4-connectivity) for a class whose mask has a saddle: its polygonizer
  follows pixel edges itself and splits objects at corners; ~15-40 ns per pixel.

Both return the same arrays (:func:`trace_arrays`), cheap to send between processes.
"""
from __future__ import annotations

import itertools

import numpy as np

from refseg.optional import require

_LABEL_DTYPES = (np.uint8, np.uint16, np.int16, np.int32)  # what GDAL's polygonizer takes as is

# the 8 neighbour directions k (angle 45k degrees, x right, y down): E, SE, S, SW, W, NW, N, NE
_DX = np.array([1, 1, 0, -1, -1, -1, 0, 1])
_DY = np.array([0, 1, 1, 1, 0, -1, -1, -1])
_CODE = np.full((3, 3), -1, np.int64)
_CODE[_DY + 1, _DX + 1] = np.arange(8)
_SEARCH = -1  # the rotation sense in which OpenCV's border follower passes over the outside neighbours


def _features():
    return require("rasterio.features", extra="slides", purpose="Tracing label outlines")


def _cv2():
    return require("cv2", extra="slides", purpose="Tracing label outlines")


def require_tracers() -> None:
    """Import OpenCV and rasterio (GDAL), or raise MissingDependencyError naming ``refseg[slides]``."""
    _cv2()
    _features()


def label_array(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    """``labels`` as a 2-D array of uint8, uint16, int16 or int32 (what both tracers read).

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
    if labels.dtype.type in _LABEL_DTYPES and labels.dtype != np.int16:
        return labels
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{what}: label values must lie in 0..{np.iinfo(np.int32).max}")
    return labels.astype(np.int32)


def saddle_classes(labels: np.ndarray) -> set[int]:
    """Classes (> 0) having two pixels that meet only at a corner (a 2 x 2 block a b / c d with a == d,
    b != a, c != a, or the mirror case): there 8- and 4-connectivity differ."""
    a, b, c, d = labels[:-1, :-1], labels[:-1, 1:], labels[1:, :-1], labels[1:, 1:]
    main = (a == d) & (a != b) & (a != c) & (a > 0)
    anti = (b == c) & (b != a) & (b != d) & (b > 0)
    return {int(v) for v in np.unique(np.concatenate([a[main], b[anti]]))}


def chain_to_cracks(chains: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-edge rings from OpenCV border chains (CHAIN_APPROX_NONE) of a class without saddles.

    Args:
        chains: closed chains of 8-adjacent border pixels, each (n, 1, 2) int (x, y) pixel indices.

    Returns:
        coords (V, 2) float64 ring vertices at pixel corners, each ring closed (first == last) and without
        collinear vertices; ring_sizes (R,) int64, one ring per chain.
    """
    lengths = np.array([len(c) for c in chains], np.int64)
    points = np.concatenate(chains).reshape(-1, 2).astype(np.int64)
    first = np.cumsum(lengths) - lengths
    chain = np.repeat(np.arange(len(chains)), lengths)
    index = np.arange(len(points))
    position = index - first[chain]
    prev = np.where(position == 0, index + lengths[chain] - 1, index - 1)
    succ = np.where(position == lengths[chain] - 1, first[chain], index + 1)
    back = points[prev] - points
    ahead = points[succ] - points
    k_back = _CODE[np.clip(back[:, 1], -1, 1) + 1, np.clip(back[:, 0], -1, 1) + 1]
    k_ahead = _CODE[np.clip(ahead[:, 1], -1, 1) + 1, np.clip(ahead[:, 0], -1, 1) + 1]
    turn = (k_ahead - k_back) * _SEARCH % 8
    turn[turn == 0] = 8                     # back the way it came: all the way round
    turn[lengths[chain] == 1] = 9           # a lone pixel: all four edges
    k_back[lengths[chain] == 1] = 0
    step = np.arange(1, 9)
    direction = (k_back[:, None] + _SEARCH * step) % 8          # neighbours passed over, in search order
    emit = (step < turn[:, None]) & (direction % 2 == 0)        # the 4-neighbours among them are outside
    corner = (direction + _SEARCH) % 8                          # end corner of the edge facing that neighbour
    x = points[:, 0, None] + (_DX[corner] + 1) // 2
    y = points[:, 1, None] + (_DY[corner] + 1) // 2
    vx, vy = x[emit], y[emit]
    ring = np.repeat(chain, emit.sum(1))
    # drop collinear vertices: keep a vertex where the edge direction changes (cyclically within its ring)
    sizes = np.bincount(ring, minlength=len(chains))
    start = np.cumsum(sizes) - sizes
    at = np.arange(len(vx)) - start[ring]
    before = np.where(at == 0, np.arange(len(vx)) + sizes[ring] - 1, np.arange(len(vx)) - 1)
    after = np.where(at == sizes[ring] - 1, start[ring], np.arange(len(vx)) + 1)
    keep = ~(((vx[before] == vx) & (vx == vx[after])) | ((vy[before] == vy) & (vy == vy[after])))
    vx, vy, ring = vx[keep], vy[keep], ring[keep]
    sizes = np.bincount(ring, minlength=len(chains))
    closing = np.cumsum(sizes) - sizes                           # repeat each ring's first vertex at its end
    order = np.argsort(np.concatenate([np.arange(len(vx)), np.cumsum(sizes) - 0.5]), kind="stable")
    coords = np.stack([np.concatenate([vx, vx[closing]]), np.concatenate([vy, vy[closing]])], 1)[order]
    return coords.astype(np.float64), sizes + 1


def _opencv_class(mask: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, int]:
    """OpenCV border chains of a binary (h, w) uint8 mask, ordered polygon by polygon (outer border, then
    its holes): chains, rings per polygon (N,), N."""
    cv2 = _cv2()
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)  # border pixels are traced too
    chains, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE, offset=(-1, -1))
    if not chains:
        return [], np.empty(0, np.int64), 0
    parent = hierarchy[0][:, 3]
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


def trace_arrays(labels: np.ndarray, offset: tuple[int, int] = (0, 0)
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact outlines of every 4-connected region of equal non-zero label in ``labels`` (h, w).

    Returns:
        coords (V, 2) float64 (x, y) vertices of all rings (each closed, shifted by ``offset`` (x, y)),
        ring_sizes (R,) vertices per ring, rings (N,) rings per polygon (its exterior first, then its
        holes), values (N,) int64 class of each polygon. The order is fixed by the pixels (the OpenCV
        classes in increasing order, then the GDAL ones).
    """
    labels = label_array(labels)
    if labels.dtype.itemsize <= 2 and labels.dtype.kind == "u":
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=1)[1:]) + 1
    else:
        present = np.unique(labels[labels > 0])
    corner = saddle_classes(labels)
    coords, ring_sizes, rings, values = [], [], [], []
    slow = [int(v) for v in present if int(v) in corner]
    for value in present:
        if int(value) in corner:
            continue
        chains, per_polygon, count = _opencv_class((labels == value).view(np.uint8))
        if count:
            xy, sizes = chain_to_cracks(chains)
            coords.append(xy)
            ring_sizes.append(sizes)
            rings.append(per_polygon)
            values.append(np.full(count, value, np.int64))
    if slow:  # one GDAL pass over the classes with saddles
        points, sizes, per_polygon, found = _gdal_class(np.where(np.isin(labels, slow), labels, 0)
                                                        .astype(labels.dtype))
        coords.append(np.fromiter(itertools.chain.from_iterable(points), np.float64,
                                  2 * len(points)).reshape(-1, 2))
        ring_sizes.append(np.asarray(sizes, np.int64))
        rings.append(np.asarray(per_polygon, np.int64))
        values.append(np.asarray(found, np.int64))
    if not values:
        return np.empty((0, 2)), np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    xy = np.concatenate(coords)
    xy += offset
    return xy, np.concatenate(ring_sizes), np.concatenate(rings), np.concatenate(values)
