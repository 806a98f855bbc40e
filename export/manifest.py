"""``DIR/manifest.json``: what an export folder holds, and the checks before anything runs it.

The manifest records the versions that produced the graphs (refseg, torch, onnx, opset), the
models and their source checkpoints (path, size, sha256), the precision and DINOv2 input side,
every graph's file and input/output names, dtypes and shapes (strings are dynamic dimensions),
and the sha256 of every file in the folder. It is written last, so a folder whose export was
interrupted has none.

:func:`verify_manifest` refuses (``ManifestError``, a ``ValueError``) a folder without a manifest,
a manifest of another format, one that does not match the request (models, precision, image size,
checkpoints) or whose files are missing or differ from their recorded checksums.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from refseg.io.writers import atomic_writer
from refseg.models.checkpoints import sha256_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
GRAPH_FILES = {"dinov2": "dinov2.onnx", "sam_encoder": "sam_encoder.onnx",
               "sam_decoder": "sam_decoder.onnx"}


class ManifestError(ValueError):
    """An export folder cannot be used for the request (the message says which file and why)."""


def checkpoint_record(path: str | os.PathLike | None) -> dict | None:
    """``{"path", "file", "size", "mtime_ns", "sha256"}`` of a checkpoint file (None for None)."""
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return {"path": str(path), "file": path.name, "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def _same_checkpoint(recorded: dict, path: str | os.PathLike) -> bool:
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    if stat.st_size != recorded.get("size"):
        return False
    if str(path) == recorded.get("path") and stat.st_mtime_ns == recorded.get("mtime_ns"):
        return True  # same file untouched since the export: skip hashing gigabytes
    return sha256_file(path) == recorded.get("sha256")


def versions() -> dict[str, str | None]:
    """Versions of refseg and of the packages that shape the exported graphs."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for package in ("refseg", "torch", "onnx", "onnxruntime"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def build_manifest(folder: str | os.PathLike, graphs: dict[str, dict], *, precision: str,
                   image_size: int, models: dict[str, str], checkpoints: dict[str, dict | None],
                   opset: int, max_batch: int) -> dict:
    """Assemble the manifest of ``folder``; checksums every file in it except the manifest.

    Args:
        graphs: {"dinov2" | "sam_encoder" | "sam_decoder": record from
            :func:`refseg.export.onnx_export.export_graph`}.
        models: {"dinov2": spec name, "sam": spec name}.
        checkpoints: {"dinov2": :func:`checkpoint_record` or None, "sam": ...}.
    """
    folder = Path(folder)
    files = {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    for key, graph in graphs.items():
        missing = [f for f in graph["files"] if f not in files]
        if missing:
            raise ManifestError(f"{folder}: graph {key} names files that are not there: {missing}")
    return {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "opset": opset,
        "precision": precision,
        "image_size": image_size,
        "max_batch": max_batch,
        "models": dict(models),
        "checkpoints": dict(checkpoints),
        "graphs": graphs,
        "files": files,
    }


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Write ``folder/manifest.json`` atomically (temp file + rename)."""
    final = Path(folder) / MANIFEST_NAME
    with atomic_writer(final, "w") as handle:  # the one atomic writer: fsync, umask's normal mode
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return final


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


def verify_manifest(folder: str | os.PathLike, *, precision: str | None = None,
                    image_size: int | None = None, dinov2: str | None = None,
                    sam: str | None = None, dinov2_checkpoint: str | os.PathLike | None = None,
                    sam_checkpoint: str | os.PathLike | None = None,
                    graphs: tuple[str, ...] = tuple(GRAPH_FILES), check_files: bool = True,
                    full_check: bool = False) -> dict:
    """Read the manifest of ``folder`` and check it against the request; return it.

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
    for key, want, have in (("precision", precision, manifest["precision"]),
                            ("image_size", image_size, manifest["image_size"]),
                            ("dinov2 model", dinov2, manifest["models"].get("dinov2")),
                            ("sam model", sam, manifest["models"].get("sam"))):
        if want is not None and want != have:
            problems.append(f"{key}: requested {want!r}, exported {have!r}")
    for key, path in (("dinov2", dinov2_checkpoint), ("sam", sam_checkpoint)):
        if path is None:
            continue
        recorded = (manifest.get("checkpoints") or {}).get(key)
        if recorded is None:
            problems.append(f"{key} checkpoint: requested {path}, the export records none")
        elif not Path(path).expanduser().is_file():
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
