"""``DIR/manifest.json``: what an export folder holds, written by the exporters.

The manifest records the versions that produced the graphs (refseg, torch, onnx, opset), the
matching encoder (``encoder``: ``dinov2`` / ``dinov3``) and its ``patch_size``, the positional projection the
matching applies (``feature_debias``: mode, and for ``project`` the basis file with its shape and rank;
:mod:`refseg.export.debias_basis`), the models and their source
checkpoints (path, size, sha256; a Hugging Face folder by its files), the precision and encoder input side,
every graph's file and input/output names, dtypes and shapes (strings are dynamic dimensions),
and the sha256 of every file in the folder. It is written last, so a folder whose export was
interrupted has none.

File names and the format version are :mod:`refseg.runtime.io_names`; the runtime reads and
verifies a folder with :func:`refseg.runtime.manifest_reader.verify_manifest` (this package
never reads back what it wrote, and the runtime never imports this package).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from refseg.config import ENCODER_PATCH_SIZE
from refseg.io.writers import atomic_writer
from refseg.models.checkpoints import file_identity, sha256_file
from refseg.optional import versions
from refseg.runtime.io_names import FEATURE_DEBIAS_KEY, FORMAT_VERSION, MANIFEST_NAME

log = logging.getLogger(__name__)


def checkpoint_record(path: str | os.PathLike | None) -> dict | None:
    """``{"path", "file", "size", "mtime_ns", "sha256"}`` of a checkpoint file or Hugging Face folder
    (:func:`refseg.models.checkpoints.file_identity`; None for None)."""
    return file_identity(path, with_sha256=True)


def build_manifest(folder: str | os.PathLike, graphs: dict[str, dict], *, precision: str,
                   image_size: int, models: dict[str, str], checkpoints: dict[str, dict | None],
                   opset: int, max_batch: int, encoder: str = "dinov2", feature_debias: dict | None = None) -> dict:
    """Assemble the manifest of ``folder``; checksums every file in it except the manifest.

    Args:
        graphs: {"dinov2" | "sam_encoder" | "sam_decoder": record from
            :func:`refseg.export.onnx_export.export_graph`}; ``dinov2`` is the matching encoder's graph
            whichever encoder it holds.
        models: {encoder: spec name, "sam": spec name}.
        checkpoints: {encoder: :func:`checkpoint_record` or None, "sam": ...}.
        encoder: ``dinov2`` or ``dinov3``; recorded with its patch size (``refseg.config.ENCODER_PATCH_SIZE``).
        feature_debias: the positional-projection record of :func:`refseg.export.debias_basis.debias_record`
            (its basis file must already be in ``folder``); None: not recorded (older exports).
    """
    if encoder not in ENCODER_PATCH_SIZE:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODER_PATCH_SIZE)}")
    folder = Path(folder)
    files = {p.name: {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    for key, graph in graphs.items():
        missing = [f for f in graph["files"] if f not in files]
        if missing:
            raise ValueError(f"{folder}: graph {key} names files that are not there: {missing}")
    manifest = {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(("refseg", "torch", "onnx", "onnxruntime")),  # what shapes the graphs
        "opset": opset,
        "precision": precision,
        "encoder": encoder,
        "patch_size": ENCODER_PATCH_SIZE[encoder],
        "image_size": image_size,
        "max_batch": max_batch,
        "models": dict(models),
        "checkpoints": dict(checkpoints),
        "graphs": graphs,
        "files": files,
    }
    if feature_debias is not None:
        if feature_debias.get("file") and feature_debias["file"] not in files:
            raise ValueError(f"{folder}: feature_debias names {feature_debias['file']}, which is not there")
        manifest[FEATURE_DEBIAS_KEY] = dict(feature_debias)
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Write ``folder/manifest.json`` atomically (temp file + rename)."""
    final = Path(folder) / MANIFEST_NAME
    with atomic_writer(final, "w") as handle:  # the one atomic writer: fsync, umask's normal mode
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return final
