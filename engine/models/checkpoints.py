"""Checkpoint files: finding them, reading them safely, and loading them strictly.

Official file names and key names are used throughout (``sam_vit_b_01ec64.pth``,
``dinov2_vitb14_pretrain.pth``, ...), so a checkpoint downloaded from the official release works
as it is. Reading uses ``torch.load(weights_only=True)`` (no pickle code execution) or
``safetensors``.

Lookup order for a checkpoint: explicit path > ``$REFSEG_CHECKPOINT_DIR/<file>`` >
``~/.cache/refseg/<file>``; when missing and the network is reachable, the official URL is
downloaded into the cache with sha256 verification and an atomic rename.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from refseg.io.writers import atomic_writer

log = logging.getLogger(__name__)

CHECKPOINT_DIR_ENV = "REFSEG_CHECKPOINT_DIR"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model asked for."""


@dataclass(frozen=True)
class CheckpointSource:
    """Where an official checkpoint comes from.

    ``sha256`` is the full digest when it is known; otherwise ``sha256_prefix`` (the hex digits
    that the official file name carries, e.g. ``01ec64`` in ``sam_vit_b_01ec64.pth``) is checked.
    ``folder`` names a Hugging Face snapshot folder (``config.json`` + ``model.safetensors``) that is
    accepted in place of the file (DINOv3). ``access`` marks gated weights: the page where the user
    accepts the licence; such files are never downloaded automatically (``url`` is None).
    """

    filename: str
    url: str | None
    sha256: str | None = None
    sha256_prefix: str | None = None
    folder: str | None = None
    access: str | None = None


def cache_dir() -> Path:
    """The download cache: ``~/.cache/refseg`` (``$XDG_CACHE_HOME/refseg`` when set)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "refseg"


def search_dirs() -> list[Path]:
    """Folders searched for a checkpoint by file name, in order."""
    dirs = []
    env = os.environ.get(CHECKPOINT_DIR_ENV)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(cache_dir())
    return dirs


def find_checkpoint(source: CheckpointSource) -> Path | None:
    """Return the first existing ``source.filename`` in :func:`search_dirs` (or, when ``source.folder``
    is set, the first such folder holding a ``config.json``), or ``None``."""
    for folder in search_dirs():
        path = folder / source.filename
        if path.is_file():
            return path
        if source.folder and (folder / source.folder / "config.json").is_file():
            return folder / source.folder
    return None


def _missing_message(source: CheckpointSource, where: str) -> str:
    if source.access:
        folders = " or ".join(str(d / source.folder) for d in search_dirs()) if source.folder else None
        return (f"checkpoint {source.filename} not found. These weights are gated: accept the licence at "
                f"{source.access} (or on the Hugging Face hub), download {source.filename} and put it at "
                f"{where}" + (f", or put the Hugging Face folder (config.json + model.safetensors) at "
                              f"{folders}" if folders else "")
                + f"; or pass the path explicitly / set {CHECKPOINT_DIR_ENV}. refseg never downloads them")
    return (f"checkpoint {source.filename} not found; put it at {where} "
            f"(or pass the path explicitly / set {CHECKPOINT_DIR_ENV})"
            + (f"; official URL: {source.url}" if source.url else ""))


def resolve_checkpoint(source: CheckpointSource, explicit: str | os.PathLike | None = None,
                       download: bool = True) -> Path:
    """Locate a checkpoint file, downloading it from the official URL if allowed and possible.

    Raises:
        CheckpointError: the explicit path does not exist, or the file is nowhere to be found and
            cannot be downloaded; the message says which file to put where.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if source.folder and path.is_dir():
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{path}: folder has no config.json (expected a Hugging Face snapshot "
                                      "folder: config.json + model.safetensors)")
            return path
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file does not exist")
        return path
    found = find_checkpoint(source)
    if found is not None:
        return found
    where = " or ".join(str(d / source.filename) for d in search_dirs())
    if not download or source.url is None:
        raise CheckpointError(_missing_message(source, where))
    try:
        return download_checkpoint(source, cache_dir())
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CheckpointError(
            f"checkpoint {source.filename} not found and could not be downloaded from {source.url} "
            f"({exc}); offline, download it elsewhere and put it at {where}") from exc


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint consists of: the file itself, or for a Hugging Face folder (DINOv3) its
    ``config.json``, ``*.safetensors`` and ``*.safetensors.index.json`` in name order (README and the like
    do not count)."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and (p.name == "config.json" or p.name.endswith(
        (".safetensors", ".safetensors.index.json"))))


def file_identity(path: str | os.PathLike | None, with_sha256: bool = False) -> dict | None:
    """``{"path", "file", "size", "mtime_ns"}`` (plus ``"sha256"`` when asked) of a checkpoint file or
    Hugging Face folder, or ``None`` for ``None``: how export cache keys, export manifests and run fingerprints
    name a checkpoint (each keeps the fields it needs). A folder's size is its files' total, its mtime their
    latest, its sha256 that of the lines ``<name> <sha256>`` of :func:`checkpoint_files`."""
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    files = checkpoint_files(path)
    stats = [f.stat() for f in files]
    record = {"path": str(path), "file": path.name, "size": sum(st.st_size for st in stats),
              "mtime_ns": max((st.st_mtime_ns for st in stats), default=path.stat().st_mtime_ns)}
    if with_sha256:
        record["sha256"] = (sha256_file(path) if not path.is_dir() else hashlib.sha256("".join(
            f"{f.name} {sha256_file(f)}\n" for f in files).encode()).hexdigest())
    return record


def verify_sha256(path: Path, source: CheckpointSource) -> None:
    """Raise :class:`CheckpointError` when ``path`` does not carry the expected digest."""
    _check_digest(sha256_file(path), source, path)


def _check_digest(actual: str, source: CheckpointSource, path: Path) -> None:
    if source.sha256 is None and source.sha256_prefix is None:
        # DINOv2's release publishes no digest: the strict key/shape load is the remaining check.
        log.warning("%s: no official sha256 to verify against; got %s", source.filename, actual)
        return
    expected = source.sha256 or source.sha256_prefix
    if not actual.startswith(expected):
        raise CheckpointError(f"{path}: sha256 {actual} does not match the official {expected}")


def download_checkpoint(source: CheckpointSource, folder: Path, timeout: float = 30.0) -> Path:
    """Download ``source.url`` into ``folder`` with sha256 verification and an atomic rename."""
    final = folder / source.filename
    log.info("downloading %s -> %s", source.url, final)
    digest = hashlib.sha256()
    with atomic_writer(final) as out, urllib.request.urlopen(source.url, timeout=timeout) as resp:
        for block in iter(lambda: resp.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
        _check_digest(digest.hexdigest(), source, final)  # raising here leaves no file behind
    return final


def unwrap_state_dict(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``obj`` as a ``{key: tensor}`` dict, unwrapping ``{"model" | "state_dict" | "teacher": sd}``.

    Raises:
        CheckpointError: naming ``path``, when no state dict of tensors is found.
    """
    # Some redistributions (MedSAM, fine-tunes) wrap the weights: {"model": sd} or {"state_dict": sd}.
    if isinstance(obj, Mapping) and obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "teacher"):
            if isinstance(obj.get(key), Mapping):
                return unwrap_state_dict(obj[key], path)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a ``{key: tensor}`` dict on the CPU.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: missing, empty, truncated or otherwise unreadable file, or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty (0 bytes)")
    try:
        if path.suffix == ".safetensors":
            from refseg.optional import require
            safetensors_torch = require("safetensors.torch", extra="io", purpose="reading .safetensors")
            obj = safetensors_torch.load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # torch/safetensors raise many types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or not a checkpoint?): "
                              f"{type(exc).__name__}: {exc}") from exc
    return unwrap_state_dict(obj, path)


def _list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly copy ``state_dict`` into ``module``.

    Raises:
        CheckpointError: naming ``source`` and listing missing keys, unexpected keys and shape
            mismatches (all three are checked before anything is copied).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_list(shapes, 6)}")
        raise CheckpointError(f"{source}: checkpoint does not fit {type(module).__name__} "
                              f"({'; '.join(parts)})")
    module.load_state_dict(state_dict, strict=True)


# SAM 2 / SAM 2.1 (Meta) and MedSAM2 (bowang-lab, on Hugging Face): neither release publishes
# digests, so these files are checked by the strict key/shape load alone (a warning logs the digest).
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
_SAM2_1_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_MEDSAM2_URL = "https://huggingface.co/wanglab/MedSAM2/resolve/main/"

SAM2_CHECKPOINTS: dict[str, CheckpointSource] = {
    **{f"sam2.1_hiera_{short}": CheckpointSource(f"sam2.1_hiera_{size}.pt", f"{_SAM2_1_URL}sam2.1_hiera_{size}.pt")
       for short, size in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))},
    **{f"sam2_hiera_{short}": CheckpointSource(f"sam2_hiera_{size}.pt", f"{_SAM2_URL}sam2_hiera_{size}.pt")
       for short, size in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large"))},
    "medsam2": CheckpointSource("MedSAM2_latest.pt", f"{_MEDSAM2_URL}MedSAM2_latest.pt"),
}
"""Official SAM 2 family checkpoint files by refseg model name (see ``refseg.models.sam2.SAM2_SPECS``)."""
