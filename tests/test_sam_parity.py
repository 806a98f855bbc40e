"""Parity of refseg's SAM with the official ``segment_anything`` 1.0 package (CPU, fp32).

Both models get the SAME deterministic random weights (``init_random_`` writes ours, the official model
loads our state dict strictly, which also proves the key names). Tolerance: max abs diff <= 1e-4 on
image embeddings, logits and IoU predictions (measured: ~1e-5); binary masks identical except at
pixels whose official logit is within 1e-4 of the threshold (float rounding decides those).
Cost: one full-depth ViT-B forward per implementation (module-scoped fixture), L/H at depth 2.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from refseg.models import build_sam
from refseg.models.checkpoints import CheckpointError, load_state_dict
from refseg.models.sam import (SAM_SPECS, Sam, SamSpec, infer_sam_name, infer_sam_spec, init_random_,
                               random_sam, sam_from_state_dict)
from refseg.models.sam_attention import ATTENTION_ENV, decomposed_rel_pos_bias, get_rel_pos
from refseg.models.sam_mask_decoder import select_best_mask
from refseg.models.sam_transforms import (normalize_pad, postprocess_masks, prepare_images,
                                          resize_boxes, resize_coords, resize_image)

sa = pytest.importorskip("segment_anything", reason="official segment_anything 1.0 is the oracle")
from segment_anything.modeling import image_encoder as sa_image_encoder  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KVASIR = DATA / "kvasir_seg5"
KVASIR_ID = "cju0qkwl35piu0993l0dewei2"
TOL = 1e-4


def official_sam(spec: SamSpec) -> nn.Module:
    """The official model with the architecture of ``spec`` (default init, eval mode)."""
    m = sa.modeling
    grid = spec.img_size // spec.patch_size
    encoder = m.ImageEncoderViT(
        depth=spec.depth, embed_dim=spec.embed_dim, img_size=spec.img_size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=spec.num_heads,
        patch_size=spec.patch_size, qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=list(spec.global_attn_indexes), window_size=spec.window_size,
        out_chans=256)
    prompt = m.PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                             input_image_size=(spec.img_size, spec.img_size), mask_in_chans=16)
    decoder = m.MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                            iou_head_hidden_dim=256,
                            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256,
                                                            mlp_dim=2048, num_heads=8))
    return m.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder).eval()


def random_pair(spec: SamSpec, seed: int = 0) -> tuple[Sam, nn.Module]:
    ours = random_sam(spec, seed)
    official = official_sam(spec)
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours, official


def max_diff(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A Kvasir polyp image (529×622) when the data is there, else a deterministic random one."""
    path = KVASIR / "images" / f"{KVASIR_ID}.jpg"
    if path.is_file():
        from PIL import Image
        return np.asarray(Image.open(path).convert("RGB"))
    return np.random.default_rng(0).integers(0, 256, (529, 622, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def vit_b(image):
    """Full-depth ViT-B pair, the official predictor with the image set, and our embedding."""
    ours, official = random_pair(SAM_SPECS["vit_b"], seed=0)
    predictor = sa.SamPredictor(official)
    with torch.no_grad():
        predictor.set_image(image)
        batch = prepare_images([image])
        embedding = ours.encode_image(batch.pixels)
    return ours, official, predictor, batch, embedding


def test_state_dict_layout_matches_official():
    for spec in SAM_SPECS.values():
        with torch.device("meta"):
            ours, official = Sam(spec), official_sam(spec)
        ours_sd, official_sd = ours.state_dict(), official.state_dict()
        assert list(ours_sd) == list(official_sd), spec.name
        assert all(ours_sd[k].shape == v.shape for k, v in official_sd.items()), spec.name
        assert "pixel_mean" not in ours_sd and "pixel_std" not in ours_sd
        assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in ours_sd
        assert infer_sam_name(ours_sd) == ("vit_b" if spec.name == "medsam" else spec.name)
    assert SAM_SPECS["vit_b"].global_attn_indexes == (2, 5, 8, 11)
    assert SAM_SPECS["vit_l"].global_attn_indexes == (5, 11, 17, 23)
    assert SAM_SPECS["vit_h"].global_attn_indexes == (7, 15, 23, 31)
    assert SAM_SPECS["vit_h"].checkpoint.url.endswith("/segment_anything/sam_vit_h_4b8939.pth")
    reduced = SAM_SPECS["vit_l"].with_depth(4)
    assert (reduced.depth, reduced.global_attn_indexes, reduced.embed_dim) == (4, (1, 3), 1024)
    inferred = infer_sam_spec(Sam(SAM_SPECS["vit_b"].with_depth(2)).state_dict())
    assert (inferred.name, inferred.depth, inferred.global_attn_indexes) == ("custom", 2, (1,))


def test_init_random_touches_every_tensor_deterministically():
    spec = SAM_SPECS["vit_b"].with_depth(2)
    a = init_random_(Sam(spec), seed=3).state_dict()
    b = random_sam(spec, seed=3).state_dict()  # no default init first: same values
    c = init_random_(Sam(spec), seed=4).state_dict()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
        assert not torch.equal(value, c[key]), key
        assert value.float().std() > 0, f"{key} is constant"
    assert abs(float(a["image_encoder.blocks.0.norm1.weight"].mean()) - 1) < 0.05


def test_preprocessing_matches_official(image, vit_b):
    _, official, predictor, batch, _ = vit_b
    reference = ResizeLongestSide(1024)
    for shape in [(529, 622, 3), (300, 200, 3), (1024, 1024, 3), (37, 1500, 3)]:
        img = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(resize_image(img), reference.apply_image(img)), shape
    size = image.shape[:2]
    coords = np.array([[10.0, 20.0], [621.0, 528.0], [300.5, 0.0]])
    boxes = np.array([[5.0, 6.0, 400.0, 500.0], [0.0, 0.0, 621.0, 528.0]])
    assert np.array_equal(resize_coords(coords, size), reference.apply_coords(coords, size))
    assert np.array_equal(resize_boxes(boxes, size), reference.apply_boxes(boxes, size))
    torch_coords = resize_coords(torch.from_numpy(coords), size)
    assert max_diff(torch_coords, reference.apply_coords(coords, size)) < 1e-4
    resized = torch.as_tensor(reference.apply_image(image)).permute(2, 0, 1)[None]
    assert torch.equal(batch.pixels, official.preprocess(resized))
    assert torch.equal(normalize_pad(resized), official.preprocess(resized))
    assert batch.input_sizes == [predictor.input_size] and batch.original_sizes == [size]
    several = prepare_images([image, image[:100, :300]])
    assert several.pixels.shape == (2, 3, 1024, 1024) and several.input_sizes[1] == (341, 1024)
    low_res = torch.randn(2, 3, 256, 256)
    expected = official.postprocess_masks(low_res, (341, 1024), (100, 300))
    assert torch.equal(postprocess_masks(low_res, (341, 1024), (100, 300)), expected)


def test_vit_b_image_encoder_full_depth(vit_b):
    _, _, predictor, _, embedding = vit_b
    assert embedding.shape == (1, 256, 64, 64)
    assert max_diff(embedding, predictor.features) <= TOL


@pytest.mark.parametrize("form", ["fused", "bias"])
@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
def test_reduced_depth_image_encoder(name, form, monkeypatch):
    # Widths and heads of L / H, one windowed block then one global block; a 512 input (32² grid,
    # padded to 42² for the 14² windows) keeps it fast; ViT-B covers the 1024 layout at full depth
    # (in the CPU's default form; tests/test_sam_attention.py checks both forms at 64x64).
    monkeypatch.setenv(ATTENTION_ENV, form)
    spec = dataclasses.replace(SAM_SPECS[name].with_depth(2), img_size=512)
    ours, official = random_pair(spec, seed=1)
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours.image_encoder(x), official.image_encoder(x)) <= TOL


def test_rel_pos_tables_and_bias_match_official():
    gen = torch.Generator().manual_seed(0)
    for q_size, k_size, length in [(14, 14, 27), (20, 20, 27), (8, 16, 31), (16, 8, 9), (64, 64, 127)]:
        table = torch.randn(length, 16, generator=gen)
        expected = sa_image_encoder.get_rel_pos(q_size, k_size, table)
        assert torch.equal(get_rel_pos(q_size, k_size, table), expected)
    q = torch.randn(2, 3, 6 * 5, 8, generator=gen)
    rel_h, rel_w = torch.randn(11, 8, generator=gen), torch.randn(9, 8, generator=gen)
    expected = sa_image_encoder.add_decomposed_rel_pos(
        torch.zeros(6, 30, 30), q.reshape(6, 30, 8), rel_h, rel_w, (6, 5), (6, 5))
    assert max_diff(decomposed_rel_pos_bias(q, rel_h, rel_w, (6, 5), (6, 5)).reshape(6, 30, 30),
                    expected) <= 1e-6


def _prompt_cases(gen: torch.Generator):
    """Two prompt sets per case; labels include padding (−1), background (0) and foreground (1)."""
    coords = torch.rand(2, 4, 2, generator=gen) * 1023
    labels = torch.tensor([[1, 0, -1, 1], [0, -1, 1, 1]])
    x0y0 = torch.rand(2, 2, generator=gen) * 500
    boxes = torch.cat([x0y0, x0y0 + 100 + torch.rand(2, 2, generator=gen) * 400], dim=1)
    masks = torch.randn(2, 1, 256, 256, generator=gen) * 4
    return {
        "points": dict(points=(coords, labels), boxes=None, masks=None),
        "box": dict(points=None, boxes=boxes, masks=None),
        "points_box": dict(points=(coords, labels), boxes=boxes, masks=None),
        "box_mask": dict(points=None, boxes=boxes, masks=masks),
        "nothing": dict(points=None, boxes=None, masks=None),
    }


def test_prompt_encoder_and_mask_decoder_match_official():
    ours, official = random_pair(SAM_SPECS["vit_b"].with_depth(2), seed=2)
    gen = torch.Generator().manual_seed(2)
    embedding = torch.randn(1, 256, 64, 64, generator=gen)
    with torch.no_grad():
        pe = ours.prompt_encoder.get_dense_pe()
        assert max_diff(pe, official.prompt_encoder.get_dense_pe()) <= 1e-5
        for case, prompts in _prompt_cases(gen).items():
            sparse, dense = ours.prompt_encoder(**prompts)
            sparse_ref, dense_ref = official.prompt_encoder(**prompts)
            assert sparse.shape == sparse_ref.shape and max_diff(sparse, sparse_ref) <= 1e-5, case
            assert dense.shape == dense_ref.shape and max_diff(dense, dense_ref) <= 1e-5, case
            # The prompt-free case only checks the prompt encoder; "points" checks both modes.
            modes = {"points": (True, False), "box_mask": (False,), "nothing": ()}
            for multimask in modes.get(case, (True,)):
                masks, iou = ours.mask_decoder(embedding, pe, sparse, dense, multimask)
                masks_ref, iou_ref = official.mask_decoder(embedding, pe, sparse_ref, dense_ref,
                                                           multimask)
                assert masks.shape == masks_ref.shape == (sparse.shape[0], 3 if multimask else 1,
                                                          256, 256), case
                assert max_diff(masks, masks_ref) <= TOL, (case, multimask)
                assert max_diff(iou, iou_ref) <= TOL, (case, multimask)
        # One image embedding per prompt set (pairs) equals one official call per set.
        prompts = _prompt_cases(gen)["points_box"]
        coords, labels = prompts["points"]
        paired = torch.randn(2, 256, 64, 64, generator=gen)
        masks, iou = ours.decode(paired, coords, labels, prompts["boxes"], multimask_output=True)
        for i in range(2):
            sparse, dense = official.prompt_encoder((coords[i:i + 1], labels[i:i + 1]),
                                                    prompts["boxes"][i:i + 1], None)
            masks_ref, iou_ref = official.mask_decoder(paired[i:i + 1], pe, sparse, dense, True)
            assert max_diff(masks[i:i + 1], masks_ref) <= TOL and max_diff(iou[i:i + 1], iou_ref) <= TOL
        best, best_iou = select_best_mask(masks, iou)
        index = iou.argmax(dim=1)
        assert torch.equal(best[:, 0], masks[torch.arange(2), index])
        assert torch.equal(best_iou[:, 0], iou.max(dim=1).values)


def test_decoder_exports_without_graph_breaks():
    model = init_random_(Sam(SAM_SPECS["vit_b"].with_depth(2)), seed=5).eval()

    class Decode(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, embedding, coords, labels, mask_input):
            return self.model.decode(embedding, coords, labels, mask_input=mask_input,
                                     multimask_output=True)

    args = (torch.randn(1, 256, 64, 64), torch.rand(2, 3, 2) * 1024,
            torch.tensor([[1, 0, -1], [1, 1, 0]]), torch.randn(2, 1, 256, 256))
    exported = torch.export.export(Decode(), args)
    with torch.no_grad():
        for got, want in zip(exported.module()(*args), Decode()(*args)):
            assert max_diff(got, want) <= 1e-5


def _kvasir_prompts(original_size):
    from PIL import Image
    mask = np.asarray(Image.open(KVASIR / "masks" / f"{KVASIR_ID}.jpg").convert("L")) > 127
    assert mask.shape == original_size
    ys, xs = np.nonzero(mask)
    centre = np.array([[xs.mean(), ys.mean()]])
    inside = np.stack([xs[:: max(1, len(xs) // 3)][:3], ys[:: max(1, len(ys) // 3)][:3]], axis=1)
    outside = np.array([[5.0, 5.0]])
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
    return centre, inside.astype(np.float64), outside, box


def test_predictor_path_matches_official(vit_b, image):
    if not (KVASIR / "masks" / f"{KVASIR_ID}.jpg").is_file():
        pytest.skip(f"Kvasir sample not found under {KVASIR} (../shared/data beside the repo)")
    ours, _, predictor, batch, embedding = vit_b
    size, input_size = batch.original_sizes[0], batch.input_sizes[0]
    centre, inside, outside, box = _kvasir_prompts(size)
    fg_bg = np.concatenate([inside, outside])

    def run(coords=None, labels=None, box_=None, mask_input=None, multimask=True):
        logits_ref, iou_ref, low_ref = predictor.predict(coords, labels, box_, mask_input, multimask,
                                                         return_logits=True)
        with torch.no_grad():
            low, iou = ours.decode(
                embedding,
                None if coords is None else torch.as_tensor(resize_coords(coords, size),
                                                            dtype=torch.float32)[None],
                None if labels is None else torch.as_tensor(labels)[None],
                None if box_ is None else torch.as_tensor(resize_boxes(box_, size),
                                                          dtype=torch.float32)[None],
                None if mask_input is None else torch.as_tensor(mask_input)[None],
                multimask_output=multimask)
            logits = postprocess_masks(low, input_size, size)[0]
        assert max_diff(low[0], low_ref) <= TOL and max_diff(iou[0], iou_ref) <= TOL
        assert logits.shape[-2:] == size and max_diff(logits, logits_ref) <= TOL
        # Binary masks (the official predictor thresholds the same logits at mask_threshold 0):
        # identical wherever the official logit is farther than TOL from the threshold. Within TOL
        # the sign is float rounding (SDPA vs explicit softmax); random weights give a speckled
        # logit field with some 1e-6-small logits, so a flip there is allowed (and counted).
        masks, masks_ref = (logits > 0).numpy(), logits_ref > 0.0
        near = np.abs(logits_ref) <= TOL
        assert np.array_equal(masks[~near], masks_ref[~near])
        assert (masks != masks_ref).sum() <= max(2, near.sum() // 10)
        return low_ref, iou_ref

    low_ref, iou_ref = run(centre, np.array([1]), multimask=True)
    run(None, None, box, multimask=True)
    run(fg_bg, np.array([1, 1, 1, 0]), box, multimask=False)
    run(centre, np.array([1]), mask_input=low_ref[int(np.argmax(iou_ref))][None], multimask=False)

    # Several prompt sets in one call against the one embedding == one official call per set.
    sets = np.stack([np.concatenate([inside[i:i + 1], outside]) for i in range(2)])
    labels = np.array([[1, 0]] * 2)
    with torch.no_grad():
        low, iou = ours.decode(embedding,
                               torch.as_tensor(resize_coords(sets, size), dtype=torch.float32),
                               torch.as_tensor(labels), multimask_output=True)
    for i in range(2):
        _, iou_ref, low_ref = predictor.predict(sets[i], labels[i], multimask_output=True,
                                                return_logits=True)
        assert max_diff(low[i], low_ref) <= TOL and max_diff(iou[i], iou_ref) <= TOL


def _low_precision_check(dtype: torch.dtype, device: str) -> None:
    spec = SAM_SPECS["vit_b"].with_depth(2)
    model = init_random_(Sam(spec), seed=6).eval().to(device)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(6)).to(device)
    coords = torch.tensor([[[100.0, 200.0], [700.0, 300.0]]], device=device)
    labels = torch.tensor([[1, 0]], device=device)
    with torch.no_grad():
        reference = model.encode_image(x)
        low_ref, _ = model.decode(reference, coords, labels, multimask_output=True)
        model = model.to(dtype)
        embedding = model.encode_image(x.to(dtype))
        low, iou = model.decode(embedding, coords, labels, multimask_output=True)
    assert embedding.dtype == dtype and low.dtype == dtype
    for t in (embedding, low, iou):
        assert torch.isfinite(t).all()
    rel = float((embedding.float() - reference).norm() / reference.norm())
    assert rel < 0.03, f"{dtype} embedding relative error {rel}"
    rel = float((low.float() - low_ref).norm() / low_ref.norm())
    assert rel < 0.1, f"{dtype} logits relative error {rel}"


def test_bfloat16_sanity_cpu():
    _low_precision_check(torch.bfloat16, "cpu")


def test_float16_sanity():
    # fp16 on the CPU is ~10x slower than fp32 but still a few tens of seconds at depth 2.
    _low_precision_check(torch.float16, "cuda" if torch.cuda.is_available() else "cpu")


def test_wrong_checkpoints_raise_checkpoint_error():
    with torch.device("meta"):
        vit_l = Sam(SAM_SPECS["vit_l"]).state_dict()
    with pytest.raises(CheckpointError, match=r"vit_l\.pth.*unexpected keys.*shape mismatches"):
        sam_from_state_dict(vit_l, "vit_b", source="vit_l.pth")
    assert infer_sam_name(vit_l) == "vit_l"
    # DINOv2 ViT-S/14 key layout.
    dinov2 = {"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 1370, 384),
              "mask_token": torch.zeros(1, 384), "patch_embed.proj.weight": torch.zeros(384, 3, 14, 14),
              "blocks.0.norm1.weight": torch.zeros(384),
              "blocks.0.attn.qkv.weight": torch.zeros(1152, 384),
              "blocks.0.ls1.gamma": torch.zeros(384), "norm.weight": torch.zeros(384)}
    with pytest.raises(CheckpointError, match="dinov2.pth: not a SAM checkpoint"):
        infer_sam_name(dinov2, "dinov2.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: image_encoder.*unexpected keys: blocks"):
        sam_from_state_dict(dinov2, "vit_b", source="dinov2.pth")


def test_medsam_format_loads(vit_b, tmp_path):
    ours = vit_b[0]
    path = tmp_path / "medsam_vit_b.pth"
    torch.save({"model": ours.state_dict()}, path)
    state_dict = load_state_dict(path)
    assert infer_sam_name(state_dict) == "vit_b"
    loaded = build_sam("medsam", checkpoint=path)
    assert loaded.spec.name == "medsam"
    assert torch.equal(loaded.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    loaded_sd = loaded.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded_sd[key], value), key
    wrapped = sam_from_state_dict({"model": ours.state_dict()})  # dict wrapper, inferred layout
    assert wrapped.spec.name == "vit_b"


def test_row_chunked_global_attention_equals_full_bias():
    from refseg.models.sam_attention import attention_in_row_chunks, decomposed_rel_pos_terms

    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 3, 12 * 10, 8, generator=gen) for _ in range(3))
    rel_pos_h, rel_pos_w = torch.randn(23, 8, generator=gen), torch.randn(19, 8, generator=gen)
    full = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, (12, 10), (12, 10)))
    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, (12, 10), (12, 10))
    import refseg.models.sam_attention as enc
    old = enc._CHUNK_BIAS_ELEMENTS
    enc._CHUNK_BIAS_ELEMENTS = 2 * 3 * 10 * 12 * 10 * 5  # 5 query rows per chunk: 12 = 5 + 5 + 2
    try:
        chunked = attention_in_row_chunks(q, k, v, rel_h, rel_w)
    finally:
        enc._CHUNK_BIAS_ELEMENTS = old
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)
