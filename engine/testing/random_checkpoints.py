"""Write deterministic random-initialised checkpoints in the official formats and file names.

Every refseg command can then run offline (smoke runs: the masks mean nothing)::

    python -m refseg.testing.random_checkpoints OUTDIR --sam vit_b --dinov2 vits14

writes ``OUTDIR/sam_vit_b_01ec64.pth`` and ``OUTDIR/dinov2_vits14_pretrain.pth``; point
``REFSEG_CHECKPOINT_DIR`` at OUTDIR or pass the paths explicitly. The same seed gives the same
tensors on every machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

import torch

from refseg.io.writers import atomic_write_bytes, atomic_writer
from refseg.models import dinov2 as dinov2_mod
from refseg.models import sam as sam_mod

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


def write_random_checkpoints(outdir: str | os.PathLike, sam: list[str] = (), dinov2: list[str] = (),
                             seed: int = 0, safetensors: bool = False) -> list[Path]:
    """Write one file per requested model into ``outdir`` under its official file name.

    Returns:
        The written paths, SAM first.
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
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refseg.testing.random_checkpoints",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--sam", nargs="*", default=[], choices=sorted(sam_mod.SAM_SPECS))
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
