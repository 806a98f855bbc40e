"""What a new user hits (issue 10): set-up from README, output permissions, early failures, masks through
the API, out-of-image points, eval, logging, MedSAM pre-processing, honest extras."""
import ast
import re
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import refseg
from refseg.cli import main
from refseg.io import writers
from refseg.jobs.summary import RunSummary
from refseg.eval.metrics import evaluate_folders
from refseg.segmenter import check_reference

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ 1-2: set-up = CI
def _readme_block(marker: str) -> list[str]:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- ci: {marker}"))
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```bash"))
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    return lines[fence + 1:end]


def test_ci_runs_exactly_the_readme_setup_and_test_lines():
    setup, tests = _readme_block("setup"), _readme_block("tests")
    joined = " ".join(setup)
    assert 'pip install -e ".[test]"' in joined
    assert 'pip install --no-deps "dinov2==0.0.1.dev2"' in joined  # the DINOv2 oracle, not only in CI
    assert tests[-1] == "python -m pytest tests -q -ra"  # after the C++ build + ctest line
    assert all(line.startswith(("cmake ", "python -m pytest")) for line in tests)
    printed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert printed == setup + tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install" not in ci.replace("python -m pip list", "")  # no set-up step of its own
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme  # the CPU-only torch build


def test_smoke_run_folders_are_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        patterns = (ROOT / ".gitignore").read_text().split()
        assert "ckpt/" in patterns and "/out/" in patterns
        return
    result = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "ckpt/sam_vit_b_01ec64.pth", "out/a.png"],
                            capture_output=True, text=True)
    assert result.stdout.split() == ["ckpt/sam_vit_b_01ec64.pth", "out/a.png"]


# ------------------------------------------------------------------------------------ 3: permissions
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_outputs_get_the_umasks_mode(tmp_path, umask_027):
    from refseg.export.manifest import write_manifest

    writers.write_png(tmp_path / "m.png", np.zeros((4, 4), np.uint8))
    writers.write_json(tmp_path / "m.json", {"a": 1})
    RunSummary(1).write(tmp_path / "summary.json")
    write_manifest(tmp_path, {"format": 1})
    for name in ("m.png", "m.json", "summary.json", "manifest.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == umask_027, name
    os.chmod(tmp_path / "m.png", 0o664)  # replacing a file keeps its mode, as open() would
    writers.write_png(tmp_path / "m.png", np.ones((4, 4), np.uint8))
    assert stat.S_IMODE((tmp_path / "m.png").stat().st_mode) == 0o664


# ------------------------------------------------------------------------------------ 4: output paths
def _segment_args(tmp_path, out, sam="missing_sam.pth", dino="missing_dino.pth"):
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(image).save(tmp_path / "ref.png")
    Image.fromarray(mask).save(tmp_path / "ref_mask.png")
    return ["segment", "-r", str(tmp_path / "ref.png"), "-m", str(tmp_path / "ref_mask.png"),
            "-i", str(tmp_path / "ref.png"), "-o", str(out), "--sam-checkpoint", str(tmp_path / sam),
            "--dinov2-checkpoint", str(tmp_path / dino), "--device", "cpu"]


def test_bad_output_path_is_refused_before_models(tmp_path, caplog):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for out, words in ((a_file, "is an existing file"), (a_file / "sub", "cannot create the output folder")):
        caplog.clear()
        assert main(_segment_args(tmp_path, out)) == 2
        assert f"{out}: " in caplog.text and words in caplog.text
        assert "checkpoint" not in caplog.text  # refused before the checkpoints are even looked up
    with pytest.raises(ValueError, match="not writable"):
        if os.geteuid() == 0:  # root writes anywhere chmod allows nothing: use a folder no one can write
            writers.prepare_output_folder("/proc/self")
        else:
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            writers.prepare_output_folder(locked)


class _FakeResult:
    def __init__(self, shape):
        self.mask = np.ones(shape, np.uint8)
        self.timings = {}


class _FakeSegmenter:
    """Enough of a Segmenter for run_folder: writes are what is tested, not the models."""

    class config:  # noqa: N801 - mimics the attribute
        batch_size = 2

        @staticmethod
        def to_dict():
            return {"preset": "fake"}

    classes = [1]

    def prepare_target(self, image, source="image"):  # the streaming runtime's protocol
        return np.asarray(image)

    def segment_prepared(self, targets):
        return [_FakeResult(t.shape[:2]) for t in targets]

    def stream(self, items, batch_size=None):  # the real streaming runtime over the fake models
        from refseg.runtime.stream import stream_segment
        return stream_segment(self, items, batch_size=batch_size)


def test_write_failures_are_per_input_and_summary_failure_hides_nothing(tmp_path, caplog):
    from refseg.jobs.folder import run_folder

    inputs = []
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / name)
        inputs.append(tmp_path / name)
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)       # b's mask cannot be written
    (out / "summary.json").mkdir()            # nor can the summary
    with caplog.at_level(logging.ERROR):
        summary = run_folder(_FakeSegmenter(), inputs, out)
    assert summary.succeeded_paths == [str(inputs[0])] and (out / "a.png").is_file()
    assert [f["path"] for f in summary.failed] == [str(inputs[1])]
    assert summary.write_error and "summary.json" in summary.write_error
    text = caplog.text
    assert str(inputs[1]) in text and text.index(str(inputs[1])) < text.index("cannot write the run summary")


# ------------------------------------------------------------------------------------ 5: checkpoints
def test_every_missing_checkpoint_in_one_message(tmp_path, caplog):
    assert main(_segment_args(tmp_path, tmp_path / "out")) == 2
    assert "2 checkpoint(s) missing" in caplog.text
    assert "missing_sam.pth" in caplog.text and "missing_dino.pth" in caplog.text


def test_model_names_contradicting_the_checkpoint_are_refused(tmp_path, small_checkpoints, caplog,
                                                                  monkeypatch):
    sam, dino = small_checkpoints
    import refseg.models.build as build

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the names were checked")

    monkeypatch.setattr(build, "_build", no_load)
    args = _segment_args(tmp_path, tmp_path / "out", sam=sam, dino=dino)
    assert main(args + ["--dinov2", "vitb14"]) == 2
    assert "--dinov2 vitb14 contradicts" in caplog.text and "DINOv2 vits14" in caplog.text
    caplog.clear()
    assert main(args + ["--sam", "vit_l"]) == 2
    assert "--sam vit_l contradicts" in caplog.text and str(sam) in caplog.text
    build.check_model_names("vits14", None, dino, sam)  # a name that fits is fine


# ------------------------------------------------------------------------------------ 7: masks via the API
def test_read_mask_is_public_and_the_api_accepts_what_pil_gives(tmp_path, caplog):
    image = np.zeros((40, 48, 3), np.uint8)
    binary = np.zeros((40, 48), np.uint8)
    binary[10:30, 12:30] = 1
    for value in (1, 63, 255):
        Image.fromarray(binary * value).save(tmp_path / f"m{value}.png")
        assert np.array_equal(refseg.read_mask(tmp_path / f"m{value}.png"), binary)
        pil = np.array(Image.open(tmp_path / f"m{value}.png"))
        assert np.array_equal(check_reference(image, pil)[1], binary)  # class 1, not 63 / 255
    rgb = np.repeat((binary * 255)[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full((40, 48, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(check_reference(image, rgb)[1], binary)
    assert np.array_equal(check_reference(image, rgba)[1], binary)
    palette = Image.fromarray(binary * 3, "P")
    palette.putpalette([0, 0, 0] * 3 + [200, 0, 0] + [0] * 756)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(refseg.read_mask(tmp_path / "p.png"), binary)
    assert np.array_equal(check_reference(image, np.array(Image.open(tmp_path / "p.png")))[1], binary)

    Image.fromarray(rgb).save(tmp_path / "m.jpg", quality=75)
    smeared = np.array(Image.open(tmp_path / "m.jpg"))
    assert np.unique(smeared).size > 5
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mask = check_reference(image, smeared)[1]
    assert set(np.unique(mask)) == {0, 1} and np.mean(mask == binary) > 0.99
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and ">= 128" in warnings[0].getMessage()

    labels = np.zeros((40, 48), np.uint8)
    labels[5:15, 5:15], labels[20:30, 20:30], labels[30:38, 2:10] = 1, 2, 5
    assert np.array_equal(check_reference(image, labels)[1], labels)  # a label map keeps its classes
    with pytest.raises(ValueError, match="differing R, G, B"):
        colour = rgb.copy()
        colour[binary == 1] = (255, 0, 0)
        check_reference(image, colour)


# ------------------------------------------------------------------------------------ 8: points
def test_engineer_points_drops_points_outside_the_image(caplog):
    pos = np.array([[10, 10], [100, 200], [300, 40]])
    neg = np.array([[512, 5], [-1, 3], [400, 400]])
    with caplog.at_level(logging.WARNING):
        points, labels = refseg.engineer_points(pos, neg, preset="gbmseg", image_size=(512, 512))
    assert "dropped 2 of 3 negatives" in caplog.text and "(512, 5)" in caplog.text
    assert ((points >= 0) & (points < 512)).all()
    assert sorted(map(tuple, points[labels == 0].tolist())) == [(400, 400)]


# ------------------------------------------------------------------------------------ 9: eval
def _masks(folder: Path, masks: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in masks.items():
        Image.fromarray(array).save(folder / name)
    return folder


def test_eval_two_valued_threshold_mismatch_and_pairing(tmp_path, caplog, capsys):
    gt = np.zeros((20, 20), np.uint8)
    gt[2:12, 2:12] = 1
    pred = np.zeros((20, 20), np.uint8)
    pred[2:12, 2:7] = 1                                  # Dice 2*50/(50+100) = 2/3
    pred_dir = _masks(tmp_path / "pred", {"a.png": pred * 63})
    gt_dir = _masks(tmp_path / "gt", {"a.png": gt * 255})
    report = evaluate_folders(pred_dir, gt_dir)
    assert report.binary and report.mean_dice_all == pytest.approx(2 / 3)

    # --threshold binarises every ground-truth format (here PNG with values 0/100/200)
    grey = gt * 200
    grey[2:12, 2:4] = 100
    _masks(tmp_path / "gt_grey", {"a.png": grey})
    report = evaluate_folders(pred_dir, tmp_path / "gt_grey", threshold=150)
    assert report.binary and report.mean_dice_all == pytest.approx(2 * 30 / (50 + 80))

    # label sets that differ are a warning naming the values
    labels_gt = gt.copy()
    labels_gt[14:18, 14:18] = 2
    labels_pred = pred.copy()
    labels_pred[14:18, 14:18] = 3
    with caplog.at_level(logging.WARNING):
        report = evaluate_folders(_masks(tmp_path / "lp", {"a.png": labels_pred}),
                                  _masks(tmp_path / "lg", {"a.png": labels_gt}))
    assert not report.binary and "only in predictions: [3]" in caplog.text
    assert "only in ground truth: [2]" in caplog.text

    # pairing by sorted order, --json, and a non-zero exit when nothing pairs
    order_pred = _masks(tmp_path / "op", {"x1.png": pred * 255, "x2.png": gt * 255})
    order_gt = _masks(tmp_path / "og", {"case_1.png": gt * 255, "case_2.png": gt * 255})
    out_json = tmp_path / "scores.json"
    assert main(["eval", "-p", str(order_pred), "-g", str(order_gt), "--pair-by", "order",
                 "--json", str(out_json)]) == 0
    scores = json.loads(out_json.read_text())
    assert scores["mean_dice_all"] == pytest.approx((2 / 3 + 1) / 2)
    assert [s["pred_path"].endswith(n) for s, n in zip(scores["images"], ("x1.png", "x2.png"))] == [True, True]
    assert main(["eval", "-p", str(order_pred), "-g", str(order_gt)]) == 1  # stems differ: nothing pairs
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "case_1.png").write_bytes(b"")
    assert main(["eval", "-p", str(order_pred), "-g", str(tmp_path / "bad")]) == 1  # nothing readable
    capsys.readouterr()


# ------------------------------------------------------------------------------------ 10: logging levels
def test_quiet_and_verbose_logging(tmp_path):
    folder = _masks(tmp_path / "m", {"a.png": np.eye(8, dtype=np.uint8) * 255})

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "refseg.cli", *flags, "eval", "-p", str(folder), "-g",
                               str(folder)], capture_output=True, text=True, check=True).stderr

    assert "evaluated 1 image(s)" in run()
    assert "evaluated 1 image(s)" not in run("-q")
    verbose = run("-v")
    assert "DEBUG" in verbose and "STREAM" not in verbose and "PIL" not in verbose


def test_cpu_fallback_and_checkpoint_name_notes_are_debug(monkeypatch, caplog):
    from refseg.kernels import dispatch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="refseg"):
        assert dispatch.choose_backend("match", "auto", [torch.zeros(2)], None) == "torch"
    records = [r for r in caplog.records if "using the torch reference" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG


# ------------------------------------------------------------------------------------ 14: MedSAM
def _official_medsam_preprocess(img_3c: np.ndarray) -> np.ndarray:
    """MedSAM_Inference.py (bowang-lab/MedSAM), the image pre-processing lines as released."""
    from skimage import transform

    img_1024 = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True,
                                anti_aliasing=True).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    return torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0)


def test_medsam_preprocessing_matches_the_official_script():
    pytest.importorskip("skimage")
    from refseg.models.sam_transforms import prepare_images, resize_coords

    rng = np.random.default_rng(0)
    small = rng.integers(20, 200, (300, 420, 3), dtype=np.uint8)
    large = rng.integers(0, 256, (1100, 600, 3), dtype=np.uint8)     # y downscaled (anti-aliasing), x up
    prepared = prepare_images([large], preprocessing="medsam")
    diff = (prepared.pixels[0] - _official_medsam_preprocess(large)[0]).abs()
    # uint8 truncation of the resize can flip one grey level where two float paths round differently
    assert float(diff.max()) <= 1.0 / 255 + 1e-6 and float((diff > 0).float().mean()) < 1e-3
    assert prepared.input_sizes == [(1024, 1024)]
    sam = prepare_images([small])
    assert sam.input_sizes == [(731, 1024)] and float(sam.pixels.min()) < 0  # SAM's mean/std, unchanged
    # prompts follow the stretch: x * 1024 / W, y * 1024 / H (the official box_1024 rule)
    xy = resize_coords(np.array([[210.0, 150.0]]), (300, 420), input_size=(1024, 1024))
    assert np.allclose(xy, [[210 * 1024 / 420, 150 * 1024 / 300]])


def test_medsam_is_selected_by_file_name_or_name(tmp_path, small_checkpoints):
    from refseg.config import SegmenterConfig
    from refseg.models.build import check_model_names
    from refseg.models.sam import SAM_SPECS, Sam
    from refseg.models.sam_transforms import preprocessing_for
    from refseg.runtime.select import load_models

    _, dino = small_checkpoints
    with torch.device("meta"):
        layout = Sam(SAM_SPECS["vit_b"]).state_dict()
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in layout.items()}
    medsam_file, other_file = tmp_path / "medsam_vit_b.pth", tmp_path / "finetuned_b.pth"
    torch.save(state, medsam_file)
    del state
    os.link(medsam_file, other_file)
    config = SegmenterConfig.from_preset("sat")
    _, sam, cfg = load_models(config, sam_checkpoint=medsam_file, dinov2_checkpoint=dino)
    assert cfg.sam == "medsam" and preprocessing_for(cfg.sam) == "medsam"
    del sam
    _, sam, cfg = load_models(config.replace(sam="medsam"), sam_checkpoint=other_file, dinov2_checkpoint=dino)
    assert cfg.sam == "medsam"
    del sam
    check_model_names(None, "medsam", dino, other_file)  # MedSAM fits any ViT-B-layout file
    with pytest.raises(refseg.CheckpointError, match="--sam vit_l contradicts"):
        check_model_names(None, "vit_l", dino, other_file)


# ------------------------------------------------------------------------------------ 16: honest extras/docs
def test_io_and_medsam_extras_list_only_what_the_code_imports():
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "EXTRAS")
    source = "\n".join(p.read_text(encoding="utf-8") for folder in ("engine", "kernels", "export")
                       for p in (ROOT / folder).rglob("*.py"))
    modules = {"scikit-image": "skimage"}
    for extra in ("io", "medsam", "dist"):
        for package in extras.get(extra, []):
            name = re.split(r"[\[<>=!~ ;]", package)[0]  # "ray[data]>=2.40" -> "ray"
            module = modules.get(name, name)
            assert (f'require("{module}' in source or f"import {module}" in source), (extra, package)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "gets the FP16 flag path" not in readme
    assert "meet only through these names" not in (ROOT / "engine/runtime/io_names.py").read_text()
