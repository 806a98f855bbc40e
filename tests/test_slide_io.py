"""Slide readers, levels / mpp, tissue detection, the pyramid writer and GeoJSON (no models)."""
import json

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
shapely = pytest.importorskip("shapely")

from refseg.io import geojson, pyramid  # noqa: E402
from refseg.io.slide import SlideReadError, SlideView, is_slide_file, open_slide  # noqa: E402
from refseg.runtime.tiling import TileGrid, default_overlap, tissue_mask, tissue_tiles  # noqa: E402
from refseg.testing.synthetic_slide import render, write_slide  # noqa: E402

SIZE = 1536


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides_io")
    return {"ome": write_slide(root / "s.ome.tif", SIZE, layout="ome"),
            "pages": write_slide(root / "s_pages.tif", SIZE, layout="pages"), "root": root}


def test_tifffile_reader_levels_mpp_and_regions(slides):
    with open_slide(slides["ome"]) as reader:
        assert reader.level_dimensions == [(1536, 1536), (768, 768), (384, 384)]
        assert reader.mpp == pytest.approx(0.5)
        region = reader.read_region(1, 300, 200, 100, 80)
        expected = render(300, 200, 100, 80, 2, SIZE, SIZE, (0.3, 0.3, 0.7, 0.7), 96, 24)
        assert region.shape == (80, 100, 3) and np.array_equal(region, expected)
        outside = reader.read_region(0, SIZE - 10, -5, 30, 20)  # white outside the slide
        assert (outside[:5] == 255).all() and (outside[:, 10:] == 255).all()
        inside = render(SIZE - 10, 0, 10, 15, 1, SIZE, SIZE, (0.3, 0.3, 0.7, 0.7), 96, 24)
        assert np.array_equal(outside[5:, :10], inside)


def test_openslide_and_tifffile_agree(slides):
    pytest.importorskip("openslide")
    with open_slide(slides["pages"], "openslide") as a, open_slide(slides["pages"], "tifffile") as b:
        assert a.level_dimensions == b.level_dimensions and a.mpp == pytest.approx(b.mpp)
        for level in (0, 2):
            assert np.array_equal(a.read_region(level, 50, 70, 200, 120), b.read_region(level, 50, 70, 200, 120))


def test_level_and_mpp_selection(slides):
    with open_slide(slides["ome"]) as reader:
        view = SlideView.select(reader, mpp=1.0)
        assert (view.level, view.scale, view.size) == (1, 1.0, (768, 768))
        view = SlideView.select(reader, mpp=1.5)  # between levels: level 1 box-resampled by 1.5
        assert view.level == 1 and view.scale == pytest.approx(1.5) and view.size == (512, 512)
        assert view.downsample == pytest.approx(3.0) and view.mpp == pytest.approx(1.5)
        tile = view.read(100, 100, 64, 64)
        assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
        assert SlideView.select(reader, level=2).size == (384, 384)
        with pytest.raises(ValueError, match="level 3 does not exist"):
            SlideView.select(reader, level=3)
        with pytest.raises(ValueError, match="mpp 0.1 is not available"):
            SlideView.select(reader, mpp=0.1)


def test_is_slide_file_keeps_plain_tiffs_images(tmp_path, slides):
    from PIL import Image

    plain = tmp_path / "plain.tif"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(plain)
    assert not is_slide_file(plain) and is_slide_file(slides["ome"]) and is_slide_file(tmp_path / "x.svs")


def test_bad_slide_files(tmp_path, slides):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(SlideReadError, match="garbage.tif"):
        open_slide(garbage)
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(SlideReadError, match="empty"):
        open_slide(tmp_path / "empty.svs")
    data = slides["ome"].read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match="cut.tif: truncated file"):
        open_slide(cut)  # the level-0 IFD survives; its tiles end beyond the file


def test_tissue_detection_finds_the_tissue_rectangle(slides):
    with open_slide(slides["ome"]) as reader:
        view = SlideView.select(reader)
        thumb, scale = view.thumbnail(256)
    assert thumb.shape == (256, 256, 3) and scale == pytest.approx(256 / SIZE)
    tissue, threshold = tissue_mask(thumb)
    ys, xs = np.nonzero(tissue)
    assert 0.08 <= threshold < 0.25
    assert abs(xs.min() - 0.3 * 256) <= 2 and abs(xs.max() - 0.7 * 256) <= 2 and abs(ys.min() - 0.3 * 256) <= 2
    blank, _ = tissue_mask(np.full((64, 64, 3), 247, np.uint8) + np.random.default_rng(0).integers(
        0, 4, (64, 64, 3)).astype(np.uint8))
    assert not blank.any()
    grid = TileGrid(SIZE, SIZE, 256, default_overlap(256))
    keep = tissue_tiles(grid, tissue, scale, 0.01)
    cores = [grid.core_box(r, c) for r, c in zip(*np.nonzero(keep))]
    lo, hi = 0.3 * SIZE, 0.7 * SIZE
    assert all(x < hi and x + w > lo and y < hi and y + h > lo for x, y, w, h in cores)
    assert 0 < keep.sum() < len(grid)


def test_tile_grid_rules():
    grid = TileGrid(1000, 500, 256, 32)
    assert (grid.core, grid.rows, grid.cols) == (224, 3, 5)
    assert grid.read_box(1, 2) == (448 - 16, 224 - 16, 256, 256)
    assert grid.core_box(2, 4) == (896, 448, 104, 52)
    with pytest.raises(ValueError, match="multiple of 16"):
        TileGrid(100, 100, 256, 30)


def test_pyramid_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    full = (rng.random((700, 1000)) > 0.7).astype(np.uint8) * rng.integers(1, 3, (700, 1000)).astype(np.uint8)
    t = 224

    def source(r, c):
        tile = np.zeros((t, t), np.uint8)
        part = full[r * t:(r + 1) * t, c * t:(c + 1) * t]
        tile[:part.shape[0], :part.shape[1]] = part
        tile[part.shape[0]:, :] = 9  # beyond the image: must be cleared
        return tile if r != 1 else None

    expected = full.copy()
    expected[t:2 * t] = 0
    sizes = pyramid.write_label_pyramid(tmp_path / "m.ome.tif", source, 1000, 700, t, tmp_path / "work", 0.5)
    assert sizes == [(1000, 700), (500, 350), (250, 175), (125, 88)] and not (tmp_path / "work").exists()
    with tifffile.TiffFile(tmp_path / "m.ome.tif") as tf:
        assert tf.is_ome and 'PhysicalSizeX="0.5"' in tf.ome_metadata
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(700, 1000), (350, 500), (175, 250), (88, 125)]
        assert levels[0].keyframe.tile == (t, t)
        for k, level in enumerate(levels):
            assert np.array_equal(level.asarray(), expected[::2 ** k, ::2 ** k])
    labels, factor = pyramid.read_label_level(tmp_path / "m.ome.tif", 200_000)
    assert factor == 2 and labels.shape == (350, 500)


def test_geojson_polygons_with_holes_round_trip(tmp_path):
    """Label outlines as the slide job writes them (tracer tiles of 40 px: the ring crosses a seam, scale 4,
    QuPath names), read back as annotations and rasterised (PIL: an independent polygon fill)."""
    from refseg.io.outlines import OutlineTracer

    mask = np.zeros((60, 80), np.uint8)
    mask[10:40, 10:50] = 1
    mask[20:30, 20:30] = 0  # a hole
    mask[45:55, 60:75] = 2
    names = {1: ("Glomerulus", (255, 0, 0)), 2: ("Tumor", (0, 0, 255))}
    with geojson.FeatureWriter(tmp_path / "a.geojson", names=names, scale=4.0, bounds=(320, 240)) as writer:
        tracer = OutlineTracer(80, 60, 40, writer.write)
        for row, col in ((1, 1), (0, 1), (1, 0), (0, 0)):  # any order: joined in row-major order
            tracer.add_tile(row, col, mask[row * 40:(row + 1) * 40, col * 40:(col + 1) * 40])
        assert tracer.close() == 2
    data = json.loads((tmp_path / "a.geojson").read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    first, = (f for f in data["features"] if f["properties"]["classification"]["name"] == "Glomerulus")
    assert first["properties"]["objectType"] == "annotation"
    assert first["properties"]["classification"] == {"name": "Glomerulus", "color": [255, 0, 0]}
    poly = shapely.geometry.shape(first["geometry"])
    assert poly.is_valid and len(poly.interiors) == 1 and poly.area == (30 * 40 - 100) * 16
    assert poly.exterior.is_ccw and not poly.interiors[0].is_ccw
    assert poly.equals(shapely.box(40, 40, 200, 160).difference(shapely.box(80, 80, 120, 120)))
    annotations = geojson.read_annotations(tmp_path / "a.geojson")
    values = geojson.class_values(annotations)
    assert values == {"Tumor": 1, "Glomerulus": 2}  # in order of first appearance in the file
    back = geojson.rasterize(annotations, origin=(0, 0), downsample=4.0, size=(80, 60), values=values)
    assert (back != np.array([0, 2, 1], np.uint8)[mask]).mean() < 0.03  # PIL's polygon fill differs on the outline only
    (tmp_path / "bad.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(ValueError, match="no Polygon"):
        geojson.read_annotations(tmp_path / "bad.geojson")
