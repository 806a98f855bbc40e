"""Volume segmentation: reference-slice planning, the empty-slice rule, failure isolation (a stand-in
segmenter), then the CLI end to end on a crop of the TotalSegmentator CT with random checkpoints (NIfTI and
a DICOM series written from it, eval, resume, summary)."""
import json
from pathlib import Path

import numpy as np
import pytest

from volume_data import ct_crop, write_dicom_series

nib = pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

from refseg.config import SegmenterConfig  # noqa: E402
from refseg.io.volume import Volume  # noqa: E402
from refseg.segmenter import SegmentationResult  # noqa: E402
from refseg.jobs.volume import run_volume_plan as run_plan  # noqa: E402
from refseg.jobs.volume_plan import plan_volume  # noqa: E402


def _labels(shape=(20, 20, 12)):
    lab = np.zeros(shape, np.int64)
    lab[4:12, 4:12, 2:11] = 5   # label 5 on slices 2..10
    lab[12:18, 12:18, 6:9] = 7  # label 7 on slices 6..8
    return lab


def test_plan_protosam_chunks_pool_and_reference_slices():
    vol = np.zeros((20, 20, 12), np.int16)
    vol[0, 0, 0] = 100
    lab = _labels()
    plan = plan_volume(vol, lab, reference=vol.copy(), labels=[5])
    # 9 labelled slices 2..10 -> chunks [2,3,4] [5,6,7] [8,9,10] -> middles 3, 6, 9; 12 targets -> 4 per chunk
    assert plan.groups == {(3,): [0, 1, 2, 3], (6,): [4, 5, 6, 7], (9,): [8, 9, 10, 11]}
    both = plan_volume(vol, lab, reference=vol.copy(), labels=[5, 7], slices="0:6")
    assert both.groups == {(3, 6): [0, 1], (6, 7): [2, 3], (8, 9): [4, 5]}  # 7: chunks [6] [7] [8]
    pooled = plan_volume(vol, lab, reference=vol.copy(), labels=[7], pool_references=True)
    assert list(pooled.groups) == [(6, 7, 8)] and pooled.groups[(6, 7, 8)] == list(range(12))
    given = plan_volume(vol, lab, reference=vol.copy(), labels=[5], reference_slices=[2, 10])
    assert given.groups == {(2,): list(range(6)), (10,): list(range(6, 12))}
    assert plan.window.lo == 0 and plan.window.hi == 100 and "reference volume" in plan.window.source


def test_plan_same_volume_nearest_and_copied():
    vol = np.arange(20 * 20 * 12, dtype=np.int16).reshape(20, 20, 12)
    lab = np.zeros(vol.shape, np.int64)
    lab[4:12, 4:12, 3] = 5
    lab[4:12, 4:12, 8] = 5
    plan = plan_volume(vol, lab, labels=[5])
    assert plan.copied == [3, 8]
    assert plan.groups == {(3,): [0, 1, 2, 4, 5], (8,): [6, 7, 9, 10, 11]}  # 5.5 -> tie -> lower


def test_plan_bad_inputs_are_named():
    vol = Volume(np.zeros((20, 20, 12), np.int16), np.eye(4), path=Path("t.nii.gz"))
    lab = Volume(_labels(), np.eye(4), path=Path("lab.nii.gz"))
    with pytest.raises(ValueError, match=r"lab.nii.gz: label\(s\) \[3\] absent from the reference"):
        plan_volume(vol, lab, reference=vol, labels=[3, 5])
    short = Volume(_labels()[:, :, :5], np.eye(4), path=Path("short.nii.gz"))
    with pytest.raises(ValueError, match=r"short.nii.gz: label map shape \(20, 20, 5\) differs"):
        plan_volume(vol, short, reference=vol)
    with pytest.raises(ValueError, match=r"label\(s\) \[7\] absent from reference slices \[2\]"):
        plan_volume(vol, lab, reference=vol, labels=[5, 7], reference_slices=[2])
    with pytest.raises(ValueError, match=r"--slices 20:30: t.nii.gz has 12 slices along axis 2 \(axial\)"):
        plan_volume(vol, lab, reference=vol, slices="20:30")
    with pytest.raises(ValueError, match=r"--slices 5:5: selects no slice of the 12 slices"):
        plan_volume(vol, lab, reference=vol, slices="5:5")


class FakeSegmenter:
    """Stand-in for refseg.Segmenter: class c where the image is bright; classes in ``no_positive`` come
    back without a positive prompt (as when nothing survives the cycle check); ``fail`` images raise."""

    def __init__(self, no_positive=(), fail_value=None):
        self.config = SegmenterConfig(batch_size=3)
        self.no_positive, self.fail_value = set(no_positive), fail_value
        self.references, self.fallback_seen = [], set()

    @property
    def classes(self):
        return sorted({int(c) for _, m in self.references for c in np.unique(m) if c})

    def set_reference(self, image, mask, source="reference"):
        self.references = [(image, mask)]

    def add_reference(self, image, mask, source="reference"):
        self.references.append((image, mask))

    def segment_batch(self, images):
        self.fallback_seen.add(self.config.fallback)
        out = []
        for image in images:
            if self.fail_value is not None and (image == self.fail_value).all():
                raise RuntimeError("model broke on this slice")
            mask = np.zeros(image.shape, np.uint8)
            result = SegmentationResult(mask=mask)
            first, *others = self.classes
            mask[image > 128] = first
            for c in others:
                mask[0, 0] = c  # what SAM might answer to negative points alone
            for c in self.classes:
                result.class_masks[c] = mask == c
                result.point_labels[c] = np.array([0] if c in self.no_positive else [1, 0])
            out.append(result)
        return out

    def segment(self, image):
        return self.segment_batch([image])[0]

    # the streaming runtime's protocol (refseg.runtime.stream)
    def prepare_target(self, image, source="image"):
        return np.asarray(image)

    def segment_prepared(self, targets):
        return self.segment_batch(targets)

    def stream(self, items, batch_size=None):  # what the jobs' LocalRunner calls
        from refseg.runtime.stream import stream_segment
        return stream_segment(self, items, batch_size=batch_size)


def test_run_plan_empty_rule_failures_and_geometry():
    vol = np.full((20, 20, 12), -1000, np.int16)
    vol[2:10, 3:9, :] = 500       # bright region -> class
    vol[:, :, 4] = 7               # slice 4: constant, the fake fails on it (window maps 7 to a known value)
    lab = _labels()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    target = Volume(vol, lps, path=Path("t.nii.gz"))  # stored LPS: flipped vs canonical
    reference = Volume(vol[::-1, ::-1].copy(), np.eye(4), path=Path("r.nii.gz"))
    reference_labels = Volume(lab[::-1, ::-1].copy(), np.eye(4), path=Path("l.nii.gz"))
    plan = plan_volume(target, reference_labels, reference=reference, labels=[5, 7])
    fail_value = plan.window.apply(np.int16(7))
    seg = FakeSegmenter(no_positive={7}, fail_value=fail_value)
    config = seg.config
    result = run_plan(seg, plan)
    assert seg.config is config and seg.fallback_seen == {True}  # the segmenter's config is never swapped
    assert list(result.failed) == [4] and "model broke" in result.failed[4]
    assert result.labels.shape == vol.shape and result.labels.dtype == np.uint8
    assert 7 not in result.labels  # no positive prompt -> empty, never forced
    expected = np.where(vol > 0, 5, 0)
    expected[:, :, 4] = 0
    assert np.array_equal(result.labels, expected)  # back in the stored (LPS) voxel order
    assert result.segmented == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def case(tmp_path_factory, small_checkpoints):
    root = tmp_path_factory.mktemp("volcase")
    ct, seg = ct_crop(root / "data")
    sam, dino = small_checkpoints
    common = ["--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "-d", "cpu", "--image-size", "224",
              "--batch-size", "2"]
    return root, ct, seg, common


def _canonical(path):
    img = nib.load(str(path))
    return np.asanyarray(nib.as_closest_canonical(img).dataobj)


def test_cli_nifti_and_dicom_end_to_end(case, capsys):
    from refseg.cli import main

    root, ct, seg, common = case
    target = root / "target.nii.gz"
    target.write_bytes(ct.read_bytes())  # another file: cross-volume mode
    out = root / "out" / "ct_labels.nii.gz"
    args = ["--label", "5", "1", "--slices", "2:4", "--window", "abdomen", *common]
    assert main(["segment", "-r", str(ct), "-m", str(seg), "-i", str(target), "-o", str(out), *args]) == 0
    src, res = nib.load(str(ct)), nib.load(str(out))
    assert res.shape == src.shape and np.array_equal(res.affine, src.affine)
    assert res.get_data_dtype() == np.uint8 and int(res.header["sform_code"]) == 2
    data = np.asanyarray(res.dataobj)
    assert set(np.unique(data)) <= {0, 1, 5}
    assert not data[:, :, :2].any() and not data[:, :, 4:].any()  # only the asked slices
    summary = json.loads((out.parent / "ct_labels.summary.json").read_text())
    assert summary["succeeded"] == 1 and summary["volumes"][0]["slices_segmented"] == 2
    assert summary["volumes"][0]["window"][2] == "abdomen" and summary["volumes"][0]["seconds"] > 0

    # The same CT as a DICOM series (shuffled files, transposed + flipped storage) gives the same labels.
    src_data = np.asanyarray(src.dataobj)
    write_dicom_series(root / "dicom", src_data, src.affine)
    dcm_out = root / "out" / "dicom_labels.nii.gz"
    assert main(["segment", "-r", str(ct), "-m", str(seg), "-i", str(root / "dicom"), "-o", str(dcm_out), *args]) == 0
    from refseg.io.volume import read_volume

    series = read_volume(root / "dicom")
    dres = nib.load(str(dcm_out))
    assert dres.shape == series.shape and np.allclose(dres.affine, series.affine)
    assert np.array_equal(_canonical(dcm_out), _canonical(out))
    assert data.any()  # something was segmented, so the comparison is not between two empty volumes

    # Per-structure volume Dice with the empty rule stated.
    capsys.readouterr()
    assert main(["eval", "-p", str(out), "-g", str(seg), "--label", "5", "1", "--per-slice"]) == 0
    table = capsys.readouterr().out
    assert "Empty rule" in table and "slice 2" in table
    from refseg.eval.metrics_volume import evaluate_volume

    score = evaluate_volume(out, seg, labels=[5])
    gt = np.asanyarray(nib.load(str(seg)).dataobj) == 5
    p = data == 5
    assert score.dice[5] == pytest.approx(2 * (p & gt).sum() / (p.sum() + gt.sum()))


def test_cli_same_volume_multilabel_one_encode_and_folder_resume(case, monkeypatch):
    from refseg.cli import main
    from refseg.runtime.torch_backend import TorchBackend

    root, ct, seg, common = case
    full = nib.load(str(seg))
    few = np.zeros(full.shape, np.uint8)
    few[:, :, 1] = np.asanyarray(full.dataobj)[:, :, 1]
    few_path = root / "few.nii.gz"
    nib.Nifti1Image(few, full.affine, header=full.header).to_filename(str(few_path))
    folder = root / "vols"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(ct.read_bytes())
    calls = []
    original = TorchBackend.encode_sam
    monkeypatch.setattr(TorchBackend, "encode_sam", lambda self, x: calls.append(len(x)) or original(self, x))
    out = root / "vols_out"
    args = ["--label", "5", "2", "--slices", "0:3", *common]
    # same-volume mode: -r is the input itself, -m labels slice 1 only
    assert main(["segment", "-r", str(folder / "a.nii.gz"), "-m", str(few_path), "-i", str(folder), "-o", str(out),
                 *args]) == 0
    assert sum(calls) == 2  # slices 0 and 2 segmented, both labels from one SAM encode each; slice 1 copied
    data = np.asanyarray(nib.load(str(out / "a.nii.gz")).dataobj)
    assert np.array_equal(data[:, :, 1], np.where(np.isin(few[:, :, 1], [5, 2]), few[:, :, 1], 0))
    assert set(np.unique(data)) <= {0, 2, 5}
    # --resume: nothing left, so no model is loaded
    import refseg.segmenter

    monkeypatch.setattr(refseg.segmenter.Segmenter, "__init__", lambda *a, **k: pytest.fail("models loaded"))
    assert main(["segment", "-r", str(folder / "a.nii.gz"), "-m", str(few_path), "-i", str(folder), "-o", str(out),
                 "--resume", *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == 1 and summary["succeeded_this_run"] == 0  # succeeded counts earlier runs too


def test_cli_volume_errors_before_models(case, tmp_path):
    from refseg.cli import main

    root, ct, seg, common = case
    out = tmp_path / "o.nii.gz"
    bad_ckpt = ["--sam-checkpoint", str(tmp_path / "none.pth")]
    assert main(["segment", "-r", str(ct), "-m", str(seg), "-i", str(ct), "-o", str(out), "--label", "200",
                 *bad_ckpt]) == 2
    small = tmp_path / "small.nii.gz"
    img = nib.load(str(seg))
    nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :3], img.affine).to_filename(str(small))
    assert main(["segment", "-r", str(ct), "-m", str(small), "-i", str(ct), "-o", str(out), *bad_ckpt]) == 2
    truncated = tmp_path / "t.nii.gz"
    truncated.write_bytes(ct.read_bytes()[:3000])
    assert main(["segment", "-r", str(truncated), "-m", str(seg), "-i", str(ct), "-o", str(out), *bad_ckpt]) == 2
    assert not out.exists()
    before = ct.read_bytes()
    assert main(["segment", "-r", str(ct), "-m", str(seg), "-i", str(ct), "-o", str(ct), *bad_ckpt]) == 2
    assert ct.read_bytes() == before
