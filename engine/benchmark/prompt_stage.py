"""The matching + prompt stage on given features, for refseg and for the research-style baseline.

:func:`refseg_prompt_stage` runs exactly the calls :class:`refseg.Segmenter` makes between the
DINOv2 and the SAM encoders (matching, candidates -> points, physical-space stage), so both sides can
be timed and compared on the SAME tokens. The baseline is :mod:`refseg.benchmark.baseline` (part of the
installed package; ``bench/baseline.py`` re-exports it for scripts in the source checkout).
"""
from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.pipeline.grid import grids_from_config
from refseg.pipeline.matching import match_candidates
from refseg.pipeline.prompts import PromptBatch, prompts_from_candidates


def load_baseline() -> ModuleType:
    """The research-style baseline module (:mod:`refseg.benchmark.baseline`).

    Kept as a function so callers can treat the baseline as optional: the module itself imports only
    numpy, torch and PIL; the official ``dinov2`` / ``segment_anything`` packages are imported when a
    baseline model is built (a clear :class:`refseg.optional.MissingDependencyError` when missing).
    """
    return importlib.import_module("refseg.benchmark.baseline")


def reference_labels(mask: np.ndarray, config: SegmenterConfig) -> tuple[list[int], torch.Tensor]:
    """Reference mask (H, W) -> (class values, (C, T) int8 grid labels 1 / 0 / −1), as the Segmenter."""
    classes, grids = grids_from_config(mask, config)
    return classes, grids.reshape(len(classes), -1)


def refseg_prompt_stage(ref_tokens: torch.Tensor, ref_labels: torch.Tensor, tgt_tokens: torch.Tensor,
                        sizes: list[tuple[int, int]], config: SegmenterConfig) -> PromptBatch:
    """Matching + prompts for B targets: the Segmenter's stage between the two encoders.

    Args:
        ref_tokens: (T, D) reference tokens; ref_labels: (C, T) grid labels on the same device.
        tgt_tokens: (B, T, D) target tokens.
        sizes: B (H, W) target sizes.

    Returns:
        :class:`PromptBatch` of B·C prompt sets (target-major), points (x, y) in target pixels.
    """
    cand = match_candidates(ref_tokens, ref_labels, tgt_tokens, config)
    return prompts_from_candidates(cand, config, sizes, device=tgt_tokens.device)


def prompt_set(points: np.ndarray, labels: np.ndarray) -> set[tuple[int, int, int]]:
    """{(x, y, label)} of one prompt set (points rounded to whole pixels)."""
    pts = np.rint(np.asarray(points, dtype=np.float64)).astype(np.int64).reshape(-1, 2)
    return {(int(x), int(y), int(lab)) for (x, y), lab in zip(pts, np.asarray(labels).reshape(-1))}


def compare_prompts(ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray]) -> dict:
    """Compare two prompt sets as sets of (x, y, label): equality, sizes and the differences."""
    a, b = prompt_set(*ours), prompt_set(*theirs)
    return {"equal": a == b, "refseg_points": len(a), "baseline_points": len(b),
            "only_refseg": sorted(a - b)[:10], "only_baseline": sorted(b - a)[:10]}
