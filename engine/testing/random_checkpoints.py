"""Write deterministic random-initialised checkpoints in the official formats and file names.

Every refseg command can then run offline (smoke runs: the masks mean nothing)::

    python -m refseg.testing.random_checkpoints OUTDIR --sam vit_b --dinov2 vits14

writes ``OUTDIR/sam_vit_b_01ec64.pth`` and ``OUTDIR/dinov2_vits14_pretrain.pth``; point
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
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

from refseg.io.writers import new_file_mode, write_json
from refseg.models import dinov2 as dinov2_mod
from refseg.models import dinov3 as dinov3_mod
from refseg.models import dinov3_hf
from refseg.models import sam as sam_mod

log = logging.getLogger(__name__)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, new_file_mode())  # mkstemp's 0600 -> the umask's normal mode
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
            os.chmod(tmp, new_file_mode())  # safetensors re-creates the file with mode 0600
        else:
            torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _file_name(official: str, safetensors: bool) -> str:
    return str(Path(official).with_suffix(".safetensors")) if safetensors else official


def random_dinov2_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DINOv2 state dict with official keys and shapes, random values from ``seed``."""
    model = dinov2_mod.DinoVisionTransformer(dinov2_mod.DINOV2_SPECS[name])
    dinov2_mod.init_random_(model, seed)
    return model.state_dict()


def random_sam_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A SAM state dict with official keys and shapes, random values from ``seed``."""
    return sam_mod.random_sam(name, seed).state_dict()


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
    parser.add_argument("--sam", nargs="*", default=[], choices=sorted(sam_mod.SAM_SPECS))
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
