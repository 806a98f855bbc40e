"""refseg outlines / refseg.io.outlines: exact streamed outlines, checked against independent references.

Every output is drawn back at pixel centres by an even-odd scanline fill written here (numpy) and
compared with the label mask pixel for pixel; ring orientation is checked by the shoelace formula;
objects are counted per class with scipy.ndimage.label (4-connectivity). None of these shares code with
the tracer (GDAL's polygonizer + GEOS unions).
"""
import json
import uuid

import numpy as np
import pytest

pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")
tifffile = pytest.importorskip("tifffile")
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from refseg.cli import main  # noqa: E402
from refseg.io.outlines import OutlineTracer  # noqa: E402


def scene(height: int = 70, width: int = 90) -> np.ndarray:
    """Classes 1-3: a ring with a hole and a disc crossing seams, bands across many tiles, two squares
    meeting at one corner, objects on the image border, a hole holding an island of another class."""
    yy, xx = np.mgrid[:height, :width]
    m = np.zeros((height, width), np.uint8)
    r = np.hypot(xx - 30, yy - 30)
    m[(r < 16) & (r >= 8)] = 1                      # ring (one hole) across seams
    m[r < 4] = 2                                    # island of class 2 in the ring's hole
    m[np.hypot(xx - 62, yy - 40) < 11] = 3          # disc
    m[55:58, :] = 2                                 # horizontal band, full width, both borders
    m[:, 80:83] = 1                                 # vertical band, top to bottom border
    m[60:64, 10:14] = 3                             # two squares meeting at one corner: two objects
    m[64:68, 14:18] = 3
    m[0:3, 0:5] = 3                                 # top-left corner object
    m[height - 2:, width - 4:] = 2                  # bottom-right corner object
    return m


def fill(rings: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixel centres inside the polygon of ``rings`` ((n, 2) closed (x, y) rings), by the
    even-odd rule along each pixel row (holes are holes whatever their orientation)."""
    inside = np.zeros(shape, bool)
    a = np.concatenate([r[:-1] for r in rings])
    b = np.concatenate([r[1:] for r in rings])
    centres = np.arange(shape[1]) + 0.5
    for y in range(max(int(np.floor(a[:, 1].min())), 0), min(int(np.ceil(a[:, 1].max())), shape[0])):
        yc = y + 0.5
        cross = (a[:, 1] <= yc) != (b[:, 1] <= yc)
        pa, pb = a[cross], b[cross]
        xs = np.sort(pa[:, 0] + (yc - pa[:, 1]) * (pb[:, 0] - pa[:, 0]) / (pb[:, 1] - pa[:, 1]))
        inside[y] = np.searchsorted(xs, centres) % 2 == 1
    return inside


def signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed (x, y) ring: > 0 when counter-clockwise in (x, y)."""
    return 0.5 * float(np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1]))


def draw(features: list[dict], shape: tuple[int, int], classes: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, hits): each feature's class at the pixel centres inside it, and how many features hit
    each pixel."""
    labels, hits = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for f in features:
        inside = fill([np.asarray(r, np.float64) for r in f["geometry"]["coordinates"]], shape)
        labels[inside] = classes[f["properties"]["classification"]["name"]]
        hits += inside
    return labels, hits


def check_exact(features: list[dict], mask: np.ndarray) -> None:
    classes = {f"class {v}": v for v in range(1, 256)}
    labels, hits = draw(features, mask.shape, classes)
    assert hits.max() <= 1, "features overlap"
    np.testing.assert_array_equal(labels, mask)
    for v in np.unique(mask[mask > 0]):
        count = sum(f["properties"]["classification"]["name"] == f"class {v}" for f in features)
        assert count == ndimage.label(mask == v)[1], f"class {v}: features != 4-connected objects"
    for f in features:  # RFC 7946: exterior counter-clockwise, holes clockwise
        areas = [signed_area(np.asarray(r, np.float64)) for r in f["geometry"]["coordinates"]]
        assert areas[0] > 0 and all(a < 0 for a in areas[1:])


def run_cli(tmp_path, labels_file, *extra) -> list[dict]:
    out = tmp_path / "out.geojson"
    workers = [] if "--workers" in extra else ["--workers", "1"]
    assert main(["outlines", str(labels_file), "-o", str(out), *workers, *extra]) == 0
    data = json.loads(out.read_text())
    assert data["type"] == "FeatureCollection"
    return data["features"]


@pytest.mark.parametrize("tile_tif, tile", [(16, None), (16, 23), (32, 7)])
def test_exact_outlines_tiled_tiff(tmp_path, tile_tif, tile):
    mask = scene()
    tifffile.imwrite(tmp_path / "m.tif", mask, tile=(tile_tif, tile_tif), compression="zlib")
    extra = ["--simplify", "0"] + (["--tile", str(tile)] if tile else [])
    check_exact(run_cli(tmp_path, tmp_path / "m.tif", *extra), mask)


def test_worker_processes_write_the_same_file(tmp_path):
    mask = scene()
    tifffile.imwrite(tmp_path / "m.tif", mask, tile=(16, 16))
    outputs = []
    for workers in ("1", "2"):
        outputs.append(tmp_path / f"w{workers}.geojson")
        assert main(["outlines", str(tmp_path / "m.tif"), "-o", str(outputs[-1]), "--tile", "16",
                     "--simplify", "0", "--workers", workers]) == 0
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    check_exact(json.loads(outputs[1].read_text())["features"], mask)


def test_exact_outlines_striped_tiff_png_and_slide_pyramid(tmp_path):
    from refseg.io import pyramid

    mask = scene(75, 101)
    tifffile.imwrite(tmp_path / "s.tif", mask, rowsperstrip=5)
    check_exact(run_cli(tmp_path, tmp_path / "s.tif", "--simplify", "0", "--tile", "19"), mask)
    Image.fromarray(mask).save(tmp_path / "m.png")
    check_exact(run_cli(tmp_path, tmp_path / "m.png", "--simplify", "0", "--tile", "16"), mask)
    t = 16
    padded = np.pad(mask, ((0, -mask.shape[0] % t), (0, -mask.shape[1] % t)))
    pyramid.write_label_pyramid(tmp_path / "p.ome.tif", lambda r, c: padded[r * t:(r + 1) * t, c * t:(c + 1) * t],
                                mask.shape[1], mask.shape[0], t, tmp_path / "work")
    check_exact(run_cli(tmp_path, tmp_path / "p.ome.tif", "--simplify", "0"), mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_any_tile_order(tmp_path, seed):
    """Speckle and blobs fed as a slide job would (loaders, tiles in random order, level-0 scale and
    bounds): exact, and the same file byte for byte as tiles given in row-major order (resume)."""
    from refseg.io.geojson import FeatureWriter

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(20, 50, 2))
    mask = (rng.random((h, w)) < 0.55) * rng.integers(1, 4, (h, w))
    mask = (ndimage.median_filter(mask, 3) if seed else mask).astype(np.uint8)
    tile = int(rng.integers(3, 12))
    files = []
    for shuffle in (False, True):
        files.append(tmp_path / f"order{int(shuffle)}.geojson")
        with FeatureWriter(files[-1], scale=2.0, bounds=(2 * w - 1, 2 * h), namespace="slide") as writer:
            tracer = OutlineTracer(w, h, tile, writer.write)
            cells = [(r, c) for r in range(tracer.rows) for c in range(tracer.cols)]
            if shuffle:
                rng.shuffle(cells)
            for r, c in cells:
                block = mask[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                tracer.add_tile(r, c, None if not block.any() and rng.random() < 0.5 else (lambda b=block: b))
            assert tracer.close() == writer.count
    assert files[0].read_bytes() == files[1].read_bytes()
    features = json.loads(files[1].read_text())["features"]
    for f in features:  # back to mask pixels; the last column was clamped to the bounds (2w - 1)
        f["geometry"]["coordinates"] = [[[x / 2 if x != 2 * w - 1 else w, y / 2] for x, y in ring]
                                        for ring in f["geometry"]["coordinates"]]
    check_exact(features, mask)
    with pytest.raises(ValueError, match="never given"):
        OutlineTracer(w, h, tile, lambda g, c: None).close()
    with pytest.raises(ValueError, match="given twice"):
        tracer.add_tile(0, 0, None)


def test_simplify_keeps_iou_and_drops_vertices(tmp_path):
    yy, xx = np.mgrid[:200, :260]
    mask = np.zeros((200, 260), np.uint8)
    for k, (cx, cy, r) in enumerate([(50, 50, 30), (140, 60, 22), (200, 140, 40), (70, 150, 25), (130, 130, 12)]):
        mask[np.hypot(xx - cx, yy - cy) < r] = k % 2 + 1
    mask[90:100, 10:250] = 3  # a band crossing the discs' tiles
    tifffile.imwrite(tmp_path / "m.tif", mask, tile=(32, 32))
    exact = run_cli(tmp_path, tmp_path / "m.tif", "--simplify", "0")
    check_exact(exact, mask)
    simple = run_cli(tmp_path, tmp_path / "m.tif", "--simplify", "1")
    labels, _ = draw(simple, mask.shape, {f"class {v}": v for v in (1, 2, 3)})
    for v in (1, 2, 3):
        iou = ((labels == v) & (mask == v)).sum() / ((labels == v) | (mask == v)).sum()
        assert iou >= 0.95, (v, iou)

    def vertices(features):
        return sum(len(r) for f in features for r in f["geometry"]["coordinates"])

    assert vertices(simple) < 0.4 * vertices(exact)
    assert len(simple) == len(exact)


def test_scale_names_and_wide_labels(tmp_path):
    mask = np.zeros((40, 50), np.uint16)
    mask[5:15, 5:25] = 300
    mask[20:30, 30:45] = 2
    tifffile.imwrite(tmp_path / "m.tif", mask, tile=(16, 16))
    features = run_cli(tmp_path, tmp_path / "m.tif", "--simplify", "0", "--scale", "4",
                       "--names", "300=Tumor,2=Stroma")
    by_name = {f["properties"]["classification"]["name"]: f for f in features}
    assert set(by_name) == {"Tumor", "Stroma"}
    tumor = shapely.geometry.shape(by_name["Tumor"]["geometry"])
    assert tumor.equals(shapely.box(20, 20, 100, 60))
    assert len(by_name["Tumor"]["geometry"]["coordinates"][0]) == 5  # corners only, no collinear vertices
    assert by_name["Stroma"]["properties"]["objectType"] == "annotation"
    namespace = str((tmp_path / "m.tif").resolve())  # ids: uuid5 of path#index, as the slide job writes them
    assert [f["id"] for f in features] == [str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}#{k}"))
                                           for k in range(len(features))]


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("kind, message", [
    ("rgb", "not a label image"), ("float", "not a label image"), ("truncated", "truncated"),
    ("garbage", "not a readable"), ("missing", "cannot be read"), ("names", "cannot occur in uint8")])
def test_bad_input_is_refused_naming_the_file(tmp_path, caplog, kind, message):
    bad = tmp_path / "in.tif"
    extra = []
    if kind == "rgb":
        tifffile.imwrite(bad, np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    elif kind == "float":
        tifffile.imwrite(bad, np.zeros((32, 32), np.float32), tile=(16, 16))
    elif kind == "truncated":
        tifffile.imwrite(bad, np.arange(64 * 64, dtype=np.uint8).reshape(64, 64), tile=(16, 16))
        bad.write_bytes(bad.read_bytes()[:-1000])
    elif kind == "garbage":
        bad = tmp_path / "in.png"
        bad.write_bytes(b"not an image at all")
    elif kind == "names":
        tifffile.imwrite(bad, np.ones((32, 32), np.uint8), tile=(16, 16))
        extra = ["--names", "300=Big"]
    else:
        bad = tmp_path / "none.tif"
    before = _files(tmp_path)
    assert main(["outlines", "--workers", "1", str(bad), "-o", str(tmp_path / "out.geojson"), *extra]) == 2
    assert message in caplog.text and str(bad) in caplog.text
    assert _files(tmp_path) == before  # nothing written, no temporary file left


def test_unwritable_output_and_failure_midway_leave_nothing(tmp_path, caplog, monkeypatch):
    mask = scene()
    tifffile.imwrite(tmp_path / "m.tif", mask, tile=(16, 16))
    assert main(["outlines", "--workers", "1", str(tmp_path / "m.tif"), "-o", str(tmp_path)]) == 2  # a folder
    assert "is a folder" in caplog.text
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        import os
        if not os.access(locked, os.W_OK):  # root can write anywhere
            assert main(["outlines", "--workers", "1", str(tmp_path / "m.tif"), "-o",
                         str(locked / "o.geojson")]) == 2
            assert "cannot be written" in caplog.text
    finally:
        locked.chmod(0o700)
    from refseg.io import outlines

    def broken(*args, **kwargs):
        raise ValueError("boom in tile tracing")

    monkeypatch.setattr(outlines, "trace_tile", broken)
    before = _files(tmp_path)
    assert main(["outlines", "--workers", "1", str(tmp_path / "m.tif"), "-o", str(tmp_path / "o.geojson")]) == 2
    assert _files(tmp_path) == before


def test_missing_rasterio_names_the_extra(tmp_path, monkeypatch, caplog):
    import sys

    tifffile.imwrite(tmp_path / "m.tif", scene(), tile=(16, 16))
    monkeypatch.setitem(sys.modules, "rasterio", None)  # import rasterio -> ImportError
    monkeypatch.setitem(sys.modules, "rasterio.features", None)
    assert main(["outlines", "--workers", "1", str(tmp_path / "m.tif"), "-o", str(tmp_path / "o.geojson")]) == 2
    assert "pip install 'refseg[slides]'" in caplog.text and not (tmp_path / "o.geojson").exists()


def traced_features(mask: np.ndarray, tile: int) -> list[dict]:
    """The tracer's objects of ``mask`` (tiles in row-major order) as GeoJSON-like features."""
    features = []
    tracer = OutlineTracer(mask.shape[1], mask.shape[0], tile, lambda g, c: features.extend(
        {"geometry": json.loads(shapely.to_geojson(p)), "properties": {"classification": {"name": f"class {v}"}}}
        for p, v in zip(shapely.orient_polygons(g), c)))
    for r in range(tracer.rows):
        for c in range(tracer.cols):
            tracer.add_tile(r, c, mask[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
    tracer.close()
    return features


def _without_saddles(mask: np.ndarray) -> np.ndarray:
    """Fill, class by class, the corner gap of every 2 x 2 block where two pixels of a class meet only
    at a corner, until there is none (brute force over all blocks, in Python)."""
    mask = mask.copy()
    changed = True
    while changed:
        changed = False
        for i in range(mask.shape[0] - 1):
            for j in range(mask.shape[1] - 1):
                a, b, c, d = mask[i, j], mask[i, j + 1], mask[i + 1, j], mask[i + 1, j + 1]
                if a > 0 and a == d and b != a and c != a:
                    mask[i, j + 1] = a
                    changed = True
                elif b > 0 and b == c and a != b and d != b:
                    mask[i, j] = b
                    changed = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_opencv_path_exact_on_thin_shapes(monkeypatch, seed):
    """Masks without corner contacts go through OpenCV only (GDAL is made to fail): single pixels, 1 px
    lines and dead ends, 1 px holes, islands in holes, objects on every border, several classes."""
    from refseg.io import outlines_trace

    rng = np.random.default_rng(seed)
    mask = ((rng.random((37, 41)) < 0.3) * rng.integers(1, 3 + seed % 2, (37, 41))).astype(np.uint8)
    mask[5, 3:30] = 1          # a 1 px line
    mask[10:20, 10:20] = 2
    mask[12:18, 12:18] = 0     # a hole ...
    mask[14, 14] = 1           # ... holding a 1 px island
    mask[15, 16] = 0           # and a 1 px hole next to it
    mask = _without_saddles(mask)

    def refuse(*args):
        raise AssertionError("GDAL used on a mask without corner contacts")

    monkeypatch.setattr(outlines_trace, "_gdal_class", refuse)
    check_exact(traced_features(mask, 16), mask)


@pytest.mark.parametrize("limit", [-1, 10 ** 9])
def test_corner_contacts_by_gdal_and_by_geos(monkeypatch, limit):
    """Speckle full of pixels meeting at corners: traced by GDAL (limit -1) or by OpenCV with the
    touched polygons split by GEOS (no limit); both exact, with 4-connectivity."""
    from refseg.io import outlines_trace

    monkeypatch.setattr(outlines_trace, "CORNER_LIMIT", limit)
    rng = np.random.default_rng(7)
    for _ in range(3):
        mask = ((rng.random((33, 45)) < 0.5) * rng.integers(1, 3, (33, 45))).astype(np.uint8)
        check_exact(traced_features(mask, 10), mask)


@pytest.mark.parametrize("tile", [20, 13])
def test_holes_of_pieces_survive_the_merge_across_seams(monkeypatch, tile):
    """An object crossing seams whose pieces hold holes of their own (one with an island of another class,
    one touching the object's outline at a corner) and holes that cross a seam: exact, and the pieces'
    holes are holes of the merged object, without the union_all fallback."""
    def refuse(*args, **kwargs):
        raise AssertionError("the shells-then-holes merge fell back to union_all")

    monkeypatch.setattr(shapely, "union_all", refuse)
    mask = np.zeros((40, 40), np.uint8)
    mask[5:35, 5:35] = 1
    mask[8:11, 8:11] = 0          # a hole inside tile (0, 0)
    mask[18:23, 25:28] = 0        # a hole across the seam y = 20
    mask[5, 25] = mask[6, 26] = 0  # a notch, and a hole meeting it at one corner
    mask[26:32, 26:32] = 0        # a hole inside tile (1, 1) ...
    mask[28:30, 28:30] = 2        # ... holding an island of class 2
    features = traced_features(mask, tile)
    check_exact(features, mask)
    (big,) = (f for f in features if f["properties"]["classification"]["name"] == "class 1")
    assert len(big["geometry"]["coordinates"]) == 1 + 4  # the exterior and four holes


def test_simplify_hole_riddled_objects_stays_valid(tmp_path):
    """Speckled objects (a random-checkpoint mask's kind: one object with hundreds of holes, holes 1 px
    apart and 1 px from the outline, classes side by side) simplified by 1 px: every polygon valid by
    GEOS's own check, one feature per object as with --simplify 0, each within the Douglas-Peucker bound of
    its exact outline (area changed <= tolerance x perimeter, by GEOS overlay), fewer vertices."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:150, :170]
    mask = np.zeros((150, 170), np.uint8)
    mask[np.hypot(xx - 70, yy - 75) < 60] = 1
    mask[(np.hypot(xx - 140, yy - 60) < 25)] = 2
    holes = ndimage.binary_opening(rng.random(mask.shape) < 0.35, np.ones((1, 2))) | (rng.random(mask.shape) < 0.05)
    mask[holes & (mask > 0)] = 0
    tifffile.imwrite(tmp_path / "m.tif", mask, tile=(32, 32))
    exact = run_cli(tmp_path, tmp_path / "m.tif", "--simplify", "0", "--tile", "32")
    check_exact(exact, mask)
    assert max(len(f["geometry"]["coordinates"]) for f in exact) > 200  # an object with hundreds of holes
    simple = run_cli(tmp_path, tmp_path / "m.tif", "--simplify", "1", "--tile", "32")
    assert len(simple) == len(exact)
    before = np.array([shapely.geometry.shape(f["geometry"]) for f in exact], object)
    after = np.array([shapely.geometry.shape(f["geometry"]) for f in simple], object)
    assert shapely.is_valid(after).all()
    assert (shapely.area(shapely.symmetric_difference(before, after)) <= 1.0 * shapely.length(before)).all()

    def vertices(features):
        return sum(len(r) for f in features for r in f["geometry"]["coordinates"])

    assert vertices(simple) < 0.8 * vertices(exact)


def test_simplify_gives_rings_that_would_cross_their_exact_outline():
    """A hole in an outward bump of the outline: simplified on their own, the outline cuts the bump off and
    crosses the hole; both keep their exact rings, the polygon stays valid (GEOS) with its hole."""
    from refseg.io.geojson import simplify_polygons

    bumped = shapely.Polygon([(0, 0), (20, 0), (20, 20), (10, 20.9), (0, 20)],
                             [[(8.5, 18.5), (11.5, 18.5), (11.5, 20.5), (8.5, 20.5)]])
    assert bumped.is_valid
    rings = shapely.simplify(np.array([bumped.exterior, bumped.interiors[0]], object), 1.0, preserve_topology=False)
    assert shapely.intersects(*rings)  # the case is real: ring by ring, they cross
    staircase = shapely.Polygon([(30, 0)] + [(30 + k + dx, k + dy) for k in range(10) for dx, dy in ((1, 0), (1, 1))]
                                + [(30, 10)])
    out = simplify_polygons(np.array([bumped, staircase], object), 1.0)
    assert shapely.is_valid(out).all() and len(out[0].interiors) == 1
    assert out[0].equals(bumped)  # both rings back to exact
    assert shapely.get_num_coordinates(out[1]) < shapely.get_num_coordinates(staircase) / 3  # others simplified
    assert shapely.area(shapely.symmetric_difference(out[1], staircase)) <= staircase.length
