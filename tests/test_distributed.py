"""Ray Data scale-out: same files as the single-process run, bad inputs recorded, killed actors survived.

One local Ray cluster (4 logical CPUs on this 2-core machine) serves the whole module.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is the optional 'dist' extra")

from refseg.config import SegmenterConfig  # noqa: E402
from refseg.distributed import WorkerSpec, segment_dataset  # noqa: E402
from refseg.io import raster  # noqa: E402
from refseg.runner import run_folder  # noqa: E402
from refseg.segmenter import Segmenter, check_reference  # noqa: E402

CONFIG = SegmenterConfig.from_preset("sat", dinov2="vits14", image_size=224, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 1024 ** 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(kvasir_dir, small_checkpoints, tmp_path_factory):
    """Kvasir folder + a corrupt file, the reference pair, the worker spec and a single-process run."""
    sam, dino = small_checkpoints
    folder = tmp_path_factory.mktemp("inputs")
    images = sorted((kvasir_dir / "images").iterdir())
    for path in images[1:]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    ref = images[0]
    references = [(*check_reference(raster.read_image(ref), raster.read_mask(kvasir_dir / "masks" / ref.name)),
                   "reference")]
    spec = WorkerSpec(CONFIG, sam_checkpoint=str(sam), dinov2_checkpoint=str(dino), device="cpu", threads=1)
    single = tmp_path_factory.mktemp("single")
    segmenter = Segmenter(CONFIG, sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu")
    for image, mask, source in references:
        segmenter.add_reference(image, mask, source=source)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run one thread each: same reduction order, same bytes
    try:
        run_folder(segmenter, raster.list_images(folder), single, save_prompts=True, overlay=True)
    finally:
        torch.set_num_threads(threads)
    return raster.list_images(folder), references, spec, single


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".png"}


def _without_timings(path: Path) -> dict:
    data = json.loads(path.read_text())
    data.pop("timings_s", None)
    return data


def test_ray_outputs_byte_identical_to_single_process(cluster, job, tmp_path):
    inputs, references, spec, single = job
    summary = segment_dataset(inputs, tmp_path, references, spec, num_workers=2, save_prompts=True,
                              overlay=True)
    assert summary.succeeded == len(inputs) - 1
    assert [f["path"] for f in summary.failed] == [str(p) for p in inputs if p.name == "broken.png"]
    assert _files(tmp_path) == _files(single)  # masks and overlays, byte for byte
    assert (tmp_path / "run_config.json").is_file()  # the settings fingerprint, written before any output
    for js in single.glob("*.json"):
        if js.name not in ("summary.json", "run_config.json"):
            assert _without_timings(tmp_path / js.name) == _without_timings(js)
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (tmp_path, single))
    assert set(ours) == set(theirs)
    assert (ours["inputs"], ours["succeeded"], ours["failed"]) == (theirs["inputs"], theirs["succeeded"],
                                                                   theirs["failed"])

    # a rerun with resume recomputes nothing
    again = segment_dataset(inputs, tmp_path, references, spec, num_workers=1, resume=True)
    assert again.succeeded == 0 and len(again.skipped) == len(inputs) - 1


class KillOnce:
    """Kills the actor process (SIGKILL, by its own pid) when it reaches ``victim``, once per marker."""

    def __init__(self, marker: str, victim: str):
        self.marker, self.victim = marker, victim

    def __call__(self, key: str) -> None:
        if key.endswith(self.victim) and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def test_killed_actor_is_restarted_and_job_finishes(cluster, job, tmp_path):
    import sys

    from ray import cloudpickle  # Ray's own copy: the actors cannot import this test module by name

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inputs, references, spec, single = job
    victim = [p for p in inputs if p.name != "broken.png"][2].name
    marker = tmp_path / "killed.pid"
    out = tmp_path / "out"
    summary = segment_dataset(inputs, out, references, spec, num_workers=1, batch_size=1,
                              before_item=KillOnce(str(marker), victim))
    assert marker.exists(), "the fault was never injected"
    assert summary.succeeded == len(inputs) - 1
    assert _files(out) == {n: b for n, b in _files(single).items() if not n.endswith("_overlay.png")}


def test_cli_ray_flag(cluster, job, tmp_path, small_checkpoints, kvasir_dir):
    from refseg.cli import main

    inputs, _, _, single = job
    sam, dino = small_checkpoints
    ref = sorted((kvasir_dir / "images").iterdir())[0]
    code = main(["segment", "-r", str(ref), "-m", str(kvasir_dir / "masks" / ref.name), "-i", str(inputs[0].parent),
                 "-o", str(tmp_path), "--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino),
                 "--dinov2", "vits14", "--image-size", "224", "--batch-size", "2", "-d", "cpu", "--ray"])
    assert code == 1  # the broken file fails, the others are written
    assert _files(tmp_path) == {n: b for n, b in _files(single).items() if not n.endswith("_overlay.png")}
