"""Write deterministic random-initialised checkpoints in the official formats and file names.

Every refseg command can then run offline (smoke runs: the masks mean nothing)::

    python -m refseg.testing.random_checkpoints OUTDIR --sam vit_b sam2.1_hiera_t --dinov2 vits14

writes ``OUTDIR/sam_vit_b_01ec64.pth``, ``OUTDIR/sam2.1_hiera_tiny.pt`` and
``OUTDIR/dinov2_vits14_pretrain.pth``; SAM 2 family files (``sam2.1_hiera_*``, ``sam2_hiera_*``,
``medsam2``) are ``{"model": state_dict}`` with the memory modules' keys too, as released; point
``REFSEG_CHECKPOINT_DIR`` at OUTDIR or pass the paths explicitly. The same seed gives the same
tensors on every machine. DINOv3 comes in both layouts users download::

    python -m refseg.testing.random_checkpoints OUTDIR --dinov3 vitb16 --dinov3-hf vitb16

writes the official ``OUTDIR/dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth`` and the Hugging Face folder
``OUTDIR/dinov3-vitb16-pretrain-lvd1689m/`` (``config.json`` + ``model.safetensors``) holding the same
weights (the key bias, masked out by the official model, is random in the ``.pth`` and absent from the
hub layout, as in the real files).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch

from refseg.io.writers import atomic_write_bytes, atomic_writer, write_json
from refseg.models import dinov2 as dinov2_mod
from refseg.models import dinov3 as dinov3_mod
from refseg.models import dinov3_hf
from refseg.models import sam as sam_mod
from refseg.models import sam2 as sam2_mod
from refseg.models.sam2_state_dict import random_sam2_state_dict

log = logging.getLogger(__name__)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    """torch.save / safetensors by suffix, written atomically (:func:`refseg.io.writers.atomic_writer`)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}))
    else:
        with atomic_writer(path) as handle:
            torch.save(state, handle)


def _file_name(official: str, safetensors: bool) -> str:
    return str(Path(official).with_suffix(".safetensors")) if safetensors else official


def random_dinov2_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DINOv2 state dict with official keys and shapes, random values from ``seed``."""
    return random_dinov2_model(name, seed).state_dict()


def random_sam_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A SAM state dict with official keys and shapes, random values from ``seed``."""
    return sam_mod.random_sam(name, seed).state_dict()


def random_sam_model(name: str | sam_mod.SamSpec = "vit_b", seed: int = 0, depth: int | None = None,
                     img_size: int | None = None) -> sam_mod.Sam:
    """A SAM of the official ``name`` layout (or a :class:`refseg.models.sam.SamSpec`) with random weights, in
    eval mode, optionally cut to ``depth`` image-encoder blocks and an ``img_size`` input side (e.g. 2 blocks
    at 256 px: a 16 x 16 embedding, 16x cheaper than 1024): the one builder of SAMs for tests and benchmarks."""
    spec = sam_mod.SAM_SPECS[name] if isinstance(name, str) else name
    if depth is not None:
        spec = spec.with_depth(depth)
    if img_size is not None:
        spec = dataclasses.replace(spec, img_size=img_size)
    return sam_mod.random_sam(spec, seed)


def random_dinov2_model(name: str | dinov2_mod.Dinov2Spec = "vits14", seed: int = 0,
                        depth: int | None = None) -> dinov2_mod.DinoVisionTransformer:
    """A DINOv2 of the official ``name`` layout (or a spec) with random weights (eval mode), optionally cut to
    ``depth`` blocks."""
    spec = dinov2_mod.DINOV2_SPECS[name] if isinstance(name, str) else name
    model = dinov2_mod.DinoVisionTransformer(spec if depth is None else dataclasses.replace(spec, depth=depth))
    return dinov2_mod.init_random_(model, seed).eval()


def write_model(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model``'s state dict as a checkpoint file (``.pth``, or ``.safetensors`` by suffix)."""
    path = Path(path)
    _save(model.state_dict(), path)
    return path


def write_tiny_checkpoints(folder: str | os.PathLike, sam_img_size: int = 256) -> tuple[Path, Path]:
    """(SAM, DINOv2) checkpoint files of the smallest models the pipeline runs end to end: SAM ViT-B cut to
    2 blocks at ``sam_img_size`` px, DINOv2 ViT-S/14 (full), random weights; for tests and smoke runs."""
    folder = Path(folder)
    sam = write_model(random_sam_model("vit_b", depth=2, img_size=sam_img_size), folder / f"sam_tiny_{sam_img_size}.pth")
    dino = folder / dinov2_mod.DINOV2_SPECS["vits14"].checkpoint.filename
    if not dino.is_file():
        write_model(random_dinov2_model("vits14"), dino)
    return sam, dino


def random_dinov3_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DINOv3 state dict with official keys and shapes, random values from ``seed`` (the
    :func:`refseg.models.dinov2.init_random_` rules; ``rope_embed.periods`` and the qkv bias masks keep
    their official values)."""
    with torch.device("meta"):
        model = dinov3_mod.Dinov3VisionTransformer(dinov3_mod.DINOV3_SPECS[name])
    model.to_empty(device="cpu")
    model.rope_embed.periods.copy_(dinov3_mod.rope_periods(model.spec.head_dim, model.spec.rope_base))
    for block in model.blocks:
        block.attn.qkv.bias_mask.copy_(dinov3_mod.official_bias_mask(block.attn.qkv.out_features))
    dinov2_mod.init_random_(model, seed)
    return model.state_dict()


def write_dinov3_hf_folder(state: dict[str, torch.Tensor], name: str, folder: str | os.PathLike) -> Path:
    """Write official-key DINOv3 weights as a Hugging Face folder (``config.json`` + ``model.safetensors``).

    Returns:
        The folder.
    """
    spec = dinov3_mod.DINOV3_SPECS[name]
    folder = Path(folder)
    _save(dinov3_hf.official_to_hf(state, spec, name), folder / dinov3_hf.WEIGHTS_NAME)
    write_json(folder / dinov3_hf.CONFIG_NAME, dinov3_hf.hf_config(spec))
    return folder


def write_random_checkpoints(outdir: str | os.PathLike, sam: list[str] = (), dinov2: list[str] = (),
                             seed: int = 0, safetensors: bool = False, dinov3: list[str] = (),
                             dinov3_hf_folders: list[str] = ()) -> list[Path]:
    """Write one file per requested model into ``outdir`` under its official file name.

    ``dinov3`` names get the official ``.pth`` (``.safetensors`` with ``safetensors``), ``dinov3_hf_folders``
    names the Hugging Face folder; a name in both gets the same weights in both layouts.

    Returns:
        The written paths (DINOv3 folders as folders), SAM first.
    """
    outdir = Path(outdir)
    written = []
    for name in sam:
        if name in sam2_mod.SAM2_SPECS:  # the official SAM 2 files wrap the weights: {"model": ...}
            path = outdir / _file_name(sam2_mod.SAM2_SPECS[name].checkpoint.filename, safetensors)
            state = random_sam2_state_dict(name, seed)
            _save(state if safetensors else {"model": state}, path)
        else:
            path = outdir / _file_name(sam_mod.SAM_SPECS[name].checkpoint.filename, safetensors)
            _save(random_sam_state_dict(name, seed), path)
        written.append(path)
    for name in dinov2:
        path = outdir / _file_name(dinov2_mod.DINOV2_SPECS[name].checkpoint.filename, safetensors)
        _save(random_dinov2_state_dict(name, seed), path)
        written.append(path)
    for name in dict.fromkeys(list(dinov3) + list(dinov3_hf_folders)):
        state = random_dinov3_state_dict(name, seed)
        source = dinov3_mod.DINOV3_SPECS[name].checkpoint
        if name in dinov3:
            path = outdir / _file_name(source.filename, safetensors)
            _save(state, path)
            written.append(path)
        if name in dinov3_hf_folders:
            written.append(write_dinov3_hf_folder(state, name, outdir / source.folder))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refseg.testing.random_checkpoints",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--sam", nargs="*", default=[], choices=sorted(sam_mod.SAM_SPECS) + sorted(sam2_mod.SAM2_SPECS))
    parser.add_argument("--dinov2", nargs="*", default=[], choices=sorted(dinov2_mod.DINOV2_SPECS))
    parser.add_argument("--dinov3", nargs="*", default=[], choices=sorted(dinov3_mod.DINOV3_SPECS),
                        help="official DINOv3 .pth files")
    parser.add_argument("--dinov3-hf", nargs="*", default=[], choices=sorted(dinov3_mod.DINOV3_SPECS),
                        help="DINOv3 Hugging Face folders (config.json + model.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--safetensors", action="store_true", help="write .safetensors files instead")
    args = parser.parse_args(argv)
    if not (args.sam or args.dinov2 or args.dinov3 or args.dinov3_hf):
        parser.error("name at least one model with --sam, --dinov2, --dinov3 and/or --dinov3-hf")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in write_random_checkpoints(args.outdir, args.sam, args.dinov2, args.seed, args.safetensors,
                                         args.dinov3, args.dinov3_hf):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
