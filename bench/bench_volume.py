"""Benchmark: slices/s on the TotalSegmentator CT volume, slice by slice vs through the streaming runtime.

    python -m pytest bench/bench_volume.py --benchmark-only --benchmark-columns=mean,rounds \\
        --benchmark-group-by=group

Both variants segment the same axial slices of ``shared/data/totalseg_ct/example_ct_sm.nii.gz`` (liver,
label 5, one reference slice from its own label map, window ``abdomen``) with the same Segmenter:

* ``per_slice``: ``Segmenter.segment`` on each windowed slice in turn (what a naive script does);
* ``streamed``: :func:`refseg.jobs.volume.run_volume_plan`, i.e. :func:`refseg.runtime.stream.stream_segment`
  (slices decoded ahead, batches of ``batch_size`` on the encoders).

``extra_info`` records ``slices_per_second`` and, for ``streamed``, ``speedup_vs_per_slice`` (same run).
Random weights (speed only). Environment: ``REFSEG_BENCH_SAM_DEPTH`` (SAM-B blocks, default the full 12),
``REFSEG_BENCH_VOLUME_SLICES`` (default 8), ``REFSEG_BENCH_BATCH`` (default 4), ``REFSEG_BENCH_IMAGE_SIZE``
(DINOv2 side, default 518).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_ct"
SAM_DEPTH = int(os.environ.get("REFSEG_BENCH_SAM_DEPTH", "0"))
SLICES = int(os.environ.get("REFSEG_BENCH_VOLUME_SLICES", "8"))
BATCH = int(os.environ.get("REFSEG_BENCH_BATCH", "4"))
IMAGE_SIZE = int(os.environ.get("REFSEG_BENCH_IMAGE_SIZE", "518"))
_RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from refseg.io.intensity import parse_window
    from refseg.io.volume import read_label_volume, read_volume
    from refseg.jobs.volume_plan import plan_volume
    from refseg.segmenter import Segmenter
    from refseg.testing.random_checkpoints import random_dinov2_model, random_sam_model, write_model

    if not (DATA / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"TotalSegmentator CT not found at {DATA}")
    folder = tmp_path_factory.mktemp("ckpt")
    write_model(random_sam_model("vit_b", depth=SAM_DEPTH or None), folder / "sam.pth")
    write_model(random_dinov2_model("vits14"), folder / "dinov2_vits14_pretrain.pth")
    seg = Segmenter.from_preset("sat", sam_checkpoint=folder / "sam.pth",
                                dinov2_checkpoint=folder / "dinov2_vits14_pretrain.pth", device="cpu",
                                image_size=IMAGE_SIZE, batch_size=BATCH)
    ct = read_volume(DATA / "example_ct_sm.nii.gz")
    labels = read_label_volume(DATA / "example_seg.nii.gz")
    plan = plan_volume(ct, labels, reference=ct, labels=[5], slices=f"0:{SLICES}", reference_slices=[15],
                       window=parse_window("abdomen"), config=seg.config)
    return seg, plan


def test_volume_per_slice(benchmark, setup):
    from refseg.io.volume import slice_view
    from refseg.jobs.volume_plan import reference_shots

    seg, plan = setup
    seg.set_reference(*reference_shots(plan, (15,), seg.config)[0])

    def run():
        for t in plan.targets:
            seg.segment(plan.window.apply(slice_view(plan.target_canonical, plan.axis, t)))

    benchmark.group = "volume"
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    rate = len(plan.targets) / benchmark.stats.stats.mean
    _RESULTS["per_slice"] = rate
    benchmark.extra_info.update(slices_per_second=rate, slices=len(plan.targets), sam_depth=SAM_DEPTH or 12)


def test_volume_streamed(benchmark, setup):
    from refseg.jobs.volume import run_volume_plan

    seg, plan = setup
    benchmark.group = "volume"
    result = benchmark.pedantic(lambda: run_volume_plan(seg, plan, batch_size=BATCH), rounds=1, iterations=1,
                                warmup_rounds=0)
    assert not result.failed
    rate = len(plan.targets) / benchmark.stats.stats.mean
    benchmark.extra_info.update(slices_per_second=rate, slices=len(plan.targets), batch_size=BATCH,
                                sam_depth=SAM_DEPTH or 12)
    if "per_slice" in _RESULTS:
        benchmark.extra_info["speedup_vs_per_slice"] = rate / _RESULTS["per_slice"]
    assert np.isfinite(rate)
