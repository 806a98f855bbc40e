"""The slide job's mechanics with a cheap colour-threshold segmenter: stitching, resume, memory bound."""
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
shapely = pytest.importorskip("shapely")

from refseg.io.slide import SlideView, open_slide  # noqa: E402
from refseg.runtime.slide_job import SlideJobOptions, run_slide  # noqa: E402
from refseg.runtime.tiling import TileGrid  # noqa: E402
from refseg.testing.synthetic_slide import write_slide  # noqa: E402


class ThresholdSegmenter:
    """Segments the purple discs by colour: deterministic, depends on each tile's pixels only."""

    def __init__(self, batch_size=3, fail_after=None):
        self.config = SimpleNamespace(batch_size=batch_size, to_dict=lambda: {"segmenter": "threshold"})
        self.classes = [1]
        self.tiles = 0
        self.fail_after = fail_after

    def segment_batch(self, images):
        if self.fail_after is not None and self.tiles + len(images) > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.tiles += len(images)
        return [SimpleNamespace(mask=(np.asarray(i)[..., 1] < 100).astype(np.uint8), timings={}) for i in images]

    def segment(self, image):
        return self.segment_batch([image])[0]

    def prepare_target(self, image, source="image"):  # the streaming runtime's protocol
        return np.asarray(image)

    def segment_prepared(self, targets):
        return self.segment_batch(targets)

    def stream(self, items, batch_size=None):  # what refseg.runtime.stream.segment_items calls
        from refseg.runtime.stream import stream_segment
        return stream_segment(self, items, batch_size=batch_size)


OPTIONS = SlideJobOptions(tile_size=256, thumbnail_size=512, preview_size=256)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("slide_job") / "slide.tif", 2048)


def _mask(path):
    with tifffile.TiffFile(path) as tf:
        return tf.series[0].levels[0].asarray()


def test_stitched_mask_equals_tiles_one_by_one(slide, tmp_path):
    summary = run_slide(ThresholdSegmenter(), slide, tmp_path, OPTIONS)
    assert summary["status"] == "ok" and summary["tiles_total"] == 100
    assert summary["tiles_background"] > 50 and summary["tiles_segmented"] == summary["tiles_tissue"]
    stitched = _mask(tmp_path / "slide.ome.tif")
    with open_slide(slide) as reader:
        view = SlideView.select(reader)
        grid = TileGrid(*view.size, 256, 32)
        expected = np.zeros((2048, 2048), np.uint8)
        seg = ThresholdSegmenter()
        ran = 0
        for row in range(grid.rows):
            for col in range(grid.cols):
                x, y, w, h = grid.core_box(row, col)
                tile = view.read(*grid.read_box(row, col))
                if (tile[..., 1] < 100).any():  # a disc here: tissue detection must not skip it
                    m = seg.segment(tile).mask
                    expected[y:y + h, x:x + w] = m[16:16 + h, 16:16 + w]
                    ran += 1
    assert ran <= summary["tiles_segmented"]
    assert np.array_equal(stitched, expected)
    assert stitched.any() and not (tmp_path / "slide.tiles").exists()
    data = json.loads((tmp_path / "slide.geojson").read_text())
    area = sum(shapely.geometry.shape(f["geometry"]).area for f in data["features"])
    assert abs(area - stitched.sum()) / stitched.sum() < 0.02  # simplified outlines, same area


def test_resume_after_interrupt_recomputes_only_unfinished_tiles(slide, tmp_path):
    options = SlideJobOptions(**{**OPTIONS.__dict__, "resume": True})
    with pytest.raises(KeyboardInterrupt):
        run_slide(ThresholdSegmenter(fail_after=7), slide, tmp_path, options)
    stored = sorted((tmp_path / "slide.tiles").glob("r*_c*.png"))
    assert len(stored) == 6  # batches of 3: the third batch died
    before = {p: p.stat().st_mtime_ns for p in stored}
    again = ThresholdSegmenter()
    summary = run_slide(again, slide, tmp_path, options)
    assert summary["tiles_resumed"] == 6 and again.tiles == summary["tiles_tissue"] - 6
    assert summary["tiles_segmented"] == again.tiles
    fresh = tmp_path / "fresh"
    run_slide(ThresholdSegmenter(), slide, fresh, OPTIONS)
    assert np.array_equal(_mask(tmp_path / "slide.ome.tif"), _mask(fresh / "slide.ome.tif"))
    assert all(not p.exists() or p.stat().st_mtime_ns == before[p] for p in stored)
    third = ThresholdSegmenter()
    assert run_slide(third, slide, tmp_path, options)["status"] == "done earlier" and third.tiles == 0
    # other settings: the old tile store is not reused
    (tmp_path / "slide.geojson").unlink()
    moved = SlideJobOptions(**{**options.__dict__, "min_tissue": 0.02})
    fourth = ThresholdSegmenter()
    assert run_slide(fourth, slide, tmp_path, moved)["tiles_resumed"] == 0 and fourth.tiles > 0


def test_failed_tiles_are_listed_and_retried_on_resume(slide, tmp_path):
    class Flaky(ThresholdSegmenter):
        calls = 0

        def segment_batch(self, images):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("model error on this tile")
            return super().segment_batch(images)

    options = SlideJobOptions(**{**OPTIONS.__dict__, "resume": True})
    flaky = Flaky(batch_size=1)
    summary = run_slide(flaky, slide, tmp_path, options)
    assert summary["status"] == "failed tiles" and summary["tiles_failed"] == 1
    assert summary["tiles_segmented"] == summary["tiles_tissue"] - 1
    failure = summary["failed_tiles"][0]
    assert "model error" in failure["error"] and failure["tile"].startswith("slide.tif@(x=")
    assert (tmp_path / "slide.tiles").is_dir()  # kept so that resume retries the failed tile only
    again = ThresholdSegmenter()
    summary = run_slide(again, slide, tmp_path, options)
    assert summary["status"] == "ok" and again.tiles == 1 and not (tmp_path / "slide.tiles").exists()


def test_blank_slide_gives_empty_outputs(tmp_path):
    blank = write_slide(tmp_path / "blank.tif", 1024, tissue=(0, 0, 0, 0))
    seg = ThresholdSegmenter()
    summary = run_slide(seg, blank, tmp_path / "out", OPTIONS)
    assert summary["tiles_tissue"] == 0 and summary["tiles_segmented"] == 0 and seg.tiles == 0
    assert not _mask(tmp_path / "out" / "blank.ome.tif").any()
    assert json.loads((tmp_path / "out" / "blank.geojson").read_text())["features"] == []
    assert (tmp_path / "out" / "blank_overlay.png").is_file()


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace
    import numpy as np
    from refseg.runtime.slide_job import SlideJobOptions, run_slide

    class Threshold:
        config = SimpleNamespace(batch_size=4, to_dict=lambda: {})
        classes = [1]
        def segment_batch(self, images):
            return [SimpleNamespace(mask=(i[..., 1] < 100).astype(np.uint8), timings={}) for i in images]

        def prepare_target(self, image, source="image"):  # the streaming runtime's protocol
            return np.asarray(image)

        def segment_prepared(self, targets):
            return self.segment_batch(targets)

        def stream(self, items, batch_size=None):
            from refseg.runtime.stream import stream_segment
            return stream_segment(self, items, batch_size=batch_size)

    def status(key):  # kB; VmHWM is this process's peak (ru_maxrss would include the forking parent's)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    before = status("VmRSS")
    summary = run_slide(Threshold(), sys.argv[1], sys.argv[2],
                        SlideJobOptions(tile_size=512, thumbnail_size=512, preview_size=512))
    print(json.dumps({"delta": status("VmHWM") - before, "segmented": summary["tiles_segmented"]}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_is_bounded_by_tiles_not_by_the_slide(tmp_path):
    side = 8192  # 192 MiB of RGB at level 0, 64 MiB of labels
    big = write_slide(tmp_path / "big.tif", side, tile=512, tissue=(0.1, 0.1, 0.9, 0.2))
    # Under half an in-memory copy of level 0 (192 MiB RGB); what remains is the thumbnail / preview
    # (512 px), the tiles in flight and the polygons (they grow with the number of objects, not pixels).
    budget = 80 * 2 ** 20
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(big), str(tmp_path / "out")],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["segmented"] > 40
    assert result["delta"] < budget, f"peak RSS grew by {result['delta'] / 2 ** 20:.1f} MiB"
    with tifffile.TiffFile(tmp_path / "out" / "big.ome.tif") as tf:
        assert tf.series[0].levels[0].shape == (side, side) and len(tf.series[0].levels) >= 5
