"""QuPath-compatible GeoJSON: annotations in (reference masks) and label outlines out (polygons).

Format (what QuPath exports and imports): a ``FeatureCollection`` of ``Feature`` objects whose
geometry is a ``Polygon`` or ``MultiPolygon`` in **level-0 pixel coordinates** (x to the right, y down,
origin the top-left corner of the slide's top-left pixel), holes as interior rings, and properties
``{"objectType": "annotation", "classification": {"name": str, "color": [r, g, b]}}``. Exterior rings
are counter-clockwise and holes clockwise in (x, y) (RFC 7946 orientation rule).

Out: label masks are traced by the one streaming vectoriser, :class:`refseg.io.outlines.OutlineTracer`
(exact pixel-edge polygons, one per 4-connected object); :class:`FeatureWriter` is its sink: it simplifies
each polygon on its own by a tolerance in output pixels, scales it to level-0 pixels and appends it to the
file, one feature per object. In: :func:`read_annotations` and :func:`rasterize` turn QuPath annotations
into reference masks. Polygon work uses shapely (``pip install 'refseg[slides]'``), imported on first use.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from refseg.io.writers import atomic_writer, class_colour
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


def class_name(value: int, names: dict[int, tuple[str, tuple[int, int, int]]] | None = None
               ) -> tuple[str, tuple[int, int, int]]:
    """QuPath (name, RGB colour) of class ``value``: from ``names``, else ``class N`` in the overlay colour."""
    return (names or {}).get(int(value), (f"class {int(value)}", class_colour(int(value))))


def feature_properties(name: str, colour: tuple[int, int, int]) -> dict:
    """The properties QuPath reads: an unlocked annotation of class ``name`` drawn in ``colour`` (RGB)."""
    return {"objectType": "annotation", "isLocked": False,
            "classification": {"name": name, "color": [int(c) for c in colour]}}


@functools.lru_cache(maxsize=8)
def _id_prefix(namespace: str):
    return hashlib.sha1(uuid.NAMESPACE_URL.bytes + f"{namespace}#".encode())


def feature_id(namespace: str, index: int) -> str:
    """Stable id of the ``index``-th feature written for ``namespace``: ``uuid5(NAMESPACE_URL,
    f"{namespace}#{index}")``, computed from a cached hash of the prefix (5x faster per feature)."""
    digest = _id_prefix(namespace).copy()
    digest.update(str(index).encode())
    b = bytearray(digest.digest()[:16])
    b[6], b[8] = (b[6] & 0x0F) | 0x50, (b[8] & 0x3F) | 0x80  # version 5, RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def simplify_polygons(polygons: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker of (N,) shapely Polygons by ``tolerance`` (their units), each polygon on its own, its
    rings kept apart: valid polygons out. Vectorised GEOS calls (GIL released).

    GEOS's polygon simplifiers are slow on the hole-riddled objects of speckled masks (the plain one
    rebuilds each result with buffer(0), the topology-preserving one indexes every segment: 10x the time
    of this function on a random-checkpoint mask whose largest object has 4000 holes), so each ring is
    simplified as a polygon of its own (the same Douglas-Peucker, ring start included). A hole that collapses vanishes; a shell that collapses, or a ring
    that does not stay one simple ring, keeps its exact outline; then every simplified ring that meets
    another ring of its polygon gets its exact outline back (rings of the input never cross), until none
    meet. A polygon still not valid (a hole cut off from its shortened shell) is simplified again by GEOS
    keeping its topology.
    """
    shapely = _shapely()
    polygons = np.asarray(polygons, dtype=object)
    rings, owner = shapely.get_rings(polygons, return_index=True)  # per polygon: its shell, then its holes
    shell = np.ones(len(rings), bool)
    shell[1:] = owner[1:] != owner[:-1]
    each = shapely.simplify(shapely.polygons(rings), tolerance, preserve_topology=False)
    collapsed = shapely.is_empty(each)
    alive = shell | ~collapsed
    single = (shapely.get_type_id(each) == shapely.GeometryType.POLYGON) & ~collapsed
    single[single] = shapely.get_num_interior_rings(each[single]) == 0
    use = rings.copy()
    use[single] = shapely.get_exterior_ring(each[single])
    exact = alive & ~single
    exact[single] = ~shapely.is_simple(use[single])
    use[exact] = rings[exact]
    count = shapely.get_num_coordinates(use)
    live = np.flatnonzero(alive)
    a, b = shapely.STRtree(use[live]).query(use[live])  # ring pairs whose boxes overlap
    a, b = live[a], live[b]
    pair = (a < b) & (owner[a] == owner[b])
    a, b = a[pair], b[pair]
    swap = count[a] < count[b]  # the larger ring of a pair is the prepared one (a shell with many holes)
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    while True:  # simplified rings that meet a ring of their polygon get their exact outline back
        test = ~(exact[a] & exact[b])
        a, b = a[test], b[test]
        shapely.prepare(use[np.unique(a)])
        meet = shapely.intersects(use[a], use[b])
        if not meet.any():
            break
        # one ring of each meeting pair goes back to exact, the smaller while it is still simplified
        back = np.unique(np.where(exact[b[meet]], a[meet], b[meet]))
        use[back], exact[back] = rings[back], True
    count = shapely.get_num_coordinates(use)
    per_polygon = np.bincount(owner[alive], minlength=len(polygons))
    simple = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, shapely.get_coordinates(use[alive]),
        (np.concatenate([[0], np.cumsum(count[alive])]), np.concatenate([[0], np.cumsum(per_polygon)])))
    # No ring crosses itself and no two rings of a polygon meet unless both are exact, so a polygon is
    # valid when every hole lies in its shell and in no other hole; one vertex of each hole tells (a hole
    # whose shell was cut short lies wholly outside it; a vertex on another ring is a point where two exact
    # rings touch, as in the input). GEOS's is_valid costs more than the simplification on such polygons.
    rings, owner = shapely.get_rings(simple, return_index=True)
    shell = np.ones(len(rings), bool)
    shell[1:] = owner[1:] != owner[:-1]
    holes = np.flatnonzero(~shell)
    broken = np.zeros(len(polygons), bool)
    if len(holes):
        areas = shapely.polygons(rings)
        shapely.prepare(areas)
        x, y = shapely.get_coordinates(shapely.get_point(rings[holes], 0)).T
        broken[owner[holes[~shapely.intersects_xy(areas[np.flatnonzero(shell)][owner[holes]], x, y)]]] = True
        point, other = shapely.STRtree(areas[holes]).query(shapely.points(x, y), predicate="within")
        broken[owner[holes[point]][owner[holes[point]] == owner[holes[other]]]] = True
    broken = np.flatnonzero(broken)
    if len(broken):
        simple[broken] = shapely.simplify(polygons[broken], tolerance, preserve_topology=True)
    return simple


class FeatureWriter:
    """Streams polygons into a QuPath GeoJSON FeatureCollection, one feature per polygon, atomically.

    Use as a context manager: the features go to a temporary file beside ``path``, renamed onto it when
    the block ends without an exception (on an exception nothing is left behind)::

        with FeatureWriter("out.geojson", scale=4.0, simplify=4.0) as writer:
            writer.write(polygons, classes)      # any number of calls, e.g. an OutlineTracer's sink

    Args:
        path: output file.
        names: class value -> (QuPath name, RGB colour); others are ``class N`` (:func:`class_name`).
        scale: output pixels per input (mask) pixel, e.g. the slide level's downsample (level-0 pixels).
        simplify: Douglas-Peucker tolerance in output pixels, each polygon on its own with its topology
            kept (valid, holes inside); 0 writes the exact input outlines.
        bounds: (W, H) in output pixels: coordinates are clamped to [0, W] x [0, H] (a slide's level-0
            size, which a scaled mask can overshoot by less than one mask pixel).
        namespace: feature ids are UUIDs of ``namespace`` and the feature's index.
    """

    def __init__(self, path: str | os.PathLike, names: dict[int, tuple[str, tuple[int, int, int]]] | None = None,
                 scale: float = 1.0, simplify: float = 0.0, bounds: tuple[float, float] | None = None,
                 namespace: str = "refseg"):
        if not scale > 0 or simplify < 0:
            raise ValueError(f"FeatureWriter: scale must be > 0 and simplify >= 0, got {scale}, {simplify}")
        self.path, self.names, self.scale, self.simplify = Path(path), dict(names or {}), float(scale), float(simplify)
        self.bounds, self.namespace = bounds, namespace
        self.count = 0
        self._properties: dict[int, str] = {}
        self._stack: contextlib.ExitStack | None = None
        self._handle = None

    def __enter__(self) -> "FeatureWriter":
        self._stack = contextlib.ExitStack()
        self._handle = self._stack.enter_context(atomic_writer(self.path, "w"))
        self._handle.write('{"type": "FeatureCollection", "features": [')
        return self

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            self._handle.write("\n]}\n")
        self._handle = None
        return self._stack.__exit__(*exc)

    def _class_properties(self, value: int) -> str:
        if value not in self._properties:
            self._properties[value] = json.dumps(feature_properties(*class_name(value, self.names)))
        return self._properties[value]

    def write(self, polygons: np.ndarray, classes: np.ndarray) -> None:
        """Write (N,) shapely Polygons in input pixels (x, y) of classes (N,) int: simplified, scaled,
        exterior counter-clockwise and holes clockwise (RFC 7946), as N features."""
        shapely = _shapely()
        if self._handle is None:
            raise RuntimeError("FeatureWriter.write outside its `with` block")
        geometries = np.asarray(polygons, dtype=object)
        if self.simplify > 0:
            geometries = simplify_polygons(geometries, self.simplify / self.scale)
        if self.scale != 1.0 or self.bounds is not None:
            scale, bounds = self.scale, self.bounds

            def place(xy: np.ndarray) -> np.ndarray:
                xy = xy * scale
                return xy if bounds is None else np.clip(xy, 0.0, np.asarray(bounds, np.float64))

            geometries = shapely.transform(geometries, place)
        geometries = shapely.orient_polygons(geometries, exterior_cw=False)
        texts = shapely.to_geojson(geometries)
        write = self._handle.write
        for text, value, empty in zip(texts, classes, shapely.is_empty(geometries)):
            if empty:
                continue
            separator = ",\n" if self.count else "\n"
            write(f'{separator}{{"type": "Feature", "id": "{feature_id(self.namespace, self.count)}", '
                  f'"geometry": {text}, "properties": {self._class_properties(int(value))}}}')
            self.count += 1
