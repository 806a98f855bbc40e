"""SAM 2 checkpoints: official key names, the memory-module keys, strict loading, random weights.

An official file (``sam2.1_hiera_*.pt``, ``sam2_hiera_*.pt``, MedSAM2's ``MedSAM2_*.pt``) is
``{"model": state_dict}`` holding the whole video model. refseg's :class:`~refseg.models.sam2.Sam2`
is the image path; loading is still strict over the whole file:

* image-path keys (``image_encoder.*``, ``sam_prompt_encoder.*``, ``sam_mask_decoder.*``,
  ``no_mem_embed``) are copied into the model with the strict key/shape check of
  :func:`~refseg.models.checkpoints.load_into`; the two-way transformer's token MLP is renamed on the
  way (``mlp.layers.0/1`` in SAM 2 files, ``mlp.lin1/lin2`` in refseg's shared SAM transformer);
* every other key must be one of the memory-module keys of that release with its shape
  (:func:`memory_key_shapes`: memory attention, memory encoder, object pointers, temporal encodings),
  and every one of those must be present. They are checked, then dropped: the image path does not
  use them. :func:`split_state_dict` hands them over to whoever builds the memory modules.

The model name is read off the tensor shapes (trunk width and stage depths) and the memory keys
(``no_obj_embed_spatial`` is SAM 2.1 only). MedSAM2 has the SAM 2.1 tiny layout at a 512 input,
which the weights do not reveal: its files are recognised by name (``MedSAM2*``), or pass
``name="medsam2"``.
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping

import torch
from torch import nn

from .checkpoints import CheckpointError, load_into, unwrap_state_dict
from .sam2 import SAM2_SPECS, Sam2, Sam2Spec, get_spec

IMAGE_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
TRUNK_KEY = "image_encoder.trunk.patch_embed.proj.weight"
MEDSAM2_FILE_PREFIX = "medsam2"
"""A SAM 2 checkpoint whose file name starts with this (case-insensitive) is MedSAM2."""

_MLP_OFFICIAL = re.compile(r"^(sam_mask_decoder\.transformer\.layers\.\d+\.mlp\.)layers\.([01])\.")
_MLP_REFSEG = re.compile(r"^(sam_mask_decoder\.transformer\.layers\.\d+\.mlp\.)lin([12])\.")


def to_refseg_key(key: str) -> str:
    """Official SAM 2 key -> refseg :class:`Sam2` key (only the transformer's token MLP differs)."""
    return _MLP_OFFICIAL.sub(lambda m: f"{m.group(1)}lin{int(m.group(2)) + 1}.", key)


def to_official_key(key: str) -> str:
    """refseg :class:`Sam2` key -> official SAM 2 key (inverse of :func:`to_refseg_key`)."""
    return _MLP_REFSEG.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) - 1}.", key)


def is_sam2_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a SAM 2 family state dict (it has a Hiera trunk)."""
    return TRUNK_KEY in state_dict


def memory_key_shapes(version: str = "2.1", d_model: int = 256, mem_dim: int = 64) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the memory-module keys of an official SAM 2 (``"2"``) or 2.1 checkpoint.

    The same for every trunk size: 7 memories, 4 memory-attention layers (FFN 2048, keys of width
    ``mem_dim``), a 2-layer ConvNeXt fuser, a 3-layer object-pointer MLP.
    """
    shapes: dict[str, tuple[int, ...]] = {
        "maskmem_tpos_enc": (7, 1, 1, mem_dim), "no_mem_pos_enc": (1, 1, d_model),
        "no_obj_ptr": (1, d_model), "mask_downsample.weight": (1, 1, 4, 4), "mask_downsample.bias": (1,)}

    def linear(prefix: str, out: int, inp: int) -> None:
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (out, inp), (out,)

    def conv(prefix: str, out: int, inp: int, k: int) -> None:
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (out, inp, k, k), (out,)

    def norm(prefix: str, dim: int) -> None:
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (dim,), (dim,)

    for i in range(4):
        layer = f"memory_attention.layers.{i}"
        for proj in ("q", "k", "v", "out"):
            linear(f"{layer}.self_attn.{proj}_proj", d_model, d_model)
            linear(f"{layer}.cross_attn_image.{proj}_proj", d_model, mem_dim if proj in "kv" else d_model)
        linear(f"{layer}.linear1", 2048, d_model)
        linear(f"{layer}.linear2", d_model, 2048)
        for n in (1, 2, 3):
            norm(f"{layer}.norm{n}", d_model)
    norm("memory_attention.norm", d_model)
    encoder = "memory_encoder"
    for index, (out, inp) in zip((0, 3, 6, 9), ((4, 1), (16, 4), (64, 16), (256, 64))):
        conv(f"{encoder}.mask_downsampler.encoder.{index}", out, inp, 3)
        norm(f"{encoder}.mask_downsampler.encoder.{index + 1}", out)
    conv(f"{encoder}.mask_downsampler.encoder.12", d_model, 256, 1)
    conv(f"{encoder}.pix_feat_proj", d_model, d_model, 1)
    for i in range(2):
        block = f"{encoder}.fuser.layers.{i}"
        shapes[f"{block}.gamma"] = (d_model,)
        conv(f"{block}.dwconv", d_model, 1, 7)
        norm(f"{block}.norm", d_model)
        linear(f"{block}.pwconv1", 4 * d_model, d_model)
        linear(f"{block}.pwconv2", d_model, 4 * d_model)
    conv(f"{encoder}.out_proj", mem_dim, d_model, 1)
    for i in range(3):
        linear(f"obj_ptr_proj.layers.{i}", d_model, d_model)
    if version == "2.1":
        shapes["no_obj_embed_spatial"] = (1, mem_dim)
        linear("obj_ptr_tpos_proj", mem_dim, d_model)
    return shapes


def split_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(image-path keys renamed for :class:`Sam2`, every other key as it is in the file)."""
    image, memory = {}, {}
    for key, value in state_dict.items():
        if key.startswith(IMAGE_PREFIXES):
            image[to_refseg_key(key)] = value
        else:
            memory[key] = value
    return image, memory


def check_memory_keys(memory: Mapping[str, torch.Tensor], version: str, source: str) -> None:
    """Raise :class:`CheckpointError` unless ``memory`` holds exactly the memory keys of ``version``."""
    expected = memory_key_shapes(version)
    missing = sorted(set(expected) - set(memory))
    unexpected = sorted(set(memory) - set(expected))
    shapes = sorted(f"{k} {tuple(memory[k].shape)} vs {expected[k]}" for k in expected
                    if k in memory and tuple(memory[k].shape) != expected[k])
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:8])}" + (f" ... ({len(items) - 8} more)" if len(items) > 8 else "")
                 for label, items in (("missing memory keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", shapes)) if items]
        raise CheckpointError(f"{source}: not an official SAM {version} checkpoint ({'; '.join(parts)})")


def infer_sam2_name(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> str:
    """Name in ``SAM2_SPECS`` of an official-format SAM 2 state dict (``medsam2`` for a file named
    ``MedSAM2*``; otherwise from the trunk's width, stage depths and position table, and the version
    from ``no_obj_embed_spatial``).

    Raises:
        CheckpointError: not a SAM 2 state dict, or a trunk no named spec has.
    """
    if not is_sam2_state_dict(state_dict):
        raise CheckpointError(f"{source}: not a SAM 2 checkpoint (no key {TRUNK_KEY!r}; first keys: "
                              f"{', '.join(list(state_dict)[:5])})")
    if os.path.basename(source).lower().startswith(MEDSAM2_FILE_PREFIX):
        return "medsam2"
    dim = state_dict[TRUNK_KEY].shape[0]
    depth = 0
    while f"image_encoder.trunk.blocks.{depth}.norm1.weight" in state_dict:
        depth += 1
    starts = [i for i in range(1, depth) if f"image_encoder.trunk.blocks.{i}.proj.weight" in state_dict]
    stages = tuple(b - a for a, b in zip([0] + starts, starts + [depth]))
    bkg = tuple(state_dict["image_encoder.trunk.pos_embed"].shape[-2:])
    version = "2.1" if "no_obj_embed_spatial" in state_dict else "2"
    for name, spec in SAM2_SPECS.items():
        if name != "medsam2" and (spec.embed_dim, spec.stages, spec.window_pos_embed_bkg_spatial_size,
                                  spec.version) == (dim, stages, bkg, version):
            return name
    raise CheckpointError(f"{source}: SAM {version} trunk (width {dim}, stages {stages}, position table {bkg}) "
                          f"matches none of {', '.join(SAM2_SPECS)}")


def _uninitialised(spec: Sam2Spec) -> Sam2:
    with torch.device("meta"):  # skips the default init; every value is overwritten by the load
        model = Sam2(spec)
    model.to_empty(device="cpu")
    return model


def sam2_from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str | Sam2Spec | None = None,
                         source: str = "state dict") -> Sam2:
    """Build a :class:`Sam2` and load an official-format state dict strictly (fp32, CPU, eval mode).

    Args:
        state_dict: official keys, or the file's ``{"model": state_dict}``.
        name: a ``SAM2_SPECS`` name or a spec; None infers it (:func:`infer_sam2_name`).
        source: file name used in errors and to recognise MedSAM2.

    Raises:
        CheckpointError: missing / unexpected keys or shape mismatches, image path or memory modules.
    """
    state_dict = unwrap_state_dict(state_dict, source)
    if name is None:
        name = infer_sam2_name(state_dict, source)
    spec = name if isinstance(name, Sam2Spec) else get_spec(name)
    image, memory = split_state_dict(state_dict)
    check_memory_keys(memory, spec.version, source)
    model = _uninitialised(spec)
    load_into(model, image, source)
    return model.eval()


def _random_value(key: str, noise: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    """Deterministic random values of a sensible scale for one tensor (``noise`` is N(0, 1))."""
    leaf = key.rpartition(".")[2]
    if isinstance(module, nn.Embedding) or leaf == "positional_encoding_gaussian_matrix":
        return noise
    if leaf == "bias":
        return 0.02 * noise
    if leaf == "weight" and noise.dim() == 1:  # LayerNorm / LayerNorm2d
        return 1 + 0.1 * noise
    if leaf == "weight":  # linear / conv; a transposed conv's fan-in is its first axis
        fan_in = noise.shape[0] if isinstance(module, nn.ConvTranspose2d) else noise[0].numel()
        return noise / math.sqrt(fan_in)
    return 0.1 * noise  # position tables, layer scales, learned embeddings of the memory path


def official_key_shapes(spec: Sam2Spec | str) -> dict[str, tuple[tuple[int, ...], nn.Module | None]]:
    """Every key of an official checkpoint of ``spec`` (image path and memory modules) with its shape
    and, for image-path keys, the refseg module holding it (None for memory keys)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    with torch.device("meta"):
        model = Sam2(spec)
    modules = dict(model.named_modules())
    shapes = {to_official_key(k): (tuple(v.shape), modules[k.rpartition(".")[0]])
              for k, v in model.state_dict().items()}
    shapes.update({k: (shape, None) for k, shape in memory_key_shapes(spec.version, spec.d_model).items()})
    return shapes


def random_sam2_state_dict(spec: Sam2Spec | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete official-format SAM 2 state dict (image path and memory modules, official key names
    and shapes) with deterministic random values drawn from ``seed`` in key order."""
    gen = torch.Generator().manual_seed(seed)
    return {key: _random_value(key, torch.randn(shape, generator=gen), module)
            for key, (shape, module) in official_key_shapes(spec).items()}


def random_sam2(spec: Sam2Spec | str, seed: int = 0) -> Sam2:
    """A CPU fp32 :class:`Sam2` in eval mode holding the image part of :func:`random_sam2_state_dict`."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    return sam2_from_state_dict(random_sam2_state_dict(spec, seed), spec, f"random {spec.name}")
