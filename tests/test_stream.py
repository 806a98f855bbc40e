"""The streaming runtime: batched == per-image, one decoder call per batch, errors per item, OOM.

Random small checkpoints (SAM ViT-B with 2 blocks, DINOv2-S at 112) and synthetic images of
several sizes keep this fast; the masks mean nothing, only their equality across paths matters.
"""
import logging

import numpy as np
import pytest
import torch

from refseg.pipeline.decode import decode_batch, decode_target
from refseg.runtime.stream import StreamItem, stream_segment
from refseg.segmenter import Segmenter


def _image(rng, h, w):
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w].copy()


def write_tiny_sam(path):
    """SAM ViT-B layout with 2 blocks and a 256-px input (16x16 embedding): 16x cheaper than 1024."""
    from refseg.testing.random_checkpoints import random_sam_model, write_model

    return write_model(random_sam_model("vit_b", depth=2, img_size=256), path)


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    return write_tiny_sam(tmp_path_factory.mktemp("tiny_sam") / "sam_tiny.pth")


@pytest.fixture(scope="module")
def seg(small_checkpoints, tiny_sam):
    _, dino_path = small_checkpoints
    seg = Segmenter.from_preset("sat", sam_checkpoint=tiny_sam, dinov2_checkpoint=dino_path,
                                device="cpu", image_size=112, batch_size=4)
    rng = np.random.default_rng(0)
    ref = _image(rng, 128, 160)
    mask = np.zeros((128, 160), np.int64)
    mask[20:90, 20:70] = 1
    mask[40:120, 90:150] = 2  # two classes: prompt sets of different lengths per target
    seg.set_reference(ref, mask)
    return seg


@pytest.fixture(scope="module")
def targets():
    rng = np.random.default_rng(1)
    return [_image(rng, h, w) for h, w in ((96, 128), (150, 100), (64, 64), (128, 200))]


@pytest.fixture(scope="module")
def alone(seg, targets):
    """Each target segmented in a batch of its own (the per-image path)."""
    return [seg.segment_prepared([seg.prepare_target(t)])[0] for t in targets]


def test_one_decoder_call_gives_the_per_target_numbers(seg, targets):
    prepared = [seg.prepare_target(t) for t in targets]
    calls = []
    original = seg.backend.decode_batch

    def spy(*args):
        calls.append(args[4])  # point_mask
        return original(*args)

    seg.backend.decode_batch = spy
    try:
        from refseg.models.sam_transforms import normalize_pad
        from refseg.pipeline.matching import match_candidates
        from refseg.pipeline.prompts import prompts_from_candidates
        from refseg.pipeline.features import normalize_resized

        cfg, classes = seg.config, seg.classes
        ref_tokens, ref_labels = seg._reference()
        tokens = seg.backend.encode_dinov2(normalize_resized(np.stack([p.dinov2 for p in prepared])))
        sizes = [p.rgb.shape[:2] for p in prepared]
        prompts = prompts_from_candidates(match_candidates(ref_tokens, ref_labels, tokens, cfg), cfg, sizes)
        emb = seg.backend.encode_sam(torch.cat([normalize_pad(torch.tensor(p.sam).permute(2, 0, 1), 256)
                                                for p in prepared]))
        input_sizes = [p.sam.shape[:2] for p in prepared]
        batched = decode_batch(seg.backend, emb, prompts, len(classes), input_sizes, sizes, cfg)
    finally:
        del seg.backend.decode_batch
    assert len(calls) == 1 and calls[0] is not None  # one call, and the extra padding was masked
    lengths = prompts.num_points.view(len(prepared), len(classes)).amax(1)
    assert len(set(lengths.tolist())) > 1  # targets really had different set lengths
    for t in range(len(prepared)):
        rows = list(range(t * len(classes), (t + 1) * len(classes)))
        single = decode_target(seg.backend, emb[t], prompts, rows, input_sizes[t], sizes[t], cfg)
        torch.testing.assert_close(batched[t].logits, single.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[t].iou, single.iou, atol=1e-6, rtol=0)
        assert torch.equal(batched[t].logits > 0, single.logits > 0)
        # on the CPU the batch's decode is, per image, the very call the image alone makes: bit for bit
        from refseg.pipeline.prompts import PromptBatch

        own = PromptBatch(prompts.points[rows], prompts.labels[rows], prompts.num_points[rows],
                          None if prompts.boxes is None else prompts.boxes[rows])
        alone = decode_batch(seg.backend, emb[t:t + 1], own, len(classes), input_sizes[t:t + 1], sizes[t:t + 1], cfg)
        assert torch.equal(batched[t].logits, alone[0].logits) and torch.equal(batched[t].iou, alone[0].iou)


def test_stream_batches_equal_images_one_by_one(seg, targets, alone):
    items = [StreamItem(key=f"t{i}", load=lambda t=t: t) for i, t in enumerate(targets)]
    outs = list(stream_segment(seg, items, batch_size=3, workers=2))
    assert [o.item.key for o in outs] == [f"t{i}" for i in range(len(targets))]
    for out, single in zip(outs, alone):
        assert out.error is None
        np.testing.assert_array_equal(out.result.mask, single.mask)
        for c in seg.classes:
            np.testing.assert_array_equal(out.result.points[c], single.points[c])
            np.testing.assert_array_equal(out.result.point_labels[c], single.point_labels[c])
            assert out.result.scores[c] == pytest.approx(single.scores[c], abs=1e-6)
        assert out.result.timings["load"] > 0 and "postprocess" in out.result.timings
    assert [o.result.batch_size for o in outs] == [3, 3, 3, 1]


def test_bad_items_are_named_and_never_break_the_batch(seg, targets):
    def broken():
        raise OSError("scan.png: corrupt or truncated image data")

    items = [StreamItem("good0.png", lambda: targets[0]),
             StreamItem("tiny.png", lambda: np.zeros((8, 8, 3), np.uint8)),
             StreamItem("scan.png", broken),
             StreamItem("good1.png", lambda: targets[1])]
    sizes = []
    original = seg.segment_prepared
    seg.segment_prepared = lambda batch, **kw: sizes.append(len(batch)) or original(batch, **kw)
    try:
        outs = list(stream_segment(seg, items, batch_size=4))
    finally:
        del seg.segment_prepared
    assert sizes == [2]  # the two good images still shared one batch
    assert outs[0].error is None and outs[3].error is None
    assert str(outs[1].error).startswith("tiny.png: 8x8") and "14x14" in str(outs[1].error)
    assert "scan.png" in str(outs[2].error)
    with pytest.raises(ValueError, match=r"images\[1\]: 8x8"):
        seg.segment_batch([targets[0], np.zeros((8, 8), np.uint8)])


def test_out_of_memory_halves_the_batch_once(seg, targets, alone, caplog):
    sizes = []
    original = seg.backend.encode_sam

    def small_gpu(pixels):
        sizes.append(pixels.shape[0])
        if pixels.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(pixels)

    seg.backend.encode_sam = small_gpu
    try:
        items = [StreamItem(f"t{i}", lambda t=t: t) for i, t in enumerate(targets[:3])]
        with caplog.at_level(logging.WARNING, logger="refseg.runtime.stream"):
            outs = list(stream_segment(seg, items, batch_size=2))
    finally:
        del seg.backend.encode_sam
    assert all(o.error is None for o in outs)
    reports = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(reports) == 1 and "batch of 2" in reports[0].getMessage()
    assert sizes == [2, 1, 1, 1]  # halved, then the smaller batch stays
    for out, single in zip(outs, alone):
        np.testing.assert_array_equal(out.result.mask, single.mask)
