"""QuPath-compatible GeoJSON: annotations in (reference masks) and label masks out (polygons).

Format (what QuPath exports and imports): a ``FeatureCollection`` of ``Feature`` objects whose
geometry is a ``Polygon`` or ``MultiPolygon`` in **level-0 pixel coordinates** (x to the right, y down,
origin the top-left corner of the slide's top-left pixel), holes as interior rings, and properties
``{"objectType": "annotation", "classification": {"name": str, "color": [r, g, b]}}``. Exterior rings
are counter-clockwise and holes clockwise in (x, y) (RFC 7946 orientation rule).

Pixel (i, j) of a mask is the unit square [j, j + 1) x [i, i + 1) before scaling, so a traced polygon
covers exactly the foreground pixels; simplification (Douglas-Peucker with topology preserved) then
smooths the staircase by a tolerance given in level-0 pixels. Polygon work uses shapely
(``pip install 'refseg[slides]'``), imported on first use.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from refseg.io.writers import atomic_writer
from refseg.optional import require

log = logging.getLogger(__name__)


def _shapely():
    return require("shapely", extra="slides", purpose="GeoJSON polygons")


@dataclass(frozen=True)
class Annotation:
    """One annotation polygon read from GeoJSON: a shapely (Multi)Polygon in level-0 pixels."""

    geometry: object
    name: str
    color: tuple[int, int, int] | None


def read_annotations(path: str | os.PathLike) -> list[Annotation]:
    """Polygon / MultiPolygon annotations of a GeoJSON file (FeatureCollection, a list of features or
    one Feature, as QuPath writes them). Other geometry types are skipped with a warning.

    Raises:
        ValueError: naming the file: not JSON, not GeoJSON features, or no polygon at all.
    """
    shapely = _shapely()
    from shapely.geometry import shape

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable GeoJSON file ({exc})") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection, Feature or list of features")
    out, skipped = [], 0
    for i, feature in enumerate(features):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            skipped += 1
            continue
        try:
            geom = shape(geometry)
        except Exception as exc:
            raise ValueError(f"{path}: feature {i} has an invalid geometry ({exc})") from exc
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        cls = (feature.get("properties") or {}).get("classification") or {}
        colour = cls.get("color") if isinstance(cls, dict) else None
        out.append(Annotation(geom, str(cls.get("name", "foreground")) if isinstance(cls, dict) else "foreground",
                              tuple(int(c) for c in colour[:3]) if isinstance(colour, list) else None))
    if skipped:
        log.warning("%s: %d feature(s) without Polygon/MultiPolygon geometry ignored", path, skipped)
    if not out:
        raise ValueError(f"{path}: holds no Polygon or MultiPolygon annotation")
    return out


def class_values(annotations: Iterable[Annotation]) -> dict[str, int]:
    """Class name -> label value 1..K, in order of first appearance."""
    values: dict[str, int] = {}
    for a in annotations:
        values.setdefault(a.name, len(values) + 1)
    return values


def rasterize(annotations: list[Annotation], origin: tuple[float, float], downsample: float,
              size: tuple[int, int], values: dict[str, int]) -> np.ndarray:
    """Label mask (H, W) uint8 of ``annotations`` over the region whose top-left is ``origin`` (level-0
    px), sampled every ``downsample`` level-0 px; ``size`` is (W, H). Holes are cleared; later
    annotations are drawn over earlier ones."""
    width, height = size
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    ox, oy = origin

    def ring(coords) -> list[tuple[float, float]]:
        return [((x - ox) / downsample, (y - oy) / downsample) for x, y in coords]

    for a in annotations:
        polygons = getattr(a.geometry, "geoms", [a.geometry])
        for polygon in polygons:
            if polygon.geom_type != "Polygon" or polygon.is_empty:
                continue
            draw.polygon(ring(polygon.exterior.coords), fill=values[a.name])
            for hole in polygon.interiors:
                draw.polygon(ring(hole.coords), fill=0)
    return np.asarray(canvas, dtype=np.uint8).copy()


def _runs(edges: np.ndarray, saddle: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal straight runs of unit boundary edges along rows: (row, x_start, x_end) arrays.

    ``edges[r, x]`` is the edge from corner (x, r) to (x + 1, r); a run is broken at saddle corners
    (``saddle[r, x]``) so that crossing runs meet at their end points (noded line work)."""
    cont = np.zeros_like(edges)
    cont[:, 1:] = edges[:, :-1] & edges[:, 1:] & ~saddle[:, 1:-1]
    rows, cols = np.nonzero(edges)
    start = ~cont[rows, cols]
    first = np.flatnonzero(start)
    last = np.append(first[1:], len(rows)) - 1
    return rows[first], cols[first], cols[last] + 1


def mask_polygons(mask: np.ndarray, value: int, offset: tuple[int, int] = (0, 0)):
    """The pixels of ``mask == value`` as one shapely geometry (exact pixel outlines, holes kept),
    shifted by ``offset`` (x, y) pixels; ``None`` when no pixel has the value.

    The boundary between value and other pixels is cut into maximal horizontal / vertical segments,
    polygonised, and the faces lying on the value are unioned (pixels touching only at a corner stay
    separate polygons)."""
    shapely = _shapely()
    hit = np.asarray(mask) == value
    if not hit.any():
        return None
    height, width = hit.shape
    p = np.pad(hit, 1)
    horizontal = p[1:, 1:-1] != p[:-1, 1:-1]  # (H + 1, W): edge along y = r, x in [c, c + 1)
    vertical = p[1:-1, 1:] != p[1:-1, :-1]    # (H, W + 1): edge along x = c, y in [r, r + 1)
    tl, tr, bl, br = p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]
    saddle = (tl == br) & (tr == bl) & (tl != tr)  # (H + 1, W + 1) corners
    ox, oy = offset
    r, x0, x1 = _runs(horizontal, saddle)
    c, y0, y1 = _runs(vertical.T, saddle.T)
    starts = np.concatenate([np.stack([x0, r], 1), np.stack([c, y0], 1)]) + (ox, oy)
    ends = np.concatenate([np.stack([x1, r], 1), np.stack([c, y1], 1)]) + (ox, oy)
    lines = shapely.linestrings(np.stack([starts, ends], 1).astype(np.float64))
    faces = shapely.get_parts(shapely.polygonize(lines))
    inside = shapely.get_coordinates(shapely.point_on_surface(faces)) - (ox, oy)
    keep = hit[np.clip(np.floor(inside[:, 1]).astype(int), 0, height - 1),
               np.clip(np.floor(inside[:, 0]).astype(int), 0, width - 1)]
    return shapely.union_all(faces[keep])


def union(parts: list):
    """One geometry covering ``parts`` (tile pieces of a class meet along shared edges and merge)."""
    return _shapely().union_all([p for p in parts if p is not None])


def to_features(geometries: dict[int, object], scale: float, simplify: float,
                names: dict[int, tuple[str, tuple[int, int, int]]], bounds: tuple[int, int],
                namespace: str = "refseg") -> Iterator[dict]:
    """GeoJSON features (yielded one at a time), one per connected polygon, from class value ->
    geometry in mask pixels.

    ``scale`` converts mask pixels to level-0 pixels; ``simplify`` is the tolerance in level-0 pixels
    (0 = keep the pixel outline); ``names`` gives each class its QuPath name and colour; results are
    clipped to ``bounds`` (level-0 W, H). Feature ids are UUIDs derived from ``namespace`` and order.
    """
    shapely = _shapely()
    from shapely import affinity
    from shapely.geometry import box, mapping
    from shapely.geometry.polygon import orient

    frame = box(0, 0, *bounds)
    count = 0
    for value in sorted(geometries):
        geom = geometries[value]
        if geom is None or geom.is_empty:
            continue
        geom = affinity.scale(geom, xfact=scale, yfact=scale, origin=(0, 0))
        if simplify > 0:
            geom = geom.simplify(simplify, preserve_topology=True)
        geom = geom.intersection(frame)
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
        name, colour = names[value]
        parts = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type == "Polygon" and not g.is_empty]
        for polygon in parts:
            yield {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}#{count}")),
                "geometry": mapping(orient(polygon, sign=1.0)),
                "properties": {"objectType": "annotation", "isLocked": False,
                               "classification": {"name": name, "color": [int(c) for c in colour]}},
            }
            count += 1


def write_geojson(path: str | os.PathLike, features: Iterable[dict]) -> int:
    """Write ``features`` as a FeatureCollection, streamed one feature at a time (atomic, UTF-8);
    returns the number of features. Features hold plain JSON types (tuples are written as arrays)."""
    count = 0
    with atomic_writer(path, "w") as handle:
        handle.write('{"type": "FeatureCollection", "features": [')
        for feature in features:
            handle.write(("\n" if count == 0 else ",\n") + json.dumps(feature, allow_nan=False))
            count += 1
        handle.write("\n]}\n")
    return count


def write_tile_outlines(path: str | os.PathLike, tiles: Iterable[tuple[int, int, np.ndarray]], scale: float,
                        simplify: float, names: dict[int, tuple[str, tuple[int, int, int]]],
                        bounds: tuple[int, int], namespace: str = "refseg") -> int:
    """The GeoJSON stage of a slide job, in one call: label tiles -> one outline set per class -> ``path``.

    Args:
        tiles: (x, y, labels) per tile: labels an (h, w) uint8 label map whose top-left pixel is (x, y) of
            the processing level; tiles do not overlap.
        scale: processing-level pixel -> level-0 pixels; ``simplify``: tolerance in level-0 pixels (0 =
            exact pixel outlines); ``bounds``: level-0 (W, H) the outlines are clipped to.
        names: class value -> (QuPath class name, RGB colour); other values get "class k" and
            :func:`refseg.io.writers.class_colour`.

    Returns:
        The number of features written.
    """
    from refseg.io.writers import class_colour

    shapes: dict[int, list] = {}
    for x, y, labels in tiles:
        for value in np.unique(labels[labels > 0]):
            shapes.setdefault(int(value), []).append(mask_polygons(labels, int(value), offset=(x, y)))
    merged = {v: union(parts) for v, parts in shapes.items()}
    del shapes
    named = {v: names.get(v, (f"class {v}", class_colour(v))) for v in merged}
    return write_geojson(path, to_features(merged, scale, simplify, named, bounds, namespace=namespace))
