"""Stage modules of the method-family presets on synthetic inputs where the right prompts are known.

A colour backend stands in for the models: its "DINOv2 tokens" are the mean colour of each 14-px
patch, its SAM decoder paints the low-res mask from the prompts (discs around positives, or the box
when one is given) and records every call, so component points / boxes, NMS, Hungarian assignments,
the union of sets and the cascade order are checked exactly, without any weights.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refseg.config import SegmenterConfig
from refseg.models.sam_transforms import preprocess_shape
from refseg.pipeline import matcher, methods, persam, prototypes, topk
from refseg.pipeline.inputs import prepare_target
from refseg.pipeline.prompt_sets import PromptSets
from refseg.runtime.backend import decode_image_by_image

RED, BLUE = (230, 20, 20), (20, 20, 230)


class ColourBackend:
    """encode_dinov2: mean colour per 14-px patch (3-D tokens); encode_sam: the image pooled to 64²
    (3 channels, the rest zero); decode: +10 inside discs of 40 px (1024 frame) around positives,
    or inside the box when one is given, −10 elsewhere; IoU = 1 − 0.1·mask index."""

    name, precision, sam_size, device = "colour", "fp32", 1024, torch.device("cpu")

    def __init__(self):
        self.calls = []

    def decode_batch(self, *args):
        return decode_image_by_image(self, *args)

    def encode_dinov2(self, images):
        pooled = F.avg_pool2d(images.float(), 14)
        return pooled.flatten(2).transpose(1, 2).contiguous()

    def encode_sam(self, pixels):
        out = torch.zeros(pixels.shape[0], 256, 64, 64)
        out[:, :3] = F.adaptive_avg_pool2d(pixels.float(), 64)
        return out

    def decode(self, embedding, coords, labels, boxes=None, multimask=False, mask_input=None):
        self.calls.append(dict(coords=coords.clone(), labels=labels.clone(),
                               boxes=None if boxes is None else boxes.clone(), multimask=multimask,
                               mask_input=None if mask_input is None else mask_input.clone()))
        p = coords.shape[0]
        yy, xx = torch.meshgrid(torch.arange(256.) * 4 + 2, torch.arange(256.) * 4 + 2, indexing="ij")
        low = torch.full((p, 256, 256), -10.0)
        for i in range(p):
            if boxes is not None:
                x0, y0, x1, y1 = boxes[i].tolist()
                low[i][(xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)] = 10.0
            else:
                for (x, y), lab in zip(coords[i].tolist(), labels[i].tolist()):
                    if lab == 1:
                        low[i][(xx - x) ** 2 + (yy - y) ** 2 <= 40 ** 2] = 10.0
        m = 3 if multimask else 1
        iou = torch.tensor([1.0 - 0.1 * k for k in range(m)]).expand(p, m).clone()
        return low[:, None].expand(p, m, 256, 256).clone(), iou


def canvas(h, w, blobs):
    """(h, w, 3) uint8 blue image with red rectangles ``(x0, y0, x1, y1)`` (exclusive ends)."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BLUE
    for x0, y0, x1, y1 in blobs:
        img[y0:y1, x0:x1] = RED
    return img


def prepared(image, config):
    """A target as the Segmenter's readers prepare it (CPU path)."""
    return prepare_target(image, image_size=config.image_size, patch_size=config.patch_size, sam_size=1024,
                          device="cpu")


def reference(config, backend, blobs=((28, 28, 84, 84),), size=112):
    img = canvas(size, size, blobs)
    mask = (img[..., 0] > 128).astype(np.uint8)
    from refseg.pipeline.features import dinov2_batch
    from refseg.pipeline.grid import grids_from_config

    tokens = backend.encode_dinov2(dinov2_batch([img], config.image_size))[0]
    classes, grids = grids_from_config(mask, config)
    refs = methods.ReferenceSet([img], [mask], [tokens], grids.reshape(len(classes), -1), list(classes))
    return refs


def timer():
    from refseg.runtime.timing import StageTimer
    return StageTimer("cpu")


# ---------------------------------------------------------------------------------------- ProtoSAM
def test_prototypes_local_where_pure_plus_global():
    d, g = 3, 4
    fg = torch.zeros(g, g, dtype=torch.bool)
    fg[:2, :2] = True           # one pure 2x2 FG cell
    fg[2, 2] = True             # a mixed cell (share 0.25) is neither FG nor BG
    tokens = torch.zeros(g * g, d)
    tokens[:, 1] = 1.0
    tokens[fg.flatten(), 0], tokens[fg.flatten(), 1] = 1.0, 0.0
    p = prototypes.build_prototypes(tokens, fg, threshold=0.95)
    assert p.fg.shape == (2, d) and p.bg.shape == (2, d)  # 1 local + global; 2 pure BG cells
    torch.testing.assert_close(p.fg, torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
    torch.testing.assert_close(p.bg, torch.tensor([[0.0, 1, 0], [0.0, 1, 0]]))
    assert torch.allclose(p.fg.norm(dim=-1), torch.ones(2))


def test_prototype_score_is_softmax_weighted_cosine():
    protos = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)
    tok = torch.tensor([[2.0, 0.0]])
    s = 20 * torch.tensor([1.0, 2 ** -0.5])
    expected = (torch.softmax(s, 0) * s).sum()
    torch.testing.assert_close(prototypes.prototype_score(tok, protos, 20.0), expected[None])
    fg = prototypes.Prototypes(protos[:1], F.normalize(torch.tensor([[0.0, 1.0]]), dim=-1))
    # FG-minus-BG score: sigmoid of it is the two-way softmax
    torch.testing.assert_close(prototypes.fg_scores(tok, fg, 20.0), torch.tensor([20.0 - 0.0]))


def test_component_points_and_boxes():
    prob = torch.zeros(20, 30)
    prob[2:6, 3:9] = 0.8
    prob[4, 7] = 0.95                      # peak of component 1
    prob[10:19, 20:25] = 0.7               # larger component 2, flat: first pixel is its peak
    comps = prototypes.component_prompts(prob, "all")
    torch.testing.assert_close(comps.peak, torch.tensor([[7.0, 4.0], [20.0, 10.0]]))
    torch.testing.assert_close(comps.centroid, torch.tensor([[5.5, 3.5], [22.0, 14.0]]))
    torch.testing.assert_close(comps.box, torch.tensor([[3.0, 2, 9, 6], [20.0, 10, 25, 19]]))
    assert comps.size.tolist() == [24, 45]
    assert prototypes.component_prompts(prob, "largest").peak.tolist() == [[20.0, 10.0]]
    assert prototypes.component_prompts(prob, "confident").peak.tolist() == [[7.0, 4.0]]
    diag = torch.zeros(5, 5)
    diag[0, 0] = diag[1, 1] = 0.9          # 8-connected: one component
    assert prototypes.component_prompts(diag).peak.shape == (1, 2)


def test_s_space_to_target_pixels():
    # S = 100 on a 200 x 400 (H x W) target: x scales by 4, y by 2, at pixel centres
    pts = prototypes.to_target_pixels(torch.tensor([[0.0, 0.0], [99.0, 99.0]]), 100, (200, 400))
    torch.testing.assert_close(pts, torch.tensor([[1.5, 0.5], [397.5, 198.5]]))
    box = prototypes.box_to_target(torch.tensor([0.0, 0.0, 100.0, 100.0]), 100, (200, 400))
    torch.testing.assert_close(box, torch.tensor([0.0, 0.0, 399.0, 199.0]))


def test_protosam_two_components_one_decoder_call():
    cfg = SegmenterConfig.from_preset("protosam", image_size=112, dinov2="vits14", sam="vit_b")
    backend = ColourBackend()
    state = prototypes.prepare(reference(cfg, backend), backend, cfg)
    target = canvas(224, 224, [(14, 14, 70, 70), (140, 140, 210, 210)])
    [out] = prototypes.segment_chunk(state, [prepared(target, cfg)], backend, cfg, timer())
    assert len(backend.calls) == 1                                   # all components, one call
    call = backend.calls[0]
    assert call["coords"].shape == (2, 2, 2) and call["labels"].tolist() == [[1, 1], [1, 1]]
    boxes = call["boxes"] * 224 / 1024                               # back to target pixels
    torch.testing.assert_close(boxes, torch.tensor([[14.0, 14, 69, 69], [140.0, 140, 209, 209]]), atol=8, rtol=0)
    assert out.labels[1].tolist() == [1, 1, 1, 1] and out.boxes[1] is not None
    fg = out.decoded.logits[0] > 0                                   # union of the two box masks
    assert fg[40, 40] and fg[175, 175] and not fg[110, 110] and not fg[20, 200]


# ------------------------------------------------------------------------------------------- Top-K
def test_nms_2d_and_top_peaks():
    s = torch.zeros(5, 5)
    s[1, 1], s[1, 2], s[3, 4], s[4, 0] = 0.9, 0.8, 0.7, 0.6
    keep = topk.nms_2d(s, 3)
    assert keep[1, 1] and not keep[1, 2] and keep[3, 4] and keep[4, 0]
    idx, ok = topk.top_peaks(s.flatten(), keep.flatten() & (s.flatten() > 0), 4)
    assert idx[ok].tolist() == [6, 19, 20] and ok.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="odd"):
        topk.nms_2d(s, 2)


def test_uncertainty_demotes_disagreeing_cells():
    cfg = SegmenterConfig.from_preset("topk", topk_k=1, topk_neg_k=1, topk_nms_kernel=1, image_size=56)
    views = torch.full((2, 4, 4), 0.2)
    views[:, 0, 0] = torch.tensor([1.0, 0.6])      # mean 0.8, std 0.2 -> FG score 0.6
    views[:, 3, 3] = torch.tensor([0.7, 0.7])      # mean 0.7, std 0   -> FG score 0.7 wins
    views[:, 2, 0] = torch.tensor([0.0, 0.0])      # the most certain background
    mean, std = topk.confidence_and_uncertainty(views)
    pos, pos_ok, neg, neg_ok = topk.select_points(mean, std, cfg)
    assert pos[pos_ok].tolist() == [15] and neg[neg_ok].tolist() == [8]
    no_weight = cfg.replace(topk_uncertainty_weight=0.0)
    assert topk.select_points(mean, std, no_weight)[0].tolist() == [0]


def test_topk_flip_views_and_one_call_per_target():
    cfg = SegmenterConfig.from_preset("topk", image_size=112, topk_k=3, topk_neg_k=2)
    backend = ColourBackend()
    state = topk.prepare(reference(cfg, backend), backend, cfg)
    target = canvas(112, 112, [(0, 0, 56, 112)])   # left half red: the flip must be undone
    [out] = topk.segment_chunk(state, [prepared(target, cfg)], backend, cfg, timer())
    assert len(backend.calls) == 1
    pts, labels = out.points[1], out.labels[1]
    assert labels.tolist() == [1, 1, 1, 0, 0]
    assert (pts[labels == 1, 0] < 56).all() and (pts[labels == 0, 0] >= 56).all()
    sim = topk.segment_chunk(state, [prepared(target, cfg)], backend, cfg.replace(topk_confidence="similarity"),
                             timer())[0]
    assert (sim.points[1][sim.labels[1] == 1, 0] < 56).all()


# ----------------------------------------------------------------------------------------- Matcher
def test_hungarian_forward_and_reverse():
    e = torch.eye(3)
    ref = torch.stack([e[0], e[1], e[2]])                       # FG, FG, BG
    ref_fg = torch.tensor([True, True, False])
    tgt = F.normalize(torch.stack([-e[1], e[0], 0.5 * e[1] + e[2]]), dim=-1)
    r, t, sim = matcher.hungarian_matches(ref, tgt, ref_fg)
    # forward: FG0 -> t1, FG1 -> t2; reverse: t2 prefers the BG patch, so only (0, 1) survives
    assert r.tolist() == [0] and t.tolist() == [1]
    torch.testing.assert_close(sim, torch.tensor([1.0]))
    perm = torch.tensor([2, 0, 1])
    r, t, _ = matcher.hungarian_matches(e, e[perm], torch.ones(3, dtype=torch.bool))
    assert dict(zip(r.tolist(), t.tolist())) == {2: 0, 0: 1, 1: 2}


def test_halving_subsets_and_selection():
    assert len(matcher.keep_better_half(torch.rand(40))) == 40
    order = matcher.keep_better_half(torch.arange(41.0))
    assert order.tolist() == list(range(40, 20, -1))
    subs = matcher.sample_subsets(4, (1, 2), 100)
    assert len(subs) == 10 and subs[0] == (0,) and subs[-1] == (2, 3)
    few = matcher.sample_subsets(4, (1, 2), 5, seed=1)
    assert len(few) == 5 and set(few) <= set(subs) and few == matcher.sample_subsets(4, (1, 2), 5, seed=1)
    assert matcher.sample_subsets(2, (4, 6), 100) == [(0, 1)]
    cfg = SegmenterConfig.from_preset("matcher", matcher_merge=2, matcher_score_threshold=0.5)
    purity, coverage = torch.tensor([1.0, 0.9, 0.2, 1.0]), torch.tensor([0.5, 0.5, 1.0, 0.1])
    keep = matcher.select_masks(purity, coverage, None, cfg)    # scores 0.5, 0.45, 0.2, 0.1
    assert keep.tolist() == [True, True, False, False]
    strict = cfg.replace(matcher_coverage_filter=0.9)            # coverage filter first
    assert matcher.select_masks(purity, coverage, None, strict).tolist() == [False, False, True, False]


def test_masks_on_grid_any_cell_overlap():
    low = torch.full((1, 256, 256), -1.0)
    low[0, :10, :10] = 1.0                                      # inside the top-left cell only
    g = matcher.masks_on_grid(low, (1024, 512), 4)              # crop 256 x 128 -> 4 x 4 cells
    assert g.reshape(4, 4).nonzero().tolist() == [[0, 0]]


def test_matcher_subsets_decoded_in_one_call_and_merged():
    cfg = SegmenterConfig.from_preset("matcher", image_size=112, feature_key="x_norm_patchtokens",
                                      matcher_centres=3, matcher_sample_range=(1, 2), matcher_merge=10,
                                      matcher_score_threshold=0.0)
    backend = ColourBackend()
    state = matcher.prepare(reference(cfg, backend), backend, cfg)
    target = canvas(112, 112, [(56, 56, 112, 112)])
    [out] = matcher.segment_chunk(state, [prepared(target, cfg)], backend, cfg, timer())
    assert len(backend.calls) == 1
    call = backend.calls[0]
    assert call["coords"].shape[0] == 6 and call["boxes"] is None    # 3 + 3 subsets, positives only
    assert set(call["labels"].flatten().tolist()) <= {1, -1}
    pts = out.points[1]
    assert (pts >= 56).all()                                         # centres of matched red cells
    for x, y in np.round(pts).astype(int):                           # the union holds every subset's disc
        assert out.decoded.logits[0, y, x] > 0
    assert out.decoded.logits[0, 10, 10] < 0


# ------------------------------------------------------------------------------------------ PerSAM
def test_persam_prototype_points():
    emb = torch.zeros(256, 64, 64)
    emb[1] = 1.0
    emb[0, 10:20, 30:40], emb[1, 10:20, 30:40] = 1.0, 0.0     # reference object
    emb[0, 50, 5], emb[1, 50, 5] = -1.0, 0.0                    # anti-aligned cell -> negative
    cells = torch.zeros(64, 64, dtype=torch.bool)
    cells[12:18, 32:38] = True
    proto = persam.prototype([emb], [cells])
    torch.testing.assert_close(proto[:2], torch.tensor([1.0, 0.0]))
    sim = persam.cosine_map(proto[None], emb)
    pos, neg = persam.select_points(sim)
    assert pos.tolist() == [[30.0, 10.0]] and neg.tolist() == [[5.0, 50.0]]
    wide = np.pad(np.ones((64, 64), bool), ((0, 0), (0, 64)))    # left half of a 64 x 128 image
    grid = persam.mask_to_embedding_grid(wide, preprocess_shape(64, 128))  # (512, 1024) + padding
    assert grid[:31, :31].all() and not grid[33:].any() and not grid[:, 33:].any()


def test_persam_cascade_order():
    backend = ColourBackend()
    sets = PromptSets(torch.tensor([[[100.0, 100.0], [10.0, 10.0]]]), torch.tensor([[1, 0]]), torch.tensor([0]))
    res = persam.cascade(backend, torch.zeros(256, 64, 64), sets, (1024, 1024), (1024, 1024), refinements=2)
    assert res.steps == ["points", "mask", "mask+box"] and len(backend.calls) == 3
    a, b, c = backend.calls
    assert a["mask_input"] is None and a["boxes"] is None and not a["multimask"]
    assert b["mask_input"].shape == (1, 1, 256, 256) and b["boxes"] is None and b["multimask"]
    assert (b["mask_input"][0, 0] > 0).sum() > 0
    assert c["mask_input"] is not None and c["multimask"]
    x0, y0, x1, y1 = c["boxes"][0].tolist()                      # the box around step (b)'s disc
    assert 55 <= x0 <= 65 and 55 <= y0 <= 65 and 135 <= x1 <= 145 and 135 <= y1 <= 145
    torch.testing.assert_close(res.boxes[0], c["boxes"][0])
    one = persam.cascade(ColourBackend(), torch.zeros(256, 64, 64), sets, (1024, 1024), (1024, 1024), 1)
    assert one.steps == ["points", "mask"] and torch.isnan(one.boxes).all()


def test_persam_segment_chunk_prompts_per_class():
    cfg = SegmenterConfig.from_preset("persam", sam="vit_b")
    backend = ColourBackend()
    state = persam.prepare(reference(cfg, backend, size=112), backend, cfg)
    target = canvas(112, 112, [(60, 60, 100, 100)])
    [out] = persam.segment_chunk(state, [prepared(target, cfg)], backend, cfg, timer())
    assert len(backend.calls) == 3 and out.labels[1].tolist() == [1, 0]
    (px, py), (nx, ny) = out.points[1]
    assert 60 <= px < 100 and 60 <= py < 100 and not (60 <= nx < 100 and 60 <= ny < 100)
    assert out.boxes[1] is not None
