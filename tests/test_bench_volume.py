"""``refseg bench --volume``: per-slice matching vs ``--propagate`` rows on the TotalSegmentator sample CT.

Small models on 2 target slices: SAM ViT-B cut to 2 blocks at 256 px (per slice), DINOv2 ViT-S/14 at 224, a
random SAM 2.1 tiny written by the bench itself at a 128 input (so the run has random weights and must say so).
The Dice figures of the rows are checked against numpy on the written label maps and the sample's own label
map, split here with nibabel (not with the bench's code): odd slices = target.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA

nib = pytest.importorskip("nibabel")

TOTALSEG = SHARED_DATA / "totalseg_ct"
SLICES = (7, 9)
LABELS = (1, 5)


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """One torch thread; the matching on its torch reference (the Triton kernel under TRITON_INTERPRET is slow;
    tests/test_kernel_match.py checks the two agree)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REFSEG_DISABLE_MATCH", "1")
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoints):
    """(output folder, exit code) of one ``refseg bench --volume`` run."""
    if not (TOTALSEG / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"TotalSegmentator CT not found at {TOTALSEG}")
    import refseg.models.checkpoints
    from refseg.cli import main

    out = tmp_path_factory.mktemp("benchvol")
    sam, dinov2 = tiny_checkpoints
    with pytest.MonkeyPatch.context() as patch:  # a real SAM 2 file in the user's cache must not be picked up
        patch.setattr(refseg.models.checkpoints, "find_checkpoint", lambda source: None)
        code = main(["bench", "--volume", "-o", str(out), "--data", str(SHARED_DATA), "-d", "cpu",
                     "--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dinov2), "--image-size", "224",
                     "--sam2-image-size", "128", "--slices", f"{SLICES[0]}:{SLICES[1]}",
                     "--label", *map(str, LABELS)])
    return out, code


def _numpy_dice(pred: np.ndarray, gt: np.ndarray) -> float | None:
    if not pred.any() and not gt.any():
        return None
    return 2.0 * np.logical_and(pred, gt).sum() / (pred.sum() + gt.sum())


def test_rows_of_both_modes_with_speed_memory_and_dice(run):
    out, code = run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["volume"] and results["random_weights"] and results["schema"] == "refseg-bench/1"
    assert results["checkpoints"]["sam2:sam2.1_hiera_t"]["source"] == "random"
    rows = results["rows"]
    assert [r["mode"] for r in rows] == ["per-slice matching", "--propagate"]
    for r in rows:
        assert r["section"] == "volume" and r["slices"] == SLICES[1] - SLICES[0]
        assert r["slices_per_second"] > 0 and r["seconds"] > 0 and r["wall_s"] >= r["seconds"]
        assert r["memory_kind"] in ("rss_peak", "rss_maxrss_process") and r["peak_mib"] > 0
        assert set(r["dice"]) == {str(c) for c in LABELS}
        assert all(d is None or 0.0 <= d <= 1.0 for d in r["dice"].values())
    assert rows[1]["propagation"]["sam"] == "sam2.1_hiera_t"
    md = (out / "results.md").read_text()
    assert "## Volume: per-slice matching vs --propagate" in md
    assert "Random weights: the Dice figures are meaningless" in md
    assert "| per-slice matching | 2 |" in md and "| --propagate | 2 |" in md
    assert not (out / "throughput.png").exists()


def test_report_rewritten_from_results(run, tmp_path):
    from refseg.cli import main

    out, code = run
    assert code == 0
    assert main(["bench", "-o", str(tmp_path), "--from-results", str(out / "results.json")]) == 0
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()
    assert main(["bench", "-o", str(tmp_path), "--from-results", str(out / "results.json"), "--readme",
                 str(tmp_path / "README.md")]) == 2  # the README table is the suite's


def test_dice_equals_numpy_on_the_written_label_maps(run):
    out, code = run
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    gt = np.asanyarray(nib.load(str(TOTALSEG / "example_seg.nii.gz")).dataobj)[..., 1::2]  # RAS+: stored = canonical
    gt = gt[..., SLICES[0]:SLICES[1]]
    foreground = 0
    for r in rows:
        pred = np.asanyarray(nib.load(r["output"]).dataobj)
        assert pred.shape[:2] == gt.shape[:2] and pred.shape[2] == 15
        assert not pred[..., :SLICES[0]].any() and not pred[..., SLICES[1]:].any()  # only the asked slices
        pred = pred[..., SLICES[0]:SLICES[1]]
        foreground += int((pred != 0).sum())
        for c in LABELS:
            expected = _numpy_dice(pred == c, gt == c)
            got = r["dice"][str(c)]
            assert (got is None) == (expected is None), (r["mode"], c)
            if expected is not None:
                assert got == pytest.approx(expected, abs=1e-9), (r["mode"], c)
    assert foreground > 0  # the comparison is not only of empty masks


def test_volume_options_are_refused_where_they_do_not_apply(tmp_path, caplog):
    from refseg.cli import main

    assert main(["bench", "--volume", "-o", str(tmp_path), "--quick"]) == 2
    assert "--quick: not used by --volume" in caplog.text
    assert main(["bench", "-o", str(tmp_path), "--slices", "1:2"]) == 2
    assert "--slices: only with --volume" in caplog.text
    assert main(["bench", "--volume", "-o", str(tmp_path), "--data", str(tmp_path / "none")]) == 2
    assert "totalseg_ct" in caplog.text and not (tmp_path / "checkpoints").exists()
