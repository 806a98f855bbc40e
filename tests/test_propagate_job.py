"""``refseg segment ... --propagate`` on the volume job, through the CLI, with tiny random models: DINOv2 ViT-S/14
at 224 for the matching, SAM 2.1 tiny at a 128 input (random weights in the official format; its object-score
bias shifted so that objects are "present", or "absent" everywhere), on two crops of the TotalSegmentator CT
(reference slices 8-15, target slices 10-17: another file, so cross-volume mode).

Compared against: the target's own NIfTI (shape, affine, header of the output), the label value asked for,
the labelled slices themselves (same-volume mode copies them), the messages of the per-slice mode for the
same bad inputs, and the local run for Ray (the NIfTI bytes, decompressed: gzip stamps the time).
"""
from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.testing.random_checkpoints import write_random_checkpoints
from volume_data import ct_crop

nib = pytest.importorskip("nibabel")

import refseg.segmenter  # noqa: E402
import refseg.video_predictor  # noqa: E402
from refseg.cli import main  # noqa: E402

SCORE_BIAS = "sam_mask_decoder.pred_obj_score_head.layers.2.bias"


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """One torch thread; the matching on its torch reference (the Triton kernel under TRITON_INTERPRET takes
    minutes at 224 px; tests/test_kernel_match.py checks the two agree)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFSEG_DISABLE_MATCH", "1")
        yield


@pytest.fixture(scope="module")
def case(tmp_path_factory, small_checkpoints):
    root = tmp_path_factory.mktemp("propjob")
    ref, labels = ct_crop(root / "ref", slice(8, 16))
    target, target_labels = ct_crop(root / "target", slice(10, 18))
    random_file = write_random_checkpoints(root / "ckpt", sam=["sam2.1_hiera_t"], seed=3)[0]
    files = {}
    for name, shift in (("present", 5.0), ("absent", -100.0)):
        state = torch.load(random_file, weights_only=True)
        state["model"][SCORE_BIAS] += shift
        files[name] = root / name / random_file.name
        files[name].parent.mkdir()
        torch.save(state, files[name])
    common = ["--dinov2-checkpoint", str(small_checkpoints[1]), "-d", "cpu", "--image-size", "224",
              "--sam-image-size", "128", "--propagate"]
    return root, ref, labels, target, target_labels, files, common


def _no_models(monkeypatch):
    fail = lambda *a, **k: pytest.fail("models loaded")  # noqa: E731
    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", fail)
    monkeypatch.setattr(refseg.video_predictor.VideoPredictor, "__init__", fail)


def _record(out):
    return json.loads(out.with_name(out.name.replace(".nii.gz", ".summary.json")).read_text())


def test_label_values_in_the_target_geometry_summary_eval_and_resume(case, monkeypatch, caplog):
    root, ref, labels, target, target_labels, files, common = case
    out = root / "out" / "t.nii.gz"
    argv = ["segment", "-r", str(ref), "-m", str(labels), "-i", str(target), "-o", str(out), "--label", "5",
            "--sam", "sam2.1_hiera_t", "--sam-checkpoint", str(files["present"]), "--max-area-ratio", "20", *common]
    with caplog.at_level(logging.INFO):
        assert main([*argv, "--progress", "log"]) == 0
    written, source = nib.load(str(out)), nib.load(str(target))
    assert written.shape == source.shape and np.array_equal(written.affine, source.affine)
    assert written.header["descrip"] == source.header["descrip"]  # the target's header, kept
    data = np.asanyarray(written.dataobj)
    assert set(np.unique(data)) == {0, 5}  # the value asked for
    assert any(r.getMessage().startswith("progress: 8/8 slices") for r in caplog.records)
    summary = _record(out)
    assert summary["mode"] == "volume" and summary["succeeded"] == 1 and summary["items_segmented"] == 8
    assert summary["models"]["sam"] == summary["config"]["sam"] == "sam2.1_hiera_t"
    assert summary["models"]["dinov2"] == "vits14" and summary["config"]["fallback"] is False
    volume = summary["volumes"][0]
    track = volume["propagation"]["labels"]["5"]
    assert volume["propagation"]["max_area_ratio"] == 20 and volume["propagation"]["anchors"] == 3
    assert 1 <= len(track["anchors"]) <= 3 and all(m > 0 for m in track["anchor_matches"])
    assert track["slices_with_voxels"] == int((data == 5).any(axis=(0, 1)).sum()) > 0
    assert volume["slices_segmented"] == 8 and volume["reference_slices"]
    assert main(["eval", "-p", str(out), "-g", str(target_labels), "--label", "5"]) == 0

    # resume: the same settings keep the output (no model); --propagate off or other anchors are refused
    _no_models(monkeypatch)
    assert main([*argv, "--resume"]) == 0 and _record(out)["skipped"] == 1
    plain = [a for a in argv if a != "--propagate"]
    plain = plain[:plain.index("--sam")] + plain[plain.index("--max-area-ratio") + 2:]
    plain = plain[:plain.index("--sam-image-size")] + plain[plain.index("--sam-image-size") + 2:]
    for extra, words in ((plain, "mode.propagate: {"), ([*argv, "--anchors", "2"], "mode.propagate.anchors: 3 -> 2")):
        caplog.clear()
        assert main([*extra, "--resume"]) == 2
        assert words in caplog.text and "--resume --force" in caplog.text, caplog.text


def test_absent_object_and_oversize_masks_leave_no_voxel(case):
    root, ref, labels, target, _, files, common = case
    base = ["segment", "-r", str(ref), "-m", str(labels), "-i", str(target), "--label", "5", *common]
    absent = root / "absent_out.nii.gz"
    assert main([*base, "-o", str(absent), "--sam-checkpoint", str(files["absent"])]) == 0
    assert not np.asanyarray(nib.load(str(absent)).dataobj).any()
    track = _record(absent)["volumes"][0]["propagation"]["labels"]["5"]
    assert track["anchors"] and track["slices_with_voxels"] == 0 and track["absent_slices"] >= 8
    oversize = root / "oversize_out.nii.gz"
    assert main([*base, "-o", str(oversize), "--sam-checkpoint", str(files["present"]),
                 "--max-area-ratio", "0.01"]) == 0
    assert not np.asanyarray(nib.load(str(oversize)).dataobj).any()
    track = _record(oversize)["volumes"][0]["propagation"]["labels"]["5"]
    assert len(track["oversize_dropped"]) >= 3 and track["stopped"] and track["slices_with_voxels"] == 0


def test_same_volume_anchors_are_the_labelled_slices(case, tmp_path):
    root, ref, labels, _, _, files, common = case
    image = nib.load(str(labels))
    full = np.asanyarray(image.dataobj)
    few = np.zeros_like(full)
    few[..., [2, 6]] = np.where(full[..., [2, 6]] == 5, 5, 0)  # the liver marked on two slices
    nib.Nifti1Image(few, image.affine, image.header).to_filename(str(tmp_path / "few.nii.gz"))
    out = tmp_path / "same.nii.gz"
    assert main(["segment", "-r", str(ref), "-m", str(tmp_path / "few.nii.gz"), "-i", str(ref), "-o", str(out),
                 "--sam-checkpoint", str(files["present"]), "--max-area-ratio", "20", *common]) == 0
    data = np.asanyarray(nib.load(str(out)).dataobj)
    assert np.array_equal(data[..., [2, 6]], few[..., [2, 6]])  # copied as labelled
    volume = _record(out)["volumes"][0]
    track = volume["propagation"]["labels"]["5"]
    assert track["anchors"] == [2, 6] and track["anchor_matches"] == [-1, -1]  # mask prompts, no matching
    assert volume["slices_copied"] == 2 and volume["slices_segmented"] == 6
    assert set(np.unique(data)) == {0, 5}


def test_bad_inputs_stop_before_any_model(case, tmp_path, monkeypatch, caplog, tiny_checkpoints):
    root, ref, labels, target, _, files, common = case
    _no_models(monkeypatch)
    argv = ["segment", "-r", str(ref), "-m", str(labels), "-i", str(target), "--label", "5", *common]
    sam2 = ["--sam-checkpoint", str(files["present"])]
    taken = tmp_path / "taken"
    taken.write_text("x")
    (tmp_path / "pngs").mkdir()
    for flags, words in (
            (["--sam-checkpoint", str(tiny_checkpoints[0])], "SAM 2 memory needs a SAM 2 / 2.1 / MedSAM2 checkpoint: "
                                                             "sam2.1_hiera_t"),
            (["--sam", "vit_b"], "--sam vit_b: --propagate runs SAM 2 memory; name one of sam2.1_hiera_t"),
            ([*sam2, "--backend", "onnxruntime"], "--backend: not used by --propagate"),
            ([*sam2, "--compile", "--precision", "bf16"], "--compile --precision: not used by --propagate"),
            ([*sam2, "--preset", "protosam"], "--preset protosam: its method 'protosam' has no anchor prompts"),
            ([*sam2, "--sam-image-size", "100"], "--sam-image-size must be a positive multiple of 32"),
            ([*sam2, "--anchors", "0"], "--anchors must be >= 1"),
            # the per-slice mode's checks, in this mode too
            ([*sam2, "--slices", "40:50"], f"--slices 40:50: {target} has 8 slices along axis 2 (axial)"),
            ([*sam2, "--label", "5", "250"], "label(s) [250] absent from the reference"),
            ([*sam2, "-o", str(taken / "o.nii.gz")], f"{taken}: ")):
        caplog.clear()
        out = [] if "-o" in flags else ["-o", str(tmp_path / "o.nii.gz")]
        assert main([*argv, *out, *flags]) == 2, flags
        assert words in caplog.text, (flags, caplog.text)
    plain = [a for a in argv if a not in ("--propagate", "--sam-image-size", "128")]
    for flags, words in ((["--anchors", "2"], "--anchors: goes with --propagate"),):  # SAM 2 names run per slice too
        caplog.clear()
        assert main([*plain, "-o", str(tmp_path / "o.nii.gz"), *flags]) == 2
        assert words in caplog.text, caplog.text
    caplog.clear()
    image = np.zeros((32, 32), np.uint8)
    image[8:24, 8:24] = 255
    for name in ("ref.png", "mask.png", "pngs/a.png"):
        Image.fromarray(image).save(tmp_path / name)
    assert main(["segment", "-r", str(tmp_path / "ref.png"), "-m", str(tmp_path / "mask.png"), "-i",
                 str(tmp_path / "pngs"), "-o", str(tmp_path / "o"), "--propagate"]) == 2
    assert "--propagate: not used for a folder or file of 2-D images" in caplog.text


def test_a_bad_volume_fails_alone(case, tmp_path):
    root, ref, labels, target, _, files, common = case
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "good.nii.gz").write_bytes(target.read_bytes())
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "out"
    assert main(["segment", "-r", str(ref), "-m", str(labels), "-i", str(inputs), "-o", str(out), "--label", "5",
                 "--sam-checkpoint", str(files["present"]), "--max-area-ratio", "20", *common]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [os.path.basename(f["path"]) for f in summary["failed"]] == ["broken.nii.gz"]
    assert "broken.nii.gz" in summary["failed"][0]["error"] and summary["succeeded"] == 1
    assert (out / "good.nii.gz").is_file() and not (out / "broken.nii.gz").exists()


def test_ray_by_volume_equals_the_local_run(case, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is the optional 'dist' extra")
    root, ref, labels, target, _, files, common = case
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        (inputs / f"{name}.nii.gz").write_bytes(target.read_bytes())
    argv = ["segment", "-r", str(ref), "-m", str(labels), "-i", str(inputs), "--label", "5",
            "--sam-checkpoint", str(files["present"]), "--max-area-ratio", "20", *common]
    monkeypatch.setenv("REFSEG_DISABLE_ONEDNN", "1")  # one GEMM path for the driver and the actor
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 ** 2)
    try:
        torch.set_num_threads(os.cpu_count() or 1)  # the one actor's threads (default_threads(1))
        assert main([*argv, "-o", str(tmp_path / "local")]) == 0
        assert main([*argv, "-o", str(tmp_path / "ray"), "--ray", "--ray-workers", "1"]) == 0
    finally:
        torch.set_num_threads(1)
        ray.shutdown()
    for name in ("a", "b"):
        local, remote = (gzip.decompress((tmp_path / d / f"{name}.nii.gz").read_bytes()) for d in ("local", "ray"))
        assert local == remote
    assert 5 in np.asanyarray(nib.load(str(tmp_path / "local" / "a.nii.gz")).dataobj)
    ours, theirs = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ray", "local"))
    assert ours["models"]["ray_workers"] == 1 and ours["items_segmented"] == theirs["items_segmented"] == 16
    for a, b in zip(ours["volumes"], theirs["volumes"]):
        assert a["propagation"] == b["propagation"]
