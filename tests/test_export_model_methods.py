"""The models' public methods the export wrappers are built from equal the models' own forward paths,
and the wrappers use only those methods (no re-written forward, no prompt-encoder internals).

Small models: DINOv2-S/14 with 2 blocks at 56² (plus a register variant), SAM-B with 1 block on a
256² input; tolerance 1e-5 (fp32, same operations in another order at most).
"""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from refseg.models.dinov2 import DINOV2_SPECS
from refseg.models.sam import SAM_SPECS
from refseg.runtime.io_names import pack_prompts
from refseg.testing.random_checkpoints import random_dinov2_model, random_sam_model

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


@pytest.mark.parametrize("name", ["vits14", "vits14_reg"])
def test_dinov2_position_and_token_methods_rebuild_forward_features(name):
    spec = dataclasses.replace(DINOV2_SPECS[name], depth=2)
    model = random_dinov2_model(spec, seed=0)
    x = torch.randn(2, 3, 56, 70, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.forward_features(x)
        pos = model.position_embedding((4, 5))
        out = model.features_from_tokens(model.tokens_with_positions(x, pos))
    assert pos.shape == (1, 1 + 20, spec.embed_dim)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert torch.allclose(out[key], ref[key], atol=ATOL), key
    with pytest.raises(ValueError, match="position table"):
        model.tokens_with_positions(x, model.position_embedding((4, 4)))


def test_sam_packed_prompt_methods_match_decode():
    spec = dataclasses.replace(SAM_SPECS["vit_b"].with_depth(1), img_size=256)
    sam = random_sam_model(spec, seed=1)
    gen = torch.Generator().manual_seed(2)
    embedding = torch.randn(1, 256, 16, 16, generator=gen)
    coords = torch.rand(3, 5, 2, generator=gen) * 256
    labels = torch.randint(0, 2, (3, 5), generator=gen)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0]] * 3)
    mask = torch.randn(3, 1, 64, 64, generator=gen)
    with torch.no_grad():
        for box, mask_input in ((None, None), (boxes, mask)):
            points, point_labels = pack_prompts(coords, labels, box)
            sparse = sam.embed_packed_prompts(points, point_labels)
            ref_sparse, ref_dense = sam.prompt_encoder((coords, labels), box, mask_input)
            assert torch.allclose(sparse, ref_sparse, atol=ATOL)
            has = torch.zeros(1) if mask_input is None else torch.ones(1)
            dense = sam.embed_mask_prompt(torch.zeros(1, 1, 64, 64) if mask_input is None else mask_input, has)
            assert torch.allclose(dense.expand_as(ref_dense), ref_dense, atol=ATOL)
            masks, iou = sam.decode_all_masks(embedding, sparse, dense)
            for multimask, pick in ((True, slice(1, 4)), (False, slice(0, 1))):
                ref_masks, ref_iou = sam.decode(embedding, coords, labels, box, mask_input, multimask)
                assert torch.allclose(masks[:, pick], ref_masks, atol=1e-4)
                assert torch.allclose(iou[:, pick], ref_iou, atol=ATOL)


def test_export_wrappers_use_only_public_model_methods():
    # Attributes that belong to the models' insides: a wrapper touching them re-writes a forward.
    internals = {"blocks", "patch_embed", "norm", "cls_token", "register_tokens",
                 "point_embeddings", "no_mask_embed", "not_a_point_embed", "embed_points", "embed_masks",
                 "mask_downscaling", "predict_masks", "image_encoder", "mask_decoder", "pe_layer"}
    tree = ast.parse((ROOT / "export" / "wrappers.py").read_text(encoding="utf-8"))
    used = sorted({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} & internals)
    assert used == [], used
