"""refseg.VideoPredictor around the parity test: the memory modules against sam2's own modules, frames of
any dtype, the bounded feature cache, state handling and bad input (random SAM 2.1 tiny at a 128 input)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import refseg
from refseg.io.intensity import DEFAULT_PERCENTILES
from refseg.io import video_frames
from refseg.io.video_frames import VideoFrames
from refseg.models.checkpoints import CheckpointError
from refseg.models.sam2_memory import sam2_video_from_state_dict
from refseg.models.sam2_memory_attention import MemoryAttention
from refseg.models.sam2_memory_encoder import MemoryEncoder
from refseg.models.sam2_state_dict import random_sam2_state_dict
from refseg.testing.random_checkpoints import write_random_checkpoints

SIZE = 128


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoints(tmp_path_factory.mktemp("video_ckpt"), sam=["sam2.1_hiera_t"], seed=5)[0]


@pytest.fixture(scope="module")
def predictor(checkpoint) -> refseg.VideoPredictor:
    return refseg.VideoPredictor(checkpoint, image_size=SIZE)


def ct_like(count: int = 5, height: int = 40, width: int = 52) -> list[np.ndarray]:
    """int16 slices: a bright disc drifting across a noisy body, air outside."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    slices = []
    for k in range(count):
        body = np.where((y - 20) ** 2 / 300 + (x - 26) ** 2 / 500 < 1, 40, -1000)
        disc = ((y - 18) ** 2 + (x - 20 - 2 * k) ** 2) < 36
        slices.append((body + 200 * disc + rng.normal(0, 15, body.shape)).astype(np.int16))
    return slices


def test_memory_modules_match_official(checkpoint):
    """Memory attention (two objects, three memory frames of a 16 x 16 grid plus 8 pointer tokens) and
    the memory encoder against the modules sam2 builds from its config, same weights."""
    sam2_build = pytest.importorskip("sam2.build_sam")
    official = sam2_build.build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", str(checkpoint),
                                                     device="cpu")
    state = torch.load(checkpoint, weights_only=True)["model"]
    attention, encoder = MemoryAttention(), MemoryEncoder()
    for module, prefix in ((attention, "memory_attention."), (encoder, "memory_encoder.")):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    gen = torch.Generator().manual_seed(0)
    batch, side, pointers = 2, 16, 8
    curr, pos = torch.randn(side * side, batch, 256, generator=gen), torch.randn(side * side, batch, 256, generator=gen)
    memory = torch.randn(3 * side * side + pointers, batch, 64, generator=gen)
    memory_pos = torch.randn(memory.shape, generator=gen)
    with torch.no_grad():
        theirs = official.memory_attention(curr=[curr], curr_pos=[pos], memory=memory, memory_pos=memory_pos,
                                           num_obj_ptr_tokens=pointers).transpose(0, 1)
        mine = attention(curr.transpose(0, 1), pos.transpose(0, 1), memory.transpose(0, 1),
                         memory_pos.transpose(0, 1), (side, side), pointers)
        assert float((mine - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())
        pix, mask = torch.randn(batch, 256, side, side, generator=gen), torch.randn(batch, 1, 16 * side, 16 * side)
        theirs = official.memory_encoder(pix, mask, skip_mask_sigmoid=True)
        feats, mem_pos = encoder(pix, mask)
        assert float((feats - theirs["vision_features"]).abs().max()) <= 1e-4 * float(feats.abs().max())
        assert torch.allclose(mem_pos.expand(batch, -1, -1, -1), theirs["vision_pos_enc"][0], atol=1e-6)


def test_int16_frames_one_window(predictor):
    """Non-uint8 frames go through one automatic window (p0.5-p99.5 of all frames, numpy's inverted-CDF
    percentiles here) so every slice keeps one contrast; the frames are kept by reference."""
    slices = ct_like()
    state = predictor.init_state(frames=slices)
    lo, hi = np.percentile(np.stack(slices), DEFAULT_PERCENTILES, method="inverted_cdf")
    for k, frame in enumerate(slices):
        expected = np.clip(np.rint((frame.astype(np.float32) - lo) * np.float32(255 / (hi - lo))), 0, 255)
        rgb = state.frames.rgb(k)
        assert rgb.shape == (40, 52, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb[..., 0], expected.astype(np.uint8)) and np.array_equal(rgb[..., 2], rgb[..., 0])
    assert state.frames._arrays is slices
    assert (state["num_frames"], state["video_height"], state["video_width"]) == (5, 40, 52)


def test_window_sample_bounded(monkeypatch):
    """On a long volume the automatic window is taken over evenly spaced whole frames only (0, 4, 8 of 9
    here): a bright frame outside the sample does not move it."""
    monkeypatch.setattr(video_frames, "WINDOW_SAMPLE_VOXELS", 3 * 40 * 52)
    slices = ct_like(9)
    slices[2] = slices[2] + np.int16(3000)
    window = VideoFrames(frames=slices).window
    lo, hi = np.percentile(np.stack(slices[::4]), DEFAULT_PERCENTILES, method="inverted_cdf")
    assert (window.lo, window.hi) == (lo, hi) and "3 of 9 frames" in window.source
    assert hi < np.percentile(np.stack(slices), DEFAULT_PERCENTILES[1], method="inverted_cdf")

def test_streaming_reset_and_outputs(predictor):
    """Outputs at the frames' resolution for several objects; only the feature cache's frames keep
    features; reset_state forgets the prompts (the same prompts then give the same masks)."""
    slices = ct_like()
    state = predictor.init_state(frames=slices, offload_state_to_cpu=True)

    def track() -> list[tuple[int, list, np.ndarray]]:
        frame, ids, logits = predictor.add_new_points_or_box(state, 2, "a", points=[[20, 18]], labels=[1])
        assert (frame, ids, tuple(logits.shape)) == (2, ["a"], (1, 1, 40, 52))
        frame, ids, logits = predictor.add_new_mask(state, 2, 7, slices[2] > 100)
        assert ids == ["a", 7] and tuple(logits.shape) == (2, 1, 40, 52)
        return [(f, list(ids), m.numpy().copy()) for f, ids, m in predictor.propagate_in_video(state)]

    first = track()
    assert [f for f, _, _ in first] == [2, 3, 4] and all(ids == ["a", 7] for _, ids, _ in first)
    assert len(state.features) <= predictor.feature_cache_frames
    assert state.banks[0].non_cond[3].maskmem_features.device.type == "cpu"  # offloaded memory bank
    assert state.banks[0].non_cond[3].maskmem_features.dtype == torch.bfloat16
    predictor.reset_state(state)
    assert state["obj_ids"] == []
    with pytest.raises(RuntimeError, match="No input points or masks"):
        next(predictor.propagate_in_video(state))
    again = track()
    for (f1, _, a), (f2, _, b) in zip(first, again):
        assert f1 == f2 and np.array_equal(a, b)


def test_jpeg_folder(predictor, tmp_path):
    slices = ct_like(3)
    for k, frame in enumerate(slices):
        Image.fromarray(np.clip(frame // 8 + 128, 0, 255).astype(np.uint8)).save(tmp_path / f"{k}.jpg")
    state = predictor.init_state(str(tmp_path))
    assert state["num_frames"] == 3 and state.frames.rgb(1).shape == (40, 52, 3)
    (tmp_path / "x.jpg").write_bytes((tmp_path / "0.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"<index>\.jpg; not an index: x\.jpg"):
        predictor.init_state(tmp_path)


def test_bad_input(predictor, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="folder of JPEG frames"):
        predictor.init_state(checkpoint)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        predictor.init_state(tmp_path / "absent")
    with pytest.raises(ValueError, match=r"frames\[1\] is \(30, 52\)"):
        VideoFrames(frames=[np.zeros((40, 52), np.uint8), np.zeros((30, 52), np.uint8)])
    with pytest.raises(ValueError, match="no contrast"):
        VideoFrames(frames=[np.zeros((40, 52), np.int16)] * 2)
    state = predictor.init_state(frames=ct_like(3))
    with pytest.raises(IndexError, match="outside the video's 3 frames"):
        predictor.add_new_points_or_box(state, 3, 1, points=[[1, 1]], labels=[1])
    assert state["obj_ids"] == []  # nothing registered by a refused prompt
    with pytest.raises(ValueError, match="without clearing old points"):
        predictor.add_new_points_or_box(state, 0, 1, box=[0, 0, 5, 5], clear_old_points=False)
    with pytest.raises(ValueError, match="together"):
        predictor.add_new_points_or_box(state, 0, 1, points=[[1, 1]])
    with pytest.raises(ValueError, match=r"mask must be \(H, W\)"):
        predictor.add_new_mask(state, 0, 1, np.zeros((1, 40, 52)))
    sam_file = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)}, sam_file)
    with pytest.raises(CheckpointError, match="needs SAM 2"):
        refseg.VideoPredictor(sam_file)


def test_strict_loading():
    """Every official key is loaded into the video model (none left over, none missing)."""
    state = random_sam2_state_dict("sam2_hiera_t", seed=1)
    model = sam2_video_from_state_dict({"model": state}, source="sam2_hiera_tiny.pt")
    assert not model.is_v21 and len(model.state_dict()) == len(state)
    assert torch.equal(model.maskmem_tpos_enc, state["maskmem_tpos_enc"])
    assert torch.equal(model.memory_encoder.fuser.layers[1].gamma, state["memory_encoder.fuser.layers.1.gamma"])
    del state["obj_ptr_proj.layers.2.bias"]
    with pytest.raises(CheckpointError, match="missing memory keys: obj_ptr_proj.layers.2.bias"):
        sam2_video_from_state_dict(state, source="broken.pt")
