"""Parity of refseg's SAM 2 / 2.1 / MedSAM2 with the official ``sam2`` 1.1.0 package (CPU, fp32).

Both sides load the SAME official-format random checkpoint file (``refseg.testing.random_checkpoints``):
the official ``build_sam2(config, file, apply_postprocessing=False)`` loads it strictly, which also proves
the key names and shapes. ``refseg.Predictor`` is compared with ``SAM2ImagePredictor`` on encoder
features (<= 1e-4) and, for points, a box, points + box, a mask prompt and two boxes at once, with and
without multimask output: low-resolution logits <= 1e-3, IoU predictions <= 1e-4, full-size logits
<= 1e-3 and binary masks equal (a pixel may differ only where the official logit is within 1e-4 of
the threshold: float rounding decides those; measured: none).

Models: SAM 2.1 tiny at its 1024 input; SAM 2.1 base_plus at a 256 input (the official model accepts
``image_size``; sam2 1.1.0's image predictor hard-codes the 1024 feature sizes, so they are set for
the size used, as MedSAM2's fork of it computes them) to keep the CPU cost down (its encoder at 1024
costs about 1.5x tiny's), also through a two-image batch; MedSAM2 (tiny at its 512 input). Small and large: the full official key/shape set, and trunk parity at their widths,
heads and windows on a 128 input (large with fewer blocks per stage).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import refseg
from prompt_images import make_image
from refseg.models.checkpoints import CheckpointError
from refseg.models.hiera import Hiera
from refseg.models.sam2 import SAM2_SPECS
from refseg.models.sam2_neck import sine_position_encoding
from refseg.models.sam2_state_dict import infer_sam2_name, official_key_shapes, sam2_from_state_dict
from refseg.testing.random_checkpoints import write_random_checkpoints

sam2_pkg = pytest.importorskip("sam2", reason="the official sam2 1.1.0 package is the oracle (test extra)")
from sam2.build_sam import build_sam2  # noqa: E402
from sam2.modeling.backbones.hieradet import Hiera as OfficialHiera  # noqa: E402
from sam2.modeling.position_encoding import PositionEmbeddingSine  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

LOGIT_TOL, IOU_TOL, FEATURE_TOL, THRESHOLD_BAND = 1e-3, 1e-4, 1e-4, 1e-4


def config_of(name: str) -> str:
    """The official config of a refseg SAM 2 name (MedSAM2 is SAM 2.1 tiny at 512)."""
    if name == "medsam2":
        return "configs/sam2.1/sam2.1_hiera_t.yaml"
    version, size = name.split("_hiera_")
    return f"configs/{version}/{version}_hiera_{size}.yaml"


def official_predictor(name: str, checkpoint: Path, image_size: int) -> SAM2ImagePredictor:
    overrides = [] if image_size == 1024 else [f"++model.image_size={image_size}"]
    model = build_sam2(config_of(name), str(checkpoint), device="cpu", apply_postprocessing=False,
                       hydra_overrides_extra=overrides)
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(image_size // 4 >> k, image_size // 4 >> k) for k in range(3)]
    return predictor


PROMPTS = {
    "points": dict(point_coords=np.array([[70.0, 40.0], [30.0, 80.0]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([40.0, 20.0, 110.0, 75.0])),
    "points+box": dict(point_coords=np.array([[70.0, 40.0]]), point_labels=np.array([1]),
                       box=np.array([40.0, 20.0, 110.0, 75.0])),
    "two_boxes": dict(box=np.array([[40.0, 20.0, 110.0, 75.0], [5.0, 8.0, 60.0, 90.0]])),
}


def check(ours: tuple, official: tuple) -> float:
    """Check refseg's (masks, iou, low_res) against the official (logits, iou, low_res) of the same
    prompt; returns the mask fraction. The official masks are ``logits > 0`` as 0/1 float32, exactly
    as ``SAM2ImagePredictor`` thresholds them."""
    masks, iou, low = ours
    logits, official_iou, official_low = official
    official_masks = (logits > 0).astype(np.float32)
    assert masks.shape == official_masks.shape and masks.dtype == official_masks.dtype
    assert iou.shape == official_iou.shape and low.shape == official_low.shape
    assert np.abs(low - official_low).max() <= LOGIT_TOL
    assert np.abs(iou - official_iou).max() <= IOU_TOL
    differ = masks != official_masks
    assert not (differ & (np.abs(logits) > THRESHOLD_BAND)).any(), int(differ.sum())
    return float(official_masks.mean())


def compare(ours, official, **kwargs) -> float:
    """One ``predict`` call on each side (the official one returning logits), then :func:`check`."""
    return check(ours.predict(**kwargs), official.predict(return_logits=True, **kwargs))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sam2_ckpt")
    paths = write_random_checkpoints(folder, sam=["sam2.1_hiera_t", "sam2.1_hiera_b+", "medsam2"], seed=3)
    return {path.name: path for path in paths}


@pytest.fixture(scope="module", params=[("sam2.1_hiera_t", "sam2.1_hiera_tiny.pt", 1024),
                                        ("sam2.1_hiera_b+", "sam2.1_hiera_base_plus.pt", 256)],
                ids=["tiny@1024", "base_plus@256"])
def pair(request, checkpoints):
    """(refseg Predictor, official SAM2ImagePredictor), both with the same image set."""
    name, file, size = request.param
    ours = refseg.Predictor(checkpoints[file], device="cpu", dynamic_multimask=False,
                            image_size=None if size == 1024 else size)
    assert ours.model.spec.name == name and ours.image_size == size
    official = official_predictor(name, checkpoints[file], size)
    image = make_image(97, 131, seed=1)
    ours.set_image(image)
    official.set_image(image)
    return ours, official


def test_encoder_features(pair):
    ours, official = pair
    feats = official._features
    pairs = [(ours.get_image_embedding(), feats["image_embed"]),
             (ours._features.high_res_s0, feats["high_res_feats"][0]),
             (ours._features.high_res_s1, feats["high_res_feats"][1])]
    for a, b in pairs:
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= FEATURE_TOL * max(1.0, float(b.abs().max()))


def test_prompts(pair):
    ours, official = pair
    fractions = [compare(ours, official, **kwargs, multimask_output=multimask)
                 for (name, kwargs), multimask in zip(PROMPTS.items(), (True, False, True, False))]
    # A mask prompt: earlier official low-res logits fed back, with a new point and alone.
    previous = official.predict(**PROMPTS["points"], multimask_output=False)[2]
    fractions.append(compare(ours, official, point_coords=np.array([[50.0, 50.0]]), point_labels=np.array([1]),
                             mask_input=previous, multimask_output=True))
    fractions.append(compare(ours, official, mask_input=previous, multimask_output=False))
    # normalize_coords=False: prompts as fractions of the width / height.
    fractions.append(compare(ours, official, point_coords=np.array([[0.4, 0.3]]), point_labels=np.array([1]),
                             box=np.array([0.2, 0.1, 0.9, 0.8]), normalize_coords=False, multimask_output=True))
    assert 0.0 < np.mean(fractions) < 1.0  # the masks are not trivially empty or full


def test_dynamic_multimask(pair):
    """The official default post-processing (build_sam2's apply_postprocessing=True) against ours, at the
    official stability threshold (0.98) and at 1.01, where every single mask counts as unstable."""
    ours, official = pair
    decoder, ours_decoder = official.model.sam_mask_decoder, ours.model.sam_mask_decoder
    prompts = {name: PROMPTS[name] for name in ("points", "two_boxes")}
    static = {name: official.predict(**kw, multimask_output=False)[1] for name, kw in prompts.items()}
    changed = 0
    try:
        decoder.dynamic_multimask_via_stability = ours.dynamic_multimask = True
        for thresh in (0.98, 1.01):
            decoder.dynamic_multimask_stability_thresh = ours_decoder.stability_thresh = thresh
            for name, kwargs in prompts.items():
                official_out = official.predict(**kwargs, multimask_output=False, return_logits=True)
                check(ours.predict(**kwargs, multimask_output=False), official_out)
                changed += thresh > 1 and not np.array_equal(official_out[1], static[name])
    finally:
        decoder.dynamic_multimask_via_stability = ours.dynamic_multimask = False
        decoder.dynamic_multimask_stability_thresh = ours_decoder.stability_thresh = 0.98
    assert changed, "no prompt fell back to a multimask output: the dynamic path was not exercised"


def test_medsam2(checkpoints):
    """MedSAM2: recognised by its file name, 512 input; encoder features and a box (its usual prompt)."""
    path = checkpoints["MedSAM2_latest.pt"]
    ours = refseg.Predictor(path, dynamic_multimask=False)
    assert ours.model.spec.name == "medsam2" and ours.image_size == 512
    official = official_predictor("medsam2", path, 512)
    image = make_image(120, 90, seed=4)
    ours.set_image(image)
    official.set_image(image)
    assert float((ours.get_image_embedding() - official._features["image_embed"]).abs().max()) <= 1e-3
    low_res = ours.predict(box=np.array([10.0, 10.0, 80.0, 100.0]), multimask_output=False)[2]
    assert low_res.shape == (1, 128, 128)
    for multimask in (True, False):
        compare(ours, official, box=np.array([10.0, 10.0, 80.0, 100.0]), multimask_output=multimask)
        compare(ours, official, mask_input=low_res, point_coords=np.array([[40.0, 60.0]]),
                point_labels=np.array([0]), multimask_output=multimask)


def test_batch(checkpoints):
    """set_image_batch / predict_batch: two images of different sizes in one encoder batch (base_plus
    at 256), points on one image and a box on the other."""
    path = checkpoints["sam2.1_hiera_base_plus.pt"]
    ours = refseg.Predictor(path, dynamic_multimask=False, image_size=256)
    official = official_predictor("sam2.1_hiera_b+", path, 256)
    images = [make_image(97, 131, seed=2), make_image(120, 90, seed=4)]
    ours.set_image_batch(images)
    official.set_image_batch(images)
    assert float((ours.get_image_embedding() - official._features["image_embed"]).abs().max()) <= 1e-3
    batch = dict(point_coords_batch=[PROMPTS["points"]["point_coords"], np.array([[20.0, 60.0]])],
                 point_labels_batch=[PROMPTS["points"]["point_labels"], np.array([1])],
                 box_batch=[None, np.array([10.0, 10.0, 80.0, 100.0])])
    for multimask in (True, False):
        ours_out = ours.predict_batch(**batch, multimask_output=multimask)
        official_out = official.predict_batch(**batch, multimask_output=multimask, return_logits=True)
        for i in range(2):
            check(tuple(out[i] for out in ours_out), tuple(out[i] for out in official_out))
    with pytest.raises(RuntimeError, match="predict_batch"):
        ours.predict(**PROMPTS["box"])


@pytest.fixture()
def fast_official_init(monkeypatch):
    """Skip the official modules' weight initialisation (only names and shapes are compared)."""
    import sam2.modeling.sam2_base as sam2_base
    for cls in (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.LayerNorm):
        monkeypatch.setattr(cls, "reset_parameters", lambda self: None)
    monkeypatch.setattr(sam2_base, "trunc_normal_", lambda tensor, **kwargs: tensor)


@pytest.mark.parametrize("name", [n for n in SAM2_SPECS if n != "medsam2"])
def test_official_keys_and_shapes(name, fast_official_init):
    """Every release's full key set (image path and memory modules) and shapes."""
    official = build_sam2(config_of(name), None, device="cpu", apply_postprocessing=False)
    expected = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert {k: shape for k, (shape, _) in official_key_shapes(name).items()} == expected


def zero_state_dict(name: str) -> dict[str, torch.Tensor]:
    """An official-format state dict of zeros (names and shapes are what matter here)."""
    return {k: torch.zeros(shape) for k, (shape, _) in official_key_shapes(name).items()}


def test_name_inference_and_strict_load(tmp_path):
    state = zero_state_dict("sam2_hiera_t")
    assert infer_sam2_name(state) == "sam2_hiera_t"
    shapes_only = {k: torch.empty(shape, device="meta") for k, (shape, _) in official_key_shapes("sam2_hiera_s").items()}
    assert infer_sam2_name(shapes_only, "x/sam2_hiera_small.pt") == "sam2_hiera_s"
    shapes_only = {k: torch.empty(shape, device="meta") for k, (shape, _) in official_key_shapes("sam2.1_hiera_l").items()}
    assert infer_sam2_name(shapes_only) == "sam2.1_hiera_l"
    assert infer_sam2_name(state, "ckpt/MedSAM2_2411.pt") == "medsam2"
    model = sam2_from_state_dict({"model": state}, source="sam2_hiera_tiny.pt")
    assert model.spec.name == "sam2_hiera_t" and model.spec.version == "2"
    key = "sam_mask_decoder.transformer.layers.0.mlp.layers.1.weight"
    state[key] = torch.randn(state[key].shape)
    model = sam2_from_state_dict({"model": state}, source="sam2_hiera_tiny.pt")
    assert torch.equal(model.state_dict()[key.replace("mlp.layers.1", "mlp.lin2")], state[key])
    broken = dict(state)
    del broken["memory_attention.layers.0.linear1.weight"]
    with pytest.raises(CheckpointError, match="missing memory keys: memory_attention.layers.0.linear1.weight"):
        sam2_from_state_dict(broken, source="broken.pt")
    with pytest.raises(CheckpointError, match="unexpected keys: extra.weight"):
        sam2_from_state_dict(dict(state, **{"extra.weight": torch.zeros(1)}), source="extra.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        sam2_from_state_dict(dict(state, no_mem_embed=torch.zeros(1, 1, 128)), source="shape.pt")
    with pytest.raises(CheckpointError, match="missing memory keys: no_obj_embed_spatial"):
        sam2_from_state_dict(state, "sam2.1_hiera_t", source="v2_as_v21.pt")
    with pytest.raises(CheckpointError, match="is a SAM 2 checkpoint, not a SAM one"):
        refseg.build_sam(checkpoint=_saved(tmp_path / "sam2_hiera_tiny.pt", {"model": state}))


def _saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("size", ["s", "l"])
def test_trunk_parity_small_large(size, fast_official_init):
    """Hiera small (full) and large (its widths, heads and windows, fewer blocks) at a 128 input."""
    spec = SAM2_SPECS[f"sam2.1_hiera_{size}"]
    stages, global_blocks = spec.stages, spec.global_att_blocks
    if size == "l":
        stages, global_blocks = (1, 2, 4, 2), (4, 6, 8)
    kwargs = dict(embed_dim=spec.embed_dim, num_heads=spec.num_heads, stages=stages,
                  global_att_blocks=global_blocks,
                  window_pos_embed_bkg_spatial_size=spec.window_pos_embed_bkg_spatial_size,
                  window_spec=spec.window_spec)
    official = OfficialHiera(**kwargs).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in official.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.dim() == 1 else p[0].numel() ** -0.5))
    ours = Hiera(**kwargs).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(1, 3, 128, 128, generator=gen)
    with torch.no_grad():
        for a, b in zip(ours(x), official(x)):
            assert a.shape == b.shape
            assert float((a - b).abs().max()) <= FEATURE_TOL * max(1.0, float(b.abs().max()))


def test_sine_position_encoding():
    official = PositionEmbeddingSine(num_pos_feats=256, normalize=True, warmup_cache=False)
    x = torch.zeros(1, 256, 12, 20)
    assert torch.allclose(sine_position_encoding(12, 20, 256), official(x), atol=1e-6)


def test_predictor_bad_input(checkpoints):
    path = checkpoints["sam2.1_hiera_tiny.pt"]
    with pytest.raises(ValueError, match="multiple of 32"):
        refseg.Predictor(path, image_size=500)
    with pytest.raises(CheckpointError, match="does not exist"):
        refseg.Predictor(path.with_name("absent.pt"))
    predictor = refseg.Predictor(path, image_size=256)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box=np.array([0, 0, 5, 5]))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predictor.set_image(np.zeros((10, 10, 3), np.float32))
    predictor.set_image(make_image(40, 50, seed=0))
    with pytest.raises(ValueError, match="point_coords must be"):
        predictor.predict(point_coords=np.zeros((2, 3)), point_labels=np.ones(2))
    with pytest.raises(ValueError, match=r"mask_input must be \(1, 64, 64\)"):
        predictor.predict(box=np.array([0, 0, 5, 5]), mask_input=np.zeros((1, 256, 256)))
    masks, iou, low = predictor.predict(box=np.array([0, 0, 5, 5]), multimask_output=False)
    assert masks.shape == (1, 40, 50) and masks.dtype == np.float32 and low.shape == (1, 64, 64)
    assert dataclasses.replace(SAM2_SPECS["sam2.1_hiera_t"], image_size=256) == predictor.model.spec
