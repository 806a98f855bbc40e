"""SAM 2's memory bank: what one tracked object remembers, and which of it a frame attends to.

Per object, each visited frame leaves a :class:`FrameOutput`: its low-resolution mask logits, its
object pointer (a 256-d summary of the decoder's mask token), its object-score logit and, once the
memory encoder has run, its spatial memory (64 x h x w, stored in bfloat16 as the official
predictor stores it). Frames prompted by the user are *conditioning* frames; frames reached by
propagation are *non-conditioning* frames.

To track frame ``t`` the model attends to (:func:`select_memories`):

* spatial memories: every conditioning frame (temporal slot 0), then the ``num_maskmem - 1`` = 6
  non-conditioning frames just before ``t`` in the tracking direction (slots 1..6, the nearest in
  slot 6; a missing frame is skipped);
* object pointers (:func:`select_object_pointers`): the conditioning frames not after ``t`` in the
  tracking direction ("only pointers in the past"), each at its temporal distance (signed by the
  tracking direction in SAM 2.1), then the non-conditioning frames 1..15 steps back, stopping at the
  video's ends; at most ``min(num_frames, 16)`` in all.

The memory tokens are then built by :meth:`refseg.models.sam2_memory.Sam2Video.memory_tokens`.
Reverse tracking looks "back" towards higher frame indices, so a reverse pass also attends to the
non-conditioning memories that a forward pass left on the other side of a conditioning frame,
exactly as the official ``SAM2VideoPredictor`` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class FrameOutput:
    """What one frame leaves in an object's memory bank (batch B = 1 per object in the predictor).

    pred_masks: (B, 1, S/4, S/4) fp32 low-resolution logits (-1024 where the object is absent);
    obj_ptr: (B, 256) object pointer; object_score_logits: (B, 1) (> 0: the object is present);
    maskmem_features: (B, 64, S/16, S/16) bfloat16 spatial memory, None until encoded.
    """

    pred_masks: torch.Tensor
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor
    maskmem_features: torch.Tensor | None = None


@dataclass
class MemoryBank:
    """One object's frame outputs: ``cond`` (prompted frames) and ``non_cond`` (tracked frames),
    frame index -> :class:`FrameOutput`, in insertion order (the order memories are concatenated)."""

    cond: dict[int, FrameOutput] = field(default_factory=dict)
    non_cond: dict[int, FrameOutput] = field(default_factory=dict)

    def get(self, frame_idx: int) -> FrameOutput | None:
        """The frame's output, conditioning first."""
        out = self.cond.get(frame_idx)
        return out if out is not None else self.non_cond.get(frame_idx)

    def clear(self) -> None:
        self.cond.clear()
        self.non_cond.clear()


def select_memories(frame_idx: int, bank: MemoryBank, reverse: bool, num_maskmem: int = 7
                    ) -> list[tuple[int, FrameOutput]]:
    """(temporal slot, output) of the spatial memories frame ``frame_idx`` attends to: slot 0 for
    every conditioning frame, slot k (1..num_maskmem-1) for the non-conditioning frame
    ``num_maskmem - k`` steps back in the tracking direction (absent frames are left out)."""
    chosen = [(0, out) for out in bank.cond.values()]
    step = 1 if reverse else -1
    for slot in range(1, num_maskmem):
        out = bank.non_cond.get(frame_idx + step * (num_maskmem - slot))
        if out is not None:
            chosen.append((slot, out))
    return chosen


def select_object_pointers(frame_idx: int, bank: MemoryBank, reverse: bool, num_frames: int,
                           signed: bool, max_pointers: int = 16) -> list[tuple[int, torch.Tensor]]:
    """(temporal distance, pointer (B, 256)) of the object pointers frame ``frame_idx`` attends to.

    Conditioning frames at or before ``frame_idx`` in the tracking direction come first, at distance
    ``frame_idx - t`` (negated when ``reverse``) if ``signed`` else ``|frame_idx - t|``; then the
    non-conditioning frames 1 .. max-1 steps back (max = min(num_frames, max_pointers)), at their
    step count, stopping at the first index outside the video.
    """
    sign = -1 if reverse else 1
    pointers = [((frame_idx - t) * sign if signed else abs(frame_idx - t), out.obj_ptr)
                for t, out in bank.cond.items() if (t >= frame_idx if reverse else t <= frame_idx)]
    for step in range(1, min(num_frames, max_pointers)):
        t = frame_idx - sign * step
        if t < 0 or t >= num_frames:
            break
        out = bank.non_cond.get(t)
        if out is not None:
            pointers.append((step, out.obj_ptr))
    return pointers


def pointer_position_encoding(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """1-D sine encoding of (P,) float positions -> (P, dim) fp32: the sines of dim/2 frequencies
    ``temperature^(-2·floor(i/2)/(dim/2))`` followed by their cosines (SAM 2's ``get_1d_sine_pe``)."""
    half = dim // 2
    index = torch.arange(half, dtype=torch.float32, device=positions.device)
    freqs = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / half)
    angles = positions.float()[:, None] / freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)
