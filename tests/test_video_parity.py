"""Parity of ``refseg.VideoPredictor`` with sam2 1.1.0's ``SAM2VideoPredictor`` on CT slices (CPU, fp32).

Both sides load the SAME official-format random checkpoint (``refseg.testing.random_checkpoints``;
sam2's ``build_sam2_video_predictor`` loads it strictly, refseg loads every key too) at a 128-pixel
model input (the official ``image_size`` override; it keeps the test to seconds) and see the same
pixels: six slices of the TotalSegmentator CT crop, windowed, written as ``<index>.jpg`` (what sam2
reads) and decoded back with Pillow for refseg's ``frames=`` path (refseg reads the folder itself in
the first scenario). sam2 is run with its default post-processing; where its compiled extension
(``sam2._C``, needed for hole filling) is missing, its connected-components call is given a SciPy
implementation so that it fills holes as a full install does.

Scenarios, every output of every call compared (mask logits <= 1e-2 at the slices' resolution; masks
equal except where the official logit is within that tolerance of 0, where the tolerated error
decides; measured: see docs/video.md):

* points: one click on slice 2, forward then backward, then a correction click on a tracked slice
  (memory-conditioned, 3 points: single mask with dynamic multimask) and a short forward pass;
* masks: three objects on slice 3: the liver mask, a box, an empty mask (object absent: no-object
  pointer, no-object memory embedding, -1024 logits), forward then backward;
* SAM 2 (not 2.1): points, both directions (no pointer temporal encodings, no no-object embedding).

The logits are of order 1-10 and the masks cover 5-20 % of a slice, so the tolerance is meaningful,
and the memory banks (scores, pointers, bfloat16 memories) are compared too. Random weights make the
memory nearly irrelevant to the output, so the test checkpoints sharpen it (see ``checkpoints``);
deliberately wrong memory wirings (temporal slots reversed, pointer distances off by one, tracked
memories left out) then break parity by more than 10x the tolerance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import refseg
from refseg.io.intensity import Window
from refseg.models import sam2_memory
from refseg.testing.random_checkpoints import write_random_checkpoints
from volume_data import TOTALSEG

pytest.importorskip("sam2", reason="the official sam2 1.1.0 package is the oracle (test extra)")
nib = pytest.importorskip("nibabel")
from PIL import Image  # noqa: E402
from sam2.build_sam import build_sam2_video_predictor  # noqa: E402

LOGIT_TOL, MEMORY_TOL, IMAGE_SIZE = 1e-2, 5e-2, 128
SLICES = slice(8, 14)
CT_WINDOW = Window(-160.0, 240.0)
FILES = {"sam2.1_hiera_t": "sam2.1_hiera_tiny.pt", "sam2_hiera_t": "sam2_hiera_tiny.pt"}
CONFIGS = {"sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml", "sam2_hiera_t": "configs/sam2/sam2_hiera_t.yaml"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def official_hole_filling():
    """Without ``sam2._C`` sam2 skips hole filling with a warning; give it connected components from
    SciPy (8-connected, as its CUDA/CPU extension) so that it fills holes as a full install does."""
    try:
        from sam2 import _C  # noqa: F401
        yield
        return
    except ImportError:
        pass
    from scipy import ndimage
    import sam2.utils.misc as misc

    def connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(torch.uint8).cpu().numpy()
        labels, counts = np.zeros(m.shape, np.int32), np.zeros(m.shape, np.int32)
        for n in range(m.shape[0]):
            lab, _ = ndimage.label(m[n, 0], structure=np.ones((3, 3)))
            area = np.bincount(lab.ravel())
            area[0] = 0
            labels[n, 0], counts[n, 0] = lab, area[lab]
        return torch.from_numpy(labels), torch.from_numpy(counts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(misc, "get_connected_components", connected_components)
        yield


SHARPEN_QK, SHARPEN_TPOS, SHARPEN_PTR_TPOS = 1.5, 10.0, 3.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Official-format random checkpoints with a sharper memory: with plain random weights the
    cross-attention over ~500 memory tokens is near-uniform and the memory moves the logits by
    ~0.03 only (a wrong slot order stayed within 4x the tolerance); the cross-attention query / key
    weights x1.5, the slot encodings x10 and the pointer distance projection x3 make memory mistakes
    cost 0.3-3 (see the wiring test) while parity stays near 1e-3 (sharper attention also amplifies
    float rounding: query / key x3 gave 6e-3)."""
    folder = tmp_path_factory.mktemp("sam2_video_ckpt")
    paths = {p.name: p for p in write_random_checkpoints(folder, sam=list(FILES), seed=3)}
    for path in paths.values():
        state = torch.load(path, weights_only=True)
        model = state["model"]
        for key in model:
            if ".cross_attn_image.q_proj.weight" in key or ".cross_attn_image.k_proj.weight" in key:
                model[key] = model[key] * SHARPEN_QK
        model["maskmem_tpos_enc"] = model["maskmem_tpos_enc"] * SHARPEN_TPOS
        if "obj_ptr_tpos_proj.weight" in model:
            model["obj_ptr_tpos_proj.weight"] = model["obj_ptr_tpos_proj.weight"] * SHARPEN_PTR_TPOS
        torch.save(state, path)
    return paths


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """(JPEG folder, decoded frames (H, W) uint8, label slices (H, W)) of six CT slices."""
    if not (TOTALSEG / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"TotalSegmentator CT not found at {TOTALSEG}")
    volume = np.asanyarray(nib.load(str(TOTALSEG / "example_ct_sm.nii.gz")).dataobj)[:, :, SLICES]
    labels = np.asanyarray(nib.load(str(TOTALSEG / "example_seg.nii.gz")).dataobj)[:, :, SLICES]
    folder = tmp_path_factory.mktemp("ct_frames")
    frames = []
    for k in range(volume.shape[2]):
        path = folder / f"{k:05d}.jpg"
        Image.fromarray(CT_WINDOW.apply(volume[:, :, k].T)).save(path, quality=95)
        with Image.open(path) as im:
            frames.append(np.asarray(im))
    return folder, frames, [labels[:, :, k].T for k in range(labels.shape[2])]


def official(name: str, checkpoint: Path):
    return build_sam2_video_predictor(CONFIGS[name], str(checkpoint), device="cpu",
                                      hydra_overrides_extra=[f"++model.image_size={IMAGE_SIZE}"])


def ours(checkpoint: Path) -> refseg.VideoPredictor:
    return refseg.VideoPredictor(checkpoint, device="cpu", image_size=IMAGE_SIZE)


def run(predictor, state, steps: list[tuple[str, dict]]) -> list[tuple[int, list, np.ndarray]]:
    """Every (frame_idx, obj_ids, logits) the steps produce, in order."""
    outputs = []
    for method, kwargs in steps:
        result = getattr(predictor, method)(state, **kwargs)
        for frame_idx, obj_ids, logits in (result if method == "propagate_in_video" else [result]):
            outputs.append((frame_idx, list(obj_ids), logits.float().cpu().numpy()))
    return outputs


def compare(mine: list, theirs: list) -> float:
    """Check every output; returns the largest logit difference."""
    assert [(f, ids) for f, ids, _ in mine] == [(f, ids) for f, ids, _ in theirs]
    worst = 0.0
    for (_, _, a), (_, _, b) in zip(mine, theirs):
        assert a.shape == b.shape
        worst = max(worst, float(np.abs(a - b).max()))
        differ = (a > 0) != (b > 0)
        assert not (differ & (np.abs(b) > LOGIT_TOL)).any(), int(differ.sum())
    assert worst <= LOGIT_TOL, worst
    return worst


def compare_banks(mine: refseg.video_predictor.VideoState, theirs: dict) -> None:
    """Every object's memory bank against sam2's ``output_dict_per_obj``: the same conditioning and
    non-conditioning frames, low-resolution logits, object scores and pointers <= 1e-2, spatial
    memories (bfloat16 in both) <= 5e-2 plus one bfloat16 rounding step (the memory encoder sees the
    mask as sigmoid(logit) x 20: a logit difference comes out up to 5x larger; measured: 0.03)."""
    assert mine.obj_ids == theirs["obj_ids"]
    for obj, bank in enumerate(mine.banks):
        official = theirs["output_dict_per_obj"][obj]
        for ours_part, key in ((bank.cond, "cond_frame_outputs"), (bank.non_cond, "non_cond_frame_outputs")):
            assert sorted(ours_part) == sorted(official[key])
            for t, out in ours_part.items():
                ref = official[key][t]
                for name in ("pred_masks", "obj_ptr", "object_score_logits"):
                    assert float((getattr(out, name).float() - ref[name].float()).abs().max()) <= LOGIT_TOL, name
                a, b = out.maskmem_features.float(), ref["maskmem_features"].float()
                assert out.maskmem_features.dtype == ref["maskmem_features"].dtype == torch.bfloat16
                assert bool(((a - b).abs() <= MEMORY_TOL + 2 ** -7 * b.abs()).all()), float((a - b).abs().max())


def liver_point(labels: np.ndarray) -> list[list[float]]:
    ys, xs = np.nonzero(labels == 5)
    return [[float(np.median(xs)), float(np.median(ys))]]


def points_steps(ct) -> list[tuple[str, dict]]:
    _, _, labels = ct
    return [("add_new_points_or_box", dict(frame_idx=2, obj_id=1, points=liver_point(labels[2]), labels=[1])),
            ("propagate_in_video", {}),
            ("propagate_in_video", dict(reverse=True))]


CORRECTION = [("add_new_points_or_box", dict(frame_idx=4, obj_id=1, points=[[30.0, 40.0], [60.0, 70.0]],
                                            labels=[1, 0], clear_old_points=False)),
              ("propagate_in_video", dict(start_frame_idx=4, max_frame_num_to_track=1))]


@pytest.fixture(scope="module")
def points_reference(ct, checkpoints):
    """sam2's outputs of the points scenario (before the correction) and after the correction."""
    path = checkpoints[FILES["sam2.1_hiera_t"]]
    predictor = official("sam2.1_hiera_t", path)
    state = predictor.init_state(video_path=str(ct[0]))
    first = run(predictor, state, points_steps(ct))
    return first, run(predictor, state, CORRECTION), state


def test_points_forward_backward_correction(ct, checkpoints, points_reference):
    predictor = ours(checkpoints[FILES["sam2.1_hiera_t"]])
    state = predictor.init_state(video_path=ct[0])  # refseg reads the JPEG folder itself
    outputs = run(predictor, state, points_steps(ct))
    compare(outputs, points_reference[0])
    assert [f for f, _, _ in outputs] == [2, 2, 3, 4, 5, 2, 1, 0]
    for _, _, logits in outputs:  # discriminative: real masks, logits far above the tolerance
        assert 0.02 < (logits > 0).mean() < 0.5 and logits.std() > 1.0
    compare(run(predictor, state, CORRECTION), points_reference[1])
    compare_banks(state, points_reference[2])
    assert 4 in state.banks[0].non_cond and list(state.banks[0].cond) == [2]  # the correction stays non-cond
    assert len(state.features) <= predictor.feature_cache_frames


def mask_steps(ct) -> list[tuple[str, dict]]:
    _, _, labels = ct
    ys, xs = np.nonzero(labels[3] == 2)
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    return [("add_new_mask", dict(frame_idx=3, obj_id=5, mask=labels[3] == 5)),
            ("add_new_points_or_box", dict(frame_idx=3, obj_id=7, box=box)),
            ("add_new_mask", dict(frame_idx=3, obj_id=9, mask=np.zeros_like(labels[3], dtype=bool))),
            ("propagate_in_video", {}),
            ("propagate_in_video", dict(reverse=True))]


def test_masks_box_absent_object(ct, checkpoints):
    path = checkpoints[FILES["sam2.1_hiera_t"]]
    reference = official("sam2.1_hiera_t", path)
    reference_state = reference.init_state(video_path=str(ct[0]))
    theirs = run(reference, reference_state, mask_steps(ct))
    predictor = ours(path)
    state = predictor.init_state(frames=ct[1])
    mine = run(predictor, state, mask_steps(ct))
    compare(mine, theirs)
    compare_banks(state, reference_state)
    assert [ids for _, ids, _ in mine[-1:]] == [[5, 7, 9]]
    frame, _, logits = mine[2]
    assert frame == 3 and np.allclose(logits[2], -10.0)  # the empty mask is the output: logit -10
    assert float(state.banks[2].cond[3].object_score_logits) < 0  # ... and the object absent
    for _, _, logits in mine[3:]:
        assert (logits[:2] > 0).mean() > 0.01  # liver and box objects tracked


def test_sam2_v2_points(ct, checkpoints):
    path = checkpoints[FILES["sam2_hiera_t"]]
    reference = official("sam2_hiera_t", path)
    steps = [points_steps(ct)[0], ("propagate_in_video", dict(max_frame_num_to_track=2)),
             ("propagate_in_video", dict(reverse=True, max_frame_num_to_track=2))]
    theirs = run(reference, reference.init_state(video_path=str(ct[0])), steps)
    predictor = ours(path)
    assert not predictor.model.is_v21
    mine = run(predictor, predictor.init_state(frames=ct[1]), steps)
    compare(mine, theirs)
    assert all((logits > 0).mean() > 0.01 for _, _, logits in mine)


def _max_difference(mine: list, theirs: list) -> float:
    return max(float(np.abs(a - b).max()) for (_, _, a), (_, _, b) in zip(mine, theirs))


def test_wrong_memory_wiring_breaks_parity(ct, checkpoints, points_reference, monkeypatch):
    """The parity test can see memory mistakes: each wrong wiring moves the logits by > 10x the tolerance."""
    path = checkpoints[FILES["sam2.1_hiera_t"]]

    def wrong_outputs() -> list:  # the click and the forward pass (5 outputs)
        predictor = ours(path)
        return run(predictor, predictor.init_state(frames=ct[1]), points_steps(ct)[:2])

    select, pointers = sam2_memory.select_memories, sam2_memory.select_object_pointers
    slots = sam2_memory.Sam2Video.num_maskmem
    with monkeypatch.context() as m:  # temporal slots of the tracked frames' memories reversed
        m.setattr(sam2_memory, "select_memories",
                  lambda *args: [(slot and slots - slot, out) for slot, out in select(*args)])
        assert _max_difference(wrong_outputs(), points_reference[0][:5]) > 10 * LOGIT_TOL
    with monkeypatch.context() as m:  # object-pointer distances off by one
        m.setattr(sam2_memory, "select_object_pointers",
                  lambda *args, **kwargs: [(d + 1, p) for d, p in pointers(*args, **kwargs)])
        assert _max_difference(wrong_outputs(), points_reference[0][:5]) > 10 * LOGIT_TOL
    with monkeypatch.context() as m:  # the tracked frames' memories left out
        m.setattr(sam2_memory, "select_memories", lambda *args: [(s, o) for s, o in select(*args) if s == 0])
        assert _max_difference(wrong_outputs(), points_reference[0][:5]) > 10 * LOGIT_TOL

def test_object_absent_on_tracked_frames(ct, checkpoints, tmp_path):
    """The object-score head's last bias lowered by 1 (the same file for both sides): the prompted slice
    keeps the object, tracked slices lose it (masks -1024, no-object pointer and memory embedding),
    which the memory banks' scores, pointers and memories then carry."""
    state_dict = torch.load(checkpoints[FILES["sam2.1_hiera_t"]], weights_only=True)
    state_dict["model"]["sam_mask_decoder.pred_obj_score_head.layers.2.bias"] -= 1.0
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save(state_dict, path)
    steps = [points_steps(ct)[0], ("propagate_in_video", dict(max_frame_num_to_track=2)),
             ("propagate_in_video", dict(reverse=True, max_frame_num_to_track=1))]
    reference = official("sam2.1_hiera_t", path)
    reference_state = reference.init_state(video_path=str(ct[0]))
    theirs = run(reference, reference_state, steps)
    predictor = ours(path)
    state = predictor.init_state(frames=ct[1])
    mine = run(predictor, state, steps)
    compare(mine, theirs)
    compare_banks(state, reference_state)
    scores = {t: float(out.object_score_logits) for t, out in state.banks[0].non_cond.items()}
    assert float(state.banks[0].cond[2].object_score_logits) > 0 and min(scores.values()) <= 0, scores
    absent = [f for f, _, logits in mine if (logits == sam2_memory.NO_OBJ_SCORE).all()]
    assert absent == sorted(t for t, score in scores.items() if score <= 0) or set(absent) == {
        t for t, score in scores.items() if score <= 0}
