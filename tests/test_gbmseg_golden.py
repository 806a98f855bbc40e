"""Golden test: the physical-space stage reproduces the GBMSeg release's final prompt list.

Data: ../shared/data/gbmseg_example (SnowRain510/GBMSeg @ db345e9, see SOURCES.md there). Each prompt file
holds ``<target>;<positives>;<negatives>`` with [x, y] pixels of the 512² target.

How the release combined its lists (established from the data, asserted below): the final list is
``group(initial negatives, r=64) -> exclusion 128``, followed by ``group(hard negatives, r=64)`` appended
without exclusion — hence the duplicate [454, 237], which survives once from each part. Positives are
only de-duplicated (r = 0), so they are unchanged. Order: the release iterated Python sets, so its files
list points in set-iteration order; the physical stage walks the lists in the order given, and with the
files' own orders it reproduces the final file point for point (order included).
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from refseg.config import SegmenterConfig
from refseg.pipeline.grid import cells_to_pixels
from refseg.pipeline.prompts import engineer_points

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gbmseg_example"
TARGET = "001_250744_2.png"
SIZE = (512, 512)
OFF = [506, -6]

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"golden data folder {DATA} is absent")


def load(name: str) -> tuple[str, list[list[int]], list[list[int]]]:
    """Parse ``<target>;[[x, y], ...];[[x, y], ...]`` (one line)."""
    text = (DATA / name).read_text().strip()
    target, pos, neg = text.split(";")
    return target, ast.literal_eval(pos), ast.literal_eval(neg)


@pytest.fixture(scope="module")
def files():
    return {k: load(f"prompt_{k}.txt") for k in ("initial", "hard", "final")}


def release_oracle(pos, neg, hard, r_neg=64.0, r_excl=128.0, r_hard=64.0):
    """Plain-Python statement of the release's physical stage (algorithm.md §1), point by point."""
    def dist(a, b):
        return math.hypot(a[0] - b[0], a[1] - b[1])

    def group(points, opposite, r):
        points = [p for i, p in enumerate(points) if p not in points[:i]]
        assigned, out = [False] * len(points), []
        for i, p in enumerate(points):
            if assigned[i]:
                continue
            members = [j for j, q in enumerate(points) if not assigned[j] and dist(p, q) <= r]
            score = [sum(dist(points[j], o) for o in opposite) / max(len(opposite), 1) for j in members]
            out.append(points[members[score.index(max(score))]])
            for j in members:
                assigned[j] = True
        return out

    pos = group(pos, neg, 0.0)
    negs = [n for n in group(neg, pos, r_neg) if min(dist(n, p) for p in pos) >= r_excl]
    return pos, negs + group(hard, pos, r_hard)


def test_files_match_sources_md(files):
    counts = {k: (len(v[1]), len(v[2])) for k, v in files.items()}
    assert counts == {"initial": (57, 334), "hard": (57, 35), "final": (57, 29)}
    assert all(v[0] == TARGET for v in files.values())
    assert files["initial"][1] == files["hard"][1] == files["final"][1]
    final_neg = files["final"][2]
    assert final_neg.count([454, 237]) == 2 and len({tuple(p) for p in final_neg}) == 28
    assert OFF in files["initial"][1] and OFF in files["initial"][2]


def test_lattice_and_offimage_point_match_patch_centres(files):
    """Every point is a patch centre (14·i + 7 at S = 560) rounded to 512 px; [506, -6] is index -1."""
    idx = torch.arange(-1, 1600)
    lattice = {tuple(p) for p in cells_to_pixels(idx, 40, 560, SIZE).tolist()}
    assert tuple(cells_to_pixels(torch.tensor([-1]), 40, 560, SIZE)[0].tolist()) == tuple(OFF)
    for _, pos, neg in files.values():
        assert {tuple(p) for p in pos + neg} <= lattice


def test_parity_flag_reproduces_final_list_exactly(files):
    _, pos, neg = files["initial"]
    _, _, hard = files["hard"]
    _, final_pos, final_neg = files["final"]
    cfg = SegmenterConfig.from_preset("gbmseg", gbmseg_offimage_quirk=True)
    points, labels = engineer_points(pos, neg, hard, image_size=SIZE, config=cfg)
    assert points.dtype == np.int64 and labels.dtype == np.int64
    assert (labels == 1).sum() == 57 and (labels == 0).sum() == 29
    assert labels.tolist() == [1] * 57 + [0] * 29  # positives first
    assert points[labels == 1].tolist() == final_pos  # same points, same order
    assert points[labels == 0].tolist() == final_neg  # incl. the duplicate [454, 237]


def test_parity_matches_plain_python_oracle(files):
    _, pos, neg = files["initial"]
    _, _, hard = files["hard"]
    exp_pos, exp_neg = release_oracle(pos, neg, hard)
    assert (exp_pos, exp_neg) == (files["final"][1], files["final"][2])


def test_default_drops_offimage_point(files):
    """Default gbmseg preset: [506, -6] is dropped before grouping; everything else as the release."""
    _, pos, neg = files["initial"]
    _, _, hard = files["hard"]
    points, labels = engineer_points(pos, neg, hard, preset="gbmseg", image_size=SIZE)
    assert ((points >= 0) & (points < 512)).all()
    on = lambda pts: [p for p in pts if 0 <= p[0] < 512 and 0 <= p[1] < 512]  # noqa: E731
    exp_pos, exp_neg = release_oracle(on(pos), on(neg), on(hard))
    assert points[labels == 1].tolist() == exp_pos == on(files["final"][1])
    assert points[labels == 0].tolist() == exp_neg
    assert (labels == 1).sum() == 56
    # without the phantom positive at the top-right corner, two more corner negatives survive exclusion
    final_neg = files["final"][2]
    extra = [p for p in exp_neg if p not in final_neg]
    assert len(exp_neg) == len(final_neg) + len(extra) and all(p[1] < 128 and p[0] > 384 for p in extra)


def test_release_order_is_python_set_order():
    """Documents the order deviation: the release's lists are CPython set iteration orders of S-space
    (x, y) tuples (a set re-iterates the hard list unchanged, which a raster order would not survive);
    the iteration order also depends on insertion history, so the engine lists candidates by patch
    index instead, and only the physical stage is compared point for point."""
    _, _, hard = load("prompt_hard.txt")
    s_space = [tuple(round((v * 560 / 512 - 7) / 14) * 14 + 7 for v in p) for p in hard]
    assert list(set(s_space)) == s_space
    assert s_space != sorted(s_space, key=lambda p: (p[1], p[0]))
