"""Parity of refseg's DINOv3 backbone with ``transformers``' ``DINOv3ViTModel`` (CPU, fp32), and its two
checkpoint layouts.

Oracles: ``transformers.DINOv3ViTModel`` (test extra), configured per size with the values of the official
hub configs written out here (not taken from refseg), and — where installed — the official ``dinov3``
package (``facebookresearch/dinov3``, not on PyPI; those tests skip without it). Patch tokens (and cls /
register tokens) must agree within 1e-4 (max abs) at 96², 64² and a non-square 64x112 input (small
sizes keep the file fast on a shared 2-core CPU; the RoPE tables depend on the grid only).

The weights reach the oracle two ways: (1) refseg's random official-layout ``.pth`` converted by refseg to
a hub folder that ``DINOv3ViTModel.from_pretrained`` must load with no missing or unexpected key, and
(2) ``transformers``' own random initialisation (perturbed) saved by ``save_pretrained`` and read by refseg.
The official ``.pth`` and the hub folder of the same weights must give bit-identical tokens in refseg.
"""
from __future__ import annotations

import pytest
import torch

from refseg.models import build_dinov3
from refseg.models.build import build_dinov2
from refseg.models.checkpoints import CheckpointError
from refseg.models.dinov3 import (DINOV3_LICENSE_URL, DINOV3_SPECS, Dinov3VisionTransformer,
                                  dinov3_from_state_dict, infer_dinov3_name, official_bias_mask, rope_periods)
from refseg.models.dinov3_hf import hf_to_official, official_to_hf, read_config
from refseg.testing.random_checkpoints import write_dinov3_hf_folder, write_random_checkpoints

PARITY_ATOL = 1e-4

transformers = pytest.importorskip("transformers", reason="transformers (the oracle) not installed")
try:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
except ImportError as exc:  # transformers < 4.56
    pytest.skip(f"transformers {transformers.__version__} has no DINOv3ViTModel ({exc})", allow_module_level=True)

# The official hub configurations (hidden, intermediate, layers, heads, gated FFN): transformers'
# conversion script / the hub's config.json files.
HF_SIZES = {"vits16": (384, 1536, 12, 6, False), "vits16plus": (384, 1536, 12, 6, True),
            "vitb16": (768, 3072, 12, 12, False), "vitl16": (1024, 4096, 24, 16, False),
            "vith16plus": (1280, 5120, 32, 20, True)}
SIZES = [(2, 96, 96), (1, 64, 64), (2, 64, 112)]  # (batch, H, W): two squares, one non-square


def hf_config(name: str) -> "DINOv3ViTConfig":
    hidden, inter, layers, heads, gated = HF_SIZES[name]
    return DINOv3ViTConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_register_tokens=4, use_gated_mlp=gated,
                           hidden_act="silu" if gated else "gelu")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def hf_from_folder(folder: Path) -> "DINOv3ViTModel":
    model, info = DINOv3ViTModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@torch.no_grad()
def assert_parity(ours: Dinov3VisionTransformer, oracle: "DINOv3ViTModel", sizes, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for batch, height, width in sizes:
        x = torch.randn(batch, 3, height, width, generator=gen)
        got = ours.forward_features(x)
        expected = oracle(pixel_values=x).last_hidden_state
        n = (height // 16) * (width // 16)
        assert got["x_norm_patchtokens"].shape == (batch, n, ours.embed_dim)
        assert got["x_prenorm"].shape == (batch, 5 + n, ours.embed_dim)
        diff = max_diff(got["x_norm_patchtokens"], expected[:, 5:])
        assert diff <= PARITY_ATOL, f"{ours.spec.name} {height}x{width} patch tokens: max abs diff {diff}"
        assert max_diff(got["x_norm_clstoken"], expected[:, 0]) <= PARITY_ATOL
        assert max_diff(got["x_norm_regtokens"], expected[:, 1:5]) <= PARITY_ATOL
        diffs.append(diff)
    return diffs


def hf_from_state(state: dict[str, torch.Tensor], name: str) -> "DINOv3ViTModel":
    """The oracle holding official-layout weights without a file: built on the meta device, weights
    assigned through refseg's hub-layout conversion (strict), its RoPE module rebuilt on the CPU (the
    frequencies are a non-persistent buffer that transformers computes itself)."""
    spec = DINOV3_SPECS[name]
    with torch.device("meta"):
        oracle = DINOv3ViTModel(hf_config(name))
    converted = official_to_hf(state, spec, name)
    prefix = "model." if any(k.startswith("model.layer.") for k in oracle.state_dict()) else ""  # transformers 5
    oracle.load_state_dict({(prefix + k if k.startswith("layer.") else k): v for k, v in converted.items()},
                           strict=True, assign=True)
    oracle.rope_embeddings = type(oracle.rope_embeddings)(oracle.config)  # on the CPU: its own inv_freq
    return oracle.eval()


def quick_random_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Official-layout weights drawn uniformly: init_random_'s truncated normals (tested through the
    checkpoint writer) take ~1.5 s for ViT-S, ~5 s for ViT-B and ~25 s for ViT-L on a loaded 2-core CPU."""
    with torch.device("meta"):
        model = Dinov3VisionTransformer(DINOV3_SPECS[name])
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("periods"):
            value.copy_(rope_periods(model.spec.head_dim))
        elif key.endswith("bias_mask"):
            value.copy_(official_bias_mask(value.numel()))
        elif "norm" in key and key.endswith("weight"):
            value.uniform_(0.8, 1.2, generator=gen)
        elif key.endswith("gamma"):
            value.uniform_(0.1, 1.0, generator=gen)
        elif key.endswith(("_token", "_tokens")):
            value.uniform_(-0.8, 0.8, generator=gen)
        else:
            value.uniform_(-0.035, 0.035, generator=gen)
    return state


@pytest.fixture(scope="module")
def vits16_state():
    return quick_random_state("vits16", seed=1)


@pytest.fixture(scope="module")
def vits16_files(tmp_path_factory):
    """Random ViT-S/16 weights written in both official layouts (refseg's writer)."""
    out = tmp_path_factory.mktemp("dinov3")
    pth, folder = write_random_checkpoints(out, dinov3=["vits16"], dinov3_hf_folders=["vits16"], seed=3)
    return pth, folder


@pytest.mark.parametrize("name, sizes", [("vits16", SIZES), ("vits16plus", SIZES[2:]), ("vitb16", SIZES[1:])])
def test_official_pth_parity_with_transformers(name, sizes, tmp_path, vits16_state):
    state = vits16_state if name == "vits16" else quick_random_state(name, seed=1)
    path = tmp_path / DINOV3_SPECS[name].checkpoint.filename
    torch.save(state, path)
    ours = build_dinov3(checkpoint=path)  # name inferred from the weights
    assert ours.spec.name == name
    oracle = hf_from_folder(write_dinov3_hf_folder(state, name, tmp_path / "hf"))
    assert_parity(ours, oracle, sizes)


def test_transformers_saved_folder_loads_with_parity(tmp_path):
    # transformers' own random init (S+: the gated FFN), perturbed so that no parameter keeps a trivial value
    # (zero biases, layer scales of 1), saved by save_pretrained: refseg reads transformers' layout.
    torch.manual_seed(4)
    oracle = DINOv3ViTModel(hf_config("vits16plus")).eval()
    with torch.no_grad():
        for param_name, param in oracle.named_parameters():
            scale = 0.5 if "embeddings." in param_name and "patch" not in param_name else 0.02
            param.add_(torch.randn_like(param) * scale)
    oracle.save_pretrained(tmp_path)
    ours = build_dinov3(checkpoint=tmp_path)
    assert ours.spec.name == "vits16plus"
    assert_parity(ours, oracle, SIZES[2:])
    assert build_dinov3(checkpoint=tmp_path / "model.safetensors").spec.name == "vits16plus"  # file in the folder


@torch.no_grad()
def test_official_and_hub_layouts_of_the_same_weights_agree(vits16_files):
    pth, folder = vits16_files
    assert pth.name == "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    assert folder.name == "dinov3-vits16-pretrain-lvd1689m"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    from_pth, from_folder = build_dinov3(checkpoint=pth), build_dinov3(checkpoint=folder)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    a, b = from_pth.forward_features(x), from_folder.forward_features(x)
    for key in ("x_norm_patchtokens", "x_norm_clstoken", "x_prenorm"):
        assert torch.equal(a[key], b[key]), key
    # The .pth holds a random key bias that the official model masks out; the hub layout has none.
    raw = torch.load(pth, weights_only=True)
    assert raw["blocks.0.attn.qkv.bias"][384:768].abs().max() > 0
    assert torch.equal(from_pth.blocks[0].attn.qkv.bias, from_folder.blocks[0].attn.qkv.bias)
    assert_parity(from_pth, hf_from_folder(folder), [(1, 64, 96)])


@torch.no_grad()
def test_key_bias_is_masked_and_parity_would_catch_it(vits16_state):
    # A large key bias in the .pth: the official model masks it out (parity holds); applying it (a mask of
    # ones) must be caught, so the comparison is not trivially passing.
    gen = torch.Generator().manual_seed(11)
    state = dict(vits16_state)
    for key in [k for k in state if k.endswith("qkv.bias")]:
        state[key] = state[key].clone()
        state[key][384:768] = torch.randn(384, generator=gen)
    oracle = hf_from_state(state, "vits16")
    assert_parity(dinov3_from_state_dict(state), oracle, SIZES[2:])
    unmasked = {k: torch.ones_like(v) if k.endswith("qkv.bias_mask") else v for k, v in state.items()}
    wrong = dinov3_from_state_dict(unmasked)
    x = torch.randn(1, 3, 64, 112, generator=torch.Generator().manual_seed(7))
    diff = max_diff(wrong.forward_features(x)["x_norm_patchtokens"], oracle(pixel_values=x).last_hidden_state[:, 5:])
    assert diff > 100 * PARITY_ATOL


@torch.no_grad()
def test_vitl16_builds_loads_and_matches():
    state = quick_random_state("vitl16", seed=8)
    ours = dinov3_from_state_dict(state, source="vitl16 random")  # strict: every key, every shape
    assert ours.spec.name == "vitl16"
    assert (ours.spec.depth, ours.embed_dim, ours.spec.num_heads) == (24, 1024, 16)
    assert_parity(ours, hf_from_state(state, "vitl16"), [(1, 64, 96)])


@pytest.mark.parametrize("name", sorted(DINOV3_SPECS))
def test_layout_matches_transformers_and_names_are_inferred(name):
    with torch.device("meta"):
        ours = Dinov3VisionTransformer(DINOV3_SPECS[name]).state_dict()
    assert infer_dinov3_name(ours) == name
    spec = DINOV3_SPECS[name]
    base = name.removesuffix("_sat493m")
    with torch.device("meta"):
        oracle = {k.replace("model.layer.", "layer."): tuple(v.shape)
                  for k, v in DINOv3ViTModel(hf_config(base)).state_dict().items() if not k.endswith("inv_freq")}
    # the two small buffers official_to_hf checks get their real values; the rest stays on the meta device
    buffers = {k: official_bias_mask(v.numel()) if k.endswith("bias_mask") else rope_periods(spec.head_dim)
               for k, v in ours.items() if k.endswith(("bias_mask", "periods"))}
    assert {k: tuple(v.shape) for k, v in official_to_hf({**ours, **buffers}, spec).items()} == oracle
    source = spec.checkpoint
    weights = "sat493m" if name.endswith("sat493m") else "lvd1689m"
    assert source.filename.startswith(f"dinov3_{base}_pretrain_{weights}-") and source.filename.endswith(".pth")
    assert source.url is None and source.access == DINOV3_LICENSE_URL
    assert spec.hf_repo == f"facebook/{source.folder}" == f"facebook/dinov3-{base}-pretrain-{weights}"


def test_official_file_names_are_the_release_names():
    names = {s.checkpoint.filename for s in DINOV3_SPECS.values()}
    assert names == {"dinov3_vits16_pretrain_lvd1689m-08c60483.pth", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
                     "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
                     "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"}


# ---- the official dinov3 package (optional second oracle: not on PyPI) ----

def official_backbone(name: str):
    backbones = pytest.importorskip("dinov3.hub.backbones", reason="official dinov3 package not installed")
    with torch.device("meta"):
        return getattr(backbones, f"dinov3_{name}")(pretrained=False)


@pytest.mark.parametrize("name", ["vits16", "vits16plus", "vitb16", "vitl16", "vith16plus"])
def test_keys_in_the_official_order(name):
    with torch.device("meta"):
        ours = Dinov3VisionTransformer(DINOV3_SPECS[name]).state_dict()
    official = official_backbone(name).state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == [(k, tuple(v.shape)) for k, v in official.items()]


@torch.no_grad()
def test_parity_with_the_official_package(vits16_state):
    state = vits16_state
    official = official_backbone("vits16")
    official.load_state_dict(state, strict=True, assign=True)
    official.eval()
    ours = dinov3_from_state_dict(state)
    x = torch.randn(2, 3, 64, 112, generator=torch.Generator().manual_seed(10))
    got, expected = ours.forward_features(x), official.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert max_diff(got[key], expected[key]) <= PARITY_ATOL, key
    assert max_diff(got["x_norm_regtokens"], expected["x_storage_tokens"]) <= PARITY_ATOL


# ---- errors: every one names the file and the problem ----

def test_missing_gated_checkpoint_says_where_and_why(tmp_path, monkeypatch):
    monkeypatch.setenv("REFSEG_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as info:
        build_dinov3("vitb16")
    message = str(info.value)
    assert "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth" in message and "gated" in message
    assert DINOV3_LICENSE_URL in message and str(tmp_path / "dinov3-vitb16-pretrain-lvd1689m") in message


def test_default_lookup_finds_file_or_hub_folder(vits16_files, monkeypatch):
    pth, folder = vits16_files
    monkeypatch.setenv("REFSEG_CHECKPOINT_DIR", str(pth.parent))
    assert build_dinov3("vits16").spec.name == "vits16"
    pth_moved = pth.with_name("elsewhere.pth")
    pth.rename(pth_moved)
    try:
        assert build_dinov3("vits16").spec.name == "vits16"  # the hub folder by its name
    finally:
        pth_moved.rename(pth)


def test_wrong_size_name_and_other_models_are_refused(vits16_files, tmp_path):
    pth, folder = vits16_files
    with pytest.raises(CheckpointError, match=r"holds DINOv3 vits16, not vitb16"):
        build_dinov3("vitb16", checkpoint=pth)
    with pytest.raises(CheckpointError, match="DINOv3 checkpoint, not a DINOv2"):
        build_dinov2(checkpoint=pth)
    from refseg.testing.random_checkpoints import random_dinov2_state_dict
    torch.save(random_dinov2_state_dict("vits14"), tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(CheckpointError, match="DINOv2 checkpoint, not a DINOv3"):
        build_dinov3(checkpoint=tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(ValueError, match="unknown DINOv3 model 'vitx16'"):
        build_dinov3("vitx16", checkpoint=pth)
    with pytest.raises(CheckpointError, match="does not exist"):
        build_dinov3(checkpoint=tmp_path / "nothing.pth")


def test_strict_load_lists_missing_unexpected_and_shapes(vits16_files):
    state = torch.load(vits16_files[0], weights_only=True)
    missing = {k: v for k, v in state.items() if k != "blocks.3.ls2.gamma"}
    with pytest.raises(CheckpointError, match=r"f\.pth: checkpoint does not fit .*missing keys: blocks\.3\.ls2\.gamma"):
        dinov3_from_state_dict(missing, name="vits16", source="f.pth")
    extra = {**state, "head.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="unexpected keys: head.weight"):
        dinov3_from_state_dict(extra, name="vits16")
    wrong = {**state, "blocks.0.ls1.gamma": torch.zeros(385)}
    with pytest.raises(CheckpointError, match=r"shape mismatches: blocks\.0\.ls1\.gamma \(385,\) vs model \(384,\)"):
        dinov3_from_state_dict(wrong, name="vits16")
    nan_mask = {**state, "blocks.0.attn.qkv.bias_mask": torch.full((1152,), float("nan"))}
    with pytest.raises(CheckpointError, match="bias masks hold NaN"):
        dinov3_from_state_dict(nan_mask)
    with pytest.raises(CheckpointError, match="not a known DINOv3 layout"):
        infer_dinov3_name({k: v for k, v in state.items() if not k.startswith("blocks.11.")}, "g.pth")


def test_hub_folder_problems(vits16_files, tmp_path):
    import json
    import shutil
    _, folder = vits16_files
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    for change, message in (({"model_type": "dinov2"}, "model_type 'dinov2', not a DINOv3 ViT"),
                            ({"key_bias": True}, "key_bias=True"),
                            ({"hidden_act": "gelu", "use_gated_mlp": True}, "hidden_act='gelu'"),
                            ({"num_hidden_layers": 11}, "no supported DINOv3 size")):
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            build_dinov3(checkpoint=bad)
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        build_dinov3(checkpoint=bad)
    with pytest.raises(CheckpointError, match="need their config.json"):
        build_dinov3(checkpoint=bad / "model.safetensors")
    hub = read_config(folder)
    from safetensors.torch import load_file
    weights = load_file(str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="keys not part of a DINOv3ViTModel: layer.0.attention.k_proj.bias"):
        hf_to_official({**weights, "layer.0.attention.k_proj.bias": torch.zeros(384)}, hub, "w")
    with pytest.raises(CheckpointError, match="keys not part of a DINOv3ViTModel: pooler.weight"):
        hf_to_official({**weights, "pooler.weight": torch.zeros(1)}, hub, "w")


def test_side_not_multiple_of_16_raises(vits16_files):
    model = build_dinov3(checkpoint=vits16_files[0])
    with pytest.raises(ValueError, match="224x232"):
        model(torch.zeros(1, 3, 224, 232))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(3, 224, 224))
