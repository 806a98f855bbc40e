"""``refseg.Predictor`` on SAM (ViT) and MedSAM checkpoints against the official ``segment_anything`` 1.0.

SAM: the official ``SamPredictor`` on the official model holding the same random weights (ViT-B layout
at 2 blocks, written as an official-format file), compared on the image embedding (<= 1e-4) and on
points, a box, points + box and a mask prompt, with and without multimask output: low-resolution
logits <= 1e-3, IoU predictions <= 1e-4, binary masks equal (a pixel may differ only where the official
logit is within 1e-4 of the threshold; measured: none).

MedSAM (a file named ``medsam*``): the procedure of MedSAM's released inference script written with
the official modules and scikit-image's resize: stretched 1024 x 1024 image (cubic, antialiased, uint8),
min-max scaled, box scaled by 1024 / (W, H), single mask. The masks are its low-resolution logits
resized bilinearly to the image and thresholded at 0 (the script thresholds the resized sigmoid at
0.5, which differs only on boundary pixels; refseg resizes logits everywhere).

SAM 2 / MedSAM2 through the same class: tests/test_sam2_parity.py.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import refseg
from prompt_images import make_image
from refseg.models.checkpoints import CheckpointError
from refseg.models.sam import SAM_SPECS, random_sam

sa = pytest.importorskip("segment_anything", reason="official segment_anything 1.0 is the oracle")
skimage_transform = pytest.importorskip("skimage.transform", reason="MedSAM's pre-processing oracle")

LOGIT_TOL, IOU_TOL, THRESHOLD_BAND = 1e-3, 1e-4, 1e-4
SPEC = SAM_SPECS["vit_b"].with_depth(2)


def official_sam(state_dict: dict) -> nn.Module:
    """The official SAM of SPEC's architecture with ``state_dict`` loaded strictly."""
    m = sa.modeling
    encoder = m.ImageEncoderViT(
        depth=SPEC.depth, embed_dim=SPEC.embed_dim, img_size=1024, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=SPEC.num_heads, patch_size=16, qkv_bias=True,
        use_rel_pos=True, global_attn_indexes=list(SPEC.global_attn_indexes), window_size=14, out_chans=256)
    prompt = m.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                             mask_in_chans=16)
    decoder = m.MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    model = m.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(a SAM file, the same weights named as MedSAM, the state dict)."""
    folder = tmp_path_factory.mktemp("predictor_ckpt")
    state = random_sam(SPEC, seed=5).state_dict()
    sam_path, medsam_path = folder / "sam_vit_b_small.pth", folder / "medsam_vit_b_small.pth"
    torch.save(state, sam_path)
    torch.save({"model": state}, medsam_path)  # MedSAM redistributions may wrap the weights
    return sam_path, medsam_path, state


@pytest.fixture(scope="module")
def sam_pair(files):
    sam_path, _, state = files
    ours = refseg.Predictor(sam_checkpoint=sam_path, device="cpu")
    official = sa.SamPredictor(official_sam(state))
    image = make_image(90, 140, seed=0)
    ours.set_image(image)
    official.set_image(image)
    return ours, official


def check(ours: tuple, official: tuple, official_logits: np.ndarray) -> float:
    masks, iou, low = ours
    official_masks, official_iou, official_low = official
    assert masks.shape == official_masks.shape and masks.dtype == official_masks.dtype == bool
    assert iou.shape == official_iou.shape and low.shape == official_low.shape
    assert np.abs(low - official_low).max() <= LOGIT_TOL
    assert np.abs(iou - official_iou).max() <= IOU_TOL
    differ = masks != official_masks
    assert not (differ & (np.abs(official_logits) > THRESHOLD_BAND)).any(), int(differ.sum())
    return float(official_masks.mean())


def test_sam_embedding(sam_pair):
    ours, official = sam_pair
    assert ours.original_size == tuple(official.original_size)
    assert float((ours.get_image_embedding() - official.get_image_embedding()).abs().max()) <= 1e-4


def test_sam_prompts(sam_pair):
    ours, official = sam_pair
    points = dict(point_coords=np.array([[60.0, 40.0], [20.0, 70.0]]), point_labels=np.array([1, 0]))
    box = dict(box=np.array([30.0, 10.0, 120.0, 80.0]))
    prompts = [points, box, dict(point_coords=np.array([[60.0, 40.0]]), point_labels=np.array([1]), **box)]
    previous = official.predict(**points, multimask_output=False)[2]
    prompts.append(dict(point_coords=np.array([[50.0, 50.0]]), point_labels=np.array([1]), mask_input=previous))
    fractions = []
    for kwargs in prompts:
        for multimask in (True, False):
            kw = dict(kwargs, multimask_output=multimask)
            logits = official.predict(**kw, return_logits=True)[0]
            fractions.append(check(ours.predict(**kw), official.predict(**kw), logits))
    assert 0.0 < np.mean(fractions) < 1.0


def test_medsam(files):
    """A ``medsam*`` file: MedSAM's stretch / min-max pre-processing and direct resize of the logits."""
    _, medsam_path, state = files
    ours = refseg.Predictor(medsam_path)
    assert ours.model.spec.name == "custom" and ours.preprocessing == "medsam"
    image = make_image(90, 140, seed=1)
    h, w = image.shape[:2]
    box = np.array([30.0, 10.0, 120.0, 80.0])
    ours.set_image(image)
    masks, iou, low = ours.predict(box=box, multimask_output=False)

    official = official_sam(state)
    resized = skimage_transform.resize(image, (1024, 1024), order=3, preserve_range=True,
                                       anti_aliasing=True).astype(np.uint8)
    scaled = (resized - resized.min()) / np.clip(resized.max() - resized.min(), 1e-8, None)
    pixels = torch.tensor(scaled).float().permute(2, 0, 1)[None]
    box_1024 = torch.as_tensor(box / np.array([w, h, w, h]) * 1024, dtype=torch.float)[None, None]
    with torch.no_grad():
        embedding = official.image_encoder(pixels)
        sparse, dense = official.prompt_encoder(points=None, boxes=box_1024, masks=None)
        ref_low, ref_iou = official.mask_decoder(embedding, official.prompt_encoder.get_dense_pe(), sparse, dense,
                                                 multimask_output=False)
        ref_logits = F.interpolate(ref_low, (h, w), mode="bilinear", align_corners=False)[0].numpy()
    assert float((ours.get_image_embedding() - embedding).abs().max()) <= 1e-4
    assert np.abs(low - ref_low[0].numpy()).max() <= LOGIT_TOL
    assert np.abs(iou - ref_iou[0].numpy()).max() <= IOU_TOL
    differ = masks != (ref_logits > 0)
    assert not (differ & (np.abs(ref_logits) > THRESHOLD_BAND)).any()
    assert 0.0 < masks.mean() < 1.0


def test_sam_batch_and_bgr(files, sam_pair):
    """set_image_batch / predict_batch give what set_image / predict give (image 0 is sam_pair's image);
    a BGR image given as such is encoded as its RGB version."""
    ours, _ = sam_pair
    images = [make_image(90, 140, seed=0), make_image(64, 48, seed=2)]
    batch = refseg.Predictor(files[0])
    batch.set_image_batch(images)
    boxes = [np.array([30.0, 10.0, 120.0, 80.0]), np.array([5.0, 5.0, 40.0, 60.0])]
    masks, iou, low = batch.predict_batch(box_batch=boxes)
    m, s, lr = ours.predict(box=boxes[0])
    np.testing.assert_allclose(low[0], lr, atol=1e-4)
    np.testing.assert_allclose(iou[0], s, atol=1e-5)
    assert masks[1].shape == (3, 64, 48) and low[1].shape == (3, 256, 256)
    embedding = ours.get_image_embedding().clone()
    ours.set_image(images[0][..., ::-1].copy(), image_format="BGR")
    assert torch.equal(ours.get_image_embedding(), embedding)


def test_errors(files, sam_pair, tmp_path):
    sam_path = files[0]
    with pytest.raises(CheckpointError, match="does not exist"):
        refseg.Predictor(tmp_path / "absent.pth")
    dino = tmp_path / "dinov2_like.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(4, 3, 14, 14)}, dino)
    with pytest.raises(CheckpointError, match="not a SAM-family one"):
        refseg.Predictor(dino)
    with pytest.raises(ValueError, match="unknown model 'vit_z'"):
        refseg.Predictor(tmp_path / "absent.pth", sam="vit_z")  # refused before the file is read
    with pytest.raises(ValueError, match="input is 1024 only"):
        refseg.Predictor(sam_path, image_size=512)
    predictor = refseg.Predictor(sam_path)  # device "auto": CUDA when there is one, as the Segmenter's
    assert predictor.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="image_format"):
        predictor.set_image(make_image(20, 20, 0), image_format="HSV")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        predictor.set_image(np.zeros((20, 20), np.uint8))
    predictor = sam_pair[0]  # an image is set (not a batch)
    with pytest.raises(RuntimeError, match="set_image_batch first"):
        predictor.predict_batch(box_batch=[np.array([0, 0, 5, 5])])
    with pytest.raises(ValueError, match="point_labels must be supplied"):
        predictor.predict(point_coords=np.array([[1.0, 1.0]]))
    with pytest.raises(ValueError, match="box must be"):
        predictor.predict(box=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"mask_input must be \(1, 256, 256\)"):
        predictor.predict(box=np.array([1.0, 2.0, 3.0, 4.0]), mask_input=np.zeros((1, 64, 64)))
