"""`refseg segment` / `refseg eval` / `refseg info` on a folder with good and bad files."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refseg.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_checkpoints, kvasir_dir):
    DATA = kvasir_dir
    root = tmp_path_factory.mktemp("cli")
    sam, dino = small_checkpoints
    images = sorted((DATA / "images").iterdir())
    inputs = root / "inputs"
    inputs.mkdir()
    for src in images[1:3]:
        shutil.copy(src, inputs / src.name)
    (inputs / "zero.png").write_bytes(b"")
    good = (inputs / images[1].name).read_bytes()
    (inputs / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (inputs / "tiny.png").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inputs / "tiny.png")
    common = ["--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "--device", "cpu",
              "--set", "image_size=224", "--batch-size", "2"]
    ref = ["-r", str(images[0]), "-m", str(DATA / "masks" / images[0].name)]
    return root, inputs, images, common, ref


def test_segment_folder_with_bad_files_and_resume(setup, capsys):
    root, inputs, images, common, ref = setup
    data = images[0].parent.parent
    out = root / "out"
    code = main(["segment", *ref, "-i", str(inputs), "-o", str(out), "--save-prompts", "--overlay", *common])
    assert code == 1  # some inputs failed, the others were written
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == 5 and summary["succeeded"] == 2
    failed = {Path(f["path"]).name: f["error"] for f in summary["failed"]}
    assert set(failed) == {"zero.png", "truncated.jpg", "tiny.png"}
    assert "0 bytes" in failed["zero.png"] or "empty" in failed["zero.png"]
    assert summary["items_per_second"] > 0 and summary["item"] == "image"
    for src in images[1:3]:
        mask = np.asarray(Image.open(out / f"{src.stem}.png"))
        assert mask.shape == np.asarray(Image.open(src)).shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        prompts = json.loads((out / f"{src.stem}.json").read_text())
        assert prompts["classes"]["1"]["points"] and "sam_encoder" in prompts["timings_s"]
        assert (out / f"{src.stem}_overlay.png").is_file()
    assert not list(out.glob(".*"))  # no temp files left behind
    first = (out / f"{images[1].stem}.png").stat().st_mtime_ns

    code = main(["segment", *ref, "-i", str(inputs), "-o", str(out), "--resume", *common])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1 and summary["skipped"] == 2 and summary["succeeded"] == 2  # done earlier + now
    assert summary["succeeded_this_run"] == 0
    assert (out / f"{images[1].stem}.png").stat().st_mtime_ns == first

    capsys.readouterr()
    assert main(["eval", "-p", str(out), "-g", str(data / "masks")]) == 0
    table = capsys.readouterr().out
    assert images[1].stem in table and "mean" in table.lower() and "empty" in table.lower()


def test_bad_reference_stops_before_any_work(setup):
    root, inputs, images, common, _ = setup
    empty = root / "empty_mask.png"
    Image.fromarray(np.zeros(np.asarray(Image.open(images[0])).shape[:2], np.uint8)).save(empty)
    out = root / "out_bad"
    code = main(["segment", "-r", str(images[0]), "-m", str(empty), "-i", str(inputs), "-o", str(out), *common])
    assert code == 2 and not out.exists()
    code = main(["segment", "-r", str(images[0]), "-m", str(images[0].parent.parent / "masks" / images[1].name),
                 "-i", str(inputs), "-o", str(out), *common])
    assert code == 2 and not out.exists()  # mask of another size


def test_bad_config_values_are_reported(setup, capsys):
    root, inputs, images, common, ref = setup
    assert main(["segment", *ref, "-i", str(inputs), "-o", str(root / "x"), "--set", "image_size=225"]) == 2
    assert main(["segment", *ref, "-i", str(inputs), "-o", str(root / "x"), "--set", "nope=1"]) == 2


def test_console_script_and_info():
    exe = shutil.which("refseg")
    assert exe is not None, "the refseg console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "segment" in out and "eval" in out and "info" in out
    info = subprocess.run([sys.executable, "-m", "refseg.cli", "info"], capture_output=True, text=True,
                          check=True).stdout
    assert "torch" in info and "onnxruntime" in info and "checkpoint dirs" in info
