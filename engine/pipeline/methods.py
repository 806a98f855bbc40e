"""The method family behind ``SegmenterConfig.method`` (docs/algorithm.md §1–§5), one common interface.

Every method module (:mod:`.match_method` for ``match`` — GBMSeg / sat —, :mod:`.prototypes` for
``protosam``, :mod:`.topk`, :mod:`.matcher`, :mod:`.persam`) offers the same two functions, dispatched here:

- ``prepare(refs: ReferenceSet, backend, config) -> state`` — everything derived from the
  reference(s) once (pooled tokens, prototypes, SAM reference features, ...); the Segmenter caches it.
- ``segment_chunk(state, targets, backend, config, timer) -> list[TargetOutput]`` — one batch of
  :class:`~refseg.pipeline.inputs.PreparedTarget`: encoders batched over the chunk, then the prompt sets
  (all classes, all components / subsets) decoded through the one decode path of :mod:`.decode`
  (PerSAM: one call per cascade step), merged into per-class logits. ``config`` is the run's
  configuration (e.g. with ``fallback`` as the caller asked), not necessarily the Segmenter's.

Outputs may hold device tensors (prompts padded with label −1, boxes with NaN rows): the Segmenter
turns every target's logits into label maps on the device and copies everything to the host at once
(:func:`refseg.pipeline.results.finish`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.pipeline.decode import DecodedSets, DecodedTarget, decode_sets, unite_by_owner
from refseg.pipeline.prompt_sets import PromptSets, box_extent

MODULES = {"match": "refseg.pipeline.match_method", "protosam": "refseg.pipeline.prototypes",
           "topk": "refseg.pipeline.topk", "matcher": "refseg.pipeline.matcher", "persam": "refseg.pipeline.persam"}


STAGES = {
    "match": "DINOv2 tokens -> NN/Hungarian matching -> radius grouping (+ k-means) prompts -> SAM, one "
             "decoder call per target -> label map",
    "protosam": "DINOv2 tokens -> local (2x2) + global prototypes -> coarse mask -> per-component peak + "
                "centroid + box -> SAM, one call for all components -> union",
    "topk": "DINOv2 tokens (+ flipped view) -> prototype/similarity confidence - uncertainty -> max-pool "
            "NMS -> Top-K positives/negatives -> SAM",
    "matcher": "DINOv2 x_prenorm -> Hungarian forward + reverse -> k-means++ centres -> point subsets -> "
               "SAM, one call for all subsets -> purity/coverage(/EMD) -> union",
    "persam": "SAM embedding prototype -> argmax / argmin points -> SAM cascade: points, + mask, + mask "
              "and box",
}


def describe_presets(presets: dict[str, SegmenterConfig]) -> list[dict[str, str]]:
    """One row per preset: name, method, DINOv2 model @ input side (``unused`` for PerSAM), SAM, stages."""
    rows = []
    for name, cfg in presets.items():
        dino = "unused (loaded)" if cfg.method == "persam" else f"{cfg.dinov2} @{cfg.image_size} ({cfg.feature_key})"
        rows.append({"preset": name, "method": cfg.method, "dinov2": dino, "sam": cfg.sam,
                     "stages": STAGES[cfg.method]})
    return rows


@dataclass
class ReferenceSet:
    """The labelled reference(s), as the Segmenter holds them.

    rgbs: list of (H, W, 3) uint8 images; masks: list of (H, W) integer label masks;
    tokens: list of (T, D) float32 DINOv2 tokens (``config.feature_key``) of each reference;
    labels: (C, R·G²) int8 grid labels {1 FG, 0 BG, −1 ignored}, reference r at columns
    r·G² .. (r+1)·G² − 1 (``config.grid_rule``); classes: the C class values, ascending.
    """

    rgbs: list[np.ndarray]
    masks: list[np.ndarray]
    tokens: list[torch.Tensor]
    labels: torch.Tensor
    classes: list[int]


@dataclass
class TargetOutput:
    """One target's result before the label map: ``decoded`` (C, H, W) logits and (C,) IoU in
    class order; per class value the prompts used (all sets concatenated: ``points`` (n, 2) float32
    (x, y) target pixels, ``labels`` (n,) int64) and ``boxes`` (4,) float32 or None. Prompts may also
    be device tensors padded with label −1 and boxes NaN rows (cut on the host).
    ``check_positives``: warn on the host when a class got no positive point."""

    decoded: DecodedTarget
    points: dict[int, np.ndarray | torch.Tensor] = field(default_factory=dict)
    labels: dict[int, np.ndarray | torch.Tensor] = field(default_factory=dict)
    boxes: dict[int, Optional[np.ndarray | torch.Tensor]] = field(default_factory=dict)
    check_positives: bool = False


def patch_tokens(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(..., T, D) encoder tokens -> (..., G·G, D) patch tokens.

    ``x_prenorm`` carries the class (and register) tokens in front of the patches; the last G·G
    rows are the patch grid, row-major, for either feature key.
    """
    n = grid_size * grid_size
    if tokens.shape[-2] < n:
        raise ValueError(f"{tokens.shape[-2]} tokens cannot hold a {grid_size}x{grid_size} patch grid")
    return tokens[..., tokens.shape[-2] - n:, :]


def method_module(config: SegmenterConfig):
    """The stage module implementing ``config.method`` (ValueError for an unknown method)."""
    if config.method not in MODULES:
        raise ValueError(f"method {config.method!r} has no stage module; choose one of {', '.join(MODULES)}")
    return importlib.import_module(MODULES[config.method])


def prepare(refs: ReferenceSet, backend, config: SegmenterConfig) -> Any:
    """Reference-side state of ``config.method`` (computed once, cached by the Segmenter)."""
    return method_module(config).prepare(refs, backend, config)


def segment_chunk(state: Any, targets: list, backend, config: SegmenterConfig, timer) -> list[TargetOutput]:
    """Segment a chunk of :class:`~refseg.pipeline.inputs.PreparedTarget` with ``config.method``."""
    return method_module(config).segment_chunk(state, targets, backend, config, timer)


def empty_output(classes: list[int], original_size: tuple[int, int]) -> TargetOutput:
    """A target without any prompt: −inf logits, no points, no boxes."""
    h, w = original_size
    out = TargetOutput(DecodedTarget(torch.full((len(classes), h, w), float("-inf")), torch.zeros(len(classes))))
    for c in classes:
        out.points[c], out.labels[c], out.boxes[c] = np.zeros((0, 2), np.float32), np.zeros(0, np.int64), None
    return out


def decode_target_sets(backend, config: SegmenterConfig, embedding: torch.Tensor, sets: Optional[PromptSets],
                       classes: list[int], input_size: tuple[int, int], original_size: tuple[int, int], timer,
                       keep=None) -> TargetOutput:
    """Decode all prompt sets of one target in ONE decoder call and unite them per class
    (:func:`~refseg.pipeline.decode.decode_sets`, :func:`~refseg.pipeline.decode.unite_by_owner`).

    ``sets``: the target's :class:`PromptSets` (``None`` = no prompt at all); ``keep``: optional
    callable ``(sets, decoded) -> (P,) bool`` choosing the sets that enter the union (Matcher's
    scoring); default all.
    """
    if sets is None:
        return empty_output(classes, original_size)
    with timer("decoder"):
        decoded = decode_prompt_sets(backend, embedding, sets, input_size, original_size, config.multimask_output)
    with timer("postprocess"):
        chosen = None if keep is None else keep(sets, decoded)
        merged = unite_by_owner(backend, config, decoded, [0] * len(sets), sets.owner.tolist(), len(classes),
                                [input_size], [original_size], chosen)[0]
    return collect_prompts(TargetOutput(merged), sets, classes)


def decode_prompt_sets(backend, embedding: torch.Tensor, sets: PromptSets, input_size: tuple[int, int],
                       original_size: tuple[int, int], multimask: bool,
                       mask_input: Optional[torch.Tensor] = None) -> DecodedSets:
    """Every set of one target's :class:`PromptSets` against its (256, 64, 64) embedding, in ONE call
    (:func:`~refseg.pipeline.decode.decode_sets`); ``mask_input`` (P, 1, 256, 256) low-res logits."""
    dev = embedding.device
    index = torch.zeros(len(sets), dtype=torch.int64, device=dev)
    return decode_sets(backend, embedding[None], index, sets.points.to(dev), sets.labels.to(dev), [input_size],
                       [original_size], multimask, None if sets.boxes is None else sets.boxes.to(dev),
                       mask_input=mask_input)


def collect_prompts(out: TargetOutput, sets: PromptSets, classes: list[int]) -> TargetOutput:
    """Fill ``out``'s per-class prompts from :class:`~refseg.pipeline.prompt_sets.PromptSets`."""
    for j, c in enumerate(classes):
        rows = (sets.owner == j).nonzero().flatten().tolist()
        pts = [sets.set_prompt(r) for r in rows]
        out.points[c] = (np.concatenate([p for p, _ in pts]).astype(np.float32) if pts
                         else np.zeros((0, 2), np.float32))
        out.labels[c] = (np.concatenate([l for _, l in pts]).astype(np.int64) if pts
                         else np.zeros(0, np.int64))
        out.boxes[c] = None if sets.boxes is None or not rows else box_extent(sets.boxes[rows])
    return out
