"""The C API's mask post-processing (refseg_clean_mask through refseg._C) against
refseg.pipeline.postprocess.clean_mask (torch) on random masks, every option combination."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refseg.pipeline.postprocess import clean_mask

_C = pytest.importorskip("refseg._C", reason="refseg._C is not built (pip install -e . builds it)")

OPTIONS = [(False, 0.0, False), (False, 0.3, False), (False, 0.0, True), (False, 0.3, True), (True, 0.0, False),
           (True, 0.3, True), (False, 1.0, False), (False, 0.05, True)]


def random_masks(seed: int, count: int = 6):
    gen = np.random.default_rng(seed)
    for i in range(count):
        h, w = gen.integers(5, 70, 2)
        blobs = gen.random((-(-h // 6), -(-w // 6))) > 0.55
        mask = np.kron(blobs, np.ones((6, 6), bool))[:h, :w].copy()
        mask ^= gen.random((h, w)) < 0.08  # specks, holes and diagonal touches
        yield mask


@pytest.mark.parametrize("keep_largest,fraction,holes", OPTIONS)
def test_clean_mask_equals_torch(keep_largest, fraction, holes):
    for mask in random_masks(int(keep_largest) * 100 + int(fraction * 100) + int(holes)):
        want = clean_mask(torch.from_numpy(mask), keep_largest=keep_largest, min_component_fraction=fraction,
                          holes=holes).numpy()
        got = _C.clean_mask(mask.astype(np.uint8) * 255, keep_largest, fraction, holes)
        assert got.dtype == bool and np.array_equal(got, want), (mask.shape, keep_largest, fraction, holes)


def test_clean_mask_edge_cases():
    empty = np.zeros((9, 7), np.uint8)
    assert not _C.clean_mask(empty, True, 0.3, True).any()
    ring = np.zeros((7, 7), np.uint8)
    ring[1:6, 1:6] = 1
    ring[3, 3] = 0
    assert _C.clean_mask(ring, False, 0.0, True)[3, 3] and not _C.clean_mask(ring, False, 0.0, False)[3, 3]
    # two equal components: keep_largest keeps the first in raster order, as torch.argmax does
    twins = np.zeros((5, 9), np.uint8)
    twins[1:3, 1:3] = twins[1:3, 6:8] = 1
    got = _C.clean_mask(twins, True, 0.0, False)
    assert got[1, 1] and not got[1, 6]
    assert np.array_equal(got, clean_mask(torch.from_numpy(twins.astype(bool)), keep_largest=True).numpy())
    with pytest.raises(ValueError, match="min_component_fraction"):
        _C.clean_mask(twins, False, 1.5, False)
