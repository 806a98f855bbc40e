"""Read and verify an export folder's ``manifest.json`` before a backend runs it.

:mod:`refseg.export` writes the folder (graphs named by :mod:`refseg.runtime.io_names`, the
manifest last); this module only reads. :func:`verify_manifest` refuses (``ManifestError``, a
``ValueError``) a folder without a manifest, a manifest of another format, one that does not match
the request (encoder, models, precision, image size, checkpoints) or whose files are missing or differ from
their recorded size / checksum.

The matching encoder's graph is ``graphs.dinov2`` (``dinov2.onnx``) whichever encoder it holds: the manifest's
``encoder`` (``"dinov2"`` / ``"dinov3"``) and ``patch_size`` say which, ``models.<encoder>`` its model and
``checkpoints.<encoder>`` its source. Manifests written before DINOv3 have neither key: :func:`encoder_of`
reads them as DINOv2 with 14-px patches.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from refseg.config import ENCODER_PATCH_SIZE
from refseg.models.checkpoints import file_identity, sha256_file
from refseg.runtime.io_names import FORMAT_VERSION, GRAPH_FILES, MANIFEST_NAME

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """An export folder cannot be used for the request (the message says which file and why)."""


def _same_checkpoint(recorded: dict, path: str | os.PathLike) -> bool:
    """True when ``path`` (a file, or a Hugging Face folder) is the checkpoint ``recorded`` describes."""
    identity = file_identity(path)
    if identity["size"] != recorded.get("size"):
        return False
    if identity["path"] == recorded.get("path") and identity["mtime_ns"] == recorded.get("mtime_ns"):
        return True  # same file untouched since the export: skip hashing gigabytes
    if Path(path).is_dir():
        return file_identity(path, with_sha256=True)["sha256"] == recorded.get("sha256")
    return sha256_file(path) == recorded.get("sha256")


def read_manifest(folder: str | os.PathLike) -> dict:
    """Parse ``folder/manifest.json``.

    Raises:
        ManifestError: missing, unreadable, or of another format version.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no export manifest; create the folder with "
                            f"`refseg export --dinov2-checkpoint ... --sam-checkpoint ... -o {folder}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ManifestError(f"{path}: manifest format {found!r}, this refseg reads format "
                            f"{FORMAT_VERSION}; export again")
    for key in ("graphs", "files", "precision", "image_size", "models"):
        if key not in manifest:
            raise ManifestError(f"{path}: manifest lacks {key!r}; export again")
    return manifest


def encoder_of(manifest: dict) -> tuple[str, int]:
    """(encoder, patch size) of an export: ``("dinov2", 14)`` for manifests that predate the fields."""
    encoder = manifest.get("encoder", "dinov2")
    return encoder, int(manifest.get("patch_size", ENCODER_PATCH_SIZE.get(encoder, 14)))


def verify_manifest(folder: str | os.PathLike, *, precision: str | None = None,
                    image_size: int | None = None, dinov2: str | None = None,
                    sam: str | None = None, dinov2_checkpoint: str | os.PathLike | None = None,
                    sam_checkpoint: str | os.PathLike | None = None,
                    graphs: tuple[str, ...] = tuple(GRAPH_FILES), check_files: bool = True,
                    full_check: bool = False, encoder: str | None = None, dinov3: str | None = None,
                    dinov3_checkpoint: str | os.PathLike | None = None) -> dict:
    """Read the manifest of ``folder`` and check it against the request; return it.

    ``encoder`` (``dinov2`` / ``dinov3``) must be the export's, with that encoder's patch size; ``dinov2`` /
    ``dinov3`` name its model, ``dinov2_checkpoint`` / ``dinov3_checkpoint`` its source (file or folder).

    Every argument left None is not checked. Checkpoints match when they are the recorded file
    (same path, size and modification time) or have the recorded sha256. Export files are checked by
    size and modification time (no re-hash of multi-GB graphs at every start); a file whose mtime
    differs from the record, or every file when ``full_check`` is True, is re-hashed against its sha256.

    Raises:
        ManifestError: naming the folder and each mismatch (requested vs recorded), a missing
            graph, or a file whose size/sha256 differs from the manifest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    exported_encoder, patch = encoder_of(manifest)
    for key, want, have in (("encoder", encoder, exported_encoder),
                            ("patch_size", None if encoder is None else ENCODER_PATCH_SIZE.get(encoder), patch),
                            ("precision", precision, manifest["precision"]),
                            ("image_size", image_size, manifest["image_size"]),
                            ("dinov2 model", dinov2, manifest["models"].get("dinov2")),
                            ("dinov3 model", dinov3, manifest["models"].get("dinov3")),
                            ("sam model", sam, manifest["models"].get("sam"))):
        if want is not None and want != have:
            problems.append(f"{key}: requested {want!r}, exported {have!r}")
    for key, path in (("dinov2", dinov2_checkpoint), ("dinov3", dinov3_checkpoint), ("sam", sam_checkpoint)):
        if path is None:
            continue
        recorded = (manifest.get("checkpoints") or {}).get(key)
        if recorded is None:
            problems.append(f"{key} checkpoint: requested {path}, the export records none")
        elif not Path(path).expanduser().exists():
            problems.append(f"{key} checkpoint: {path} does not exist")
        elif not _same_checkpoint(recorded, path):
            problems.append(f"{key} checkpoint: {path} is not the exported {recorded.get('path')} "
                            f"(sha256 {str(recorded.get('sha256'))[:12]}...)")
    for key in graphs:
        if key not in manifest["graphs"]:
            problems.append(f"graph {key!r} is not in the export")
    if problems:
        raise ManifestError(f"{folder}: export does not match the request: " + "; ".join(problems))
    if check_files:
        for name, record in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                raise ManifestError(f"{path}: listed in the manifest but missing")
            stat = path.stat()
            if stat.st_size != record["size"]:
                raise ManifestError(f"{path}: size {stat.st_size} differs from the manifest's "
                                    f"{record['size']} (file modified or truncated); export again")
            if not full_check and stat.st_mtime_ns == record.get("mtime_ns"):
                continue  # fast path: same size and modification time as when it was exported
            if sha256_file(path) != record["sha256"]:
                raise ManifestError(f"{path}: checksum differs from the manifest (file modified or "
                                    "truncated); export again")
    log.debug("export %s verified (%d files)", folder, len(manifest["files"]))
    return manifest
