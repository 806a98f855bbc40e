"""The slide job's mechanics with cheap segmenters (a colour threshold, a speckle of the slide's pixel noise):
stitching, each tile written and traced into the GeoJSON as it leaves the stream, resume after a kill (an
exception, or SIGKILL) giving the same files, failed tiles retried, memory bound. GeoJSON outlines are
checked pixel for pixel by test_outlines' independent scanline fill and scipy.ndimage.label counts."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
shapely = pytest.importorskip("shapely")

from scipy import ndimage  # noqa: E402
from test_outlines import check_exact  # noqa: E402

from refseg.io.slide import SlideView, open_slide  # noqa: E402
from refseg.jobs.slide import run_slides  # noqa: E402
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
        return [SimpleNamespace(mask=self.labels(np.asarray(i)), timings={}) for i in images]

    def labels(self, rgb):
        return (rgb[..., 1] < 100).astype(np.uint8)

    def segment(self, image):
        return self.segment_batch([image])[0]

    def prepare_target(self, image, source="image"):  # the streaming runtime's protocol
        return np.asarray(image)

    def segment_prepared(self, targets):
        return self.segment_batch(targets)

    def stream(self, items, batch_size=None):  # what the jobs' LocalRunner calls
        from refseg.runtime.stream import stream_segment
        return stream_segment(self, items, batch_size=batch_size)


class SpeckleSegmenter(ThresholdSegmenter):
    """Classes 1 and 2 as speckle on the tissue, from each pixel's grey-level noise smoothed by a 3 x 3
    median: blobs crossing every seam, meeting at corners, holding holes and islands. A function of the
    slide's pixels only (the median reaches 1 px, inside the tile margin), like the threshold."""

    def labels(self, rgb):
        return ndimage.median_filter(np.where(rgb[..., 1] < 200, rgb[..., 0] % 3, 0).astype(np.uint8), 3)


OPTIONS = dict(tile_size=256, thumbnail_size=512, preview_size=256, batch_size=3, progress="off")
# level 1 of a 1024 px slide (512 px, downsample 2), tiles of 64 px (cores of 48): 121 cells, many seams
SPECKLE = dict(level=1, tile_size=64, thumbnail_size=512, preview_size=128, batch_size=1, progress="off",
               simplify=0, resume=True)


def run_slide(segmenter, slide, outdir, options=OPTIONS):
    """One slide through the slide job; returns its record of ``summary.json``'s ``slides``."""
    summary = run_slides(segmenter, slide, outdir, **options)
    if not summary.records:
        return {"status": "done earlier"} if summary.skipped else {"status": "failed", "failed": summary.failed}
    return summary.records[0]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("slide_job") / "slide.tif", 2048)


@pytest.fixture(scope="module")
def fresh(slide, tmp_path_factory):
    """An uninterrupted threshold run of ``slide``: (output folder, its record)."""
    out = tmp_path_factory.mktemp("fresh")
    return out, run_slide(ThresholdSegmenter(), slide, out, OPTIONS)


def _mask(path):
    with tifffile.TiffFile(path) as tf:
        return tf.series[0].levels[0].asarray()


def test_stitched_mask_equals_tiles_one_by_one(slide, fresh):
    tmp_path, summary = fresh
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


def test_resume_after_interrupt_recomputes_only_unfinished_tiles(slide, fresh, tmp_path):
    options = {**OPTIONS, "resume": True}
    with pytest.raises(KeyboardInterrupt):
        run_slide(ThresholdSegmenter(fail_after=7), slide, tmp_path, options)
    stored = sorted((tmp_path / "slide.tiles").glob("r*_c*.png"))
    assert len(stored) == 6  # batches of 3: the third batch died
    before = {p: p.stat().st_mtime_ns for p in stored}
    again = ThresholdSegmenter()
    summary = run_slide(again, slide, tmp_path, options)
    assert summary["tiles_resumed"] == 6 and again.tiles == summary["tiles_tissue"] - 6
    assert summary["tiles_segmented"] == again.tiles
    assert np.array_equal(_mask(tmp_path / "slide.ome.tif"), _mask(fresh[0] / "slide.ome.tif"))
    assert (tmp_path / "slide.geojson").read_bytes() == (fresh[0] / "slide.geojson").read_bytes()
    assert all(not p.exists() or p.stat().st_mtime_ns == before[p] for p in stored)
    third = ThresholdSegmenter()
    assert run_slide(third, slide, tmp_path, options)["status"] == "done earlier" and third.tiles == 0
    # other settings: the old tile store is not reused
    (tmp_path / "slide.geojson").unlink()
    moved = {**options, "min_tissue": 0.02}
    with pytest.raises(ValueError, match=r"mode.tissue: \[True, 0.01, 512\] -> \[True, 0.02, 512\].*--force"):
        run_slide(ThresholdSegmenter(), slide, tmp_path, moved)  # refused, naming what differs
    fourth = ThresholdSegmenter()
    assert run_slide(fourth, slide, tmp_path, {**moved, "force": True})["tiles_resumed"] == 0 and fourth.tiles > 0


def test_each_tile_is_written_as_it_leaves_the_stream(slide, tmp_path):
    # no --batch-size on a CPU: one tile per model call, each stored at once; a kill after 5 keeps all 5
    options = {**OPTIONS, "resume": True}
    del options["batch_size"]
    with pytest.raises(KeyboardInterrupt):
        run_slide(ThresholdSegmenter(batch_size=16, fail_after=5), slide, tmp_path, options)
    assert len(list((tmp_path / "slide.tiles").glob("r*_c*.png"))) == 5
    again = ThresholdSegmenter(batch_size=16)
    record = run_slide(again, slide, tmp_path, options)
    assert record["tiles_resumed"] == 5 and again.tiles == record["tiles_tissue"] - 5


def test_failed_tiles_are_listed_and_retried_on_resume(slide, fresh, tmp_path):
    class Flaky(ThresholdSegmenter):
        calls = 0

        def segment_batch(self, images):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("model error on this tile")
            return super().segment_batch(images)

    options = {**OPTIONS, "resume": True}
    flaky = Flaky()
    options["batch_size"] = 1
    summary = run_slide(flaky, slide, tmp_path, options)
    assert summary["status"] == "failed tiles" and summary["tiles_failed"] == 1
    assert summary["tiles_segmented"] == summary["tiles_tissue"] - 1
    failure = summary["failed_tiles"][0]
    assert "model error" in failure["error"] and failure["tile"].startswith("slide.tif@(x=")
    assert (tmp_path / "slide.tiles").is_dir()  # kept so that resume retries the failed tile only
    again = ThresholdSegmenter()
    summary = run_slide(again, slide, tmp_path, options)
    assert summary["status"] == "ok" and again.tiles == 1 and not (tmp_path / "slide.tiles").exists()
    assert (tmp_path / "slide.geojson").read_bytes() == (fresh[0] / "slide.geojson").read_bytes()


class WatchedSpeckle(SpeckleSegmenter):
    """Records, at each tile it segments, how many grid cells the outline tracer has finished and the
    row-major index of that tile."""

    def __init__(self):
        super().__init__(batch_size=1)
        self.job, self.seen = None, []

    def segment_batch(self, images):
        run = self.job.current
        row, col = run.todo[self.tiles]
        self.seen.append((run.tracer.tiles_done, row * run.grid.cols + col))
        return super().segment_batch(images)


@pytest.fixture(scope="module")
def speckle(tmp_path_factory):
    """A 1024 px slide and an uninterrupted speckle run of it: (slide, output folder, record, segmenter)."""
    from refseg.jobs.base import job_arguments
    from refseg.jobs.segmenter_spec import LocalRunner
    from refseg.jobs.slide import SlideJob

    root = tmp_path_factory.mktemp("speckle")
    slide = write_slide(root / "speckle.tif", 1024)
    segmenter = WatchedSpeckle()
    job = SlideJob(job_arguments(input=slide, output=root / "fresh", reference=[], reference_mask=[], **SPECKLE),
                   segmenter.config, runner=LocalRunner(segmenter=segmenter))
    segmenter.job = job
    assert job.run() == 0
    return slide, root / "fresh", job.summary.records[0], segmenter


def test_speckle_outlines_are_exact_and_traced_while_tiles_finish(speckle):
    slide, out, record, segmenter = speckle
    assert record["status"] == "ok" and record["downsample"] == 2 and record["tiles_segmented"] > 20
    # when a tile goes to the models, every cell before it (row-major) already went through the tracer:
    # the GeoJSON is written while tiles finish, nothing is left for a pass at the end
    assert len(segmenter.seen) == record["tiles_segmented"]
    assert all(done == index for done, index in segmenter.seen), segmenter.seen
    assert 0 < record["times"]["geojson_s"] and record["times"]["segment_s"] > 0
    features = json.loads((out / "speckle.geojson").read_text())["features"]
    assert record["features"] == len(features) > 500
    for f in features:  # level-0 pixels -> mask pixels (downsample 2)
        f["geometry"]["coordinates"] = [[[x / 2, y / 2] for x, y in ring] for ring in f["geometry"]["coordinates"]]
    mask = _mask(out / "speckle.ome.tif")
    assert set(np.unique(mask)) == {0, 1, 2}
    check_exact(features, mask)


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from test_slide_job import SPECKLE, SpeckleSegmenter
    from refseg.jobs.slide import run_slides

    class Killed(SpeckleSegmenter):  # SIGKILL (no clean-up at all) when tile number `kill_at` comes
        def segment_batch(self, images):
            if self.tiles == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)
            return super().segment_batch(images)

    run_slides(Killed(batch_size=1), sys.argv[1], sys.argv[2], **SPECKLE)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_run_resumes_to_the_same_geojson(speckle, tmp_path):
    slide, fresh_out, fresh_record, _ = speckle
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(slide), str(tmp_path), "9"], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((tmp_path / "speckle.tiles").glob("r*_c*.png"))) == 9
    assert not (tmp_path / "speckle.geojson").exists()
    assert len(list(tmp_path.glob(".speckle.geojson.*.tmp"))) == 1  # it was being written when killed
    again = SpeckleSegmenter(batch_size=1)
    record = run_slide(again, slide, tmp_path, SPECKLE)
    assert record["status"] == "ok" and record["tiles_resumed"] == 9
    assert again.tiles == fresh_record["tiles_segmented"] - 9
    assert (tmp_path / "speckle.geojson").read_bytes() == (fresh_out / "speckle.geojson").read_bytes()
    assert np.array_equal(_mask(tmp_path / "speckle.ome.tif"), _mask(fresh_out / "speckle.ome.tif"))
    assert not list(tmp_path.glob(".*.tmp"))


def test_outline_failure_fails_the_slide_keeps_its_tiles(slide, fresh, tmp_path, monkeypatch):
    from refseg.io import outlines

    real, calls = outlines.trace_tile, []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("tracer bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(outlines, "trace_tile", broken)
    options = {**OPTIONS, "resume": True}
    summary = run_slides(ThresholdSegmenter(), slide, tmp_path, **options)
    assert summary.records == [] and len(summary.failed) == 1
    assert "slide.geojson: outlines failed (RuntimeError: tracer bug)" in summary.failed[0]["error"]
    stored = list((tmp_path / "slide.tiles").glob("r*_c*.png"))
    assert len(stored) == fresh[1]["tiles_tissue"]  # every tile segmented and kept for --resume
    assert not (tmp_path / "slide.geojson").exists() and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(outlines, "trace_tile", real)
    again = ThresholdSegmenter()
    record = run_slide(again, slide, tmp_path, options)
    assert record["status"] == "ok" and again.tiles == 0 and record["tiles_resumed"] == len(stored)
    assert (tmp_path / "slide.geojson").read_bytes() == (fresh[0] / "slide.geojson").read_bytes()


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
    from refseg.jobs.slide import run_slides
    import refseg.runtime.stream  # the runtime (torch) is loaded before the baseline, as in any run
    from refseg.io.outlines import require_outlines
    require_outlines()  # ... and the outline libraries (OpenCV, GDAL, GEOS: code, not data)

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
    summary = run_slides(Threshold(), sys.argv[1], sys.argv[2], tile_size=512, thumbnail_size=512,
                         preview_size=512, batch_size=4, progress="off")
    print(json.dumps({"delta": status("VmHWM") - before, "segmented": summary.records[0]["tiles_segmented"]}))
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
