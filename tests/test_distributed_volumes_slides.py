"""Ray scale-out of volumes (slice batches) and slides (tile batches): ``refseg segment ... --ray`` gives the
label volume / stitched slide mask and GeoJSON of the single-process run; a failing item is reported, not fatal.

One local Ray cluster (4 logical CPUs on this 2-core machine) serves the module; the actors run one torch
thread each, and so does the single-process run, so both reduce in the same order.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from volume_data import ct_crop

ray = pytest.importorskip("ray", reason="Ray is the optional 'dist' extra")
nib = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")
shapely = pytest.importorskip("shapely")

from refseg.cli import main  # noqa: E402
from refseg.testing.synthetic_slide import write_slide  # noqa: E402

WORKERS = ["--ray", "--ray-workers", "2"]  # 2 actors x 1 thread on 2 cores (threads = cores // actors)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024 ** 2)
    yield
    ray.shutdown()


def _single_process(argv: list[str]) -> int:
    """``main(argv)`` with torch on one thread per process, as each of the two actors of :data:`WORKERS`
    on this 2-core machine (``WorkerSpec.threads=0``: cores // actors)."""
    import os

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def test_volume_on_ray_equals_single_process(cluster, tmp_path, small_checkpoints):
    ct, seg = ct_crop(tmp_path / "data", z=slice(8, 14), step=2)
    target = tmp_path / "target.nii.gz"
    target.write_bytes(ct.read_bytes())  # cross-volume mode: reference chunks switch along the slices
    sam, dino = small_checkpoints
    common = ["-r", str(ct), "-m", str(seg), "-i", str(target), "--label", "5", "1", "--slices", "1:3",
              "--window", "abdomen", "--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "-d", "cpu",
              "--image-size", "224", "--batch-size", "2"]
    single, remote = tmp_path / "single" / "labels.nii.gz", tmp_path / "ray" / "labels.nii.gz"
    assert _single_process(["segment", *common, "-o", str(single)]) == 0
    assert main(["segment", *common, "-o", str(remote), *WORKERS]) == 0
    expected, got = (np.asanyarray(nib.load(str(p)).dataobj) for p in (single, remote))
    assert expected.any() and np.array_equal(got, expected)
    assert np.array_equal(nib.load(str(remote)).affine, nib.load(str(single)).affine)
    ours, theirs = (json.loads((p.parent / "summary.json").read_text())["volumes"][0] for p in (remote, single))
    assert len({tuple(s) for s in theirs["reference_slices"]}) > 1  # more than one reference set was shipped
    for key in ("slices_segmented", "slices_copied", "reference_slices", "failed_slices", "window"):
        assert ours[key] == theirs[key]


def test_slide_on_ray_equals_single_process(cluster, tmp_path, small_checkpoints):
    slides = tmp_path / "slides"
    slides.mkdir()
    slide = write_slide(slides / "case1.tif", 2048, tissue=(0.15, 0.15, 0.6, 0.4))
    discs = [(432, 432), (528, 432), (432, 528), (528, 528)]
    annotation = tmp_path / "reference.geojson"
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.geometry.Point(x, y).buffer(24)),
         "properties": {"objectType": "annotation", "classification": {"name": "Glomerulus"}}}
        for x, y in discs]}))
    sam, dino = small_checkpoints
    common = ["-r", str(slide), "-m", str(annotation), "-i", str(slides), "--mpp", "2.0", "--simplify", "0",
              "--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "--device", "cpu",
              "--set", "image_size=224", "--dinov2", "vits14", "--batch-size", "1", "--tile-size", "256",
              "--thumbnail-size", "512", "--preview-size", "256"]
    single, remote = tmp_path / "single", tmp_path / "ray"
    assert _single_process(["segment", *common, "-o", str(single)]) == 0
    assert main(["segment", *common, "-o", str(remote), *WORKERS]) == 0
    masks = []
    for out in (single, remote):
        with tifffile.TiffFile(out / "case1.ome.tif") as tf:
            masks.append([level.asarray() for level in tf.series[0].levels])
    assert masks[0][0].any() and len(masks[1]) == len(masks[0])
    assert all(np.array_equal(a, b) for a, b in zip(masks[0], masks[1]))  # every pyramid level, pixel for pixel
    assert (remote / "case1.geojson").read_text() == (single / "case1.geojson").read_text()
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (remote, single))
    for key in ("tiles_total", "tiles_background", "tiles_segmented", "tiles_failed"):
        assert ours[key] == theirs[key]
    assert ours["tiles_segmented"] == 2


def test_failing_items_are_reported_and_the_stream_goes_on(cluster, tmp_path, small_checkpoints):
    from refseg.config import SegmenterConfig
    from refseg.distributed import WorkerSpec
    from refseg.ray_stream import RaySegmenter
    from refseg.io.intensity import parse_window
    from refseg.io.volume import reorientation, slice_view
    from refseg.runtime.stream import StreamItem, segment_items
    from refseg.volume_segment import read_canonical_slice

    ct, seg = ct_crop(tmp_path / "data", z=slice(8, 11))
    window = parse_window("abdomen")
    image = nib.load(str(seg))
    labels = reorientation(image.affine).apply(np.asanyarray(image.dataobj))  # canonical, as the slices
    sam, dino = small_checkpoints
    config = SegmenterConfig(dinov2="vits14", image_size=224, batch_size=2, device="cpu")
    spec = WorkerSpec(config, sam_checkpoint=str(sam), dinov2_checkpoint=str(dino), device="cpu", threads=1)
    load = functools.partial(read_canonical_slice, str(ct), None, 2)
    missing = functools.partial(read_canonical_slice, str(tmp_path / "gone.nii.gz"), None, 2, 0, window)
    with RaySegmenter(spec, num_workers=1) as remote:
        reference = load(1, window)
        remote.set_reference(reference, (slice_view(labels, 2, 1) > 0).astype(np.uint8), "slice 1")
        assert remote.classes == [1]
        items = [StreamItem("good 0", functools.partial(load, 0, window)), StreamItem("gone", missing),
                 StreamItem("good 2", functools.partial(load, 2, window))]
        outs = list(segment_items(remote, items))
    assert [o.item.key for o in outs] == ["good 0", "gone", "good 2"]
    assert isinstance(outs[1].error, FileNotFoundError) and "gone.nii.gz" in str(outs[1].error)
    assert outs[0].error is None and outs[2].error is None
    assert outs[0].result.mask.shape == reference.shape
