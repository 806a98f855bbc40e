"""The accelerator path on the CPU (``REFSEG_ACCELERATOR_PATH=1``): the GPU's code, tested in CI.

* Its masks, prompts and scores equal the CPU path's (the CPU path runs the C++ prompt engine, the
  greedy walk on numpy, oneDNN where it is faster, encoders and decoder image by image, PIL resizes in
  the readers: independent code for every stage but the models).
* Its host reads during ``segment_batch`` (counted by :class:`refseg.runtime.host_reads.HostReadCounter`:
  ``item``/``bool``/``int``/``float``, ``tolist``, ``cpu``, ``numpy``, ``nonzero``, boolean-mask
  indexing, ``unique``, ``equal`` ...) are at most 8 per batch and the same for batches of 2 and 8.
* PIL's resizes computed on the device reproduce the readers' PIL resizes on the Kvasir pairs.

Random small checkpoints (DINOv2-S at 112, SAM ViT-B with 2 blocks at 256): masks mean nothing, only
their equality across paths matters.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refseg.pipeline.accelerator import ACCELERATOR_ENV, accelerator_path
from refseg.runtime.host_reads import HostReadCounter
from refseg.segmenter import Segmenter

sys.path.insert(0, str(Path(__file__).parent))
from test_stream import _image, write_tiny_sam  # noqa: E402

MAX_READS_PER_BATCH = 8


# the gbmseg preset's stages with its pixel radii scaled to these ~128 px images
GBMSEG_SMALL = dict(neg_radius=16.0, exclusion_radius=32.0, hard_radius=16.0)


def _segmenter(checkpoints, preset, device="cpu"):
    sam, dino = checkpoints
    seg = Segmenter.from_preset(preset, sam_checkpoint=sam, dinov2_checkpoint=dino, device=device, image_size=112,
                                batch_size=8, **(GBMSEG_SMALL if preset == "gbmseg" else {}))
    rng = np.random.default_rng(0)
    mask = np.zeros((128, 160), np.int64)
    mask[20:90, 20:70] = 1
    mask[40:120, 90:150] = 2  # two classes
    return seg.set_reference(_image(rng, 128, 160), mask)


@pytest.fixture(scope="module")
def checkpoints(small_checkpoints, tmp_path_factory):
    return write_tiny_sam(tmp_path_factory.mktemp("tiny_accel") / "sam_tiny.pth"), small_checkpoints[1]


@pytest.fixture(scope="module")
def seg(checkpoints):
    return _segmenter(checkpoints, "sat")


@pytest.fixture(scope="module")
def targets():
    rng = np.random.default_rng(1)
    return [_image(rng, *hw) for hw in ((96, 128), (150, 100), (96, 128), (64, 64))]


def test_switch(monkeypatch):
    monkeypatch.delenv(ACCELERATOR_ENV, raising=False)
    assert not accelerator_path("cpu") and accelerator_path("cuda")
    monkeypatch.setenv(ACCELERATOR_ENV, "1")
    assert accelerator_path("cpu")


def test_accelerator_path_gives_the_cpu_paths_results(seg, targets, monkeypatch):
    monkeypatch.delenv(ACCELERATOR_ENV, raising=False)
    cpu = seg.segment_batch(targets)
    prepared = seg.prepare_target(targets[0])
    assert prepared.dinov2 is not None and prepared.pixels is None  # readers resized with PIL
    monkeypatch.setenv(ACCELERATOR_ENV, "1")
    accel = seg.segment_batch(targets)
    prepared = seg.prepare_target(targets[0])
    assert prepared.dinov2 is None and prepared.sam is None  # resized on the device instead
    for a, c in zip(accel, cpu):
        np.testing.assert_array_equal(a.mask, c.mask)
        for k in seg.classes:
            np.testing.assert_array_equal(a.points[k], c.points[k])
            np.testing.assert_array_equal(a.point_labels[k], c.point_labels[k])
            assert a.scores[k] == pytest.approx(c.scores[k], abs=1e-4)
            assert (a.boxes[k] is None) == (c.boxes[k] is None)


@pytest.mark.parametrize("preset", ["sat", "gbmseg"])
def test_host_reads_per_batch_are_few_and_do_not_grow_with_the_batch(checkpoints, seg, targets, monkeypatch,
                                                                      preset):
    monkeypatch.setenv(ACCELERATOR_ENV, "1")
    seg = seg if preset == "sat" else _segmenter(checkpoints, preset)
    counts = {}
    for n in (2, 8):
        batch = [targets[i % len(targets)] for i in range(n)]
        prepared = [seg.prepare_target(t) for t in batch]
        seg.segment_prepared(prepared)  # warm-up (kernel dispatch logs, caches)
        prepared = [seg.prepare_target(t) for t in batch]
        with HostReadCounter(trace=True) as reads:
            seg.segment_prepared(prepared)
        counts[n] = reads
    for n, reads in counts.items():
        assert reads.total <= MAX_READS_PER_BATCH, (n, dict(reads.by_kind), dict(reads.sites))
    assert counts[2].total == counts[8].total, (dict(counts[2].sites), dict(counts[8].sites))
    assert counts[8].by_kind["tolist"] + counts[8].by_kind["cpu"] >= 1  # the one copy of the results


def test_device_resizes_equal_the_readers_pil_on_kvasir(kvasir_dir):
    """Pixel agreement of the accelerator path's resizes with PIL on the Kvasir images: 100 %."""
    from refseg.io.raster import list_images, read_image
    from refseg.models.sam_transforms import preprocess_shape, resize_image
    from refseg.pipeline.features import resize_rgb
    from refseg.pipeline.resample import pil_resize

    for path in list_images(kvasir_dir / "images"):
        rgb = read_image(path)
        device = torch.from_numpy(np.array(rgb))[None]  # a writable copy
        dino = pil_resize(device, (518, 518), "bicubic")[0].permute(1, 2, 0).to(torch.uint8).numpy()
        np.testing.assert_array_equal(dino, resize_rgb(rgb, 518), err_msg=str(path))
        h, w = preprocess_shape(*rgb.shape[:2], 1024)
        sam = pil_resize(device, (h, w), "bilinear")[0].permute(1, 2, 0).to(torch.uint8).numpy()
        np.testing.assert_array_equal(sam, resize_image(rgb, 1024), err_msg=str(path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_matches_the_cpu_path_and_reads_little(checkpoints, seg, targets, monkeypatch):
    """On a GPU: the same masks as the CPU path up to the GPU's float rounding in the encoders (mean IoU
    >= 0.95 on random weights, where a rounding change can move a match), and at most 8 host reads."""
    monkeypatch.delenv(ACCELERATOR_ENV, raising=False)
    cpu = seg.segment_batch(targets)
    gpu_seg = _segmenter(checkpoints, "sat", device="cuda")
    gpu = gpu_seg.segment_batch(targets)
    ious = [np.logical_and(a.mask, c.mask).sum() / max(np.logical_or(a.mask, c.mask).sum(), 1)
            for a, c in zip(gpu, cpu)]
    assert np.mean(ious) >= 0.95, ious
    prepared = [gpu_seg.prepare_target(t) for t in targets]
    with HostReadCounter(trace=True) as reads:
        gpu_seg.segment_prepared(prepared)
    assert reads.total <= MAX_READS_PER_BATCH, (dict(reads.by_kind), dict(reads.sites))
