"""The propagation of one volume (``refseg.jobs.propagate``) with a prompt source that reads the ground truth
and a tiny random SAM 2.1 at a 128-px input, on eight slices of the TotalSegmentator CT.

What each test compares against:

* the anchor rule, the probe step and the overlap rule: hand-computed values and numpy;
* ``slice_stack``: :func:`refseg.io.volume.slice_view` slice by slice;
* the whole driver: the documented procedure written out in the test with :class:`refseg.VideoPredictor`
  calls (itself certified against sam2 1.1.0 by tests/test_video_parity.py): the same prompts on the same
  anchors, a forward pass from the earliest first anchor and a backward pass from the latest, per label the
  forward result from its first anchor on and the backward one before it, larger logit wins: label maps
  equal, slice by slice;
* streaming: the predictor's feature cache, counted while a volume is propagated (at most its two frames);
* absent objects (the object-score head's bias lowered, as tests/test_video_parity.py does): no voxel, every
  visited slice counted absent; oversize masks: dropped, listed, the pass stopped after three.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import refseg
from refseg.io.intensity import Window
from refseg.io.volume import reorientation, slice_view
from refseg.jobs.propagate import (OVERSIZE_RUN, PropagationSettings, PropagationTask, SliceComposer, choose_anchors,
                                   probe_slices, propagate_volume, slice_stack)
from refseg.pipeline.match_method import ClassPrompts
from refseg.testing.random_checkpoints import write_random_checkpoints
from volume_data import TOTALSEG

nib = pytest.importorskip("nibabel")

IMAGE_SIZE = 128
WINDOW = Window(-160.0, 240.0)
LIVER, KIDNEY = 5, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ct():
    """(canonical CT (X, Y, 8) int16, canonical labels) of slices 12..19 of the sample CT."""
    if not (TOTALSEG / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"TotalSegmentator CT not found at {TOTALSEG}")
    image = nib.load(str(TOTALSEG / "example_ct_sm.nii.gz"))
    turn = reorientation(image.affine)
    volume = turn.apply(np.asanyarray(image.dataobj))[:, :, 12:20]
    labels = turn.apply(np.asanyarray(nib.load(str(TOTALSEG / "example_seg.nii.gz")).dataobj))[:, :, 12:20]
    return volume, labels


@pytest.fixture(scope="module")
def sam2_files(tmp_path_factory):
    """A random SAM 2.1 tiny checkpoint, and one whose object-score head says 'absent' everywhere."""
    folder = tmp_path_factory.mktemp("sam2_prop")
    path = write_random_checkpoints(folder, sam=["sam2.1_hiera_t"], seed=3)[0]
    state = torch.load(path, weights_only=True)
    state["model"]["sam_mask_decoder.pred_obj_score_head.layers.2.bias"] -= 100.0
    absent = folder / "absent" / path.name
    absent.parent.mkdir()
    torch.save(state, absent)
    return path, absent


class TruthPrompts:
    """Prompt source for the driver: per slice and label, the label's centroid (positive) and a corner
    (negative) from the ground truth; matches = the label's pixel count; ``hide``: labels it never finds."""

    def __init__(self, labels: np.ndarray, classes: list[int], hide: tuple[int, ...] = ()):
        self.labels, self.classes, self.hide = labels, classes, hide
        self.config = type("Config", (), {"batch_size": 3})()
        self.seen: list[np.ndarray] = []

    def match_prompts(self, images):
        out = []
        for image in images:
            self.seen.append(image)
            t = next(t for t in range(self.labels.shape[2]) if self._same(image, t))
            truth = slice_view(self.labels, 2, t)
            found = {}
            for c in self.classes:
                ys, xs = np.nonzero(truth == c)
                if len(xs) and c not in self.hide:
                    found[c] = ClassPrompts(np.array([[xs.mean(), ys.mean()], [1, 1]], np.float32), np.array([1, 0]),
                                            None, len(xs))
                else:
                    found[c] = ClassPrompts(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), None, 0)
            out.append(found)
        return out

    def _same(self, image, t):
        return np.array_equal(image, WINDOW.apply(slice_view(self.volume, 2, t)))


def _source(ct, classes, hide=()):
    source = TruthPrompts(ct[1], classes, hide)
    source.volume = ct[0]
    return source


def _task(classes, ct, max_area=1e9, anchors=2):
    return PropagationTask("ct", 2, list(range(ct[0].shape[2])), classes, WINDOW, {c: max_area for c in classes},
                           PropagationSettings(anchors=anchors, sam_image_size=IMAGE_SIZE))


def test_slice_stack_is_every_slice_view():
    data = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    for axis in range(3):
        stack = slice_stack(data, axis)
        assert stack.shape[0] == data.shape[axis] and np.shares_memory(stack, data)
        for t in range(data.shape[axis]):
            assert np.array_equal(stack[t], slice_view(data, axis, t))


def test_probe_step_anchor_rule_and_overlaps():
    assert probe_slices(range(10), 4) == ([0, 3, 6, 9], 3)
    assert probe_slices(range(3, 13), 3) == ([3, 7, 11, 12], 4)  # the last slice always probed
    assert probe_slices(range(40), 64) == (list(range(40)), 1)
    # [0, 9] in three parts [0, 3), [3, 6), [6, 10): the most matches in each, ties to the lower slice
    assert choose_anchors({0: 5, 2: 9, 3: 9, 7: 1, 9: 4}, 3, 0, 9) == [2, 3, 9]
    assert choose_anchors({4: 5, 5: 5}, 1, 4, 5) == [4]
    assert choose_anchors({8: 1}, 3, 0, 9) == [8]  # parts without a positive slice give none
    composer = SliceComposer([0, 1], {3: (0, 1), 7: (1, 1)}, (2, 3))
    a, b = torch.tensor([[1.0, -1, 2], [0.5, 3, -2]]), torch.tensor([[2.0, 1, 1], [-1, 4, 1]])
    composer.decide(1, 3, a > 0, a)
    assert composer.slices == {}  # label 7 still to decide on slice 1
    composer.decide(1, 7, b > 0, b)
    composer.decide(0, 3)
    both = np.stack([np.where(a > 0, a, -np.inf), np.where(b > 0, b, -np.inf)])
    expected = np.where(np.isfinite(both).any(0), np.array([3, 7])[both.argmax(0)], 0)
    assert composer.slices.keys() == {1} and np.array_equal(composer.slices[1], expected)


def _by_hand(predictor, ct, prompts: dict[int, list[int]], extents: dict[int, tuple[int, int]]) -> dict:
    """The documented procedure with plain VideoPredictor calls: {slice: label image} (non-empty only)."""
    volume, labels = ct
    frames = [WINDOW.apply(slice_view(volume, 2, t)) for t in range(volume.shape[2])]
    state = predictor.init_state(frames=frames)
    for c, anchors in prompts.items():
        for t in anchors:
            ys, xs = np.nonzero(slice_view(labels, 2, t) == c)
            predictor.add_new_points_or_box(state, t, c, points=[[xs.mean(), ys.mean()], [1, 1]], labels=[1, 0])
    first = {c: a[0] for c, a in prompts.items()}
    kept: dict[int, dict[int, np.ndarray]] = {}
    start, end = min(first.values()), max(hi for _, hi in extents.values())
    for t, ids, logits in predictor.propagate_in_video(state, start, end - start):
        for j, c in enumerate(ids):
            if first[c] <= t <= extents[c][1]:
                kept.setdefault(t, {})[c] = logits[j, 0].numpy()
    start, end = max(first.values()), min(lo for lo, _ in extents.values())
    for t, ids, logits in predictor.propagate_in_video(state, start, start - end, reverse=True):
        for j, c in enumerate(ids):
            if extents[c][0] <= t < first[c]:
                kept.setdefault(t, {})[c] = logits[j, 0].numpy()
    out = {}
    for t, per_label in kept.items():
        values = np.array(list(per_label))
        scored = np.stack([np.where(v > 0, v, -np.inf) for v in per_label.values()])
        image = np.where(np.isfinite(scored).any(0), values[scored.argmax(0)], 0).astype(np.uint8)
        if image.any():
            out[t] = image
    return out


def test_two_labels_match_the_procedure_by_hand(ct, sam2_files):
    predictor = refseg.VideoPredictor(sam2_files[0], image_size=IMAGE_SIZE)
    source = _source(ct, [KIDNEY, LIVER])
    result = propagate_volume(predictor, source, _task([KIDNEY, LIVER], ct), ct[0])
    area = {c: [(slice_view(ct[1], 2, t) == c).sum() for t in range(8)] for c in (KIDNEY, LIVER)}
    # all 8 slices probed; the slices holding the label split in two halves, the larger area wins in each
    # (the kidney ends on slice 6: halves 0-2 and 3-6; the liver: 0-3 and 4-7); extents widened by one
    assert result.probed == list(range(8))
    assert [a > 0 for a in area[KIDNEY]] == [True] * 7 + [False] and all(a > 0 for a in area[LIVER])
    for c, (first, second) in ((KIDNEY, (range(0, 3), range(3, 7))), (LIVER, (range(0, 4), range(4, 8)))):
        expected = [max(part, key=lambda t: area[c][t]) for part in (first, second)]
        assert result.tracks[c].anchors == expected and result.tracks[c].extent == (0, 7)
        assert result.tracks[c].matches == [area[c][t] for t in expected]
    assert len(source.seen) == 8 and all(s.dtype == np.uint8 for s in source.seen)
    by_hand = _by_hand(predictor, ct, {c: result.tracks[c].anchors for c in (KIDNEY, LIVER)},
                       {KIDNEY: (0, 7), LIVER: (0, 7)})
    assert result.slices.keys() == by_hand.keys() and len(by_hand) >= 4
    for t in by_hand:
        assert np.array_equal(result.slices[t], by_hand[t]), t
    assert {int(v) for image in by_hand.values() for v in np.unique(image)} - {0} <= {KIDNEY, LIVER}


def test_absent_object_gives_no_voxel(ct, sam2_files):
    predictor = refseg.VideoPredictor(sam2_files[1], image_size=IMAGE_SIZE)
    result = propagate_volume(predictor, _source(ct, [LIVER]), _task([LIVER], ct), ct[0])
    track = result.tracks[LIVER]
    assert result.slices == {} and track.slices_with_voxels == 0
    assert track.absent == 8 and result.tracked >= 8  # every slice of the extent decided "absent"


def test_slice_features_streamed(ct, sam2_files, monkeypatch):
    """Every slice is encoded, but at most the predictor's few cached frames hold image features at once."""
    predictor = refseg.VideoPredictor(sam2_files[1], image_size=IMAGE_SIZE)
    held, encoded = [], []
    cached, encode = predictor._features, predictor.model.encode_frame

    def features(state, frame_idx):
        out = cached(state, frame_idx)
        held.append(len(state.features))
        return out

    monkeypatch.setattr(predictor, "_features", features)
    monkeypatch.setattr(predictor.model, "encode_frame", lambda pixels: encoded.append(1) or encode(pixels))
    result = propagate_volume(predictor, _source(ct, [LIVER]), _task([LIVER], ct), ct[0])
    assert result.tracked >= 8 and len(encoded) >= 8
    assert max(held) <= predictor.feature_cache_frames == 2


def test_oversize_masks_dropped_reported_and_the_pass_stopped(ct, sam2_files, caplog):
    predictor = refseg.VideoPredictor(sam2_files[0], image_size=IMAGE_SIZE)
    # the liver's largest reference area is claimed to be 1 px: every mask is oversize
    result = propagate_volume(predictor, _source(ct, [LIVER]), _task([LIVER], ct, max_area=1.0, anchors=1), ct[0])
    track = result.tracks[LIVER]
    assert track.anchors == [7]  # the liver's largest slice: the forward pass holds the anchor alone
    assert result.slices == {}
    backward = [6, 5, 4][:OVERSIZE_RUN]
    assert track.oversize_dropped == [7, *backward] and track.stopped == {"backward": backward[-1]}
    assert "oversize slices in a row; backward pass stopped at slice 4" in caplog.text


def test_a_label_the_matching_never_finds_is_left_out(ct, sam2_files, caplog):
    predictor = refseg.VideoPredictor(sam2_files[0], image_size=IMAGE_SIZE)
    result = propagate_volume(predictor, _source(ct, [KIDNEY, LIVER], hide=(KIDNEY,)),
                              _task([KIDNEY, LIVER], ct), ct[0])
    assert result.tracks[KIDNEY].anchors == [] and result.tracks[KIDNEY].extent is None
    assert all(KIDNEY not in np.unique(image) for image in result.slices.values())
    assert result.tracks[LIVER].slices_with_voxels > 0
    assert "label 2: no probed slice has a positive match" in caplog.text
