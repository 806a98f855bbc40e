"""SAM 2 / SAM 2.1 / MedSAM2 for images: named specs and the model (Hiera + FPN neck + SAM heads).

``SAM2_SPECS`` holds ``sam2.1_hiera_{t,s,b+,l}``, ``sam2_hiera_{t,s,b+,l}`` and ``medsam2`` (MedSAM2:
the SAM 2.1 tiny layout at a 512 input). :class:`Sam2` holds exactly the image path of the official
model under its official key names (``image_encoder.{trunk,neck}.*``, ``sam_prompt_encoder.*``,
``sam_mask_decoder.*``, ``no_mem_embed``); the memory modules of SAM 2 video are not part of it
(their checkpoint keys are checked, see :mod:`refseg.models.sam2_state_dict`).

Typical use::

    model = build_sam2("sam2.1_hiera_t")                 # refseg.models.build
    batch = sam2_transforms.prepare_images([rgb_uint8], model.image_size)
    emb = model.encode_image(batch.pixels)               # Sam2Embedding: (1, 256, 64, 64) + high-res
    low_res, iou, obj = model.decode(emb, point_coords=pts, point_labels=lab, multimask_output=True)

``decode`` returns an object-score logit per prompt set (> 0: the object is present), which SAM (ViT)
does not have; ``SAM2ImagePredictor`` ignores it, the video predictor uses it (:data:`NO_OBJ_SCORE`,
:func:`drop_absent`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checkpoints import SAM2_CHECKPOINTS, CheckpointSource
from .hiera import Hiera
from .sam2_heads import DecoderOutput, Sam2MaskDecoder, Sam2PromptEncoder
from .sam2_neck import FpnNeck

BACKBONE_STRIDE = 16


@dataclass(frozen=True)
class Sam2Spec:
    """Architecture of one SAM 2 family model (and where its official checkpoint comes from).

    The Hiera trunk is given by ``embed_dim``, ``num_heads``, ``stages``, ``global_att_blocks``,
    ``window_pos_embed_bkg_spatial_size`` and ``window_spec``; the neck and the SAM heads are the same
    for every release (width 256). ``image_size`` is the square model input (1024; 512 for MedSAM2).
    ``version`` ``"2"`` or ``"2.1"`` says which memory-module keys the checkpoint holds.
    """

    name: str
    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    checkpoint: CheckpointSource | None = None
    image_size: int = 1024
    version: str = "2.1"
    d_model: int = 256

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for a 1024 input)."""
        return self.image_size // BACKBONE_STRIDE

    @property
    def channel_list(self) -> tuple[int, ...]:
        """Trunk channels per stage, lowest resolution first (the neck's ``backbone_channel_list``)."""
        return tuple(self.embed_dim * 2 ** i for i in reversed(range(len(self.stages))))


_TRUNKS = {  # (embed_dim, num_heads, stages, global_att_blocks, pos-embed size, window_spec)
    "t": (96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7), (8, 4, 14, 7)),
    "s": (96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7), (8, 4, 14, 7)),
    "b+": (112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14), (8, 4, 14, 7)),
    "l": (144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), (8, 4, 16, 8)),
}


def _spec(name: str, size: str, version: str, image_size: int = 1024) -> Sam2Spec:
    dim, heads, stages, global_blocks, bkg, windows = _TRUNKS[size]
    return Sam2Spec(name, dim, heads, stages, global_blocks, bkg, windows, SAM2_CHECKPOINTS[name],
                    image_size, version)


SAM2_SPECS: dict[str, Sam2Spec] = {
    **{f"sam2.1_hiera_{s}": _spec(f"sam2.1_hiera_{s}", s, "2.1") for s in _TRUNKS},
    **{f"sam2_hiera_{s}": _spec(f"sam2_hiera_{s}", s, "2") for s in _TRUNKS},
    "medsam2": _spec("medsam2", "t", "2.1", image_size=512),
}


def get_spec(name: str) -> Sam2Spec:
    """``SAM2_SPECS[name]`` with an error listing the known names."""
    if name not in SAM2_SPECS:
        raise KeyError(f"unknown SAM 2 model {name!r}; known: {', '.join(SAM2_SPECS)}")
    return SAM2_SPECS[name]


NO_OBJ_SCORE = -1024.0
"""Mask logit of every pixel of a prompt set whose object score says "absent" (SAM 2's own constant)."""
LOW_RES_LIMIT = 32.0
"""``SAM2ImagePredictor`` returns low-resolution logits clamped to [-32, 32]; fed back as mask prompts they
are in that range (refseg's pipeline clamps the mask prompts it passes on to SAM 2 likewise)."""


def drop_absent(masks: torch.Tensor, iou: torch.Tensor, object_score_logits: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt sets whose object-score logit is <= 0 get no mask: their logits become :data:`NO_OBJ_SCORE`
    (what SAM 2's video model does with them) and their predicted IoU 0.

    Args:
        masks: (P, M, h, w) logits; iou: (P, M); object_score_logits: (P, 1).

    Returns:
        (masks, iou) of the same shapes and dtypes (no host read: one ``torch.where`` each).
    """
    present = object_score_logits > 0
    return (torch.where(present[..., None, None], masks, NO_OBJ_SCORE).to(masks.dtype),
            torch.where(present, iou, 0.0).to(iou.dtype))


@dataclass(eq=False)
class Sam2Embedding:
    """The image encoding the SAM 2 decoder needs, for B images.

    image_embed: (B, 256, S/16, S/16), the stride-16 neck level plus ``no_mem_embed``;
    high_res_s0: (B, 32, S/4, S/4); high_res_s1: (B, 64, S/8, S/8) (projected by the decoder's
    ``conv_s0`` / ``conv_s1``).

    It indexes like SAM's (B, 256, h, w) embedding tensor along the image axis, every part alike:
    ``emb[i]`` is image i without the batch axis, ``emb[None]`` adds one, ``emb[index_tensor]``
    gathers; :meth:`select` keeps the batch axis for an int. :meth:`parts` gives the three tensors.
    """

    image_embed: torch.Tensor
    high_res_s0: torch.Tensor
    high_res_s1: torch.Tensor

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image_embed, high_res_s0, high_res_s1)."""
        return self.image_embed, self.high_res_s0, self.high_res_s1

    def __getitem__(self, index) -> Sam2Embedding:
        return Sam2Embedding(*(t[index] for t in self.parts()))

    def select(self, index: int | slice | torch.Tensor) -> Sam2Embedding:
        """The embedding of some images (an int keeps the batch axis: batch 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self[index]

    @property
    def device(self) -> torch.device:
        return self.image_embed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the three tensors (16.8 MB per image in fp32 at a 1024 input)."""
        return sum(t.numel() * t.element_size() for t in self.parts())

    def to(self, *args, **kwargs) -> Sam2Embedding:
        """``Tensor.to`` applied to every part."""
        return Sam2Embedding(*(t.to(*args, **kwargs) for t in self.parts()))

    def float(self) -> Sam2Embedding:
        return self.to(torch.float32)

    @staticmethod
    def cat(embeddings: list[Sam2Embedding]) -> Sam2Embedding:
        """Concatenate batches along the image axis."""
        return Sam2Embedding(*(torch.cat(list(parts)) for parts in zip(*(e.parts() for e in embeddings))))


class Sam2ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck: (B, 3, S, S) -> neck levels [(B, 256, S/4, S/4), (B, 256, S/8, S/8),
    (B, 256, S/16, S/16)] (the stride-32 level is dropped, ``scalp=1``)."""

    def __init__(self, spec: Sam2Spec) -> None:
        super().__init__()
        self.trunk = Hiera(spec.embed_dim, spec.num_heads, spec.stages, spec.global_att_blocks,
                           spec.window_pos_embed_bkg_spatial_size, spec.window_spec)
        self.neck = FpnNeck(spec.d_model, spec.channel_list)
        if tuple(reversed(self.trunk.channel_list)) != self.neck.backbone_channel_list:
            raise ValueError(f"Sam2ImageEncoder: trunk channels {self.trunk.channel_list} do not fit the neck")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.neck(self.trunk(x))


class Sam2(nn.Module):
    """SAM 2 for images: ``image_encoder``, ``sam_prompt_encoder``, ``sam_mask_decoder``, ``no_mem_embed``.

    ``mask_threshold`` (0.0) turns logits into masks.
    """

    mask_threshold: float = 0.0

    def __init__(self, spec: Sam2Spec | str) -> None:
        super().__init__()
        if isinstance(spec, str):
            spec = get_spec(spec)
        self.spec = spec
        grid = spec.embedding_size
        self.image_encoder = Sam2ImageEncoder(spec)
        self.sam_prompt_encoder = Sam2PromptEncoder(spec.d_model, (grid, grid), (spec.image_size, spec.image_size),
                                                    mask_in_chans=16)
        self.sam_mask_decoder = Sam2MaskDecoder(spec.d_model)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, spec.d_model))

    @property
    def image_size(self) -> int:
        """Side of the square model input in pixels (1024; 512 for MedSAM2)."""
        return self.spec.image_size

    def encode_image(self, pixels: torch.Tensor) -> Sam2Embedding:
        """Normalised images (B, 3, S, S) (``sam2_transforms.prepare_images``) -> :class:`Sam2Embedding`.

        The stride-16 level gets ``no_mem_embed`` added (what the official image predictor does);
        the two high-resolution levels are projected once here for every later decode.
        """
        size = self.spec.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"Sam2.encode_image: pixels must be (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        return self.embed_levels(self.image_encoder(pixels))

    def embed_levels(self, levels: list[torch.Tensor]) -> Sam2Embedding:
        """The image encoder's three neck levels (B, 256, S/4, S/4), (B, 256, S/8, S/8), (B, 256, S/16, S/16)
        -> :class:`Sam2Embedding` (what :meth:`encode_image` does after the encoder; a backend running the
        encoder in fp16 / bf16 passes the levels in fp32, so the decoder side stays fp32)."""
        level0, level1, level2 = levels
        s0, s1 = self.sam_mask_decoder.project_high_res(level0, level1)
        image_embed = level2 + self.no_mem_embed.reshape(1, -1, 1, 1).to(level2.dtype)
        return Sam2Embedding(image_embed, s0, s1)

    @staticmethod
    def pack_prompts(point_coords: torch.Tensor | None, point_labels: torch.Tensor | None,
                     boxes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Points and boxes as one point set, the way ``SAM2ImagePredictor`` feeds the prompt encoder.

        Args:
            point_coords: (B, N, 2) (x, y) input-frame pixels; point_labels: (B, N) 1 / 0 / -1.
            boxes: (B, 4) XYXY (or (B, 2, 2) corners) in the input frame.

        Returns:
            None without points and boxes, else coords (B, N', 2) and labels (B, N') float32: the box
            corners (labels 2, 3) first, then the points, then one padding point (0, 0) of label -1.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("Sam2: point_coords and point_labels must be given together")
        coords, labels = [], []
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2).to(torch.float32)
            coords.append(corners)
            labels.append(torch.tensor([[2.0, 3.0]], device=boxes.device).expand(corners.shape[0], 2))
        if point_coords is not None:
            coords.append(point_coords.to(torch.float32))
            labels.append(point_labels.to(torch.float32))
        if not coords:
            return None
        sets = coords[0].shape[0]
        coords.append(coords[0].new_zeros(sets, 1, 2))
        labels.append(labels[0].new_full((sets, 1), -1.0))
        return torch.cat(coords, dim=1), torch.cat(labels, dim=1)

    def embed_packed_prompts(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """Sparse embeddings (P, N, 256) of packed prompts (:meth:`pack_prompts`): coords (P, N, 2)
        input-frame pixels, labels (P, N) float 1 / 0 / -1 / 2 / 3, one token per column."""
        return self.sam_prompt_encoder.embed_points(point_coords, point_labels, pad=False)

    def embed_mask_prompt(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """Dense embedding (M, 256, h, w) with the mask prompt switched by a tensor (traceable):
        ``has_mask_input`` (1,) 1.0 embeds ``mask_input`` (M, 1, 4h, 4w), 0.0 gives ``no_mask_embed``."""
        encoder = self.sam_prompt_encoder
        use_mask = has_mask_input.reshape(1, 1, 1, 1)
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return use_mask * encoder.embed_masks(mask_input) + (1 - use_mask) * no_mask

    def embed_prompts(self, point_coords: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
                      boxes: torch.Tensor | None = None, mask_input: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N', 256) and dense (B or 1, 256, h, w) prompt embeddings, packed as
        :meth:`pack_prompts` says (shapes as in :meth:`decode`)."""
        packed = self.pack_prompts(point_coords, point_labels, boxes)
        sparse, dense = self.sam_prompt_encoder(None, None, mask_input)
        if packed is not None:
            sparse = self.embed_packed_prompts(*packed)
        return sparse, dense

    def decode_all(self, embedding: Sam2Embedding, sparse: torch.Tensor, dense: torch.Tensor,
                   image_pe: torch.Tensor | None = None) -> DecoderOutput:
        """Mask decoder returning every output token (:class:`~refseg.models.sam2_heads.DecoderOutput`:
        masks (P, 4, 4h, 4w), IoU (P, 4), tokens, object_score_logits (P, 1)) for embedded prompts.
        ``image_pe`` (1, 256, h, w) defaults to the prompt encoder's (an exporter passes it precomputed)."""
        if image_pe is None:
            image_pe = self.sam_prompt_encoder.get_dense_pe()
        return self.sam_mask_decoder.predict_all(embedding.image_embed, image_pe, sparse, dense,
                                                 (embedding.high_res_s0, embedding.high_res_s1))

    def decode(self, embedding: Sam2Embedding, point_coords: torch.Tensor | None = None,
               point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
               mask_input: torch.Tensor | None = None, multimask_output: bool = True,
               dynamic_multimask: bool = False, point_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for B prompt sets.

        Args:
            embedding: :class:`Sam2Embedding` of 1 image (shared by all sets) or of B images (pairs).
            point_coords: (B, N, 2) (x, y) pixels in the input frame (``sam2_transforms.transform_coords``);
                point_labels: (B, N) 1 fg, 0 bg, -1 padding, 2 / 3 box corners.
            boxes: (B, 4) XYXY in the input frame; mask_input: (B, 1, S/4, S/4) low-res logits.
            multimask_output: 3 masks per set when True, 1 when False.
            dynamic_multimask: with ``multimask_output=False``, replace an unstable single mask by the
                best multimask one (the official default post-processing; see ``Sam2MaskDecoder``).
            point_mask: (B, N) bool or None; False marks points that only pad sets of different
                lengths into one batch (invisible to every token, unlike a -1 label).

        Returns:
            low_res_masks (B, M, S/4, S/4) logits, iou_predictions (B, M), object_score_logits (B, 1).
        """
        sparse, dense = self.embed_prompts(point_coords, point_labels, boxes, mask_input)
        prompt_mask = None
        if point_mask is not None:
            # The box corners lead, the encoder's padding point trails: both always count.
            lead = 0 if boxes is None else 2
            prompt_mask = torch.cat([point_mask.new_ones(point_mask.shape[0], lead, dtype=torch.bool),
                                     point_mask.bool(), point_mask.new_ones(point_mask.shape[0], 1, dtype=torch.bool)], 1)
        return self.sam_mask_decoder(embedding.image_embed, self.sam_prompt_encoder.get_dense_pe(), sparse, dense,
                                     multimask_output, prompt_mask, (embedding.high_res_s0, embedding.high_res_s1),
                                     dynamic_multimask)
