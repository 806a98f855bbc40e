"""The ``match`` method (GBMSeg / sat, docs/algorithm.md §1–§2) in the method-family interface.

DINOv2 tokens of the batch (one encoder call) -> NN (or Hungarian) matching against the pooled reference
patches with the cycle check (:mod:`.matching`) -> physical-space prompts: radius grouping, exclusion,
k-means thinning (:mod:`.prompts`) -> one SAM encoder call -> ONE decoder call for every prompt set of
the batch (:func:`.decode.decode_batch`). Every step runs on the backend's device; on the accelerator
path the prompts stay there, padded, until the Segmenter's one copy to the host. :func:`class_prompts`
stops before SAM (the anchors of ``refseg segment --propagate``, decoded by SAM 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.pipeline.accelerator import accelerator_path
from refseg.pipeline.decode import decode_batch
from refseg.pipeline.feature_norm import encode_for_matching
from refseg.pipeline.inputs import PreparedTarget, dinov2_inputs, sam_inputs
from refseg.pipeline.matching import Candidates, match_candidates
from refseg.pipeline.methods import ReferenceSet, TargetOutput
from refseg.pipeline.prompts import PromptBatch, prompts_from_candidates


@dataclass
class MatchState:
    """Pooled reference patches: ``tokens`` (Nr, D) (n-shot: references concatenated), ``labels``
    (C, Nr) int8 grid labels {1 FG, 0 BG, −1 ignored} per class, ``classes`` the C class values."""

    tokens: torch.Tensor
    labels: torch.Tensor
    classes: list[int]


def prepare(refs: ReferenceSet, backend, config: SegmenterConfig) -> MatchState:
    """Concatenate the references' patch tokens; labels as the Segmenter pooled them."""
    tokens = torch.cat(refs.tokens)
    return MatchState(tokens, refs.labels.to(tokens.device), list(refs.classes))


@dataclass
class ClassPrompts:
    """The match method's prompts for one class on one target, without decoding (:func:`class_prompts`).

    Attributes:
        points: (N, 2) float32 (x, y) pixels of the target; labels: (N,) int64, 1 positive / 0 negative.
        box: (4,) float32 (x0, y0, x1, y1) pixels, or None.
        matches: cycle-consistent positive matches: reference foreground patches whose nearest target patch
            matches back into the foreground (before the physical-space stage thins them to points).
    """

    points: np.ndarray
    labels: np.ndarray
    box: Optional[np.ndarray]
    matches: int

    @property
    def positives(self) -> int:
        """Positive points."""
        return int((np.asarray(self.labels) == 1).sum())


def target_prompts(state: MatchState, targets: list[PreparedTarget], backend, config: SegmenterConfig, timer
                   ) -> tuple[Candidates, PromptBatch]:
    """The prompt half of :func:`segment_chunk`: ONE DINOv2 call for the chunk, matching with the cycle
    check, physical-space prompts (B·C sets, target-major), on the backend's device."""
    sizes = [t.size for t in targets]
    with timer("dinov2"):
        tokens = encode_for_matching(backend, dinov2_inputs(targets, backend, config), config)
    with timer("matching"):
        cand = match_candidates(state.tokens, state.labels, tokens, config)
    with timer("prompts"):
        prompts = prompts_from_candidates(cand, config, sizes, device=tokens.device)
    return cand, prompts


def class_prompts(state: MatchState, targets: list[PreparedTarget], backend, config: SegmenterConfig, timer
                  ) -> list[dict[int, ClassPrompts]]:
    """The prompts :func:`segment_chunk` decodes, per target and class value, on the host, with each
    class's count of cycle-consistent positive matches (a confidence that needs no decoder)."""
    cand, prompts = target_prompts(state, targets, backend, config, timer)
    matches = cand.positives.sum(-1).cpu()  # (B, C)
    out = []
    for i in range(len(targets)):
        found = {}
        for j, value in enumerate(state.classes):
            row = i * len(state.classes) + j
            points, labels = prompts.prompt(row)
            box = None if prompts.boxes is None else prompts.boxes[row].cpu().numpy()
            found[value] = ClassPrompts(points, labels, None if box is None or np.isnan(box).any() else box,
                                        int(matches[i, j]))
        out.append(found)
    return out


def segment_chunk(state: MatchState, targets: list[PreparedTarget], backend, config: SegmenterConfig, timer
                  ) -> list[TargetOutput]:
    """The match method on a chunk of targets: both encoders and the decoder once each for the chunk.

    Returns one :class:`TargetOutput` per target whose prompts are device tensors: per class the
    padded (M, 2) float32 points, (M,) int64 labels (−1 = padding) and (4,) box (NaN = none).
    """
    c = len(state.classes)
    sizes = [t.size for t in targets]
    cand, prompts = target_prompts(state, targets, backend, config, timer)
    with timer("sam_encoder"):
        embeddings = backend.encode_sam(sam_inputs(targets, backend, config))
    with timer("decoder"):
        decoded = decode_batch(backend, embeddings, prompts, c, [t.sam_input_size for t in targets], sizes, config)
    outputs = []
    for i, target_decoded in enumerate(decoded):
        out = TargetOutput(target_decoded, check_positives=accelerator_path(prompts.points.device))
        for j, value in enumerate(state.classes):
            row = i * c + j
            out.points[value], out.labels[value] = prompts.points[row], prompts.labels[row]
            out.boxes[value] = None if prompts.boxes is None else prompts.boxes[row]
        outputs.append(out)
    return outputs
