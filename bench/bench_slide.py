"""pytest-benchmark rows of the whole-slide job on the synthetic test slide.

    python -m pytest bench/bench_slide.py --benchmark-only [--benchmark-json out.json]

Rows:

* ``machinery``: a 4096 px synthetic slide at level 0, tiles of 256 px, with a colour-threshold
  segmenter instead of the models: reading, tissue detection, tile store, pyramid, GeoJSON, preview —
  the job's own cost per tile.
* ``speckle``: the same slide and tiles with a speckle "segmenter" (two classes from each pixel's grey-level
  noise: ~10^5 objects, most of them a few pixels, touching at corners): the worst case of the GeoJSON
  stage, which runs tile by tile inside the segmentation phase (``times.geojson_s`` beside ``segment_s``).
* ``models``: the 2048 px test slide of ``tests/test_slide_cli.py`` at 2 µm/px (9 tiles, 2 with tissue) with random-weight SAM ViT-B
  and DINOv2 ViT-S/14 at 224 (official sizes, weights meaningless): tiles/s of a real run.
* ``tiny_models``: the same slide at 1 µm/px and at level 0 with the tiny random models of
  ``refseg.testing.write_tiny_checkpoints``: the GeoJSON stage's share of the segmentation time on the
  speckled masks random weights give.

``extra_info`` holds tiles total / skipped / segmented, the share skipped by tissue detection and the
tiles per second of the segmentation phase.
"""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("tifffile")
pytest.importorskip("shapely")

from refseg.jobs.slide import run_slides  # noqa: E402
from refseg.testing.synthetic_slide import write_slide  # noqa: E402


class _Threshold:
    config = SimpleNamespace(batch_size=4, to_dict=lambda: {"segmenter": "threshold"})
    classes = [1]

    def prepare_target(self, image, source="image"):  # the streaming runtime's protocol
        return np.asarray(image)

    def segment_prepared(self, targets):
        return [SimpleNamespace(mask=(t[..., 1] < 100).astype(np.uint8), timings={}) for t in targets]


class _Speckle(_Threshold):
    def segment_prepared(self, targets):
        return [SimpleNamespace(mask=np.where(t[..., 1] < 200, t[..., 0] % 3, 0).astype(np.uint8), timings={})
                for t in targets]


def run_slide(segmenter, slide, outdir, **options):
    """One slide through the slide job; its record of ``summary.json``'s ``slides``."""
    return run_slides(segmenter, slide, outdir, progress="off", **options).records[0]


def _record(benchmark, summary):
    total, skipped = summary["tiles_total"], summary["tiles_background"]
    benchmark.extra_info.update(tiles_total=total, tiles_skipped=skipped, tiles_segmented=summary["tiles_segmented"],
                                skipped_share=round(skipped / total, 4), tiles_per_second=summary["tiles_per_second"],
                                times=summary["times"])


@pytest.mark.parametrize("segmenter", [_Threshold, _Speckle], ids=["machinery", "speckle"])
def test_slide_machinery(benchmark, tmp_path, segmenter):
    slide = write_slide(tmp_path / "bench.tif", 4096)
    def job():
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        return run_slide(segmenter(), slide, tmp_path / "out", tile_size=256, thumbnail_size=1024,
                         preview_size=512, batch_size=4)

    rounds = 3 if segmenter is _Threshold else 1  # a speckle round writes ~3 * 10^5 features
    summary = benchmark.pedantic(job, rounds=rounds, warmup_rounds=1 if rounds > 1 else 0, iterations=1)
    _record(benchmark, summary)
    benchmark.extra_info["features"] = summary["features"]


TISSUE = (0.15, 0.15, 0.6, 0.4)


def _models_run(benchmark, tmp_path, sam, dino, **view):
    """The 2048 px test slide through random-weight models; reference: the level-0 region (384, 384, 256,
    256) and its disc mask at the processing resolution ``view`` (``mpp=`` or ``level=``)."""
    from refseg.config import SegmenterConfig
    from refseg.io.slide import SlideView, open_slide
    from refseg.segmenter import Segmenter
    from refseg.testing.synthetic_slide import structure_mask

    config = SegmenterConfig.from_preset("sat", dinov2="vits14", image_size=224, batch_size=1)
    segmenter = Segmenter(config, sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu")
    slide = write_slide(tmp_path / "bench.tif", 2048, tissue=TISSUE)
    with open_slide(slide) as reader:
        ds = round(SlideView.select(reader, **view).downsample)
        image = SlideView.select(reader, **view).read(384 // ds, 384 // ds, 256 // ds, 256 // ds)
    segmenter.set_reference(image, structure_mask(384, 384, 256, 256, 2048, 2048, TISSUE, 96, 24)[::ds, ::ds])

    def job():
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        return run_slide(segmenter, slide, tmp_path / "out", tile_size=256, thumbnail_size=512, preview_size=256,
                         **view)

    summary = benchmark.pedantic(job, rounds=1, warmup_rounds=0, iterations=1)
    _record(benchmark, summary)
    benchmark.extra_info.update(features=summary["features"],
                                geojson_share=round(summary["times"]["geojson_s"] / summary["times"]["segment_s"], 4))


def test_slide_models(benchmark, tmp_path):
    from refseg.testing.random_checkpoints import write_random_checkpoints

    sam, dino = write_random_checkpoints(tmp_path / "ckpt", sam=["vit_b"], dinov2=["vits14"])
    _models_run(benchmark, tmp_path, sam, dino, mpp=2.0)


@pytest.mark.parametrize("view", [{"mpp": 1.0}, {"level": 0}], ids=["mpp1", "level0"])
def test_slide_tiny_models(benchmark, tmp_path, view):
    """Random SAM ViT-B cut to 2 blocks at 256 px + DINOv2 ViT-S/14: speckled, hole-riddled masks at a
    few seconds per tile; ``geojson_share`` is ``times.geojson_s / times.segment_s``."""
    from refseg.testing.random_checkpoints import write_tiny_checkpoints

    _models_run(benchmark, tmp_path, *write_tiny_checkpoints(tmp_path / "ckpt"), **view)
