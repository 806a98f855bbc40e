"""``refseg segment --ray``: one actor pool for folders, volumes and slides. Each mode's outputs are byte for
byte those of the local run; progress is logged at INFO; a killed actor is restarted and the job finishes
(a missing ``ray``: tests/test_jobs.py).

One local Ray cluster (4 logical CPUs) serves the module; 1-2 actors with tiny random models. The actors
run ``cores // actors`` torch threads, and so does the local run they are compared with (same reduction
order, same bytes).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_stream import _image
from volume_data import synthetic_volume

ray = pytest.importorskip("ray", reason="Ray is the optional 'dist' extra")

from refseg.cli import build_parser, main  # noqa: E402
from refseg.jobs import run_segment  # noqa: E402

WORKERS = ["--ray", "--ray-workers", "2"]


@pytest.fixture(scope="module")
def cluster():
    # The CPU GEMM path (oneDNN or F.linear) is chosen per process by a timing probe, so under load the driver
    # and an actor may round differently; pin it (for the actors too: set before they start) so that the
    # comparison is about the job layer.
    saved = os.environ.get("REFSEG_DISABLE_ONEDNN")
    os.environ["REFSEG_DISABLE_ONEDNN"] = "1"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024 ** 2)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("REFSEG_DISABLE_ONEDNN", None)
    else:
        os.environ["REFSEG_DISABLE_ONEDNN"] = saved


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("ray_folder")
    rng = np.random.default_rng(0)
    Image.fromarray(_image(rng, 96, 128)).save(root / "ref.png")
    mask = np.zeros((96, 128), np.uint8)
    mask[16:80, 20:90] = 255
    Image.fromarray(mask).save(root / "ref_mask.png")
    inputs = root / "in"
    inputs.mkdir()
    for i in range(4):
        Image.fromarray(_image(rng, 64 + 8 * i, 96)).save(inputs / f"img{i}.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    sam, dino = tiny_checkpoints
    common = ["-r", str(root / "ref.png"), "-m", str(root / "ref_mask.png"), "-i", str(inputs),
              "--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "-d", "cpu", "--image-size", "56",
              "--batch-size", "2"]
    return root, common


def _local(argv: list[str]) -> int:
    """``main(argv)`` with torch on ``cores // 2`` threads, as each of the two actors of :data:`WORKERS`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _files(folder: Path, suffixes=(".png",)) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in suffixes}


def _without_timings(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("timings_s", None)
    return data


def test_folder_on_ray_equals_the_local_run(cluster, folder, caplog):
    root, common = folder
    local, remote = root / "local", root / "ray"
    assert _local(["segment", *common, "-o", str(local), "--save-prompts", "--overlay"]) == 1  # broken.png
    with caplog.at_level(logging.INFO):
        assert main(["segment", *common, "-o", str(remote), "--save-prompts", "--overlay", "--progress", "log",
                     *WORKERS]) == 1
    assert any(r.levelno == logging.INFO and r.getMessage().startswith("progress: 5/5 images")
               for r in caplog.records)
    assert _files(remote) == _files(local) and len(_files(local)) == 8  # masks and overlays, byte for byte
    for js in local.glob("img*.json"):
        assert _without_timings(remote / js.name) == _without_timings(js)
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (remote, local))
    assert set(ours) == set(theirs)
    for key in ("inputs", "succeeded", "failed", "items_segmented", "config"):
        assert ours[key] == theirs[key]
    assert ours["models"]["ray_workers"] == 2 and ours["models"]["dinov2"] == "vits14"


class KillOnce:
    """Kills the actor process (SIGKILL, by its own pid) when it reaches ``victim``, once per marker."""

    def __init__(self, marker: str, victim: str):
        self.marker, self.victim = marker, victim

    def __call__(self, key: str) -> None:
        if key.endswith(self.victim) and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_actor_is_restarted_and_the_job_finishes(cluster, folder):
    from ray import cloudpickle  # Ray's own copy: the actors cannot import this test module by name

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root, common = folder
    marker, out = root / "killed.pid", root / "killed"
    args = build_parser().parse_args(["segment", *common, "-o", str(out), "--ray", "--ray-workers", "1",
                                      "--batch-size", "1"])
    assert run_segment(args, before_item=KillOnce(str(marker), "img2.png")) == 1
    assert marker.exists(), "the fault was never injected"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] == 4 and [Path(f["path"]).name for f in summary["failed"]] == ["broken.png"]
    assert set(_files(out)) == {f"img{i}.png" for i in range(4)}


def test_volume_on_ray_equals_the_local_run_and_keeps_label_values(cluster, tmp_path, tiny_checkpoints):
    ref, labels = synthetic_volume(tmp_path / "data", "ref")
    target, _ = synthetic_volume(tmp_path / "data", "target")  # another file: cross-volume mode
    sam, dino = tiny_checkpoints
    common = ["-r", str(ref), "-m", str(labels), "-i", str(target), "--label", "5", "--slices", "1:5",
              "--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "-d", "cpu", "--image-size", "56",
              "--batch-size", "2"]
    local, remote = tmp_path / "local" / "t.nii.gz", tmp_path / "ray" / "t.nii.gz"
    assert _local(["segment", *common, "-o", str(local)]) == 0
    assert main(["segment", *common, "-o", str(remote), *WORKERS]) == 0
    nib = pytest.importorskip("nibabel")
    expected, got = (np.asanyarray(nib.load(str(p)).dataobj) for p in (local, remote))
    assert 5 in expected and set(np.unique(expected)) == {0, 5}
    assert np.array_equal(got, expected)
    ours, theirs = (json.loads((p.parent / "t.summary.json").read_text())["volumes"][0] for p in (remote, local))
    assert len(theirs["reference_slices"]) > 1  # more than one reference set was shipped to the actors
    for key in ("slices_segmented", "reference_slices", "failed_slices", "window", "labels"):
        assert ours[key] == theirs[key]


def test_slide_on_ray_equals_the_local_run(cluster, tmp_path, tiny_checkpoints):
    shapely = pytest.importorskip("shapely")
    tifffile = pytest.importorskip("tifffile")
    from refseg.testing.synthetic_slide import write_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    slide = write_slide(slides / "case1.tif", 2048, tissue=(0.15, 0.15, 0.6, 0.4))
    annotation = tmp_path / "reference.geojson"
    annotation.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.geometry.Point(x, y).buffer(24)),
         "properties": {"objectType": "annotation", "classification": {"name": "Glomerulus"}}}
        for x, y in [(432, 432), (528, 432), (432, 528), (528, 528)]]}))
    sam, dino = tiny_checkpoints
    common = ["-r", str(slide), "-m", str(annotation), "-i", str(slides), "--mpp", "2.0", "--simplify", "0",
              "--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "-d", "cpu", "--image-size", "112",
              "--tile-size", "128", "--overlap", "16", "--thumbnail-size", "512", "--preview-size", "256"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert _local(["segment", *common, "-o", str(local)]) == 0
    assert main(["segment", *common, "-o", str(remote), *WORKERS]) == 0
    masks = []
    for out in (local, remote):
        with tifffile.TiffFile(out / "case1.ome.tif") as tf:
            masks.append([level.asarray() for level in tf.series[0].levels])
    assert masks[0][0].any() and len(masks[1]) == len(masks[0])
    assert all(np.array_equal(a, b) for a, b in zip(masks[0], masks[1]))  # every pyramid level
    assert (remote / "case1.geojson").read_text() == (local / "case1.geojson").read_text()
    ours, theirs = (json.loads((d / "summary.json").read_text())["slides"][0] for d in (remote, local))
    for key in ("tiles_total", "tiles_background", "tiles_segmented", "tiles_failed"):
        assert ours[key] == theirs[key]
