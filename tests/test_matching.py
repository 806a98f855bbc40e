"""Feature-space candidates: planted features with known answers, and a brute-force loop oracle.

Planted scene (4×4 grids, unit-norm tokens so cosine and Euclidean rank alike): reference FG patches
0, 1, 5 are copied into target patches 3, 7, 0 (must become positives); FG patch 2 is a near-copy of
BG patch 14, which is copied into target 9, so 2's forward match back-matches BG (cycle rejection);
BG patches 10, 11, 15 are copied into targets 12, 13, 15; target 4 points away from every FG patch
(the farthest match of all of them, back-matching a non-FG patch: hard negative).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from refseg.config import SegmenterConfig
from refseg.pipeline.grid import cells_to_pixels
from refseg.pipeline.matching import candidates_to_points, match_candidates

FG_REF, BG_REF = [0, 1, 2, 5], [10, 11, 14, 15]


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def planted(d: int = 32):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    q = q.T  # orthonormal rows
    ref = q[:16].clone()
    ref[2] = unit(q[14] + 0.05 * q[30])
    tgt = q[16:32].clone()  # fillers: orthogonal to every reference patch except the perturbation
    for t, r in ((3, 0), (7, 1), (0, 5), (12, 10), (13, 11), (15, 15)):
        tgt[t] = ref[r]
    tgt[9] = ref[14]
    tgt[4] = -unit(ref[[0, 1, 2, 5]].sum(0))
    labels = torch.full((16,), -1, dtype=torch.int8)
    labels[FG_REF] = 1
    labels[BG_REF] = 0
    return ref.float(), labels, tgt.float()[None]


def cfg(**kw) -> SegmenterConfig:
    base = dict(image_size=56, hard_negatives=True, fallback=False, cycle_check=True, matcher="nn")
    base.update(kw)
    return SegmenterConfig.from_preset("sat", **base)


def where(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask)[:, 0].tolist()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_planted_positives_negatives_hard(metric):
    ref, labels, tgt = planted()
    cand = match_candidates(ref, labels, tgt, cfg(metric=metric))
    assert cand.positives.shape == (1, 1, 16)
    assert where(cand.positives[0, 0]) == [0, 3, 7]  # FG copies; 9 rejected by the cycle check
    assert where(cand.negatives[0, 0]) == [9, 12, 13, 15]
    assert where(cand.hard_negatives[0, 0]) == [4]
    assert not cand.offimage_pos.any() and not cand.offimage_neg.any()
    open_ = match_candidates(ref, labels, tgt, cfg(metric=metric, cycle_check=False))
    assert where(open_.positives[0, 0]) == [0, 3, 7, 9]


def test_hard_negatives_off_and_scaled_tokens_euclidean_vs_cosine():
    ref, labels, tgt = planted()
    assert not match_candidates(ref, labels, tgt, cfg(hard_negatives=False)).hard_negatives.any()
    # cosine ignores token norms; a target copy scaled x3 is still the cosine match
    tgt2 = tgt.clone()
    tgt2[0, 3] *= 3.0
    assert where(match_candidates(ref, labels, tgt2, cfg(metric="cosine")).positives[0, 0]) == [0, 3, 7]


def test_offimage_quirk_and_fallback():
    ref, labels, tgt = planted()
    quirk = match_candidates(ref, labels, tgt, cfg(gbmseg_offimage_quirk=True))
    assert quirk.offimage_pos.tolist() == [[True]] and quirk.offimage_neg.tolist() == [[False]]
    pts = candidates_to_points(quirk, 4, 56, (56, 56))
    p, v = pts["positives"]
    assert v.tolist() == [[True] * 4]
    assert p[0].tolist() == [[49, -7], [7, 7], [49, 7], [49, 21]]  # index -1 first, then 0, 3, 7
    # only FG patch 2 (rejected) -> empty without fall-back, its forward match with it
    only2 = labels.clone()
    only2[[0, 1, 5]] = -1
    assert not match_candidates(ref, only2, tgt, cfg()).positives.any()
    assert where(match_candidates(ref, only2, tgt, cfg(fallback=True)).positives[0, 0]) == [9]


def test_multiclass_and_batch_equal_single_runs():
    ref, labels, tgt = planted()
    other = labels.clone()
    other[[0, 1]] = 0
    other[[10, 11]] = 1
    both = torch.stack([labels, other])
    tg = torch.cat([tgt, tgt.flip(1), tgt[:, torch.randperm(16, generator=torch.Generator().manual_seed(1))]])
    cand = match_candidates(ref, both, tg, cfg())
    assert cand.positives.shape == (3, 2, 16)
    for b in range(3):
        for c in range(2):
            one = match_candidates(ref, both[c], tg[b:b + 1], cfg())
            for name in ("positives", "negatives", "hard_negatives"):
                assert torch.equal(getattr(cand, name)[b, c], getattr(one, name)[0, 0]), (b, c, name)
    grids = both.reshape(2, 4, 4)  # (C, G, G) labels are accepted too
    assert torch.equal(match_candidates(ref, grids, tg, cfg()).positives, cand.positives)
    per_target = match_candidates(ref.expand(3, -1, -1), both, tg, cfg())
    assert torch.equal(per_target.negatives, cand.negatives)


def loop_oracle(ref, labels, tgt, metric, cycle):
    """Literal statement of §1 with numpy float64 loops (no ties in random data)."""
    r, t = ref.double().numpy(), tgt.double().numpy()
    if metric == "cosine":
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        best = lambda s: int(np.argmax(s))  # noqa: E731
        worst = lambda s: int(np.argmin(s))  # noqa: E731
        sim = r @ t.T
    else:
        sim = np.sqrt(((r[:, None] - t[None]) ** 2).sum(-1))
        best = lambda s: int(np.argmin(s))  # noqa: E731
        worst = lambda s: int(np.argmax(s))  # noqa: E731
    pos, neg, hard = set(), set(), set()
    for i, lab in enumerate(labels.tolist()):
        if lab not in (0, 1):
            continue
        j = best(sim[i])
        back = labels[best(sim[:, j])].item()
        if not cycle or back == lab:
            (pos if lab == 1 else neg).add(j)
        if lab == 1:
            f = worst(sim[i])
            if labels[best(sim[:, f])].item() != 1:
                hard.add(f)
    return sorted(pos), sorted(neg), sorted(hard)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("cycle", [True, False])
def test_random_features_match_loop_oracle(metric, cycle):
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(36, 8, generator=g)
    tgt = torch.randn(2, 36, 8, generator=g) + 0.5 * ref[torch.randperm(36, generator=g)][None]
    labels = torch.randint(-1, 2, (36,), generator=g, dtype=torch.int8)
    cand = match_candidates(ref, labels, tgt, cfg(metric=metric, cycle_check=cycle, image_size=84))
    for b in range(2):
        exp = loop_oracle(ref, labels, tgt[b], metric, cycle)
        got = tuple(where(getattr(cand, n)[b, 0]) for n in ("positives", "negatives", "hard_negatives"))
        assert got == exp


def test_hungarian_one_to_one():
    """FG patches 0 and 1 both prefer target 5 (NN); the assignment sends 1 to target 6."""
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    q = q.T
    ref = q[:16].clone()
    ref[1] = unit(q[0] + 0.3 * q[20])
    tgt = q[16:32].clone()
    tgt[5] = ref[0]
    tgt[6] = unit(ref[1] + 0.5 * q[21])
    tgt[10] = ref[10]
    labels = torch.full((16,), -1, dtype=torch.int8)
    labels[[0, 1]] = 1
    labels[10] = 0
    for metric in ("cosine", "euclidean"):
        nn = match_candidates(ref.float(), labels, tgt.float()[None], cfg(metric=metric))
        hu = match_candidates(ref.float(), labels, tgt.float()[None], cfg(metric=metric, matcher="hungarian"))
        assert where(nn.positives[0, 0]) == [5]
        assert where(hu.positives[0, 0]) == [5, 6]
        assert where(hu.negatives[0, 0]) == [10]
        assert torch.equal(hu.hard_negatives, nn.hard_negatives)


def test_hungarian_cycle_rejection_matches_nn_on_planted_scene():
    ref, labels, tgt = planted()
    hu = match_candidates(ref, labels, tgt, cfg(matcher="hungarian", gbmseg_offimage_quirk=True))
    assert where(hu.positives[0, 0]) == [0, 3, 7]
    assert where(hu.negatives[0, 0]) == [9, 12, 13, 15]
    assert hu.offimage_pos.tolist() == [[True]]


def test_candidates_to_points_geometry_and_errors():
    ref, labels, tgt = planted()
    cand = match_candidates(ref, labels, torch.cat([tgt, tgt]), cfg())
    out = candidates_to_points(cand, 4, 56, [(100, 200), (56, 56)])
    pts, valid = out["negatives"]
    exp = cells_to_pixels(torch.tensor([9, 12, 13, 15]), 4, 56, (100, 200)).tolist()
    assert pts[0][valid[0]].long().tolist() == exp
    exp = cells_to_pixels(torch.tensor([9, 12, 13, 15]), 4, 56, (56, 56)).tolist()
    assert pts[1][valid[1]].long().tolist() == exp
    with pytest.raises(ValueError, match="ref_labels"):
        match_candidates(ref, labels[:5], tgt, cfg())
    with pytest.raises(ValueError, match="tgt_tokens"):
        match_candidates(ref, labels, tgt[0], cfg())
