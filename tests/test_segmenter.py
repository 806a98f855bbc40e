"""Segmenter end to end on the Kvasir pairs with random checkpoints (geometry, determinism, classes).

Random weights: the masks mean nothing, so these tests check shapes, value sets, prompts inside the
image, determinism, batch = single, one SAM encode per target and the refusal of bad references.
SAM uses a reduced-depth ViT-B (same widths, 2 blocks) and DINOv2-S runs at 224 to keep CI time low.
"""
import numpy as np
import pytest
import torch

from refseg.config import SegmenterConfig
from refseg.segmenter import Segmenter

@pytest.fixture(scope="module")
def kvasir(kvasir_dir):
    from refseg.io.raster import list_images, read_image, read_mask
    images = list_images(kvasir_dir / "images")
    return [(p, read_image(p), read_mask(kvasir_dir / "masks" / p.name)) for p in images]


@pytest.fixture(scope="module")
def segmenter(small_checkpoints):
    sam_path, dino_path = small_checkpoints
    return Segmenter.from_preset("sat", sam_checkpoint=sam_path, dinov2_checkpoint=dino_path,
                                 device="cpu", image_size=224, batch_size=2)


def _check_result(result, image, classes=(1,)):
    h, w = image.shape[:2]
    assert result.mask.shape == (h, w) and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {0, *classes}
    assert sorted(result.class_masks) == sorted(classes)
    for c in classes:
        pts, labels = result.points[c], result.point_labels[c]
        assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) == len(labels) >= 1
        assert (labels == 1).any() and set(np.unique(labels)) <= {0, 1}
        assert (pts[:, 0] >= 0).all() and (pts[:, 0] < w).all()
        assert (pts[:, 1] >= 0).all() and (pts[:, 1] < h).all()
        assert np.isfinite(result.scores[c])  # random weights: any finite predicted IoU
    assert {"dinov2", "matching", "prompts", "sam_encoder", "decoder", "postprocess"} <= set(result.timings)


def test_kvasir_end_to_end_geometry_and_determinism(segmenter, kvasir):
    _, ref_image, ref_mask = kvasir[0]
    segmenter.set_reference(ref_image, ref_mask)
    targets = [image for _, image, _ in kvasir[1:]]
    results = segmenter.segment_batch(targets)  # batch_size=2: two chunks
    assert len(results) == len(targets)
    for result, image in zip(results, targets):
        _check_result(result, image)
    again = segmenter.segment(targets[1])  # alone instead of in a batch, second time
    np.testing.assert_array_equal(again.points[1], results[1].points[1])
    np.testing.assert_array_equal(again.point_labels[1], results[1].point_labels[1])
    inter = np.logical_and(again.mask, results[1].mask).sum()
    union = np.logical_or(again.mask, results[1].mask).sum()
    assert union == 0 or inter / union >= 0.99


def test_reference_is_encoded_once(segmenter, kvasir):
    calls = []
    original = segmenter.backend.encode_dinov2

    def counting(images):
        calls.append(images.shape[0])
        return original(images)

    segmenter.backend.encode_dinov2 = counting
    try:
        _, ref_image, ref_mask = kvasir[0]
        segmenter.set_reference(ref_image, ref_mask)
        segmenter.segment_batch([kvasir[1][1], kvasir[2][1]])
    finally:
        del segmenter.backend.encode_dinov2
    assert calls == [1, 2]  # reference once, then one batched call for both targets


def test_multiclass_reference_gives_one_label_per_class(segmenter, kvasir):
    _, ref_image, ref_mask = kvasir[0]
    labels = ref_mask.astype(np.int64).copy()
    half = labels.shape[1] // 2
    labels[:, half:][labels[:, half:] > 0] = 2  # left part of the polyp = 1, right part = 2
    sam_calls = []
    original = segmenter.backend.encode_sam
    segmenter.backend.encode_sam = lambda x: sam_calls.append(x.shape[0]) or original(x)
    try:
        segmenter.set_reference(ref_image, labels)
        result = segmenter.segment(kvasir[3][1])
    finally:
        del segmenter.backend.encode_sam
    assert segmenter.classes == [1, 2]
    assert sam_calls == [1]  # one SAM encode for both classes
    _check_result(result, kvasir[3][1], classes=(1, 2))


def test_n_shot_and_image_types(segmenter, kvasir):
    (_, img0, m0), (_, img1, m1) = kvasir[0], kvasir[1]
    segmenter.set_reference(img0, m0).add_reference(img1, m1)
    assert len(segmenter._ref_tokens) == 2
    rgb = kvasir[2][1]
    grey16 = (rgb.mean(-1) * 257).astype(np.uint16)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    floats = rgb.astype(np.float32) / 255.0
    for image in (grey16, rgba, floats):
        _check_result(segmenter.segment(image), image)


def test_bad_references_are_refused(segmenter, kvasir):
    _, image, mask = kvasir[0]
    with pytest.raises(ValueError, match="empty"):
        segmenter.set_reference(image, np.zeros_like(mask))
    with pytest.raises(ValueError, match="all foreground"):
        segmenter.set_reference(image, np.ones_like(mask))
    with pytest.raises(ValueError, match="differs from its image"):
        segmenter.set_reference(image, mask[:-3])
    tiny = np.zeros_like(mask)
    tiny[10:13, 10:13] = 1  # smaller than one 14-px patch at any scale used here
    with pytest.raises(ValueError, match="cover no whole"):
        segmenter.set_reference(image, tiny)


def test_image_smaller_than_a_patch_is_an_error(segmenter, kvasir):
    _, image, mask = kvasir[0]
    segmenter.set_reference(image, mask)
    with pytest.raises(ValueError, match="smaller than one 14x14 patch"):
        segmenter.segment(np.zeros((10, 40, 3), np.uint8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-missing error")
def test_config_device_is_used_unless_the_argument_names_one(small_checkpoints):
    sam_path, dino_path = small_checkpoints
    on_cuda = SegmenterConfig(device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):  # device="auto" defers to config
        Segmenter(on_cuda, sam_checkpoint=sam_path, dinov2_checkpoint=dino_path)
    seg = Segmenter(on_cuda, sam_checkpoint=sam_path, dinov2_checkpoint=dino_path, device="cpu")
    assert seg.device.type == "cpu"


@pytest.mark.parametrize("preset", ["sat", "gbmseg"])
def test_x_prenorm_features_with_the_match_method(small_checkpoints, kvasir, preset):
    """x_prenorm holds the class (and register) tokens before the patches: the backend hands the
    matching stage the G·G patch rows only, so the match presets run with either feature key."""
    sam_path, dino_path = small_checkpoints
    seg = Segmenter.from_preset(preset, sam_checkpoint=sam_path, dinov2_checkpoint=dino_path, device="cpu",
                                image_size=224, feature_key="x_prenorm")
    (_, ref_image, ref_mask), (_, image, _) = kvasir[0], kvasir[1]
    tokens = seg.backend.encode_dinov2(torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 16 * 16, 384)
    seg.set_reference(ref_image, ref_mask)
    _check_result(seg.segment(image), image)
