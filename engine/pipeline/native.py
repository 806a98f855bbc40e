"""The C++ prompt engine (``refseg._C``: pybind11 bindings over the C API of ``csrc/include/refseg.h``) behind
grid labelling, matching post-processing and the physical-space prompt stage, used on the CPU when the
extension is built.

Each function here takes the torch path's own arguments and returns its result, or None when the
native engine does not apply (extension absent, kill switch set, tensors on another device, an
option it does not cover); the caller then runs the torch code. Results are identical to the torch
path (``tests/test_cpp_prompts.py`` compares both); k-means thinning is bit-identical on pixel-lattice
(integer) coordinates, which is what the pipeline produces.

``REFSEG_DISABLE_NATIVE=1`` forces the torch path. Whether the extension loaded is logged once.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import numpy as np
import torch

from ..config import SegmenterConfig

log = logging.getLogger(__name__)

KILL_SWITCH = "REFSEG_DISABLE_NATIVE"


@functools.lru_cache(maxsize=1)
def _load():
    try:
        from refseg import _C
    except ImportError as exc:
        log.info("refseg._C is not built (%s): the prompt engine runs on torch", exc)
        return None
    log.info("refseg._C loaded: the prompt engine runs in C++ on the CPU")
    return _C


def module():
    """The ``refseg._C`` module when built and not disabled by ``REFSEG_DISABLE_NATIVE``, else None."""
    if os.environ.get(KILL_SWITCH, "0").strip().lower() in ("1", "true", "yes", "on"):
        return None
    return _load()


def _cpu(*tensors) -> bool:
    return all(t is None or t.device.type == "cpu" for t in tensors)


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy(), dtype=dtype)


def grid_labels(mask: torch.Tensor, rule: str, fraction: float, skip_last: bool,
                patch_size: int) -> Optional[torch.Tensor]:
    """:func:`refseg.pipeline.grid.binary_to_grid` of (..., S, S) bool masks -> (..., G, G) int8, G = S /
    ``patch_size``, or None."""
    c = module()
    if c is None or not _cpu(mask) or mask.numel() == 0:
        return None
    s = mask.shape[-1]
    flat = _np(mask.reshape(-1, s, s), np.uint8)
    out = c.grid_labels(flat, rule, float(fraction), bool(skip_last), int(patch_size))
    return torch.from_numpy(out).reshape(*mask.shape[:-2], s // patch_size, s // patch_size)


def match_nn(res, labels: torch.Tensor, config: SegmenterConfig) -> Optional[tuple]:
    """Nearest-neighbour match result ``res`` (``refseg.kernels.match``) and (C, Nr) labels ->
    the :class:`~refseg.pipeline.matching.Candidates` fields, or None."""
    c = module()
    if c is None or not _cpu(res.fwd_idx, res.far_idx, res.bwd_idx, labels):
        return None
    out = c.match_nn(_np(res.fwd_idx[..., 0], np.int64), _np(res.far_idx, np.int64),
                     _np(res.fwd_val[..., 0].to(torch.float64), np.float64), _np(res.bwd_idx, np.int64),
                     _np(labels, np.int8), config.metric == "cosine", config.cycle_check,
                     config.hard_negatives, config.fallback,
                     config.gbmseg_offimage_quirk)
    return tuple(torch.from_numpy(a) for a in out)


@functools.lru_cache(maxsize=32)
def _options(config: SegmenterConfig):
    """The C API's ``refseg_prompt_params`` of ``config``'s physical-space fields."""
    o = _load().PromptParams()
    o.gbmseg_offimage_quirk = int(config.gbmseg_offimage_quirk)
    o.radius_in_pixels = int(config.radius_unit == "pixel")
    for key in ("pos_radius", "neg_radius", "exclusion_radius", "hard_radius"):
        setattr(o, key, float(getattr(config, key)))
    o.kmeans_k, o.kmeans_iters, o.kmeans_seed = config.kmeans_k, config.kmeans_iters, config.kmeans_seed
    o.max_points, o.fallback, o.use_box = config.max_points, int(config.fallback), int(config.use_box)
    return o


def engineer_padded(pos, pos_valid, neg, neg_valid, sizes, config: SegmenterConfig, hard=None,
                    hard_valid=None, dtype: torch.dtype = torch.float32) -> Optional[tuple]:
    """:func:`refseg.pipeline.prompts.engineer_padded` in C++: the PromptBatch fields
    (points (P, N, 2) ``dtype``, labels (P, N) int64, num_points (P,) int64, boxes (P, 4) or None), or None."""
    c = module()
    if c is None or not _cpu(pos, pos_valid, neg, neg_valid, sizes, hard, hard_valid):
        return None
    h = hv = None
    if hard is not None:
        h, hv = _np(hard.to(torch.float64), np.float64), _np(hard_valid, np.bool_)
    points, labels, num, boxes = c.engineer_padded(
        _np(pos.to(torch.float64), np.float64), _np(pos_valid, np.bool_),
        _np(neg.to(torch.float64), np.float64), _np(neg_valid, np.bool_), _np(sizes, np.int64),
        _options(config), h, hv)
    num_t = torch.from_numpy(num)
    if num_t.numel() and bool((~torch.from_numpy(labels == 1).any(-1)).any()):
        log.warning("%d prompt set(s) have no positive point", int((~torch.from_numpy(labels == 1).any(-1)).sum()))
    boxes_t = None if boxes is None else torch.from_numpy(boxes).to(dtype)
    return torch.from_numpy(points).to(dtype), torch.from_numpy(labels), num_t, boxes_t
