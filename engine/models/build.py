"""Build DINOv2, DINOv3 and SAM from official checkpoint files (or official names looked up on disk)."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, load_state_dict, resolve_checkpoint, unwrap_state_dict
from .dinov2 import DINOV2_SPECS, dinov2_from_state_dict, infer_dinov2_name
from .dinov3 import DINOV3_SPECS, dinov3_from_state_dict, infer_dinov3_name
from .dinov3_hf import CONFIG_NAME, is_hf_layout, load_hf_folder
from .sam import SAM_SPECS, infer_sam_spec, sam_from_state_dict
from .sam2 import SAM2_SPECS
from .sam2 import get_spec as sam2_get_spec
from .sam2_state_dict import infer_sam2_name, is_sam2_state_dict, sam2_from_state_dict

log = logging.getLogger(__name__)

DEFAULT_DINOV2 = "vitb14"
DEFAULT_SAM = "vit_b"
DEFAULT_DINOV3 = "vitb16"
DEFAULT_SAM2 = "sam2.1_hiera_t"

PathLike = str | os.PathLike


MEDSAM_FILE_PREFIX = "medsam"
"""A SAM checkpoint whose file name starts with this (case-insensitive), e.g. the released
``medsam_vit_b.pth``, is MedSAM: same layout as SAM ViT-B, its own pre-processing."""


def sam_name_from_file(checkpoint: PathLike) -> str | None:
    """``"medsam"`` for a MedSAM file name (:data:`MEDSAM_FILE_PREFIX`), else None (infer from the weights)."""
    return "medsam" if os.path.basename(os.fspath(checkpoint)).lower().startswith(MEDSAM_FILE_PREFIX) else None


def _build(kind: str, specs: dict, default: str, from_state_dict, name: str | None,
           checkpoint: PathLike | None, download: bool) -> nn.Module:
    if name is not None and name not in specs:
        raise ValueError(f"unknown {kind} model {name!r}; choose one of {', '.join(specs)}")
    if kind == "SAM" and name is None and checkpoint is not None:
        name = sam_name_from_file(checkpoint)
    if checkpoint is None:
        name = name or default
        checkpoint = resolve_checkpoint(specs[name].checkpoint, download=download)
    path = os.fspath(checkpoint)
    state = load_state_dict(path)
    family = checkpoint_family(state)
    if family != kind:
        raise CheckpointError(f"{path}: this is a {family} checkpoint, not a {kind} one")
    model = from_state_dict(state, name=name, source=path)
    log.info("%s %s loaded from %s", kind, model.spec.name, path)
    return model.eval()


def checkpoint_family(state: dict) -> str:
    """``"SAM"`` (ViT: SAM, MedSAM), ``"SAM 2"`` (Hiera: SAM 2, SAM 2.1, MedSAM2), ``"DINOv3"`` (official
    or Hugging Face keys) or ``"DINOv2"``, read off the keys of a state dict."""
    if "image_encoder.pos_embed" in state:
        return "SAM"
    if is_sam2_state_dict(state):
        return "SAM 2"
    return "DINOv3" if _is_dinov3(state) else "DINOv2"


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
            is ``medsam`` for a file named ``medsam*`` (e.g. ``medsam_vit_b.pth``), else inferred
            from ``checkpoint`` (or defaults to ``vit_b``).
        checkpoint: path to an official ``sam_vit_*.pth`` / MedSAM file (or ``.safetensors``).
            When ``None`` the official file is looked up / downloaded as for :func:`build_dinov2`.
        download: allow the download.

    Raises:
        CheckpointError: missing/unreadable file, or a checkpoint of another model or size.
    """
    return _build("SAM", SAM_SPECS, DEFAULT_SAM, sam_from_state_dict, name, checkpoint, download)


def _is_dinov3(state: dict) -> bool:
    return "rope_embed.periods" in state or "storage_tokens" in state or is_hf_layout(state)


def _hf_folder(path: Path) -> Path | None:
    """The Hugging Face folder ``path`` is, or whose ``model.safetensors`` it is; None for a single file."""
    if path.is_dir():
        return path
    return path.parent if path.suffix == ".safetensors" and (path.parent / CONFIG_NAME).is_file() else None


def _official_dinov3_name(state: dict, path: Path) -> str:
    """The model name of official-key DINOv3 weights read from ``path``; refuses hub weights without their
    ``config.json`` and other families (naming the file)."""
    if is_hf_layout(state):
        raise CheckpointError(f"{path}: Hugging Face DINOv3 weights need their {CONFIG_NAME}: pass the folder "
                              f"that holds both")
    family = checkpoint_family(state)
    if family != "DINOv3":
        raise CheckpointError(f"{path}: this is a {family} checkpoint, not a DINOv3 one")
    return infer_dinov3_name(state, str(path))


def _dinov3_state(path: Path) -> tuple[dict, str]:
    """(official-key state dict, inferred model name) of a DINOv3 file or Hugging Face folder."""
    folder = _hf_folder(path)
    if folder is not None:
        return load_hf_folder(folder)
    state = load_state_dict(path)
    return state, _official_dinov3_name(state, path)


def build_dinov3(name: str | None = None, checkpoint: PathLike | None = None) -> nn.Module:
    """Build a DINOv3 ViT backbone with official weights, in eval mode on the CPU.

    Args:
        name: ``vits16``, ``vits16plus``, ``vitb16``, ``vitl16``, ``vitl16_sat493m`` or ``vith16plus``.
            When ``None`` it is inferred from ``checkpoint`` (or defaults to ``vitb16``); when both are
            given they must agree.
        checkpoint: an official ``dinov3_*_pretrain_*.pth`` file (or a ``.safetensors`` with the same
            keys), or a Hugging Face folder (``config.json`` + ``model.safetensors``, e.g. a download of
            ``facebook/dinov3-vitb16-pretrain-lvd1689m``) or its ``model.safetensors``. When ``None``
            the official file name for ``name``, then the hub folder name, is looked up in
            ``$REFSEG_CHECKPOINT_DIR`` then ``~/.cache/refseg``. DINOv3 weights are gated (licence
            to accept): they are never downloaded.

    Returns:
        The module; ``forward_features(x)`` takes (B, 3, H, W) ImageNet-normalised images with H, W
        multiples of 16 and returns ``x_norm_clstoken``, ``x_norm_regtokens``, ``x_norm_patchtokens``
        (patches only), ``x_prenorm``, ``masks`` like :func:`build_dinov2`'s.

    Raises:
        CheckpointError: missing/unreadable file or folder, a checkpoint of another model or size
            (message names the file), keys that do not fit.
        ValueError: unknown ``name``.
    """
    if name is not None and name not in DINOV3_SPECS:
        raise ValueError(f"unknown DINOv3 model {name!r}; choose one of {', '.join(DINOV3_SPECS)}")
    source = DINOV3_SPECS[name or DEFAULT_DINOV3].checkpoint
    path = resolve_checkpoint(source, checkpoint, download=False)
    state, found = _dinov3_state(path)
    if name is not None and name != found:
        raise CheckpointError(f"{path} holds DINOv3 {found}, not {name}; drop the name to use the checkpoint's "
                              "model, or give the checkpoint of the model named")
    model = dinov3_from_state_dict(state, name=found, source=str(path))
    log.info("DINOv3 %s loaded from %s", found, path)
    return model


def build_sam2(name: str | None = None, checkpoint: PathLike | None = None,
               download: bool = True, image_size: int | None = None) -> nn.Module:
    """Build SAM 2 / SAM 2.1 / MedSAM2 for images (Hiera encoder + neck, prompt encoder, mask decoder)
    with official weights, eval mode, CPU.

    Args:
        name: ``sam2.1_hiera_{t,s,b+,l}``, ``sam2_hiera_{t,s,b+,l}`` or ``medsam2``. When ``None`` it is
            ``medsam2`` for a file named ``MedSAM2*``, else inferred from ``checkpoint`` (or defaults to
            ``sam2.1_hiera_t``).
        checkpoint: an official ``sam2.1_hiera_*.pt`` / ``sam2_hiera_*.pt`` / ``MedSAM2_*.pt`` file
            (weights under ``"model"``). When ``None`` the official file is looked up / downloaded as
            for :func:`build_dinov2`.
        download: allow the download.
        image_size: the square input side, a multiple of 32 (default: the model's, 1024; MedSAM2 512). SAM 2
            runs at other sizes (the official ``image_size`` setting): smaller is faster and coarser.

    Raises:
        CheckpointError: missing/unreadable file, a checkpoint of another model, or any key or shape
            that does not fit (the memory modules' keys included; see ``refseg.models.sam2_state_dict``).
        ValueError: unknown name, or an image size that is not a positive multiple of 32.
    """
    if image_size is not None and (image_size <= 0 or image_size % 32):
        raise ValueError(f"SAM 2 image_size must be a positive multiple of 32, got {image_size}")

    def load(state: dict, name: str | None, source: str) -> nn.Module:
        spec = sam2_get_spec(name or infer_sam2_name(unwrap_state_dict(state, source), source))
        if image_size is not None:
            spec = dataclasses.replace(spec, image_size=image_size)
        return sam2_from_state_dict(state, spec, source)

    return _build("SAM 2", SAM2_SPECS, DEFAULT_SAM2, load, name, checkpoint, download)


SAM_FAMILY_SPECS = {**SAM_SPECS, **SAM2_SPECS}
"""Every name ``--sam`` / ``SegmenterConfig.sam`` takes: SAM (ViT), MedSAM, SAM 2 / 2.1 and MedSAM2."""


def build_sam_family(name: str | None = None, checkpoint: PathLike | None = None, *,
                     image_size: int | None = None, download: bool = True) -> nn.Module:
    """SAM (:func:`build_sam`) or SAM 2 (:func:`build_sam2`), whichever the checkpoint holds.

    The family comes from the checkpoint's keys (a ViT image encoder: SAM, MedSAM; a Hiera trunk: SAM 2,
    SAM 2.1, MedSAM2), or from ``name`` when no checkpoint is given. ``name`` must then be one of that
    family's names (or None: inferred from the file).

    Args:
        image_size: SAM 2's square input side (see :func:`build_sam2`); SAM (ViT) takes none.

    Raises:
        CheckpointError: as the builders, or a ``name`` of the other family (the message names both).
        ValueError: unknown name; ``image_size`` for a SAM (ViT) model.
    """
    if name is not None and name not in SAM_FAMILY_SPECS:
        raise ValueError(f"unknown SAM model {name!r}; choose one of {', '.join(SAM_FAMILY_SPECS)}")
    if checkpoint is not None:
        family = checkpoint_family(_peek_state_dict(Path(checkpoint)))
    else:
        family = "SAM 2" if (name or DEFAULT_SAM) in SAM2_SPECS else "SAM"
    if family not in ("SAM", "SAM 2"):
        raise CheckpointError(f"{checkpoint}: this is a {family} checkpoint, not a SAM-family one")
    wanted = None if name is None else ("SAM 2" if name in SAM2_SPECS else "SAM")
    if wanted is not None and wanted != family:
        raise CheckpointError(f"{checkpoint}: this is a {family} checkpoint, not {wanted} {name!r}; drop the "
                              "name to use the checkpoint's model, or give the checkpoint of the model named")
    if family == "SAM 2":
        return build_sam2(name, checkpoint, download, image_size)
    if image_size is not None:
        raise ValueError(f"a SAM input side ({image_size}) is for SAM 2 models only; SAM (ViT) takes its "
                         "checkpoint's (1024)")
    return build_sam(name, checkpoint, download)


def _layout(spec) -> tuple:
    """The architecture fields of a spec (everything but its name and checkpoint source)."""
    fields = dataclasses.asdict(spec)
    fields.pop("name", None)
    fields.pop("checkpoint", None)
    return tuple(sorted(fields.items()))


ENCODERS = {"dinov2": ("DINOv2", DINOV2_SPECS, DEFAULT_DINOV2), "dinov3": ("DINOv3", DINOV3_SPECS, DEFAULT_DINOV3)}
"""The matching encoders: config name -> (display name, specs, default model)."""


def _trunk(spec) -> tuple:
    """A SAM 2 spec's weights layout: :func:`_layout` without the input side, which the weights do not fix
    (``medsam2`` fits any SAM 2.1 tiny file, as ``medsam`` fits any SAM ViT-B one)."""
    return tuple(item for item in _layout(spec) if item[0] != "image_size")


def resolve_model_checkpoints(encoder_model: str | None = None, sam: str | None = None,
                              encoder_checkpoint: PathLike | None = None, sam_checkpoint: PathLike | None = None,
                              download: bool = True, encoder: str = "dinov2") -> tuple[Path, Path]:
    """Locate both checkpoints (the matching encoder's and SAM's) before either is read; every problem is
    reported in one error.

    ``encoder_model`` / ``sam`` are model names (default ``vitb14`` or ``vitb16`` / ``vit_b``; ``sam`` may name a
    SAM 2 model) whose official file is looked up (``$REFSEG_CHECKPOINT_DIR``, ``~/.cache/refseg``; for DINOv3
    also its Hugging Face folder) when no explicit file is given. Nothing is downloaded while an explicit file or a gated one (DINOv3: never
    downloaded) is missing; then missing official files are downloaded (``download``).

    Returns:
        (encoder file or folder, sam file).

    Raises:
        CheckpointError: listing every missing file and where to put it. ValueError: unknown name or encoder.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    kind, specs, default = ENCODERS[encoder]
    requests = []
    for kind, specs, default, name, explicit in ((kind, specs, default, encoder_model, encoder_checkpoint),
                                                 ("SAM", SAM_FAMILY_SPECS, DEFAULT_SAM, sam, sam_checkpoint)):
        name = name or default
        if name not in specs:
            raise ValueError(f"unknown {kind} model {name!r}; choose one of {', '.join(specs)}")
        requests.append((kind, specs[name].checkpoint, explicit))
    found: list[Path | None] = []
    problems: list[str] = []
    for kind, source, explicit in requests:  # pass 1: local files only
        try:
            found.append(resolve_checkpoint(source, explicit, download=False))
        except CheckpointError as exc:
            found.append(None)
            problems.append(f"{kind}: {exc}")
    # a missing explicit or gated file cannot be fixed by downloading the others: report before any download
    hopeless = any(p is None and (explicit is not None or source.url is None)
                   for p, (_, source, explicit) in zip(found, requests))
    if problems and (hopeless or not download):
        raise CheckpointError(f"{len(problems)} checkpoint(s) missing:\n  " + "\n  ".join(problems))
    problems = []
    for i, (kind, source, explicit) in enumerate(requests):  # pass 2: download the official files
        if found[i] is None:
            try:
                found[i] = resolve_checkpoint(source, None, download=True)
            except CheckpointError as exc:
                problems.append(f"{kind}: {exc}")
    if problems:
        raise CheckpointError(f"{len(problems)} checkpoint(s) missing:\n  " + "\n  ".join(problems))
    return found[0], found[1]


def _peek_state_dict(path: Path) -> dict:
    """Keys and shapes of a checkpoint without reading its weights where the format allows it
    (memory-mapped zip checkpoints, safetensors); other files are read in full."""
    if path.suffix != ".safetensors":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return unwrap_state_dict(obj, path)
        except CheckpointError:
            raise
        except Exception:  # legacy (non-zip) format: mmap is not possible
            pass
    return load_state_dict(path)


def peek_dinov3_name(path: PathLike) -> str:
    """The DINOv3 model a file or Hugging Face folder holds, read from its ``config.json`` or its keys and
    shapes (memory-mapped where the format allows), without building the model.

    Raises:
        CheckpointError: not a DINOv3 checkpoint (the message names the file and what it is).
    """
    path = Path(path)
    folder = _hf_folder(path)
    if folder is not None:
        from .dinov3_hf import read_config, spec_from_config

        return spec_from_config(read_config(folder), str(folder)).name
    return _official_dinov3_name(_peek_state_dict(path), path)


def sam2_checkpoint_name(path: PathLike, name: str | None = None) -> str:
    """The SAM 2 model name of the checkpoint ``path`` (read without its weights where the format allows).

    Raises:
        CheckpointError: the file is not a SAM 2 / 2.1 / MedSAM2 checkpoint (naming the SAM 2 models), or
            ``name`` contradicts it (``medsam2`` fits any SAM 2.1 tiny file).
    """
    state = _peek_state_dict(Path(path))
    family = checkpoint_family(state)
    if family != "SAM 2":
        raise CheckpointError(f"{path} is a {family} checkpoint; SAM 2 memory needs a SAM 2 / 2.1 / MedSAM2 "
                              f"checkpoint: {', '.join(SAM2_SPECS)}")
    found = infer_sam2_name(state, os.fspath(path))
    fits = name in (None, found) or (name in SAM2_SPECS and _trunk(SAM2_SPECS[found]) == _trunk(SAM2_SPECS[name]))
    if not fits:
        raise CheckpointError(f"--sam {name} contradicts {path}, which holds {found}; drop the name to use the "
                              f"checkpoint's model, or give the checkpoint of the model named")
    return name or found


def check_model_names(encoder_model: str | None, sam: str | None, encoder_checkpoint: PathLike,
                      sam_checkpoint: PathLike, encoder: str = "dinov2") -> None:
    """Refuse model names given explicitly (``--dinov2`` / ``--dinov3`` / ``--sam``) that contradict the
    architecture of the checkpoint (a DINOv3 checkpoint also refuses being anything else). ``medsam`` fits
    any SAM ViT-B-layout file (MedSAM is a ViT-B fine-tune), ``medsam2`` any SAM 2.1 tiny one; a SAM 2 name
    needs a SAM 2 file and a SAM name a SAM file.

    Raises:
        CheckpointError: naming the file, its architecture and the name asked for.
    """
    problems = []
    if encoder == "dinov3":
        found = peek_dinov3_name(encoder_checkpoint)  # also refuses a file of another family
        if encoder_model is not None and found != encoder_model:
            problems.append(f"--dinov3 {encoder_model} contradicts {encoder_checkpoint}, which holds DINOv3 {found}")
    elif encoder_model is not None:
        state = _peek_state_dict(Path(encoder_checkpoint))
        family = checkpoint_family(state)
        if family != "DINOv2":
            problems.append(f"{encoder_checkpoint} is a {family} checkpoint, not DINOv2 {encoder_model!r}")
        else:
            found = infer_dinov2_name(state, os.fspath(encoder_checkpoint))
            if found != encoder_model:
                problems.append(f"--dinov2 {encoder_model} contradicts {encoder_checkpoint}, which holds DINOv2 "
                                f"{found}")
    if sam is not None:
        state = _peek_state_dict(Path(sam_checkpoint))
        family = checkpoint_family(state)
        if sam in SAM2_SPECS:
            if family != "SAM 2":
                problems.append(f"{sam_checkpoint} is a {family} checkpoint, not SAM 2 {sam!r}")
            else:
                found = infer_sam2_name(state, os.fspath(sam_checkpoint))
                if _trunk(SAM2_SPECS[found]) != _trunk(SAM2_SPECS[sam]):
                    problems.append(f"--sam {sam} contradicts {sam_checkpoint}, which holds SAM 2 {found}")
        elif family == "SAM 2":
            problems.append(f"{sam_checkpoint} is a SAM 2 checkpoint, not SAM {sam!r}")
        elif "image_encoder.pos_embed" not in state:
            problems.append(f"{sam_checkpoint} is not a SAM checkpoint (asked for SAM {sam!r})")
        else:
            spec = infer_sam_spec(state, os.fspath(sam_checkpoint))
            if _layout(spec) != _layout(SAM_SPECS[sam]):
                found = spec.name if spec.name != "custom" else (
                    f"a custom layout (width {spec.embed_dim}, depth {spec.depth})")
                problems.append(f"--sam {sam} contradicts {sam_checkpoint}, which holds SAM {found}")
    if problems:
        raise CheckpointError("; ".join(problems) + "; drop the name to use the checkpoint's model, or give "
                              "the checkpoint of the model named")
