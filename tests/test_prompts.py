"""Physical-space prompts (grouping, exclusion, hard negatives, k-means, cap, box, batching) and the config.

Reference: a plain-Python statement of the greedy walk (exact comparison; coordinates are integers).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refseg.config import PRESETS, SegmenterConfig
from refseg.pipeline.grouping import group_by_radius, mean_distance, take_points
from refseg.pipeline.matching import match_candidates
from refseg.pipeline.prompts import (engineer_points, engineer_prompt_batch, kmeans_thin,
                                     prompts_from_candidates)

PIX = SegmenterConfig.from_preset("gbmseg")  # pixel radii 0 / 64 / 128 / 64, no k-means, no fall-back


def walk_oracle(points, opposite, r):
    """Greedy radius grouping, point by point (dedup first; score = mean distance to ``opposite``)."""
    points = [p for i, p in enumerate(points) if p not in points[:i]]
    done, out = [False] * len(points), []
    for i, p in enumerate(points):
        if done[i]:
            continue
        members = [j for j, q in enumerate(points) if not done[j] and math.dist(p, q) <= r]
        score = [sum(math.dist(points[j], o) for o in opposite) / max(len(opposite), 1) for j in members]
        out.append(points[members[score.index(max(score))]])
        for j in members:
            done[j] = True
    return out


def oracle(pos, neg, hard, rp, rn, rx, rh):
    pos_d = [p for i, p in enumerate(pos) if p not in pos[:i]]
    neg_d = [p for i, p in enumerate(neg) if p not in neg[:i]]
    pos_g = walk_oracle(pos_d, neg_d, rp)
    negs = [n for n in walk_oracle(neg_d, pos_g, rn) if not pos_g or min(math.dist(n, p) for p in pos_g) >= rx]
    return pos_g, negs + (walk_oracle(hard, pos_g, rh) if hard is not None else [])


def lattice_points(rng, n, side=512, step=13):
    return [[int(x), int(y)] for x, y in rng.integers(0, side // step, (n, 2)) * step + 6]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radii", [(0, 64, 128, 64), (40, 70, 70, 30), (0, 0, 0, 0)])
def test_random_sets_match_walk_oracle(seed, radii):
    rng = np.random.default_rng(seed)
    pos, neg, hard = lattice_points(rng, 40), lattice_points(rng, 150), lattice_points(rng, 25)
    cfg = PIX.replace(pos_radius=radii[0], neg_radius=radii[1], exclusion_radius=radii[2], hard_radius=radii[3])
    pts, lab = engineer_points(pos, neg, hard, image_size=(512, 512), config=cfg)
    exp_pos, exp_neg = oracle(pos, neg, hard, *radii)
    assert pts[lab == 1].tolist() == exp_pos
    assert pts[lab == 0].tolist() == exp_neg


@pytest.mark.parametrize("method", ["walk", "steps", "rounds", "auto"])
@pytest.mark.parametrize("radius", [0.0, 10.0, 30.0, 64.0, 200.0])
def test_leader_solvers_agree_with_walk(method, radius):
    rng = np.random.default_rng(int(radius))
    sets = [lattice_points(rng, n) for n in (120, 37, 1)]
    opposite = lattice_points(rng, 20)
    pts = torch.zeros(3, 120, 2, dtype=torch.float64)
    valid = torch.zeros(3, 120, dtype=torch.bool)
    for i, s in enumerate(sets):
        pts[i, :len(s)] = torch.tensor(s, dtype=torch.float64)
        valid[i, :len(s)] = True
    opp = torch.tensor(opposite, dtype=torch.float64)[None].expand(3, -1, -1)
    score = mean_distance(pts, valid, opp, torch.ones(3, 20, dtype=torch.bool))
    got, ok = take_points(pts, group_by_radius(pts, valid, radius, score, method=method))
    for i, s in enumerate(sets):
        assert got[i][ok[i]].long().tolist() == walk_oracle(s, opposite, radius)


def test_representative_and_walk_order():
    pos = [[0, 0]]
    # group led by [200, 0] holds [230, 0] (farther from the positive) -> representative [230, 0],
    # listed first because its group's leader comes first in the walk
    neg = [[200, 0], [300, 300], [230, 0], [250, 300]]
    pts, lab = engineer_points(pos, neg, image_size=(512, 512), config=PIX.replace(exclusion_radius=0))
    assert pts[lab == 0].tolist() == [[230, 0], [300, 300]]
    # ties in mean distance: the earliest member wins
    pts, lab = engineer_points([[0, 0]], [[100, 0], [0, 100]], image_size=(512, 512),
                               config=PIX.replace(exclusion_radius=0, neg_radius=200))
    assert pts[lab == 0].tolist() == [[100, 0]]
    # radius is inclusive: exactly 64 px apart -> one group
    pts, lab = engineer_points([[0, 0]], [[300, 0], [364, 0]], image_size=(512, 512), config=PIX)
    assert pts[lab == 0].tolist() == [[364, 0]]


def test_exclusion_fallback_dedup_hard():
    pos = [[100, 100], [100, 100]]  # duplicate positive
    neg = [[227, 100], [228, 100]]  # 127 px and 128 px from the positive (one group: 1 px apart)
    pts, lab = engineer_points(pos, neg, image_size=(512, 512), config=PIX)
    assert pts.tolist() == [[100, 100], [228, 100]] and lab.tolist() == [1, 0]
    pts, lab = engineer_points(pos, [[227, 100]], image_size=(512, 512), config=PIX)
    assert pts.tolist() == [[100, 100]]  # excluded, no fall-back in the gbmseg preset
    pts, lab = engineer_points(pos, [[227, 100], [150, 100]], image_size=(512, 512),
                               config=PIX.replace(fallback=True, neg_radius=0))
    assert pts.tolist() == [[100, 100], [227, 100]]  # the negative farthest from the positives
    # hard negatives: appended without exclusion, grouped with the representative farthest away
    pts, lab = engineer_points(pos, [[400, 400]], [[110, 100], [120, 100]], image_size=(512, 512), config=PIX)
    assert pts.tolist() == [[100, 100], [400, 400], [120, 100]] and lab.tolist() == [1, 0, 0]


def test_offimage_points_dropped_unless_quirk():
    pos, neg = [[10, 10], [506, -6]], [[300, 300], [-30, 400]]
    pts, lab = engineer_points(pos, neg, image_size=(512, 512), config=PIX)
    assert pts.tolist() == [[10, 10], [300, 300]]
    pts, lab = engineer_points(pos, neg, image_size=(512, 512), config=PIX.replace(gbmseg_offimage_quirk=True))
    assert pts.tolist() == [[10, 10], [506, -6], [300, 300], [-30, 400]]
    # non-square: x is checked against W, y against H
    pts, _ = engineer_points([[10, 10], [10, 150], [250, 10]], [], image_size=(100, 300), config=PIX)
    assert pts.tolist() == [[10, 10], [250, 10]]


def test_side_relative_radii_and_float_points():
    cfg = PIX.replace(radius_unit="side", pos_radius=0.0, neg_radius=0.125, exclusion_radius=0.25,
                      hard_radius=0.125)
    a = engineer_points([[0, 0]], [[300, 0], [364, 0], [0, 140]], image_size=(512, 512), config=cfg)
    b = engineer_points([[0, 0]], [[300, 0], [364, 0], [0, 140]], image_size=(512, 512), config=PIX)
    assert a[0].tolist() == b[0].tolist()
    c = engineer_points([[0, 0]], [[600, 0], [728, 0]], image_size=(512, 1024), config=cfg)  # side = 1024
    assert c[0].tolist() == [[0, 0], [728, 0]]
    f = engineer_points([[0.5, 0.25]], [[300.75, 2.0]], image_size=(512, 512), config=PIX)
    assert f[0].dtype == np.float64 and f[0].tolist() == [[0.5, 0.25], [300.75, 2.0]]


def test_kmeans_thinning_keeps_one_point_per_blob():
    rng = np.random.default_rng(0)
    centres = np.array([[60, 60], [400, 80], [250, 420]])
    blob = [(c + d).tolist() for c in centres for d in rng.integers(-8, 9, (12, 2))]
    pos = torch.tensor(blob, dtype=torch.float64)[None]
    keep = kmeans_thin(pos, torch.ones(1, len(blob), dtype=torch.bool), k=3)
    kept = pos[0][keep[0]].numpy()
    assert len(kept) == 3
    for c in centres:  # one survivor per blob, the member nearest the blob mean
        members = np.array([p for p in blob if np.abs(np.array(p) - c).max() <= 8])
        near = members[np.argmin(((members - members.mean(0)) ** 2).sum(1))]
        assert any((k == near).all() for k in kept)
    cfg = PRESETS["sat"].replace(pos_radius=0.0, kmeans_k=3)
    pts, lab = engineer_points(blob, [[500, 500]], image_size=(512, 512), config=cfg)
    assert (lab == 1).sum() == 3 and (lab == 0).sum() == 1


def test_batch_equals_single_sets_and_padding():
    rng = np.random.default_rng(7)
    sets = [(lattice_points(rng, n), lattice_points(rng, m)) for n, m in ((5, 40), (12, 3), (1, 0))]
    sizes = [(512, 512), (400, 600), (512, 512)]
    cfg = PIX.replace(max_points=0, use_box=True)
    batch = engineer_prompt_batch([s[0] for s in sets], [s[1] for s in sets], image_sizes=sizes, config=cfg)
    assert batch.points.dtype == torch.float32 and batch.labels.shape == batch.points.shape[:2]
    for i, ((p, n), hw) in enumerate(zip(sets, sizes)):
        pts, lab = engineer_points(p, n, image_size=hw, config=cfg)
        got_p, got_l = batch.prompt(i)
        assert got_p.tolist() == pts.astype(np.float32).tolist() and got_l.tolist() == lab.tolist()
        assert (batch.labels[i, int(batch.num_points[i]):] == -1).all()
        pos = pts[lab == 1]
        assert batch.boxes[i].tolist() == [*pos.min(0).tolist(), *pos.max(0).tolist()]


def test_max_points_cap():
    pos = [[x, 10] for x in range(0, 500, 50)]  # 10 positives
    neg = [[x, 500] for x in range(0, 500, 130)]  # 4 negatives, far apart
    cfg = PIX.replace(max_points=6, neg_radius=0, exclusion_radius=0)
    pts, lab = engineer_points(pos, neg, image_size=(512, 512), config=cfg)
    assert lab.tolist() == [1, 1, 1, 0, 0, 0] and pts[:3].tolist() == pos[:3]
    pts, lab = engineer_points(pos[:2], neg, image_size=(512, 512), config=cfg)
    assert lab.tolist() == [1, 1, 0, 0, 0, 0]


def test_prompts_from_candidates_end_to_end():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 8, generator=g)
    tgt = ref[torch.randperm(16, generator=g)][None] + 0.01 * torch.randn(1, 16, 8, generator=g)
    labels = torch.tensor([1, 1, 0, 0] * 4, dtype=torch.int8)
    cfg = PIX.replace(image_size=56, neg_radius=0, exclusion_radius=0, hard_negatives=False)
    cand = match_candidates(ref, labels, tgt, cfg)
    batch = prompts_from_candidates(cand, cfg, (56, 56))
    pts, lab = batch.prompt(0)
    # every target patch is a copy of one reference patch: its label decides the prompt label
    assert (lab == 1).sum() == int(cand.positives.sum()) == 8 and (lab == 0).sum() == 8
    idx = (np.round((pts - 7) / 14).astype(int) @ np.array([1, 4]))
    assert sorted(idx[lab == 1].tolist()) == torch.nonzero(cand.positives[0, 0])[:, 0].tolist()


def test_bad_point_inputs():
    with pytest.raises(ValueError, match="positives"):
        engineer_points([[1, 2, 3]], [], image_size=(10, 10), config=PIX)
    with pytest.raises(ValueError, match="image_sizes"):
        engineer_prompt_batch([[[1, 2]]], [[]], image_sizes=[(10, 10), (5, 5)], config=PIX)


# -- SegmenterConfig ------------------------------------------------------------------------------------
def test_presets_and_overrides():
    gb, sat = SegmenterConfig.from_preset("gbmseg"), SegmenterConfig.from_preset("sat")
    assert (gb.image_size, gb.grid_size, gb.metric, gb.dinov2, gb.sam) == (560, 40, "euclidean", "vitg14", "vit_l")
    assert gb.gbmseg_skip_last and gb.hard_negatives and not gb.gbmseg_offimage_quirk and not gb.multimask_output
    assert gb.radius_px("neg_radius", (512, 512)) == 64 and gb.radius_px("exclusion_radius", (900, 100)) == 128
    assert (sat.image_size, sat.metric, sat.hard_negatives, sat.multimask_output) == (518, "cosine", False, True)
    assert sat.radius_px("neg_radius", (512, 512)) == 64 and sat.radius_px("pos_radius", (560, 300)) == 70
    assert SegmenterConfig() == sat and set(PRESETS) >= {"gbmseg", "sat"}
    o = gb.override_from_strings(["metric=cosine", "cycle_check=false", "kmeans_k=8", "grid_fraction=0.9",
                                  "device=none", "device=cuda:0", "fill_holes=YES"])
    assert (o.metric, o.cycle_check, o.kmeans_k, o.grid_fraction, o.device, o.fill_holes) == \
        ("cosine", False, 8, 0.9, "cuda:0", True)
    assert gb.replace(device="cpu").override_from_strings(["device=null"]).device is None
    assert o.to_dict()["kmeans_k"] == 8 and gb.to_dict()["name"] == "gbmseg"
    with pytest.raises(AttributeError):
        gb.metric = "cosine"


@pytest.mark.parametrize("item,match", [
    ("colour=red", "colour"), ("kmeans_k=eight", "kmeans_k"), ("cycle_check=maybe", "cycle_check"),
    ("image_size=500", "image_size"), ("metric=manhattan", "metric"), ("novalue", "key=value"),
    ("grid_fraction=0.2", "grid_fraction"), ("neg_radius=-1", "neg_radius"),
])
def test_override_errors_name_the_key(item, match):
    with pytest.raises(ValueError, match=match):
        SegmenterConfig().override_from_strings([item])


def test_constructor_validation():
    with pytest.raises(ValueError, match="multiple of the DINOv2 patch size 14"):
        SegmenterConfig(image_size=512)
    with pytest.raises(ValueError, match="unknown preset"):
        SegmenterConfig.from_preset("nope")
    with pytest.raises(ValueError, match="unknown SegmenterConfig field"):
        SegmenterConfig().replace(radius=3)
    with pytest.raises(ValueError, match="radius_unit='pixel'"):
        SegmenterConfig(neg_radius=64)


def test_grouping_ties_within_float_noise_go_to_the_earliest_member():
    from refseg.pipeline.grouping import group_by_radius

    pts = torch.tensor([[[10, 10], [12, 10], [100, 100]]], dtype=torch.float64)
    valid = torch.ones(1, 3, dtype=torch.bool)
    score = torch.tensor([[5.0, 5.0 + 1e-13, 1.0]], dtype=torch.float64)  # equal but for summation noise
    assert group_by_radius(pts, valid, 5.0, score).tolist() == [[0, 2]]
    score = torch.tensor([[5.0, 5.001, 1.0]], dtype=torch.float64)  # a real difference still wins
    assert group_by_radius(pts, valid, 5.0, score).tolist() == [[1, 2]]
