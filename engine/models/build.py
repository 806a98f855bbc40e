"""Build DINOv2 and SAM from official checkpoint files (or official names looked up on disk)."""
from __future__ import annotations

import logging
import os

from torch import nn

from .checkpoints import CheckpointError, load_state_dict, resolve_checkpoint
from .dinov2 import DINOV2_SPECS, dinov2_from_state_dict
from .sam import SAM_SPECS, sam_from_state_dict

log = logging.getLogger(__name__)

DEFAULT_DINOV2 = "vitb14"
DEFAULT_SAM = "vit_b"

PathLike = str | os.PathLike


def _build(kind: str, specs: dict, default: str, from_state_dict, name: str | None,
           checkpoint: PathLike | None, download: bool) -> nn.Module:
    if name is not None and name not in specs:
        raise ValueError(f"unknown {kind} model {name!r}; choose one of {', '.join(specs)}")
    if checkpoint is None:
        name = name or default
        checkpoint = resolve_checkpoint(specs[name].checkpoint, download=download)
    path = os.fspath(checkpoint)
    state = load_state_dict(path)
    is_sam = "image_encoder.pos_embed" in state
    if is_sam != (kind == "SAM"):
        other = "SAM" if is_sam else "DINOv2"
        raise CheckpointError(f"{path}: this is a {other} checkpoint, not a {kind} one")
    model = from_state_dict(state, name=name, source=path)
    log.info("%s %s loaded from %s", kind, model.spec.name, path)
    return model.eval()


def build_dinov2(name: str | None = None, checkpoint: PathLike | None = None,
                 download: bool = True) -> nn.Module:
    """Build a DINOv2 backbone with official weights, in eval mode on the CPU.

    Args:
        name: ``vits14``, ``vitb14``, ``vitl14``, ``vitg14`` or their ``*_reg`` variants. When
            ``None`` it is inferred from ``checkpoint`` (or defaults to ``vitb14``).
        checkpoint: path to an official ``dinov2_*_pretrain.pth`` (or ``.safetensors``) file.
            When ``None`` the official file name for ``name`` is looked up in
            ``$REFSEG_CHECKPOINT_DIR`` then ``~/.cache/refseg`` and downloaded if missing.
        download: allow the download.

    Returns:
        The module; ``forward_features(x)`` takes (B, 3, H, W) ImageNet-normalised images with H, W
        multiples of 14 and returns the official dict (``x_norm_clstoken``, ``x_norm_patchtokens``,
        ``x_prenorm``, ...).

    Raises:
        CheckpointError: missing/unreadable file, or a checkpoint of another model or size.
    """
    return _build("DINOv2", DINOV2_SPECS, DEFAULT_DINOV2, dinov2_from_state_dict, name, checkpoint, download)


def build_sam(name: str | None = None, checkpoint: PathLike | None = None,
              download: bool = True) -> nn.Module:
    """Build SAM (image encoder, prompt encoder, mask decoder) with official weights, eval mode, CPU.

    Args:
        name: ``vit_b``, ``vit_l``, ``vit_h`` or ``medsam`` (SAM ViT-B layout). When ``None`` it
            is inferred from ``checkpoint`` (or defaults to ``vit_b``).
        checkpoint: path to an official ``sam_vit_*.pth`` / MedSAM file (or ``.safetensors``).
            When ``None`` the official file is looked up / downloaded as for :func:`build_dinov2`.
        download: allow the download.

    Raises:
        CheckpointError: missing/unreadable file, or a checkpoint of another model or size.
    """
    return _build("SAM", SAM_SPECS, DEFAULT_SAM, sam_from_state_dict, name, checkpoint, download)
