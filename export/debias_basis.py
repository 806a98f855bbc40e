"""The positional basis an export carries for runtimes that cannot compute it (the C++ pipeline).

The Python pipeline projects DINOv3's positional subspace out of the tokens before matching
(:mod:`refseg.pipeline.feature_norm`, ``SegmenterConfig.feature_debias``; docs/dinov3.md). The basis is
:func:`~refseg.pipeline.feature_norm.basis_from_encoder` of the matching encoder: its patch tokens of the blank
image at the export's side S, rank ``debias_rank``. The exporters compute it here once, from the eager forward of
the same wrapper module they export (so from the tokens the exported graph returns), and write it as
``DIR/positional_basis.f32``: raw little-endian float32, row-major (D, rank). The manifest's ``feature_debias``
record (:func:`debias_record`) names it::

    {"mode": "project", "file": "positional_basis.f32", "shape": [D, rank], "rank": rank, "dtype": "float32",
     "image_size": S, "tokens": "patch_tokens", "normalize": true}

``normalize``: tokens are L2-normalised before and after ``x - (x U) Uᵀ``
(:func:`~refseg.pipeline.feature_norm.project_out`). ``{"mode": "none"}`` records an export matched without it
(DINOv2 by default). The Python exported backends recompute the basis from the graph itself
(:func:`~refseg.pipeline.feature_norm.matching_basis`), so the file is for the C++ pipeline.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from refseg.io.writers import atomic_writer
from refseg.pipeline.feature_norm import basis_from_encoder
from refseg.runtime.io_names import POSITIONAL_BASIS_FILE

log = logging.getLogger(__name__)


def resolve_debias(encoder: str, feature_debias: str = "auto", debias_rank: int | None = None) -> tuple[str, int]:
    """(mode, rank) an export of ``encoder`` records: ``SegmenterConfig``'s resolution of ``feature_debias``
    (``auto``: ``project`` for DINOv3, ``none`` for DINOv2) and its default rank when ``debias_rank`` is None."""
    from refseg.config import SegmenterConfig

    changes = {"feature_debias": feature_debias}
    if debias_rank is not None:
        changes["debias_rank"] = debias_rank
    config = SegmenterConfig().with_encoder(encoder).replace(**changes)  # validated there
    if config.debias not in ("none", "project"):
        raise ValueError(f"an export records feature_debias 'none' or 'project', got {config.debias!r}")
    return config.debias, config.debias_rank


def debias_record(out_dir: str | os.PathLike, encoder_graph: nn.Module, image_size: int, mode: str,
                  rank: int) -> dict:
    """Write the basis of ``encoder_graph`` into ``out_dir`` when ``mode`` is ``project``; its manifest record.

    Args:
        encoder_graph: the exported wrapper (``Dinov2Export`` / ``Dinov3Export``): images (B, 3, S, S) ->
            (patch tokens (B, T, D), cls tokens); run eagerly on the blank image, on its parameters' device.
        image_size: S, the side the export takes.
        mode: ``none`` (nothing written; ``{"mode": "none"}``) or ``project``.
        rank: basis rank (``SegmenterConfig.debias_rank``).

    Returns:
        The manifest's ``feature_debias`` record (module docstring).
    """
    if mode == "none":
        return {"mode": "none"}
    if mode != "project":
        raise ValueError(f"debias_record: mode must be 'none' or 'project', got {mode!r}")
    device = next(encoder_graph.parameters()).device
    basis = basis_from_encoder(lambda x: encoder_graph(x.to(device))[0], image_size, image_size, rank)
    values = basis.detach().cpu().numpy().astype("<f4", copy=False)
    with atomic_writer(Path(out_dir) / POSITIONAL_BASIS_FILE, "wb") as handle:
        handle.write(np.ascontiguousarray(values).tobytes())
    log.info("positional basis (%d x %d, rank %d at S=%d) written to %s", *values.shape, rank, image_size,
             POSITIONAL_BASIS_FILE)
    return {"mode": "project", "file": POSITIONAL_BASIS_FILE, "shape": list(values.shape), "rank": rank,
            "dtype": "float32", "image_size": image_size, "tokens": "patch_tokens", "normalize": True}


def read_basis(folder: str | os.PathLike, record: dict) -> torch.Tensor:
    """The (D, rank) float32 basis a ``feature_debias`` record of ``folder`` names (tests, inspection)."""
    path = Path(folder) / record["file"]
    values = np.fromfile(path, dtype="<f4")
    dim, rank = record["shape"]
    if values.size != dim * rank:
        raise ValueError(f"{path}: {values.size} float32 values, the manifest says {dim} x {rank}")
    return torch.from_numpy(values.reshape(dim, rank).copy())
