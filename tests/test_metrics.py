"""Tests of refseg.eval.metrics: Dice / IoU, the empty-vs-empty rule and folder evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refseg.io import list_images, read_mask, write_json, write_png
from refseg.eval.metrics import EMPTY_RULE, dice, evaluate_folders, iou, per_class_scores

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KVASIR = DATA / "kvasir_seg5"
RNG = np.random.default_rng(1)


def _hand_made() -> tuple[np.ndarray, np.ndarray]:
    """pred: 4 px, gt: 6 px, overlap 3 -> Dice 2*3/(4+6) = 0.6, IoU 3/7."""
    pred = np.zeros((5, 6), np.uint8)
    gt = np.zeros((5, 6), np.uint8)
    pred[1, 1:5] = 1
    gt[1, 2:5] = 1
    gt[2, 2:5] = 1
    return pred, gt


def test_dice_iou_hand_made():
    pred, gt = _hand_made()
    assert dice(pred, gt) == pytest.approx(0.6, abs=1e-12)
    assert iou(pred, gt) == pytest.approx(3 / 7, abs=1e-12)
    assert dice(pred * 255, gt.astype(bool)) == pytest.approx(0.6, abs=1e-12)  # non-zero = foreground
    assert dice(gt, gt) == 1.0 and iou(gt, gt) == 1.0
    assert dice(pred, np.zeros_like(gt)) == 0.0 and iou(np.zeros_like(pred), gt) == 0.0


def test_empty_vs_empty_is_one():
    empty = np.zeros((7, 9), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert "1.0" in EMPTY_RULE


def test_dice_iou_match_sklearn_on_random_masks():
    metrics = pytest.importorskip("sklearn.metrics")
    for _ in range(5):
        pred, gt = RNG.random((2, 30, 40)) > RNG.uniform(0.2, 0.8, size=(2, 1, 1))
        assert dice(pred, gt) == pytest.approx(metrics.f1_score(gt.ravel(), pred.ravel()), abs=1e-12)
        assert iou(pred, gt) == pytest.approx(metrics.jaccard_score(gt.ravel(), pred.ravel()), abs=1e-12)


def test_volume_and_shape_errors():
    pred = np.zeros((3, 4, 5), np.uint8)
    gt = np.zeros((3, 4, 5), np.uint8)
    pred[0, :2, :2] = 1  # 4 voxels
    gt[0, :2, :1] = 1    # 2 voxels, both inside pred
    assert dice(pred, gt) == pytest.approx(2 * 2 / 6) and iou(pred, gt) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\(3, 4, 5\).*\(4, 5\)"):
        dice(pred, gt[0])


def test_per_class_scores():
    gt = np.array([[1, 1, 2, 0], [1, 1, 2, 0]])
    pred = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
    scores = per_class_scores(pred, gt, [1, 2, 3])
    assert scores[1] == pytest.approx((2 * 2 / 8, 2 / 6, False))
    assert scores[2] == (0.0, 0.0, False)
    assert scores[3] == (1.0, 1.0, True)


def _mask_png(path: Path, mask: np.ndarray) -> Path:
    write_png(path, (np.asarray(mask) > 0).astype(np.uint8) * 255)
    return path


def test_evaluate_folders_binary(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    pred, gt = _hand_made()
    _mask_png(gt_dir / "a.png", gt)                          # Dice 0.6, IoU 3/7
    _mask_png(pred_dir / "a.png", pred)
    block = np.zeros((64, 64), np.uint8)
    block[16:48, 8:40] = 255
    Image.fromarray(block).save(gt_dir / "b.jpg", quality=90)  # JPEG ground truth, any suffix
    _mask_png(pred_dir / "b.png", block)                     # Dice 1
    _mask_png(gt_dir / "c.png", np.zeros((8, 8)))            # empty vs empty -> 1
    _mask_png(pred_dir / "c.png", np.zeros((8, 8)))
    _mask_png(gt_dir / "d.png", gt)                          # missing prediction -> 0
    _mask_png(gt_dir / "e.png", np.ones((10, 10)))           # size mismatch -> 0
    _mask_png(pred_dir / "e.png", np.ones((10, 12)))
    _mask_png(pred_dir / "a_overlay.png", pred)              # other outputs are ignored
    write_json(pred_dir / "a.json", {"points": []})

    report = evaluate_folders(pred_dir, gt_dir)
    assert report.binary and report.classes == [1]
    by_name = {s.name: s for s in report.images}
    assert list(by_name) == ["a", "b", "c", "d", "e"]
    assert by_name["a"].dice[1] == pytest.approx(0.6) and by_name["a"].iou[1] == pytest.approx(3 / 7)
    assert by_name["b"].dice[1] == 1.0 and by_name["c"].empty_both == [1]
    assert by_name["d"].status == "missing" and by_name["d"].dice[1] == 0.0
    assert by_name["e"].status == "error" and "size mismatch" in by_name["e"].error
    assert "e.png" in by_name["e"].error and by_name["e"].dice[1] == 0.0
    assert report.mean_dice_all == pytest.approx((0.6 + 1 + 1 + 0 + 0) / 5)
    assert report.mean_iou_all == pytest.approx((3 / 7 + 1 + 1 + 0 + 0) / 5)
    assert report.n_empty_both == 1 and report.missing == ["d"] and len(report.errors) == 1

    table = report.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["image", "dice", "iou", "note"]
    assert any(line.split()[:3] == ["a", "0.6000", "0.4286"] for line in lines)
    assert any(line.startswith("mean") and "0.5200" in line and "0.4857" in line for line in lines)
    assert f"{EMPTY_RULE}; 1 such case(s)" in table
    assert "Missing predictions (scored 0): 1: d" in table and "size mismatch" in table
    json.dumps(report.to_dict())  # JSON-friendly


def test_evaluate_folders_multiclass_and_labels(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    gt1 = np.array([[1, 1, 2, 0], [1, 1, 2, 0]], np.uint8)
    pr1 = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], np.uint8)  # class 1 Dice 0.5, class 2 Dice 0
    gt2 = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.uint8)
    pr2 = gt2.copy()                                         # class 1 Dice 1, class 2 both empty -> 1
    for name, g, p in (("s1", gt1, pr1), ("s2", gt2, pr2)):
        write_png(gt_dir / f"{name}.png", g)
        write_png(pred_dir / f"{name}.png", p)
    (gt_dir / "s3.png").write_bytes(b"")                     # unreadable ground truth: reported, not scored

    report = evaluate_folders(pred_dir, gt_dir)
    assert not report.binary and report.classes == [1, 2]
    assert report.mean_dice[1] == pytest.approx(0.75) and report.mean_dice[2] == pytest.approx(0.5)
    assert report.mean_iou[1] == pytest.approx((2 / 6 + 1) / 2) and report.mean_iou[2] == pytest.approx(0.5)
    assert report.mean_dice_all == pytest.approx(0.625) and report.n_empty_both == 1
    s3 = report.images[-1]
    assert s3.name == "s3" and not s3.scored and "0 bytes" in s3.error
    table = report.format_table()
    assert table.splitlines()[0].split() == ["image", "class", "dice", "iou", "note"]
    assert "1 such image-class case(s)" in table and "s3: ground truth" in table

    only2 = evaluate_folders(pred_dir, gt_dir, labels=[2])
    assert only2.classes == [2] and only2.mean_dice_all == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive class"):
        evaluate_folders(pred_dir, gt_dir, labels=[0])


def test_evaluate_folders_bad_folders(tmp_path):
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    write_png(gt_dir / "a.png", np.zeros((4, 4), np.uint8))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(gt_dir / "a.bmp")
    with pytest.raises(ValueError, match="share the stem 'a'"):
        evaluate_folders(gt_dir, gt_dir)
    with pytest.raises(FileNotFoundError, match="prediction folder"):
        evaluate_folders(tmp_path / "nope", gt_dir)


@pytest.mark.skipif(not KVASIR.is_dir(), reason=f"test data {KVASIR} not present")
def test_evaluate_kvasir_against_itself(tmp_path):
    for path in list_images(KVASIR / "masks"):
        _mask_png(tmp_path / f"{path.stem}.png", read_mask(path))
    report = evaluate_folders(tmp_path, KVASIR / "masks")
    assert len(report.images) == 5 and report.binary
    assert report.mean_dice_all == 1.0 and report.mean_iou_all == 1.0 and report.n_empty_both == 0
