"""Parity of refseg's DINOv2 backbone with the official ``dinov2`` package (CPU, fp32).

The official model is the oracle: both models get the SAME random state dict (from
``init_random_``, which perturbs every parameter) and must agree on ``x_norm_clstoken``,
``x_norm_patchtokens`` and ``x_prenorm`` within 1e-4 (max abs). The installed PyPI release
(April 2023) has no register tokens, so register variants are checked against the published key
layout and against a reference assembled from the official model's own parts.

Official models are built on the meta device and take our tensors with
``load_state_dict(assign=True)``: one copy of the weights serves both models, which keeps ViT-g
(1.1 B parameters, 4.4 GB in fp32) within memory and skips the official random initialisation.
``drop_path_uniform=True`` only avoids a ``.item()`` on meta tensors in the official constructor;
with ``drop_path_rate=0`` it builds the same model as the hub configuration.
"""
from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from refseg.models.checkpoints import CheckpointError
from refseg.models.dinov2 import (DINOV2_SPECS, DinoVisionTransformer, dinov2_from_state_dict,
                                  infer_dinov2_name, init_random_)
from refseg.models.vit_layers import LayerNorm32

vision_transformer = pytest.importorskip("dinov2.models.vision_transformer",
                                         reason="official dinov2 package (the oracle) not installed")

PARITY_ATOL = 1e-4
COMPARED_KEYS = ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm")
ARCHS = ("vits14", "vitb14", "vitl14", "vitg14")
OFFICIAL_FACTORY = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large",
                    "vitg14": "vit_giant2"}


def official_model(arch: str) -> torch.nn.Module:
    """The official hub configuration of ``arch`` (no registers), parameters on the meta device."""
    factory = getattr(vision_transformer, OFFICIAL_FACTORY[arch])
    ffn = "swiglufused" if arch == "vitg14" else "mlp"
    with torch.device("meta"):
        return factory(img_size=518, patch_size=14, init_values=1.0, ffn_layer=ffn, block_chunks=0,
                       drop_path_uniform=True)


def random_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-format random weights, allocated once (meta -> to_empty -> init_random_)."""
    with torch.device("meta"):
        model = DinoVisionTransformer(DINOV2_SPECS[name])
    model.to_empty(device="cpu")
    init_random_(model, seed)
    return model.state_dict()


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_layout_matches_official(arch):
    with torch.device("meta"):
        ours = shapes(DinoVisionTransformer(DINOV2_SPECS[arch]))
    assert ours == shapes(official_model(arch))
    assert list(ours) == list(shapes(official_model(arch)))  # same order as the official files


@pytest.mark.parametrize("arch", ARCHS)
def test_register_layout_matches_published_checkpoints(arch):
    # Published *_reg4_pretrain.pth: the plain layout plus register_tokens (1, 4, D); pos_embed still
    # covers 1 + 37*37 tokens (registers get no position embedding).
    with torch.device("meta"):
        plain = shapes(DinoVisionTransformer(DINOV2_SPECS[arch]))
        reg = shapes(DinoVisionTransformer(DINOV2_SPECS[arch + "_reg"]))
    dim = DINOV2_SPECS[arch].embed_dim
    assert reg.pop("register_tokens") == (1, 4, dim)
    assert reg == plain
    assert reg["pos_embed"] == (1, 1 + 37 * 37, dim)


# (batch, height, width): batch 2 where it is cheap, the 518 training size (stored position table
# used as it is), and non-square grids (224x336 -> 16x24, 336x224 -> 24x16).
@pytest.mark.parametrize("arch, inputs", [
    ("vits14", [(2, 224, 224), (1, 518, 518), (2, 224, 336)]),
    ("vitb14", [(2, 224, 224), (1, 518, 518), (1, 336, 224)]),
    ("vitl14", [(1, 224, 224)]),
    ("vitg14", [(1, 224, 224)]),
])
@torch.no_grad()
def test_forward_parity_with_official(arch, inputs):
    state_dict = random_state_dict(arch, seed=1)
    official = official_model(arch)
    official.load_state_dict(state_dict, assign=True)
    official.eval()
    ours = dinov2_from_state_dict(state_dict)  # name inferred from the shapes
    assert ours.spec.name == arch
    assert ours.cls_token.data_ptr() == official.cls_token.data_ptr()  # one copy of the weights
    gen = torch.Generator().manual_seed(2)
    try:
        for batch, height, width in inputs:
            x = torch.randn(batch, 3, height, width, generator=gen)
            expected = official.forward_features(x)
            got = ours.forward_features(x)
            n = (height // 14) * (width // 14)
            assert got["x_norm_patchtokens"].shape == (batch, n, ours.embed_dim)
            assert got["x_norm_regtokens"].shape == (batch, 0, ours.embed_dim)
            assert got["masks"] is None
            for key in COMPARED_KEYS:
                assert got[key].shape == expected[key].shape, key
                diff = max_diff(got[key], expected[key])
                assert diff <= PARITY_ATOL, f"{arch} {height}x{width} {key}: max abs diff {diff}"
            assert torch.equal(ours(x), got["x_norm_clstoken"])
    finally:
        del official, ours, state_dict
        gc.collect()


@torch.no_grad()
def test_parity_is_sensitive_to_position_resampling():
    # Guard against a trivially passing comparison: resampling with size=(h, w) instead of the
    # official +0.1 scale factor must be caught at 224 (16x16 grid from 37x37).
    state_dict = random_state_dict("vits14", seed=1)
    official = official_model("vits14")
    official.load_state_dict(state_dict, assign=True)
    official.eval()
    spec = dataclasses.replace(DINOV2_SPECS["vits14"], interpolate_offset=0.0)
    with torch.device("meta"):
        wrong = DinoVisionTransformer(spec)
    wrong.load_state_dict(state_dict, assign=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    diff = max_diff(wrong.forward_features(x)["x_norm_patchtokens"],
                    official.forward_features(x)["x_norm_patchtokens"])
    assert diff > 100 * PARITY_ATOL


@pytest.mark.parametrize("size", [(224, 224), (224, 336)])
@torch.no_grad()
def test_register_variant_against_official_parts(size):
    # Reference for the register release assembled from the official PyPI model: its token
    # preparation (patch embed, cls, interpolated position embedding), then the register tokens
    # inserted after cls, then its blocks and final norm.
    state_dict = random_state_dict("vits14_reg", seed=4)
    registers = state_dict["register_tokens"]
    plain_dict = {k: v for k, v in state_dict.items() if k != "register_tokens"}
    official = official_model("vits14")
    official.load_state_dict(plain_dict, assign=True)
    official.eval()
    ours = dinov2_from_state_dict(state_dict, source="vits14_reg random")
    assert ours.spec.name == "vits14_reg"
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))

    tokens = official.prepare_tokens_with_masks(x)
    tokens = torch.cat((tokens[:, :1], registers.expand(2, -1, -1), tokens[:, 1:]), dim=1)
    for block in official.blocks:
        tokens = block(tokens)
    normed = official.norm(tokens)
    expected = {"x_norm_clstoken": normed[:, 0], "x_norm_regtokens": normed[:, 1:5],
                "x_norm_patchtokens": normed[:, 5:], "x_prenorm": tokens}

    got = ours.forward_features(x)
    n = (size[0] // 14) * (size[1] // 14)
    assert got["x_norm_regtokens"].shape == (2, 4, 384)
    assert got["x_norm_patchtokens"].shape == (2, n, 384)
    assert got["x_prenorm"].shape == (2, 1 + 4 + n, 384)
    for key, value in expected.items():
        diff = max_diff(got[key], value)
        assert diff <= PARITY_ATOL, f"vits14_reg {size} {key}: max abs diff {diff}"
    # The registers take part in attention: the same weights without them give other patch tokens
    # (4 of ~260 keys, so the effect is small with random weights, yet far above the tolerance).
    plain = dinov2_from_state_dict(plain_dict)
    assert plain.spec.name == "vits14"
    change = max_diff(plain.forward_features(x)["x_norm_patchtokens"], got["x_norm_patchtokens"])
    assert change > 10 * PARITY_ATOL


@pytest.mark.parametrize("name", sorted(DINOV2_SPECS))
def test_infer_name_and_official_file_names(name):
    with torch.device("meta"):
        state_dict = DinoVisionTransformer(DINOV2_SPECS[name]).state_dict()
    assert infer_dinov2_name(state_dict) == name
    source = DINOV2_SPECS[name].checkpoint
    arch = name.removesuffix("_reg")
    suffix = "_reg4" if name.endswith("_reg") else ""
    assert source.filename == f"dinov2_{arch}{suffix}_pretrain.pth"
    assert source.url == f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/{source.filename}"
    assert source.sha256 is None


def test_wrong_size_checkpoint_names_source_and_mismatch():
    with torch.device("meta"):
        small = DinoVisionTransformer(DINOV2_SPECS["vits14"]).state_dict()
    with pytest.raises(CheckpointError) as info:
        dinov2_from_state_dict(small, name="vitb14", source="dinov2_vitb14_pretrain.pth")
    message = str(info.value)
    assert "dinov2_vitb14_pretrain.pth" in message
    assert "shape mismatches" in message and "blocks.0.ls1.gamma (384,) vs model (768,)" in message


def test_unknown_layouts_raise_checkpoint_error():
    with torch.device("meta"):
        state_dict = DinoVisionTransformer(DINOV2_SPECS["vitb14"]).state_dict()
    truncated = {k: v for k, v in state_dict.items() if not k.startswith("blocks.11.")}
    with pytest.raises(CheckpointError, match=r"ckpt\.pth: not a known DINOv2 layout .*11 blocks"):
        infer_dinov2_name(truncated, source="ckpt.pth")
    chunked = {k.replace("blocks.", "blocks.0.", 1): v for k, v in state_dict.items()}
    with pytest.raises(CheckpointError, match="chunked"):
        dinov2_from_state_dict(chunked)
    with pytest.raises(ValueError, match="unknown DINOv2 model 'vitx14'"):
        dinov2_from_state_dict(state_dict, name="vitx14")


def test_side_not_multiple_of_patch_raises():
    model = DinoVisionTransformer(DINOV2_SPECS["vits14"]).eval()
    with pytest.raises(ValueError, match="225x224"):
        model(torch.zeros(1, 3, 225, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(3, 224, 224))


def test_init_random_is_deterministic_and_touches_every_parameter():
    first = random_state_dict("vits14_reg", seed=7)
    second = random_state_dict("vits14_reg", seed=7)
    other = random_state_dict("vits14_reg", seed=8)
    default = DinoVisionTransformer(DINOV2_SPECS["vits14_reg"]).state_dict()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key
        assert not torch.equal(value, other[key]), key
        assert not torch.equal(value, default[key]), key  # every tensor perturbed from the defaults
    gammas = first["blocks.0.ls1.gamma"]
    assert 0.1 <= gammas.min() and gammas.max() <= 1.0
    assert abs(first["blocks.0.norm1.weight"].mean().item() - 1.0) < 0.05
    with torch.device("meta"):
        meta = DinoVisionTransformer(DINOV2_SPECS["vits14"])
    with pytest.raises(ValueError, match="meta device"):
        init_random_(meta, 0)


def test_layer_norm_fp16_does_not_overflow():
    norm = LayerNorm32(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.1, 0.1)
    # Variance ~1e8, far beyond the fp16 maximum of 65504.
    x = torch.randn(4, 10, 64, generator=torch.Generator().manual_seed(0)) * 1e4
    got = norm(x.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    expected = torch.nn.functional.layer_norm(x.half().float(), (64,), norm.weight, norm.bias, 1e-6)
    assert max_diff(got, expected) <= 2e-2  # fp16 output rounding of values up to ~2


# Reduced precision vs fp32 for ViT-S/14 at 518 (random weights, 12 blocks): relative Frobenius
# error per output and the worst per-token cosine similarity.
PRECISION_TOLERANCE = {torch.bfloat16: (0.03, 0.999), torch.float16: (0.005, 0.9999)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def vits14_fp32_reference():
    state_dict = random_state_dict("vits14", seed=9)
    model = dinov2_from_state_dict(state_dict)
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        return state_dict, x, model.forward_features(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_reduced_precision_close_to_fp32(vits14_fp32_reference, dtype, device):
    state_dict, x, reference = vits14_fp32_reference
    cast = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model = dinov2_from_state_dict(cast)
    assert model.cls_token.dtype == dtype
    got = model.forward_features(x.to(device=device, dtype=dtype))
    rel_tol, min_cos = PRECISION_TOLERANCE[dtype]
    for key in COMPARED_KEYS:
        value = got[key].float().cpu()
        assert got[key].dtype == dtype
        assert torch.isfinite(value).all(), f"{dtype} {key} has NaN/Inf"
        rel = ((value - reference[key]).norm() / reference[key].norm()).item()
        cos = torch.nn.functional.cosine_similarity(value, reference[key], dim=-1).min().item()
        assert rel <= rel_tol and cos >= min_cos, f"{dtype} {device} {key}: rel {rel}, min cos {cos}"


def test_torch_export_traces_without_graph_breaks():
    # A tiny spec of the same code: forward must trace whole (no data-dependent control flow).
    spec = dataclasses.replace(DINOV2_SPECS["vits14_reg"], embed_dim=32, depth=2, num_heads=2)
    model = init_random_(DinoVisionTransformer(spec), 0).eval()
    x = torch.randn(1, 3, 224, 308)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert max_diff(exported.module()(x), model(x)) <= 1e-5
