"""refseg._C (the C API's prompt engine) against the torch path: grid labels, matching post-processing,
k-means, the physical-space stage (random and GBMSeg golden inputs) and the pipeline hook."""
from __future__ import annotations

import logging
import zlib

import numpy as np
import pytest
import torch

from refseg.config import SegmenterConfig
from refseg.kernels import kmeans_reference
from refseg.kernels import match
from refseg.pipeline import native
from refseg.pipeline.grid import binary_to_grid
from refseg.pipeline.matching import match_candidates
from refseg.pipeline.prompts import engineer_padded, engineer_points, prompts_from_candidates

_C = pytest.importorskip("refseg._C", reason="refseg._C is not built (pip install -e . builds it)")


def both(monkeypatch, fn):
    """(torch result, native result) of fn()."""
    monkeypatch.setenv(native.KILL_SWITCH, "1")
    ref = fn()
    monkeypatch.delenv(native.KILL_SWITCH)
    assert native.module() is not None
    return ref, fn()


def same_batch(a, b):
    for name in ("points", "labels", "num_points"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    if a.boxes is None:
        assert b.boxes is None
    else:
        assert torch.equal(torch.nan_to_num(a.boxes, 1e30), torch.nan_to_num(b.boxes, 1e30))


def random_sets(gen, p, n, side, integral=True):
    pts = torch.rand(p, n, 2, generator=gen, dtype=torch.float64) * (side * 1.1) - side * 0.05
    if integral:
        pts = pts.round()
    valid = torch.rand(p, n, generator=gen) < 0.8
    return pts, valid


CONFIGS = {
    "sat": SegmenterConfig.from_preset("sat"),
    "sat_box_cap": SegmenterConfig.from_preset("sat", use_box=True, max_points=12, hard_negatives=True),
    "gbmseg": SegmenterConfig.from_preset("gbmseg"),
    "gbmseg_quirk": SegmenterConfig.from_preset("gbmseg", gbmseg_offimage_quirk=True, kmeans_k=5),
    "pixel_fallback": SegmenterConfig.from_preset("sat", radius_unit="pixel", pos_radius=9.0, neg_radius=0.0,
                                                  exclusion_radius=40.0, kmeans_k=0, fallback=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("integral", [True, False])
def test_engineer_padded_random(monkeypatch, name, integral):
    config = CONFIGS[name]
    if not integral and config.kmeans_k:
        config = config.replace(kmeans_k=0)  # k-means sums are order-exact only on pixel lattices
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}-{integral}".encode()))
    p = 6
    sizes = torch.tensor([[64, 96], [200, 150], [128, 128], [90, 60], [256, 256], [33, 47]])
    pos, pv = random_sets(gen, p, 40, 120, integral)
    neg, nv = random_sets(gen, p, 90, 120, integral)
    hard, hv = random_sets(gen, p, 20, 120, integral)
    pos[:, 5] = pos[:, 3]  # exact duplicates
    pv[1] = False  # a set without positives
    ref, fast = both(monkeypatch, lambda: engineer_padded(pos, pv, neg, nv, sizes, config, hard, hv,
                                                          torch.float64))
    same_batch(ref, fast)
    assert int(fast.num_points.sum()) > 0


def test_prompts_from_candidates_matching_path(monkeypatch):
    """Candidates -> prompts (sat preset, k-means on) through both engines, lattice points."""
    config = SegmenterConfig.from_preset("sat", image_size=112, hard_negatives=True)
    gen = torch.Generator().manual_seed(3)
    ref_tok, tgt_tok = torch.randn(64, 24, generator=gen), torch.randn(3, 64, 24, generator=gen)
    labels = (torch.rand(2, 64, generator=gen) * 3).floor().to(torch.int8) - 1
    sizes = [(100, 140), (64, 64), (300, 200)]

    def run():
        cand = match_candidates(ref_tok, labels, tgt_tok, config)
        return cand, prompts_from_candidates(cand, config, sizes)

    (c0, b0), (c1, b1) = both(monkeypatch, run)
    for field in ("positives", "negatives", "hard_negatives", "offimage_pos", "offimage_neg"):
        assert torch.equal(getattr(c0, field), getattr(c1, field)), field
    same_batch(b0, b1)


@pytest.mark.parametrize("metric,quirk,fallback", [("cosine", False, True), ("euclidean", True, False)])
def test_match_post_processing(monkeypatch, metric, quirk, fallback):
    config = SegmenterConfig.from_preset("gbmseg", metric=metric, gbmseg_offimage_quirk=quirk,
                                         fallback=fallback, image_size=56)
    gen = torch.Generator().manual_seed(7)
    ref, tgt = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
    labels = torch.tensor([[1] * 3 + [0] * 10 + [-1] * 3, [1] * 16], dtype=torch.int8)
    a, b = both(monkeypatch, lambda: match_candidates(ref, labels, tgt, config))
    for field in ("positives", "negatives", "hard_negatives", "offimage_pos", "offimage_neg"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype == torch.bool and torch.equal(x, y), field
    res = match(ref, tgt, metric=metric, k=1)
    assert native.match_nn(res, labels, config) is not None


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("rule,fraction,skip", [("all", 0.95, False), ("any", 0.95, True), ("fraction", 0.6, False)])
def test_grid_labels(monkeypatch, rule, fraction, skip, patch):
    gen = torch.Generator().manual_seed(11)
    side = 6 * patch
    blobs = torch.nn.functional.interpolate(torch.rand(2, 3, 1, 6, 6, generator=gen).flatten(0, 1), size=(side, side))
    mask = (blobs[:, 0] > 0.5).reshape(2, 3, side, side)
    a, b = both(monkeypatch, lambda: binary_to_grid(mask, patch_size=patch, rule=rule, fraction=fraction,
                                                    skip_last=skip))
    assert a.dtype == b.dtype == torch.int8 and a.shape == (2, 3, 6, 6) and torch.equal(a, b)
    assert set(b.unique().tolist()) >= {0, 1}


@pytest.mark.parametrize("n,k", [(40, 16), (7, 3), (200, 16)])
def test_kmeans_matches_reference(n, k):
    gen = torch.Generator().manual_seed(n)
    pts = (torch.rand(n, 2, generator=gen) * 500).round()
    pts[1] = pts[0]  # a duplicate point
    centres, labels, _ = kmeans_reference(pts[None], torch.tensor([n]), k, iters=100, seed=5)
    c2, l2 = _C.kmeans(pts.numpy(), k, 100, 5, "k-means++")
    assert np.array_equal(labels[0].numpy(), l2)
    assert np.array_equal(centres[0].numpy(), c2)


def test_gbmseg_golden_native(gbmseg_files):
    """The release's final list (57 positives, 29 negatives) through the C++ engine."""
    pos, neg, hard, final_pos, final_neg = gbmseg_files
    assert native.module() is not None
    cfg = SegmenterConfig.from_preset("gbmseg", gbmseg_offimage_quirk=True)
    points, labels = engineer_points(pos, neg, hard, image_size=(512, 512), config=cfg)
    assert (labels == 1).sum() == 57 and (labels == 0).sum() == 29
    assert points[labels == 1].tolist() == final_pos and points[labels == 0].tolist() == final_neg


@pytest.fixture(scope="module")
def gbmseg_files():
    import ast
    from pathlib import Path

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gbmseg_example"
    if not data.is_dir():
        pytest.skip(f"golden data folder {data} is absent")
    lists = {}
    for key in ("initial", "hard", "final"):
        _, pos, neg = (data / f"prompt_{key}.txt").read_text().strip().split(";")
        lists[key] = (ast.literal_eval(pos), ast.literal_eval(neg))
    return lists["initial"][0], lists["initial"][1], lists["hard"][1], lists["final"][0], lists["final"][1]


def test_kill_switch_and_load_log(monkeypatch, caplog):
    monkeypatch.setenv(native.KILL_SWITCH, "1")
    assert native.module() is None
    assert native.engineer_padded(torch.zeros(1, 0, 2), torch.zeros(1, 0, dtype=torch.bool), torch.zeros(1, 0, 2),
                                  torch.zeros(1, 0, dtype=torch.bool), torch.tensor([[4, 4]]),
                                  SegmenterConfig()) is None
    monkeypatch.delenv(native.KILL_SWITCH)
    native._load.cache_clear()
    with caplog.at_level(logging.INFO, logger="refseg.pipeline.native"):
        native.module()
        native.module()
    assert sum("refseg._C loaded" in r.message for r in caplog.records) == 1


def test_bad_input_raises():
    with pytest.raises(ValueError, match="sizes"):
        _C.engineer_padded(np.zeros((1, 2, 2)), np.ones((1, 2), bool), np.zeros((1, 2, 2)), np.ones((1, 2), bool),
                           np.zeros((1, 3), np.int64), _C.PromptParams())
    with pytest.raises(ValueError, match="grid rule"):
        _C.grid_labels(np.zeros((1, 14, 14), np.uint8), "most", 0.9, False, 14)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        _C.grid_labels(np.zeros((1, 14, 14), np.uint8), "all", 0.9, False, 16)
    with pytest.raises(ValueError, match=r"fwd / far\[0\] is not a target patch index"):
        _C.match_nn(np.array([[5]]), np.array([[0]]), np.zeros((1, 1)), np.array([[0, 0]]), np.ones((1, 1), np.int8),
                    True, True, False, True, False)


def test_documented_c_example_is_the_compiled_one():
    """docs/cpp.md's "Embedding from C" example is csrc/examples/embed/segment_one.c (built and run by ctest's
    find_package_example)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "cpp.md").read_text(encoding="utf-8")
    block = doc[doc.index("## Embedding from C"):].split("```c\n", 1)[1].split("```", 1)[0]
    source = (root / "csrc" / "examples" / "embed" / "segment_one.c").read_text(encoding="utf-8")
    assert source.endswith(block) and len(block.splitlines()) >= 15
