"""Write deterministic random-initialised checkpoints in the official formats and file names.

Every refseg command can then run offline (smoke runs: the masks mean nothing)::

    python -m refseg.testing.random_checkpoints OUTDIR --sam vit_b sam2.1_hiera_t --dinov2 vits14

writes ``OUTDIR/sam_vit_b_01ec64.pth``, ``OUTDIR/sam2.1_hiera_tiny.pt`` and
``OUTDIR/dinov2_vits14_pretrain.pth``; SAM 2 family files (``sam2.1_hiera_*``, ``sam2_hiera_*``,
``medsam2``) are ``{"model": state_dict}`` with the memory modules' keys too, as released; point
``REFSEG_CHECKPOINT_DIR`` at OUTDIR or pass the paths explicitly. The same seed gives the same
tensors on every machine.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

from refseg.io.writers import new_file_mode
from refseg.models import dinov2 as dinov2_mod
from refseg.models import sam as sam_mod
from refseg.models import sam2 as sam2_mod
from refseg.models.sam2_state_dict import random_sam2_state_dict

log = logging.getLogger(__name__)


def _save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, new_file_mode())  # mkstemp's 0600 -> the umask's normal mode
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
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


def write_random_checkpoints(outdir: str | os.PathLike, sam: list[str] = (), dinov2: list[str] = (),
                             seed: int = 0, safetensors: bool = False) -> list[Path]:
    """Write one file per requested model into ``outdir`` under its official file name.

    Returns:
        The written paths, SAM first.
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
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refseg.testing.random_checkpoints",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--sam", nargs="*", default=[], choices=sorted(sam_mod.SAM_SPECS) + sorted(sam2_mod.SAM2_SPECS))
    parser.add_argument("--dinov2", nargs="*", default=[], choices=sorted(dinov2_mod.DINOV2_SPECS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--safetensors", action="store_true", help="write .safetensors files instead")
    args = parser.parse_args(argv)
    if not args.sam and not args.dinov2:
        parser.error("name at least one model with --sam and/or --dinov2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in write_random_checkpoints(args.outdir, args.sam, args.dinov2, args.seed, args.safetensors):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
