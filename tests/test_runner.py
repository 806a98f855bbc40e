"""Folder runs on the streaming runtime: per-image JSON, progress lines, resume with a settings
fingerprint (no model load when nothing is left), a SIGKILLed run resumed, flat memory.

Tiny models: DINOv2-S at 56 px and a 2-block SAM ViT-B with a 256-px input (test_stream's
``write_tiny_sam``), on 64-96 px synthetic images.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refseg.cli import main
from refseg.jobs.progress import Progress

sys.path.insert(0, str(Path(__file__).parent))
from test_stream import _image, write_tiny_sam  # noqa: E402


def _write_inputs(folder: Path, count: int, seed: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(_image(rng, 64 + 8 * (i % 4), 96)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_checkpoints):
    root = tmp_path_factory.mktemp("runner")
    sam = write_tiny_sam(root / "sam_tiny.pth")
    rng = np.random.default_rng(0)
    Image.fromarray(_image(rng, 96, 128)).save(root / "ref.png")
    mask = np.zeros((96, 128), np.uint8)
    mask[16:80, 20:90] = 255
    Image.fromarray(mask).save(root / "ref_mask.png")
    common = ["--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(small_checkpoints[1]),
              "--device", "cpu", "--image-size", "56", "--batch-size", "2",
              "-r", str(root / "ref.png"), "-m", str(root / "ref_mask.png")]
    return root, common


def test_progress_lines_without_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="refseg.progress"):
        bar = Progress(5, "log", every_n=2, every_s=1e9)
        for _ in range(5):
            bar.update()
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" images")[0] for line in lines] == ["progress: 2/5", "progress: 4/5", "progress: 5/5"]
    assert all("images/s" in line and "ETA" in line for line in lines)


def test_json_resume_fingerprint_and_force(env, monkeypatch, caplog):
    root, common = env
    inputs = root / "in"
    _write_inputs(inputs, 3)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "tiny.png")
    out = root / "out"
    with caplog.at_level(logging.INFO):
        code = main(["segment", "-i", str(inputs), "-o", str(out), "--save-prompts", "--progress", "log", *common])
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["succeeded"], summary["succeeded_this_run"]) == (3, 3)
    [failure] = summary["failed"]
    assert failure["path"].endswith("tiny.png") and "tiny.png: 8x8" in failure["error"]
    assert "image 3" not in failure["error"]
    assert any(r.getMessage().startswith("progress: 4/4 images") for r in caplog.records)
    record = json.loads((out / "img001.json").read_text())
    assert record["input"] == {"path": str(inputs / "img001.png"), "width": 96, "height": 72}
    timings = record["timings_s"]
    assert timings["load"] > 0 and timings["postprocess"] > 0
    assert record["timings_batch_shared"]["batch_size"] == 2
    # post-processing cleans the whole batch's masks in one call, so it is a batch share too; load is own time
    assert set(record["timings_batch_shared"]["stages"]) == {"dinov2", "matching", "prompts",
                                                             "sam_encoder", "decoder", "postprocess"}
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("img*.png")}

    (inputs / "tiny.png").unlink()
    import refseg.segmenter

    def no_models(*args, **kwargs):
        raise AssertionError("models loaded although nothing was left to do")

    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", no_models)
    assert main(["segment", "-i", str(inputs), "-o", str(out), "--resume", *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["succeeded"], summary["succeeded_this_run"], summary["skipped"]) == (3, 0, 3)

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = main(["segment", "-i", str(inputs), "-o", str(out), "--resume", "--metric", "euclidean", *common])
    assert code == 2 and "metric: 'cosine' -> 'euclidean'" in caplog.text and "--force" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("img*.png")} == stamps
    monkeypatch.undo()

    assert main(["segment", "-i", str(inputs), "-o", str(out), "--resume", "--force", "--metric", "euclidean",
                 *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded_this_run"] == 3 and summary["config"]["metric"] == "euclidean"
    assert json.loads((out / "run_config.json").read_text())["settings"]["config"]["metric"] == "euclidean"


def test_killed_run_loses_no_finished_output(env):
    root, common = env
    inputs = root / "kill_in"
    paths = _write_inputs(inputs, 6, seed=3)
    out = root / "kill_out"
    cmd = [sys.executable, "-m", "refseg.cli", "segment", "-i", str(inputs), "-o", str(out),
           "--progress", "off", *common[:-4], "--batch-size", "1", *common[-4:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("img*.png"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = len(list(out.glob("img*.png")))
    assert 2 <= before < len(paths)
    assert main(["segment", "-i", str(inputs), "-o", str(out), "--resume", *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] == len(paths) and summary["skipped"] >= before - 1
    for path in paths:
        with Image.open(out / f"{path.stem}.png") as im:
            im.load()
            assert im.size == Image.open(path).size
    assert not list(out.glob(".*.tmp"))


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import numpy as np
    from PIL import Image
    from refseg.jobs.folder import run_folder
    from refseg.segmenter import Segmenter

    sam, dino, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    seg = Segmenter.from_preset("sat", sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu",
                                image_size=28, batch_size=8, kmeans_iters=5)
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 1
    seg.set_reference(ref, mask)
    folder = root / "in"
    folder.mkdir()
    for i in range(200):
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    files = sorted(folder.iterdir())
    peaks = []
    for n, name in ((20, "a"), (200, "b")):
        summary = run_folder(seg, files[:n], root / name, progress="off")
        assert summary.succeeded == n, summary.failed
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps(peaks))
""")


def test_peak_memory_is_flat_in_the_number_of_inputs(tmp_path, small_checkpoints):
    from refseg.testing.random_checkpoints import random_sam_model, write_model

    write_model(random_sam_model("vit_b", depth=2, img_size=64), tmp_path / "sam64.pth")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "sam64.pth"),
                          str(small_checkpoints[1]), str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    after_20, after_220 = json.loads(run.stdout.strip().splitlines()[-1])
    assert after_220 <= 1.10 * after_20, (after_20, after_220)
