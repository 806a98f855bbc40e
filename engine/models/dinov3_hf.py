"""The Hugging Face layout of DINOv3 (``config.json`` + ``model.safetensors``) and its conversion to
and from the official key names.

A folder downloaded from the hub (e.g. ``facebook/dinov3-vitb16-pretrain-lvd1689m``) holds
``transformers``' ``DINOv3ViTModel`` weights: ``embeddings.{cls_token (1, 1, D), mask_token (1, 1, D),
register_tokens, patch_embeddings.*}``, ``layer.<i>.{norm1, attention.{q,k,v,o}_proj, layer_scale1.lambda1,
norm2, mlp.{up,down}_proj | mlp.{gate,up,down}_proj, layer_scale2.lambda1}``, ``norm`` (``transformers``
5 saves ``model.layer.<i>`` instead of ``layer.<i>``; both are read). The key projection has no bias,
and there is no RoPE buffer: the periods follow from ``rope_theta``. The conversion here maps one to
one onto the official keys (:mod:`refseg.models.dinov3`), q/k/v concatenated into ``qkv`` with a zero
key bias and the official ``bias_mask``; every tensor must be used and the config must describe an
official architecture.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from refseg.models.checkpoints import CheckpointError, load_state_dict
from refseg.models.dinov3 import DINOV3_SPECS, LAYER_NORM_EPS, Dinov3Spec, official_bias_mask, rope_periods

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MODEL_TYPE = "dinov3_vit"

# DINOv3ViTConfig's defaults (transformers), used for fields a config.json leaves out.
HF_DEFAULTS = {"patch_size": 16, "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12,
               "num_attention_heads": 6, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "rope_theta": 100.0,
               "num_channels": 3, "query_bias": True, "key_bias": False, "value_bias": True,
               "proj_bias": True, "mlp_bias": True, "use_gated_mlp": False, "num_register_tokens": 0}
# The values every official release has (refseg runs exactly this computation).
_FIXED = {"num_channels": 3, "query_bias": True, "key_bias": False, "value_bias": True, "proj_bias": True,
          "mlp_bias": True, "layer_norm_eps": LAYER_NORM_EPS}

_BLOCK_RENAMES = (  # HF suffix inside layer.<i>. -> official suffix inside blocks.<i>.
    ("norm1.", "norm1."), ("norm2.", "norm2."), ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
)
_MLP_RENAMES = {"mlp": (("up_proj.", "fc1."), ("down_proj.", "fc2.")),
                "swiglu": (("gate_proj.", "w1."), ("up_proj.", "w2."), ("down_proj.", "w3."))}
_TOP_RENAMES = (("embeddings.cls_token", "cls_token"), ("embeddings.register_tokens", "storage_tokens"),
                ("embeddings.patch_embeddings.weight", "patch_embed.proj.weight"),
                ("embeddings.patch_embeddings.bias", "patch_embed.proj.bias"),
                ("norm.weight", "norm.weight"), ("norm.bias", "norm.bias"))
def _block_renames(ffn: str) -> tuple[tuple[str, str], ...]:
    """(HF suffix, official suffix) pairs inside one block, FFN included."""
    return _BLOCK_RENAMES + tuple(("mlp." + old, "mlp." + new) for old, new in _MLP_RENAMES[ffn])


_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")


def is_hf_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` uses ``DINOv3ViTModel``'s key names (``embeddings.*``, ``[model.]layer.<i>.*``;
    transformers' DINOv2 uses ``encoder.layer.<i>.*``)."""
    return "embeddings.cls_token" in state_dict and any(
        f"{prefix}layer.0.attention.o_proj.weight" in state_dict for prefix in ("", "model."))


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of a DINOv3 Hugging Face folder, with ``transformers``' defaults filled in.

    Raises:
        CheckpointError: no/unreadable config, another model type, or values refseg does not run.
    """
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME} (a Hugging Face DINOv3 folder holds "
                              f"{CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable config ({exc})") from exc
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{path}: model_type {found!r}, not a DINOv3 ViT ({MODEL_TYPE!r})"
                              + (" (ConvNeXt backbones are not supported)" if found == "dinov3_convnext" else ""))
    config = {**HF_DEFAULTS, **config}
    wrong = [f"{k}={config[k]!r} (official: {v!r})" for k, v in _FIXED.items() if config[k] != v]
    expected_act = "silu" if config["use_gated_mlp"] else "gelu"
    if config["hidden_act"] != expected_act:
        wrong.append(f"hidden_act={config['hidden_act']!r} (official: {expected_act!r} with "
                     f"use_gated_mlp={config['use_gated_mlp']})")
    if wrong:
        raise CheckpointError(f"{path}: not an official DINOv3 architecture: {'; '.join(wrong)}")
    return config


def spec_from_config(config: Mapping, source: str) -> Dinov3Spec:
    """The :data:`DINOV3_SPECS` entry a (checked) ``config.json`` describes.

    Raises:
        CheckpointError: no official size matches.
    """
    seen = (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["intermediate_size"], "swiglu" if config["use_gated_mlp"] else "mlp",
            config["num_register_tokens"], config["patch_size"])
    for spec in DINOV3_SPECS.values():
        if not spec.local_cls_norm and seen == (spec.embed_dim, spec.depth, spec.num_heads, spec.ffn_hidden,
                                                spec.ffn, spec.num_register_tokens, spec.patch_size):
            return spec
    raise CheckpointError(f"{source}: config describes no supported DINOv3 size (hidden_size, layers, heads, "
                          f"intermediate_size, ffn, registers, patch = {seen}); supported: "
                          f"{', '.join(s.name for s in DINOV3_SPECS.values() if not s.local_cls_norm)}")


def hf_to_official(state_dict: Mapping[str, torch.Tensor], config: Mapping,
                   source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Rename a Hugging Face DINOv3 state dict to the official keys (new dict; q/k/v concatenated).

    Every input tensor is used once: unknown keys, missing keys and shapes the config does not
    imply raise. ``rope_embed.periods`` is computed from ``rope_theta``.

    Raises:
        CheckpointError: naming ``source`` and the offending keys.
    """
    spec = spec_from_config(config, source)
    renames = dict(_TOP_RENAMES)
    out: dict[str, torch.Tensor] = {}
    unused = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in renames:
            out[renames[key]] = value
            continue
        if key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(value.shape[0], -1) if value.ndim == 3 else value
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            unused.append(key)
            continue
        index, rest = int(match.group(1)), match.group(2)
        proj = re.match(r"attention\.([qkv])_proj\.(weight|bias)$", rest)
        if proj:
            qkv.setdefault((index, proj.group(2)), {})[proj.group(1)] = value
            continue
        for old, new in _block_renames(spec.ffn):
            if rest.startswith(old):
                out[f"blocks.{index}.{new}{rest[len(old):]}"] = value
                break
        else:
            unused.append(key)
    for (index, kind), parts in sorted(qkv.items()):
        prefix = f"blocks.{index}.attn.qkv"
        if kind == "weight":
            if set(parts) != {"q", "k", "v"}:
                absent = sorted({"q", "k", "v"} - set(parts))
                raise CheckpointError(f"{source}: layer {index} lacks the {'/'.join(absent)}_proj weight")
            out[f"{prefix}.weight"] = torch.cat((parts["q"], parts["k"], parts["v"]), dim=0)
        else:
            if "k" in parts:  # key_bias=False in every official config: a key bias has no place here
                unused.append(f"layer.{index}.attention.k_proj.bias")
            if not {"q", "v"} <= set(parts):
                raise CheckpointError(f"{source}: layer {index} lacks the q_proj / v_proj bias")
            q, v = parts["q"], parts["v"]
            out[f"{prefix}.bias"] = torch.cat((q, torch.zeros_like(q), v))
            out[f"{prefix}.bias_mask"] = official_bias_mask(3 * q.shape[0]).to(device=q.device, dtype=q.dtype)
    if unused:
        raise CheckpointError(f"{source}: keys not part of a DINOv3ViTModel: {', '.join(sorted(unused)[:10])}"
                              + (f" ... ({len(unused) - 10} more)" if len(unused) > 10 else ""))
    reference = next(iter(state_dict.values()))
    out["rope_embed.periods"] = rope_periods(spec.head_dim, float(config["rope_theta"])).to(reference.device)
    return out


def hf_config(spec: Dinov3Spec) -> dict:
    """The ``config.json`` of ``spec`` as the hub's DINOv3 folders have it (``DINOv3ViTModel``)."""
    return {
        "architectures": ["DINOv3ViTModel"], "model_type": MODEL_TYPE, "hidden_size": spec.embed_dim,
        "intermediate_size": spec.ffn_hidden, "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads, "hidden_act": "silu" if spec.ffn == "swiglu" else "gelu",
        "use_gated_mlp": spec.ffn == "swiglu", "attention_dropout": 0.0, "drop_path_rate": 0.0,
        "initializer_range": 0.02, "layer_norm_eps": LAYER_NORM_EPS, "layerscale_value": 1.0,
        "rope_theta": spec.rope_base, "image_size": 224, "patch_size": spec.patch_size, "num_channels": 3,
        "query_bias": True, "key_bias": False, "value_bias": True, "proj_bias": True, "mlp_bias": True,
        "num_register_tokens": spec.num_register_tokens, "pos_embed_shift": None, "pos_embed_jitter": None,
        "pos_embed_rescale": 2.0, "torch_dtype": "float32",
    }


def official_to_hf(state_dict: Mapping[str, torch.Tensor], spec: Dinov3Spec,
                   source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Official keys -> the hub's ``DINOv3ViTModel`` keys (``layer.<i>.*``), as the hub files hold them.

    The key bias is dropped (its mask must be the official 1/0/1 pattern), and so are
    ``rope_embed.periods`` (the periods must be those of ``spec.rope_base``) and ``local_cls_norm``
    (training only), as the official-to-hub conversion does.

    Raises:
        CheckpointError: a mask or periods that the hub layout cannot express.
    """
    periods = state_dict["rope_embed.periods"].float().cpu()
    if not torch.allclose(periods, rope_periods(spec.head_dim, spec.rope_base), rtol=1e-6, atol=0):
        raise CheckpointError(f"{source}: rope_embed.periods are not those of rope_theta={spec.rope_base}")
    top = {new: old for old, new in _TOP_RENAMES}
    block = tuple((n, o) for o, n in _block_renames(spec.ffn))
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
        elif key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, 1, -1)
        elif key == "rope_embed.periods" or key.startswith("local_cls_norm."):
            continue
        else:
            match = _BLOCK_KEY.match(key)
            if match is None:
                raise CheckpointError(f"{source}: unexpected official key {key}")
            index, rest = match.group(1), match.group(2)
            if rest.startswith("attn.qkv."):
                _split_qkv(out, state_dict, index, rest, spec.embed_dim, source)
                continue
            for new, old in block:
                if rest.startswith(new):
                    out[f"layer.{index}.{old}{rest[len(new):]}"] = value
                    break
            else:
                raise CheckpointError(f"{source}: unexpected official key {key}")
    return out


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _split_qkv(out: dict, state_dict: Mapping, index: str, rest: str, dim: int, source: str) -> None:
    prefix = f"layer.{index}.attention."
    if rest == "attn.qkv.weight":
        q, k, v = state_dict[f"blocks.{index}.{rest}"].split(dim, dim=0)
        out.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
    elif rest == "attn.qkv.bias":
        mask = state_dict[f"blocks.{index}.attn.qkv.bias_mask"].float().cpu()
        if not torch.equal(mask, official_bias_mask(3 * dim)):
            raise CheckpointError(f"{source}: blocks.{index}.attn.qkv.bias_mask is not the official 1/0/1 "
                                  "pattern; the Hugging Face layout cannot hold it")
        q, _, v = state_dict[f"blocks.{index}.{rest}"].split(dim, dim=0)
        out.update({prefix + "q_proj.bias": q, prefix + "v_proj.bias": v})


def load_hf_folder(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a Hugging Face DINOv3 folder: (official-key state dict, model name).

    Reads ``model.safetensors`` (or the shards of ``model.safetensors.index.json``) with safetensors.

    Raises:
        CheckpointError: bad config, missing/unreadable weights, keys that do not fit the config.
    """
    folder = Path(folder)
    config = read_config(folder)
    spec = spec_from_config(config, str(folder / CONFIG_NAME))
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif (folder / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder / INDEX_NAME}: unreadable shard index ({exc})") from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} (nor {INDEX_NAME}) beside {CONFIG_NAME}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_state_dict(path))
    if not is_hf_layout(state):
        raise CheckpointError(f"{folder}: weights do not use DINOv3ViTModel key names "
                              f"(first keys: {', '.join(list(state)[:5])})")
    return hf_to_official(state, config, str(folder)), spec.name
