"""The volume job through ``refseg segment`` / ``refseg eval`` on small synthetic NIfTI volumes with tiny random
models: label values as asked, resume under other settings, book-keeping beside ``OUT.nii.gz``, every bad
input stopped before any model, per-slice PNG masks paired by order, eval by world coordinates."""
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from volume_data import synthetic_volume, write_dicom_series

nib = pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

import refseg.segmenter  # noqa: E402
from refseg.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def case(tmp_path_factory, tiny_checkpoints):
    root = tmp_path_factory.mktemp("voljob")
    ref, labels = synthetic_volume(root / "data", "ref")
    target, target_labels = synthetic_volume(root / "data", "target")  # same anatomy, another file
    sam, dino = tiny_checkpoints
    common = ["--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "-d", "cpu", "--image-size", "56",
              "--batch-size", "2"]
    return root, ref, labels, target, target_labels, common


def _no_models(monkeypatch):
    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", lambda *a, **k: pytest.fail("models loaded"))


def test_label_values_as_asked_resume_and_summary_beside_the_output(case, monkeypatch, caplog):
    root, ref, labels, target, target_labels, common = case
    out = root / "out" / "t.nii.gz"
    argv = ["segment", "-r", str(ref), "-m", str(labels), "-i", str(target), "--label", "5", *common]
    with caplog.at_level(logging.INFO):
        assert main([*argv, "-o", str(out), "--progress", "log"]) == 0
    data = np.asanyarray(nib.load(str(out)).dataobj)
    assert 5 in data and set(np.unique(data)) == {0, 5}  # the value asked for, not class 1
    assert "no usable reference patch" not in caplog.text
    assert any(r.levelno == logging.INFO and r.getMessage().startswith("progress: 6/6 slices") for r in caplog.records)
    summary = json.loads((root / "out" / "t.summary.json").read_text())
    assert summary["mode"] == "volume" and summary["succeeded"] == 1 and summary["items_segmented"] == 6
    assert summary["models"]["dinov2"] == "vits14" and summary["config"]["fallback"] is False
    assert summary["volumes"][0]["labels"] == [5]
    assert (root / "out" / "t.run_config.json").is_file() and not (root / "out" / "summary.json").exists()

    # eval: the same anatomy's ground truth, label 5
    assert main(["eval", "-p", str(out), "-g", str(target_labels), "--label", "5"]) == 0

    # resume under other settings: refused naming them, before any model; the same settings: nothing to do
    _no_models(monkeypatch)
    caplog.clear()
    assert main([*argv, "-o", str(out), "--resume", "--window", "40,400"]) == 2
    assert "mode.window: None -> '40,400'" in caplog.text and "--resume --force" in caplog.text
    assert main([*argv, "-o", str(out), "--resume"]) == 0
    assert json.loads((root / "out" / "t.summary.json").read_text())["skipped"] == 1
    monkeypatch.undo()

    # --resume --force recomputes; another output in the same folder keeps its own book-keeping
    assert main([*argv, "-o", str(out), "--resume", "--force", "--window", "40,400", "--slices", "2:3"]) == 0
    assert json.loads((root / "out" / "t.summary.json").read_text())["succeeded_this_run"] == 1
    before = (root / "out" / "t.summary.json").read_bytes()
    assert main([*argv, "-o", str(root / "out" / "u.nii.gz"), "--slices", "0:1"]) == 0
    assert (root / "out" / "t.summary.json").read_bytes() == before
    assert json.loads((root / "out" / "u.summary.json").read_text())["volumes"][0]["slices_segmented"] == 1


def test_bad_inputs_stop_before_any_model(case, tmp_path, monkeypatch, caplog):
    root, ref, labels, target, _, common = case
    _no_models(monkeypatch)
    argv = ["segment", "-r", str(ref), "-m", str(labels), "-i", str(target), *common]
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder would go")
    for out, named, words in ((a_file / "o.nii.gz", a_file, "is an existing file"),          # a file as parent
                              (blocked / "sub" / "outdir", blocked / "sub" / "outdir",
                               "cannot create the output folder"),                        # not creatable
                              (Path("/proc/self/o.nii.gz"), Path("/proc/self"), "not writable")):  # even as root
        caplog.clear()
        assert main([*argv, "-o", str(out)]) == 2, out
        assert f"{named}: " in caplog.text and words in caplog.text, caplog.text
    caplog.clear()
    assert main([*argv, "-o", str(tmp_path / "o2.nii.gz"), "--slices", "40:50"]) == 2
    assert f"--slices 40:50: {target} has 6 slices along axis 2 (axial)" in caplog.text
    assert "slice(" not in caplog.text
    for flags, words in ((["--save-prompts"], "--save-prompts: not used for volumes"),
                         (["--force"], "--force goes with --resume"),
                         (["--tile-size", "256"], "--tile-size: not used for volumes"),
                         (["--label", "7"], "label(s) [7] absent from the reference")):
        caplog.clear()
        assert main([*argv, "-o", str(tmp_path / "o3.nii.gz"), *flags]) == 2
        assert words in caplog.text
    caplog.clear()
    monkeypatch.setitem(sys.modules, "nibabel", None)  # the io extra missing: one line, exit 2
    assert main([*argv, "-o", str(tmp_path / "o4.nii.gz")]) == 2
    assert "pip install 'refseg[io]'" in caplog.text and "Traceback" not in caplog.text
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_compile_reaches_the_segmenter(case, tmp_path, monkeypatch):
    root, ref, labels, target, _, common = case
    seen = {}

    def record(self, config, **kwargs):
        seen.update(kwargs, fallback=config.fallback)
        raise ValueError("stop after recording")

    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", record)
    assert main(["segment", "-r", str(ref), "-m", str(labels), "-i", str(target), "-o", str(tmp_path / "o.nii.gz"),
                 "--compile", *common]) == 2
    assert seen["compile"] is True and seen["fallback"] is False  # fallback=False from the start, not swapped


def _dicom_with_png_masks(root: Path, labels_path: Path, names) -> tuple[Path, Path]:
    """A DICOM series of the label volume's grid (InstanceNumber = anatomical order) and one PNG mask per
    slice named by ``names(i)`` in InstanceNumber order."""
    img = nib.load(str(labels_path))
    labels = np.asanyarray(img.dataobj)
    image = (labels.astype(np.int16) * 20 - 500)
    dicom = root / "dicom"
    write_dicom_series(dicom, image, img.affine, instance_numbers=True)
    masks = root / "masks"
    masks.mkdir()
    k_count = labels.shape[2]
    for kk in range(k_count):  # file slice kk holds volume slice k = K-1-kk, pixel [r, c] = [c, J-1-r]
        k = k_count - 1 - kk
        Image.fromarray(labels[:, ::-1, k].T.astype(np.uint8)).save(masks / names(kk))
    return dicom, masks


def test_per_slice_masks_of_a_dicom_series_pair_by_order(case, tmp_path, caplog):
    from refseg.io.volume import read_slice_masks, read_volume, reorientation

    root, ref, labels, target, _, common = case
    dicom, masks = _dicom_with_png_masks(tmp_path, labels, lambda kk: f"organ_{kk:03d}.png")
    series = read_volume(dicom)
    with pytest.raises(ValueError, match="--pair-by order"):
        read_slice_masks(masks, series)  # named by number, not by the files' stems
    got = read_slice_masks(masks, series, "order")
    expected = np.asanyarray(nib.as_closest_canonical(nib.load(str(labels))).dataobj)
    assert np.array_equal(reorientation(series.affine).apply(got), expected)  # label values kept (5)
    sorted(masks.iterdir())[-1].unlink()
    with pytest.raises(ValueError, match=r"5 mask file\(s\) but the series .* has 6 files"):
        read_slice_masks(masks, series, "order")
    # through the CLI: the default is stem (refused, suggesting order) and --pair-by reaches the reader
    caplog.clear()
    assert main(["segment", "-r", str(dicom), "-m", str(masks), "-i", str(dicom), "-o", str(tmp_path / "o.nii.gz"),
                 *common]) == 2
    assert "--pair-by order" in caplog.text
    caplog.clear()
    assert main(["segment", "-r", str(dicom), "-m", str(masks), "-i", str(dicom), "-o", str(tmp_path / "o.nii.gz"),
                 "--pair-by", "order", *common]) == 2
    assert "5 mask file(s)" in caplog.text


def test_eval_pairs_voxels_by_world_position_and_takes_slices(case, tmp_path, capsys):
    from refseg.eval.metrics_volume import evaluate_volume

    root, ref, labels, *_ = case
    img = nib.load(str(labels))
    data = np.asanyarray(img.dataobj).copy()
    data[20:30, 40:50, 2] = 7  # no symmetry that a wrong pairing could hide behind
    nib.Nifti1Image(data, img.affine).to_filename(str(tmp_path / "gt.nii.gz"))
    labels = tmp_path / "gt.nii.gz"
    orientations = nib.orientations
    turn = orientations.ornt_transform(orientations.io_orientation(img.affine),
                                       orientations.axcodes2ornt(("I", "L", "P")))
    moved = nib.Nifti1Image(orientations.apply_orientation(data, turn),
                            img.affine @ orientations.inv_ornt_aff(turn, data.shape))
    moved.to_filename(str(tmp_path / "pli.nii.gz"))  # the same space stored in another voxel order
    assert moved.shape == (6, 64, 64)
    assert evaluate_volume(tmp_path / "pli.nii.gz", labels).dice == {5: 1.0, 7: 1.0}
    cut = data.copy()
    cut[:, :, 1] = 0  # slice 1 missed
    nib.Nifti1Image(cut, img.affine).to_filename(str(tmp_path / "cut.nii.gz"))
    assert evaluate_volume(tmp_path / "cut.nii.gz", labels, labels=[5]).dice[5] < 1.0
    assert evaluate_volume(tmp_path / "cut.nii.gz", labels, slices="2:5").dice == {5: 1.0, 7: 1.0}
    capsys.readouterr()
    assert main(["eval", "-p", str(tmp_path / "cut.nii.gz"), "-g", str(labels), "--slices", "2:5", "--per-slice"]) == 0
    table = capsys.readouterr().out
    assert "slice 2" in table and "slice 1 " not in table
    flipped = data[::-1].copy()  # the same grid, voxels NOT in the same place: a real mismatch is seen
    nib.Nifti1Image(flipped, img.affine).to_filename(str(tmp_path / "flip.nii.gz"))
    assert evaluate_volume(tmp_path / "flip.nii.gz", labels).dice[7] == 0.0
    nib.Nifti1Image(data[:, :, :4], img.affine).to_filename(str(tmp_path / "short.nii.gz"))
    with pytest.raises(ValueError, match="describes another space"):
        evaluate_volume(tmp_path / "short.nii.gz", labels)
