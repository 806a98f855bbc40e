"""`refseg segment` on synthetic pyramidal slides end to end (small random models) and bad slide input."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

tifffile = pytest.importorskip("tifffile")
shapely = pytest.importorskip("shapely")

from refseg.cli import build_parser, main  # noqa: E402
from refseg.testing.synthetic_slide import write_slide  # noqa: E402

SIDE = 2048
TISSUE = (0.15, 0.15, 0.6, 0.4)  # at 2 µm/px (level 2, 512 px): two tiles of 256 px hold tissue, seven do not
DISCS = [(432, 432), (528, 432), (432, 528), (528, 528)]  # lattice centres inside the tissue


@pytest.fixture(scope="module")
def data(tmp_path_factory, small_checkpoints):
    root = tmp_path_factory.mktemp("slide_cli")
    slides = root / "slides"
    slides.mkdir()
    slide = write_slide(slides / "case1.tif", SIDE, tissue=TISSUE)
    write_slide(slides / "blank.tif", 1024, tissue=(0, 0, 0, 0))
    features = [{"type": "Feature", "geometry": shapely.geometry.mapping(shapely.geometry.Point(x, y).buffer(24)),
                 "properties": {"objectType": "annotation",
                                "classification": {"name": "Glomerulus", "color": [200, 0, 0]}}}
                for x, y in DISCS]
    annotation = root / "reference.geojson"
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    sam, dino = small_checkpoints
    common = ["--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "--device", "cpu",
              "--set", "image_size=224", "--dinov2", "vits14", "--batch-size", "1", "--tile-size", "256",
              "--thumbnail-size", "512", "--preview-size", "256"]
    return root, slides, slide, annotation, common


def test_slides_end_to_end_mask_geojson_and_tiles_one_by_one(data):
    from refseg.io.slide import SlideView, open_slide
    from refseg.runtime.tiling import TileGrid, tissue_mask, tissue_tiles
    from refseg.segmenter import Segmenter
    from refseg.jobs.references import load_references
    from refseg.jobs.segmenter_spec import config_from_args

    root, slides, slide, annotation, common = data
    out = root / "out"
    argv = ["segment", "-r", str(slide), "-m", str(annotation), "-i", str(slides), "-o", str(out),
            "--mpp", "2.0", "--simplify", "0", *common]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 2 and summary["succeeded"] == 2 and summary["failed"] == []
    assert summary["mode"] == "slide" and summary["item"] == "tile" and summary["items_segmented"] == 2
    case, blank = sorted(summary["slides"], key=lambda r: r["path"])[::-1]
    assert case["level"] == 2 and case["size"] == [512, 512] and case["tiles_total"] == 9
    assert case["tiles_background"] == 7 and case["tiles_segmented"] == 2 and case["tiles_failed"] == 0
    assert set(case["times"]) >= {"tissue_s", "segment_s", "stitch_s", "geojson_s", "total_s"}
    assert blank["tiles_segmented"] == 0 and blank["features"] == 0

    with tifffile.TiffFile(out / "case1.ome.tif") as tf:
        assert tf.is_ome and 'PhysicalSizeX="2.0"' in tf.ome_metadata
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(512, 512), (256, 256), (128, 128)]
        assert levels[0].keyframe.tile == (224, 224)
        stitched = levels[0].asarray()
    assert (out / "case1_overlay.png").is_file() and (out / "blank.geojson").is_file()
    assert not (out / "case1.tiles").exists()
    assert summary["models"]["dinov2"] == "vits14" and (out / "run_config.json").is_file()

    data_json = json.loads((out / "case1.geojson").read_text())
    assert data_json["type"] == "FeatureCollection"
    for feature in data_json["features"]:
        geom = shapely.geometry.shape(feature["geometry"])
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon") and geom.is_valid
        minx, miny, maxx, maxy = geom.bounds
        assert 0 <= minx and 0 <= miny and maxx <= SIDE and maxy <= SIDE
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"] == {"name": "Glomerulus", "color": [200, 0, 0]}
    area = sum(shapely.geometry.shape(f["geometry"]).area for f in data_json["features"])
    assert area == stitched.astype(bool).sum() * 16  # exact outlines; one pixel = 4 x 4 level-0 px

    # The same reference, the same tiles, one segment() call each, stitched by the core rule.
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    refs, _ = load_references(args)
    sam, dino = args.sam_checkpoint, args.dinov2_checkpoint
    segmenter = Segmenter(config, sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu")
    for image, mask, source in refs:
        segmenter.add_reference(image, mask, source=source)
    expected = np.zeros((512, 512), np.uint8)
    with open_slide(slide) as reader:
        view = SlideView.select(reader, mpp=2.0)
        grid = TileGrid(*view.size, 256, 32)
        thumb, scale = view.thumbnail(512)
        keep = tissue_tiles(grid, tissue_mask(thumb)[0], scale, 0.01)
        for row, col in zip(*np.nonzero(keep)):
            x, y, w, h = grid.core_box(row, col)
            result = segmenter.segment(view.read(*grid.read_box(row, col)))
            expected[y:y + h, x:x + w] = result.mask[16:16 + h, 16:16 + w]
    assert keep.sum() == 2
    assert np.array_equal(stitched, expected)


def _bad(data, *extra, reference=None):
    root, slides, slide, annotation, common = data
    ref = reference or ["-r", str(slide), "-m", str(annotation)]
    return main(["segment", *ref, "-o", str(root / "bad_out"), *common, *extra])


def test_bad_level_mpp_region_and_files_are_reported(data, tmp_path, caplog):
    root, slides, slide, annotation, common = data
    assert _bad(data, "-i", str(slide), "--level", "7") == 2
    assert "level 7 does not exist" in caplog.text
    assert _bad(data, "-i", str(slide), "--mpp", "0.05") == 2
    assert "mpp 0.05 is not available" in caplog.text
    mask = tmp_path / "m.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask)
    assert _bad(data, "-i", str(slide), "--region", "2000,2000,256,256",
                reference=["-r", str(slide), "-m", str(mask)]) == 2
    assert "outside the image" in caplog.text
    assert _bad(data, "-i", str(slide), reference=["-r", str(slide), "-m", str(mask)]) == 2
    assert "needs --region" in caplog.text
    garbage = tmp_path / "broken.svs"
    garbage.write_bytes(b"\x00" * 4096)
    assert _bad(data, "-i", str(garbage)) == 2
    assert "broken.svs" in caplog.text and "not a readable slide" in caplog.text
    cut = tmp_path / "cut.tif"
    whole = slide.read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    assert _bad(data, "-i", str(cut), "--slide") == 2
    assert "cut.tif" in caplog.text and "truncated" in caplog.text
    caplog.clear()
    assert _bad(data, "-i", str(cut)) == 2  # not routed to the 2-D reader: named as a damaged slide
    assert "cut.tif: truncated file" in caplog.text and "damaged whole-slide image" in caplog.text
    assert not (root / "bad_out" / "case1.ome.tif").exists()


def test_more_bad_input_before_any_model(data, tmp_path, monkeypatch, caplog):
    import sys

    import refseg.segmenter

    root, slides, slide, annotation, common = data
    seen = {}

    def record(self, config, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop after recording")

    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", record)
    assert _bad(data, "-i", str(slide), "--compile") == 2 and seen["compile"] is True  # --compile reaches it
    for flags, words in ((["--save-prompts"], "--save-prompts: not used for whole-slide images"),
                         (["--slices", "0:3"], "--slices: not used for whole-slide images"),
                         (["--force"], "--force goes with --resume")):
        caplog.clear()
        assert _bad(data, "-i", str(slide), *flags) == 2
        assert words in caplog.text
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    caplog.clear()
    assert main(["segment", "-r", str(slide), "-m", str(annotation), "-i", str(slide), "-o", str(a_file), *common]) == 2
    assert f"{a_file}: the output path is an existing file" in caplog.text


@pytest.mark.parametrize("missing", ["cv2", "rasterio.features", "shapely", "shapely 2.0"])
def test_missing_outline_dependency_is_refused_before_any_model(data, tmp_path, monkeypatch, caplog, missing):
    """The GeoJSON outlines need OpenCV, rasterio and shapely >= 2.1: one line naming the extra, exit 2,
    before the references are read or a model loads."""
    import sys

    import shapely

    import refseg.jobs.slide
    import refseg.segmenter

    root, slides, slide, annotation, common = data
    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", lambda *a, **k: pytest.fail("models loaded"))
    monkeypatch.setattr(refseg.jobs.slide, "load_references", lambda *a: pytest.fail("references read"))
    if missing == "shapely 2.0":
        monkeypatch.delattr(shapely, "orient_polygons")
    else:
        for name in (missing, missing.split(".")[0]):
            monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError
    out = tmp_path / "out"
    assert main(["segment", "-r", str(slide), "-m", str(annotation), "-i", str(slide), "-o", str(out), *common]) == 2
    assert "pip install 'refseg[slides]'" in caplog.text
    assert "shapely >= 2.1" in caplog.text if missing == "shapely 2.0" else f"'{missing.split('.')[0]}'" in caplog.text
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert not out.exists()  # nothing written


def test_resume_checks_the_settings_of_finished_slides(data, monkeypatch, caplog):
    import refseg.segmenter

    root, slides, slide, annotation, common = data
    out = root / "out"  # written by the end-to-end test above
    if not (out / "run_config.json").is_file():
        pytest.skip("needs the end-to-end test's outputs")
    argv = ["segment", "-r", str(slide), "-m", str(annotation), "-i", str(slides), "-o", str(out),
            "--mpp", "2.0", "--simplify", "0", "--resume", *common]
    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", lambda *a, **k: pytest.fail("models loaded"))
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["skipped"] == 2
    caplog.clear()
    assert main([*argv, "--min-tissue", "0.02"]) == 2  # a finished slide is not kept under other settings
    assert "mode.tissue: [True, 0.01, 512] -> [True, 0.02, 512]" in caplog.text


def test_reference_routes_region_mask_and_plain_image(data, tmp_path):
    from refseg.jobs.references import load_references
    from refseg.testing.synthetic_slide import structure_mask

    root, slides, slide, annotation, common = data
    level0 = structure_mask(384, 384, 256, 256, SIDE, SIDE, TISSUE, 96, 24)
    big, small = tmp_path / "mask_l0.png", tmp_path / "mask_l2.png"
    Image.fromarray(level0 * 255).save(big)
    Image.fromarray(level0[::4, ::4] * 255).save(small)

    def refs(*argv):
        args = build_parser().parse_args(["segment", *argv, "-i", str(slide), "-o", str(tmp_path / "o"), *common])
        return load_references(args)

    for mask in (big, small):  # a level-0 sized mask is resized to the processing resolution
        (image, got, _), = refs("-r", str(slide), "--region", "384,384,256,256", "-m", str(mask), "--mpp", "2.0")[0]
        assert image.shape == (64, 64, 3) and got.shape == (64, 64)
        assert (got.astype(bool) != level0[::4, ::4].astype(bool)).mean() < 0.05
    region_image = image
    (image, got, _), = refs("-r", str(slide), "-m", str(annotation), "--level", "1")[0]  # bbox + 25 % margin
    assert image.shape[:2] == got.shape and 0.1 < got.astype(bool).mean() < 0.6
    plain = tmp_path / "plain.png"
    Image.fromarray(region_image).save(plain)
    (crop, crop_mask, _), = refs("-r", str(plain), "-m", str(small), "--region", "8,8,48,40")[0]
    assert crop.shape == (40, 48, 3) and np.array_equal(crop, region_image[8:48, 8:56])
    assert np.array_equal(crop_mask.astype(bool), level0[::4, ::4][8:48, 8:56].astype(bool))
    with pytest.raises(ValueError, match="mask is 64x64 px but the reference region is 128x128"):
        refs("-r", str(slide), "--region", "384,384,256,256", "-m", str(small), "--level", "1")
    names = refs("-r", str(slide), "-m", str(annotation), "--mpp", "2.0")[1]
    assert names == {1: ("Glomerulus", (200, 0, 0))}
