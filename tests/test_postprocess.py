"""Post-processing (connected components, holes) against scipy.ndimage as the reference."""
import numpy as np
import pytest
import torch

from refseg.pipeline.postprocess import clean_mask, fill_holes, label_components

ndi = pytest.importorskip("scipy.ndimage")


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_matches_scipy(connectivity):
    rng = np.random.default_rng(0)
    structure = np.ones((3, 3)) if connectivity == 8 else None
    for _ in range(25):
        shape = (int(rng.integers(1, 70)), int(rng.integers(1, 70)))
        m = rng.random(shape) < rng.uniform(0.2, 0.7)
        labels, sizes = label_components(torch.from_numpy(m), connectivity)
        ref, k = ndi.label(m, structure=structure)
        assert int(labels.max()) == k
        np.testing.assert_array_equal(labels.numpy(), ref)
        np.testing.assert_array_equal(sizes.numpy(), np.bincount(ref.ravel(), minlength=k + 1)[1:])


def test_label_components_long_snake():
    # A one-pixel-wide serpentine: plain label propagation would need thousands of rounds.
    m = np.zeros((201, 201), bool)
    m[::4, :] = True
    m[1::8, -1] = m[2::8, -1] = m[3::8, -1] = True
    m[5::8, 0] = m[6::8, 0] = m[7::8, 0] = True
    labels, sizes = label_components(torch.from_numpy(m))
    assert int(labels.max()) == 1 and int(sizes[0]) == m.sum()


def test_fill_holes_matches_scipy():
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = rng.random((40, 50)) < 0.55
        np.testing.assert_array_equal(fill_holes(torch.from_numpy(m)).numpy(), ndi.binary_fill_holes(m))


def test_clean_mask_rules():
    m = np.zeros((60, 60), bool)
    m[5:35, 5:35] = True          # big: 900 px with a hole
    m[15:20, 15:20] = False
    m[40:55, 40:55] = True        # 225 px = 26 % of the big one (before hole filling: 875 -> 25.7 %)
    m[2:4, 50:52] = True          # tiny
    t = torch.from_numpy(m)
    largest = clean_mask(t, keep_largest=True).numpy()
    assert largest[5:35, 5:35].all() and not largest[40:, 40:].any() and not largest[2:4, 50:52].any()
    kept = clean_mask(t, min_component_fraction=0.25).numpy()
    assert kept[40:55, 40:55].all() and not kept[2:4, 50:52].any() and not kept[15:20, 15:20].any()
    kept30 = clean_mask(t, min_component_fraction=0.3, holes=True).numpy()
    assert not kept30[40:55, 40:55].any() and kept30[15:20, 15:20].all()
    assert clean_mask(torch.zeros(5, 5, dtype=torch.bool), keep_largest=True).sum() == 0
    np.testing.assert_array_equal(clean_mask(t).numpy(), m)


@pytest.mark.parametrize("sam", ["vit_b", "medsam"])
def test_decoded_logits_reach_the_original_frame_as_each_model_was_run(sam):
    """SAM: 256 -> 1024, crop the resized image, -> (H, W). MedSAM (a stretched square, no padding):
    one bilinear step 256 -> (H, W), as its inference script."""
    import torch.nn.functional as F

    from refseg.config import SegmenterConfig
    from refseg.pipeline.decode import decode_target
    from refseg.pipeline.prompts import PromptBatch

    low = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))

    from refseg.runtime.backend import decode_image_by_image

    class FakeBackend:
        sam_size = 1024

        def decode(self, embedding, coords, labels, boxes, multimask, mask_input=None):
            return low.expand(coords.shape[0], 1, 256, 256), torch.ones(coords.shape[0], 1)

        def decode_batch(self, *args):
            return decode_image_by_image(self, *args)

    prompts = PromptBatch(torch.tensor([[[30.0, 40.0]]]), torch.tensor([[1]]), torch.tensor([1]))
    config = SegmenterConfig.from_preset("sat").replace(sam=sam)
    hw, input_size = (300, 420), ((1024, 1024) if sam == "medsam" else (731, 1024))
    out = decode_target(FakeBackend(), torch.zeros(256, 64, 64), prompts, [0], input_size, hw, config).logits
    if sam == "medsam":
        expected = F.interpolate(low, hw, mode="bilinear", align_corners=False)
    else:
        big = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)[..., :731, :1024]
        expected = F.interpolate(big, hw, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=0)


def _scipy_clean(m, keep_largest, fraction, holes):
    """The post-processing rules stated with scipy.ndimage, one mask at a time."""
    labels, k = ndi.label(m, structure=np.ones((3, 3)))
    if k and (keep_largest or fraction > 0):
        sizes = np.bincount(labels.ravel(), minlength=k + 1)[1:]
        if keep_largest:
            m = labels == 1 + int(np.argmax(sizes))
            holes = True
        else:
            m = np.isin(labels, 1 + np.flatnonzero(sizes >= fraction * sizes.max()))
    return ndi.binary_fill_holes(m) if holes else m


@pytest.mark.parametrize("accelerator", [False, True])
@pytest.mark.parametrize("rule", [(True, 0.0, False), (False, 0.3, False), (False, 0.3, True), (False, 0.0, True)])
def test_clean_masks_batch_equals_each_mask_alone(monkeypatch, accelerator, rule):
    """A batch of masks (empty, full, noisy, blobs) cleaned at once == scipy on each mask alone."""
    if accelerator:
        monkeypatch.setenv("REFSEG_ACCELERATOR_PATH", "1")
    from refseg.pipeline.postprocess import clean_masks

    rng = np.random.default_rng(2)
    masks = [np.zeros((33, 47), bool), np.ones((33, 47), bool)]
    masks += [rng.random((33, 47)) < p for p in (0.3, 0.5, 0.6)]
    blobs = np.zeros((33, 47), bool)
    blobs[3:20, 3:20] = blobs[25:30, 30:40] = True
    blobs[8:12, 8:12] = False
    masks.append(blobs)
    out = clean_masks(torch.from_numpy(np.stack(masks)), *rule).numpy()
    for got, m in zip(out, masks):
        np.testing.assert_array_equal(got, _scipy_clean(m, *rule))


@pytest.mark.parametrize("rule", [(True, 0.0, False), (False, 0.3, True), (False, 0.0, True)])
def test_background_padding_leaves_each_mask_as_scipy_cleans_it(rule):
    """label_maps cleans targets of several sizes in one call, padded at the bottom / right with background."""
    from refseg.pipeline.postprocess import clean_masks

    rng = np.random.default_rng(4)
    masks = [rng.random((37, 53)) < 0.45, rng.random((50, 20)) < 0.6]
    padded = torch.zeros(2, 50, 53, dtype=torch.bool)
    for i, m in enumerate(masks):
        padded[i, :m.shape[0], :m.shape[1]] = torch.from_numpy(m)
    out = clean_masks(padded, *rule).numpy()
    for got, m in zip(out, masks):
        np.testing.assert_array_equal(got[:m.shape[0], :m.shape[1]], _scipy_clean(m, *rule))
        assert not got[m.shape[0]:].any() and not got[:, m.shape[1]:].any()
