"""SAM 2 for video: the image model plus memory attention, memory encoder and object pointers.

:class:`Sam2Video` is :class:`~refseg.models.sam2.Sam2` (Hiera + FPN neck + SAM heads) with the
memory modules of the official video model, under the official key names, so an official checkpoint
(SAM 2, SAM 2.1, MedSAM2) loads into it strictly, every key used (:func:`sam2_video_from_state_dict`):

* ``memory_attention.*`` (:mod:`~refseg.models.sam2_memory_attention`) conditions a frame on the
  memory bank; ``memory_encoder.*`` (:mod:`~refseg.models.sam2_memory_encoder`) turns a frame and
  its mask into a memory;
* ``maskmem_tpos_enc`` (7, 1, 1, 64): temporal encodings of the 7 memory slots;
* ``obj_ptr_proj`` (3-layer MLP) turns the decoder's mask token into an object pointer;
  ``no_obj_ptr`` replaces it where the object is absent; SAM 2.1 adds a sine temporal encoding of
  each pointer's distance, projected by ``obj_ptr_tpos_proj`` (SAM 2: zeros);
* ``no_obj_embed_spatial`` (SAM 2.1) is added to the memory of a frame where the object is absent;
* ``mask_downsample`` (4 x 4, stride 4) turns a mask prompt into a decoder mask input;
* ``no_mem_embed`` is added to the features of a frame prompted without memory (every release adds it
  directly, ``directly_add_no_mem_embed``); ``no_mem_pos_enc`` is loaded but unused by every release
  (it belongs to the dummy-memory-token path, which no released config takes).

The settings every release shares are class constants (7 memories, at most 16 object pointers,
mask sigmoid scaled x20 - 10 for the memory encoder, mask prompts used as output, multimask output
for at most one point and while tracking, multimask tokens as pointers, pointers only from the past).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_into, unwrap_state_dict
from .sam2 import NO_OBJ_SCORE, Sam2, Sam2Spec, get_spec  # noqa: F401 (NO_OBJ_SCORE re-exported)
from .sam2_memory_attention import MemoryAttention
from .sam2_memory_bank import MemoryBank, pointer_position_encoding, select_memories, select_object_pointers
from .sam2_memory_encoder import MemoryEncoder
from .sam2_neck import sine_position_encoding
from .sam2_state_dict import check_memory_keys, infer_sam2_name, split_state_dict
from .sam_mask_decoder import MLP

MEM_DIM = 64


class FrameFeatures(NamedTuple):
    """One frame's image features: ``vision`` (B, 256, h, w) the raw stride-16 level (before any
    memory or ``no_mem_embed``); ``high_res_s0`` (B, 32, 4h, 4w), ``high_res_s1`` (B, 64, 2h, 2w)
    already projected for the decoder. B may be expanded (a view) to one row per object."""

    vision: torch.Tensor
    high_res_s0: torch.Tensor
    high_res_s1: torch.Tensor

    def expand(self, batch: int) -> FrameFeatures:
        return FrameFeatures(*(t.expand(batch, -1, -1, -1) for t in self))


class HeadsOutput(NamedTuple):
    """The SAM heads' result on one frame for B objects: ``low_res_masks`` (B, 1, S/4, S/4) and
    ``high_res_masks`` (B, 1, S, S) fp32 logits of the chosen mask (NO_OBJ_SCORE where absent),
    ``obj_ptr`` (B, 256), ``object_score_logits`` (B, 1)."""

    low_res_masks: torch.Tensor
    high_res_masks: torch.Tensor
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor


class Sam2Video(Sam2):
    """SAM 2 / 2.1 / MedSAM2 with its memory (see the module docstring); ``spec.version`` decides the
    SAM 2.1 parts (``no_obj_embed_spatial``, pointer temporal encodings)."""

    num_maskmem = 7
    max_obj_ptrs_in_encoder = 16
    sigmoid_scale_for_mem_enc, sigmoid_bias_for_mem_enc = 20.0, -10.0
    mask_as_output_scale, mask_as_output_bias = 20.0, -10.0

    def __init__(self, spec: Sam2Spec | str) -> None:
        super().__init__(spec)
        d = self.spec.d_model
        self.memory_attention = MemoryAttention(d, MEM_DIM)
        self.memory_encoder = MemoryEncoder(MEM_DIM, d)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(self.num_maskmem, 1, 1, MEM_DIM))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, d))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, d))
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.obj_ptr_proj = MLP(d, d, d, 3)
        self.is_v21 = self.spec.version == "2.1"
        if self.is_v21:
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, MEM_DIM))
            self.obj_ptr_tpos_proj = nn.Linear(d, MEM_DIM)

    # -- image features ------------------------------------------------------------------------------

    def encode_frame(self, pixels: torch.Tensor) -> FrameFeatures:
        """Normalised frames (B, 3, S, S) -> :class:`FrameFeatures`."""
        level0, level1, level2 = self.image_encoder(pixels)
        s0, s1 = self.sam_mask_decoder.project_high_res(level0, level1)
        return FrameFeatures(level2, s0, s1)

    # -- memory ---------------------------------------------------------------------------------------

    def memory_tokens(self, frame_idx: int, bank: MemoryBank, reverse: bool, num_frames: int,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The memory tokens frame ``frame_idx`` of a ``num_frames`` video attends to, tracking forward
        or in ``reverse`` (see :mod:`~refseg.models.sam2_memory_bank`).

        Returns:
            memory (B, M, 64) in ``dtype`` on the model's device, its position encodings (B, M, 64)
            (spatial sine + slot encoding; pointer distance encoding) and the number of object-pointer
            tokens at its end (each 256-d pointer is split into four 64-d tokens).
        """
        device = self.maskmem_tpos_enc.device
        tokens, positions = [], []
        for slot, out in select_memories(frame_idx, bank, reverse, self.num_maskmem):
            feats = out.maskmem_features.to(device=device, dtype=dtype)
            h, w = feats.shape[-2:]
            spatial_pos = sine_position_encoding(h, w, MEM_DIM, device=device).flatten(2).transpose(1, 2)
            tokens.append(feats.flatten(2).transpose(1, 2))
            pos = spatial_pos + self.maskmem_tpos_enc[self.num_maskmem - slot - 1].reshape(1, 1, -1)
            positions.append(pos.expand(feats.shape[0], -1, -1))
        pointers = select_object_pointers(frame_idx, bank, reverse, num_frames, signed=self.is_v21,
                                          max_pointers=self.max_obj_ptrs_in_encoder)
        num_ptr_tokens = 0
        if pointers:
            distances, ptrs = zip(*pointers)
            ptrs = torch.stack([p.to(device=device, dtype=dtype) for p in ptrs], dim=1)  # (B, P, 256)
            batch, count, width = ptrs.shape
            if self.is_v21:  # sine encoding of the distance, normalised by the largest possible one
                largest = max(min(num_frames, self.max_obj_ptrs_in_encoder) - 1, 1)
                rel = torch.tensor(distances, device=device) / largest
                ptr_pos = self.obj_ptr_tpos_proj(pointer_position_encoding(rel, width).to(dtype))
            else:
                ptr_pos = ptrs.new_zeros(count, MEM_DIM)
            split = width // MEM_DIM
            tokens.append(ptrs.reshape(batch, count * split, MEM_DIM))
            positions.append(ptr_pos.repeat_interleave(split, dim=0)[None].expand(batch, -1, -1))
            num_ptr_tokens = count * split
        return torch.cat(tokens, dim=1), torch.cat(positions, dim=1), num_ptr_tokens

    def condition(self, features: FrameFeatures,
                  memory: tuple[torch.Tensor, torch.Tensor, int] | None) -> torch.Tensor:
        """The frame's stride-16 features conditioned on memory: (B, 256, h, w).

        ``memory`` None (a frame prompted without memory): ``no_mem_embed`` added to the features;
        else (tokens, positions, pointer tokens) from :meth:`memory_tokens` through memory attention.
        """
        vision = features.vision
        if memory is None:
            return vision + self.no_mem_embed.reshape(1, -1, 1, 1).to(vision.dtype)
        b, c, h, w = vision.shape
        pos = sine_position_encoding(h, w, c, device=vision.device).to(vision.dtype)
        out = self.memory_attention(vision.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2),
                                    memory[0], memory[1], (h, w), memory[2])
        return out.transpose(1, 2).reshape(b, c, h, w)

    def encode_memory(self, features: FrameFeatures, high_res_masks: torch.Tensor,
                      object_score_logits: torch.Tensor, binarize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A frame's spatial memory from its raw features and (B, 1, S, S) mask logits.

        ``binarize``: the mask enters as logit > 0 instead of its sigmoid (prompted frames under the
        official post-processing). Returns features (B, 64, h, w) and their position (1, 64, h, w).
        """
        mask = (high_res_masks > 0).to(high_res_masks.dtype) if binarize else torch.sigmoid(high_res_masks)
        mask = mask * self.sigmoid_scale_for_mem_enc + self.sigmoid_bias_for_mem_enc
        feats, pos = self.memory_encoder(features.vision, mask)
        if self.is_v21:  # mark frames where the object is absent
            absent = (object_score_logits <= 0).to(feats.dtype)[..., None, None]
            feats = feats + absent * self.no_obj_embed_spatial.reshape(1, -1, 1, 1)
        return feats, pos

    # -- SAM heads ------------------------------------------------------------------------------------

    def sam_heads(self, backbone: torch.Tensor, features: FrameFeatures, point_coords: torch.Tensor | None,
                  point_labels: torch.Tensor | None, mask_input: torch.Tensor | None, multimask_output: bool,
                  dynamic_multimask: bool) -> HeadsOutput:
        """Prompt encoder + mask decoder on (memory-conditioned) features ``backbone`` (B, 256, h, w).

        Args:
            point_coords: (B, P, 2) (x, y) input-frame pixels, labels (B, P) (box corners 2 / 3 first);
                None: one padding point. mask_input: (B, 1, S/4, S/4) logits or (B, 1, S, S) (resized).
            multimask_output: decode three masks and keep the one of highest predicted IoU (its token
                becomes the pointer); otherwise the single mask (``dynamic_multimask`` may swap it
                for the best multimask one; the pointer stays the single-mask token).
        """
        batch = backbone.shape[0]
        if point_coords is None:
            point_coords = backbone.new_zeros(batch, 1, 2, dtype=torch.float32)
            point_labels = torch.full((batch, 1), -1, dtype=torch.int32, device=backbone.device)
        if mask_input is not None and tuple(mask_input.shape[-2:]) != self.sam_prompt_encoder.mask_input_size:
            mask_input = F.interpolate(mask_input.float(), self.sam_prompt_encoder.mask_input_size,
                                       mode="bilinear", align_corners=False, antialias=True)
        sparse, dense = self.sam_prompt_encoder((point_coords, point_labels), None, mask_input)
        out = self.sam_mask_decoder.predict_all(backbone, self.sam_prompt_encoder.get_dense_pe(), sparse, dense,
                                                (features.high_res_s0, features.high_res_s1))
        masks, iou = self.sam_mask_decoder.select_masks(out.masks, out.iou, multimask_output, dynamic_multimask)
        present = out.object_score_logits > 0  # (B, 1)
        masks = torch.where(present[..., None, None], masks, NO_OBJ_SCORE).float()
        rows = torch.arange(batch, device=masks.device)
        if multimask_output:
            best = iou.argmax(dim=-1)
            low_res, token = masks[rows, best][:, None], out.tokens[rows, best + 1]
        else:
            low_res, token = masks, out.tokens[:, 0]
        high_res = F.interpolate(low_res, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        obj_ptr = self._pointer(self.obj_ptr_proj(token), present)
        return HeadsOutput(low_res, high_res, obj_ptr, out.object_score_logits)

    def _pointer(self, obj_ptr: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``no_obj_ptr`` in place of the pointer of an absent object (B, 256)."""
        keep = present.to(obj_ptr.dtype)
        return keep * obj_ptr + (1 - keep) * self.no_obj_ptr

    def mask_as_output(self, features: FrameFeatures, mask: torch.Tensor) -> HeadsOutput:
        """A mask prompt (B, 1, S, S) of 0 / 1 used as the frame's output (logits +-10); the pointer
        comes from decoding the raw features with the mask as dense prompt; present = any pixel set."""
        mask = mask.float()
        high_res = mask * self.mask_as_output_scale + self.mask_as_output_bias
        side = self.image_size // 4
        low_res = F.interpolate(high_res, (side, side), mode="bilinear", align_corners=False, antialias=True)
        obj_ptr = self.sam_heads(features.vision, features, None, None, self.mask_downsample(mask), False,
                                 False).obj_ptr
        present = (mask.flatten(1) > 0).any(dim=1, keepdim=True)
        score = present.float() * self.mask_as_output_scale + self.mask_as_output_bias
        return HeadsOutput(low_res, high_res, self._pointer(obj_ptr, present), score)

    def track_frame(self, features: FrameFeatures, memory: tuple[torch.Tensor, torch.Tensor, int] | None,
                    point_coords: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None, prev_mask_logits: torch.Tensor | None = None,
                    dynamic_multimask: bool = True) -> HeadsOutput:
        """One frame for B objects: a mask prompt is used as output; otherwise the features are
        conditioned on ``memory`` (None on a frame prompted before any tracking) and decoded with
        the points (``prev_mask_logits`` (B, 1, S/4, S/4), earlier logits of this frame, as mask
        input). Multimask output when at most one point (a box counts two) is given."""
        if mask is not None:
            return self.mask_as_output(features, mask)
        backbone = self.condition(features, memory)
        num_points = 0 if point_labels is None else point_labels.shape[1]
        return self.sam_heads(backbone, features, point_coords, point_labels, prev_mask_logits,
                              num_points <= 1, dynamic_multimask)


def sam2_video_from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str | Sam2Spec | None = None,
                               source: str = "state dict") -> Sam2Video:
    """Build a :class:`Sam2Video` and load an official SAM 2 checkpoint strictly, memory modules included
    (fp32, CPU, eval mode). ``name``: a ``SAM2_SPECS`` name or spec (None: inferred, as for images).

    Raises:
        CheckpointError: missing / unexpected keys or shape mismatches.
    """
    state_dict = unwrap_state_dict(state_dict, source)
    if name is None:
        name = infer_sam2_name(state_dict, source)
    spec = name if isinstance(name, Sam2Spec) else get_spec(name)
    image, memory = split_state_dict(state_dict)
    check_memory_keys(memory, spec.version, source)  # names the release in its message
    with torch.device("meta"):  # skips the default init; every value is overwritten by the load
        model = Sam2Video(spec)
    model.to_empty(device="cpu")
    load_into(model, {**image, **memory}, source)
    return model.eval()
