"""Export-only modules: the exact tensors each exported graph takes and returns.

Each wrapper holds a model (sharing its parameters, no copy) and exposes a ``forward`` whose
positional inputs and tuple outputs are the graph's, named by :mod:`refseg.runtime.io_names`:

* :class:`Dinov2Export`: ``images`` (B, 3, S, S) float32 -> ``patch_tokens`` (B, T, D),
  ``cls_token`` (B, D), T = (S/14)². S is fixed when the wrapper is built: the position table is
  resampled once here (``DinoVisionTransformer.position_embedding``) and enters the graph as one
  constant, so the graph holds no bicubic resize.
* :class:`Dinov3Export`: the same names and shapes for DINOv3 at a fixed (H, W) (multiples of 16,
  T = (H/16)(W/16)); the RoPE sine/cosine tables are computed once here and enter the graph as constants.
* :class:`SamEncoderExport`: ``images`` (B, 3, 1024, 1024) float32 -> ``image_embeddings``
  (B, 256, 64, 64).
* :class:`SamDecoderExport`: P prompt sets against one image embedding, the calling convention
  of the official SAM ONNX model: ``point_coords`` (P, N, 2) (x, y) pixels of the 1024 frame,
  ``point_labels`` (P, N) float (1 positive, 0 negative, -1 padding / "not a point", 2 and 3 the
  top-left and bottom-right box corners), ``mask_input`` (M, 1, 256, 256) logits with M = 1
  (shared) or P, ``has_mask_input`` (1,) (1.0 uses ``mask_input``). Boxes are therefore passed as
  two extra points, and a prompt without a box needs one padding point appended, as SAM's prompt
  encoder does itself (:func:`refseg.runtime.io_names.pack_prompts` does both).

Graph inputs and outputs are always float32; fp16 graphs cast inside (see :mod:`refseg.export.fp16`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from refseg.models.dinov2 import DinoVisionTransformer
from refseg.models.dinov3 import Dinov3VisionTransformer
from refseg.runtime import io_names as io

MASK_OUTPUTS = ("all", "multi", "single")  # decoder mask sets an export can return


@dataclass(frozen=True)
class GraphIO:
    """Names and shapes of one graph's inputs and outputs.

    ``shapes`` maps every tensor name to its dimensions: ints for fixed sizes, strings for the
    dynamic ones (the same string means the same size, e.g. ``"batch"``).
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: dict

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes``: {name: {axis: symbol}} for string dims."""
        return {name: {i: d for i, d in enumerate(dims) if isinstance(d, str)}
                for name, dims in self.shapes.items() if any(isinstance(d, str) for d in dims)}


def image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(H, W) of a side S or an (H, W) pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = (int(v) for v in image_size)
    return height, width


class EncoderExport(nn.Module):
    """What the two matching-encoder wrappers share: the graph contract (``images`` (B, 3, H, W) ->
    ``patch_tokens`` (B, T, D), ``cls_token`` (B, D)) and example inputs at the fixed (H, W)."""

    def _set_io(self, height: int, width: int, num_tokens: int, dim: int) -> None:
        self.num_tokens = num_tokens
        self.io = GraphIO(
            inputs=(io.DINOV2_INPUT,), outputs=io.DINOV2_OUTPUTS,
            shapes={io.DINOV2_INPUT: ["batch", 3, height, width],
                    io.DINOV2_PATCH_TOKENS: ["batch", num_tokens, dim],
                    io.DINOV2_CLS_TOKEN: ["batch", dim]})

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Random ``images`` of the export size (batch 2 keeps the traced batch symbolic)."""
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, 3, *image_hw(self.image_size), generator=gen),)


class Dinov2Export(EncoderExport):
    """DINOv2 -> (``patch_tokens`` (B, T, D), ``cls_token`` (B, D)) at a fixed input side S.

    Args:
        model: a :class:`DinoVisionTransformer` (eval mode; with or without register tokens).
        image_size: S, a multiple of the patch size (14).

    The forward pass is the model's ``tokens_with_positions`` + ``features_from_tokens`` (its
    ``forward_features`` for ``masks=None``) with the resampled position table a buffer computed
    here, so tracing sees no shape arithmetic on it.
    """

    def __init__(self, model: DinoVisionTransformer, image_size: int) -> None:
        super().__init__()
        patch = model.patch_size
        if image_size <= 0 or image_size % patch:
            raise ValueError(f"Dinov2Export: image_size {image_size} is not a positive multiple "
                             f"of the patch size {patch}")
        self.model = model
        self.image_size = image_size
        grid = image_size // patch
        with torch.no_grad():
            pos = model.position_embedding((grid, grid))
        self.register_buffer("pos_embed", pos.detach().to(model.pos_embed.dtype).clone(), persistent=False)
        self._set_io(image_size, image_size, grid * grid, model.embed_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features_from_tokens(self.model.tokens_with_positions(images, self.pos_embed))
        return features["x_norm_patchtokens"], features["x_norm_clstoken"]


class Dinov3Export(EncoderExport):
    """DINOv3 -> (``patch_tokens`` (B, T, D), ``cls_token`` (B, D)) at a fixed input size.

    Args:
        model: a :class:`Dinov3VisionTransformer` (eval mode; its parameters are shared, not copied).
        image_size: S (square) or (H, W), multiples of 16.

    The forward pass is the model's ``prepare_tokens`` + ``features_from_tokens`` (its
    ``forward_features`` for ``masks=None``) with the RoPE tables held as buffers.
    """

    def __init__(self, model: Dinov3VisionTransformer, image_size: int | tuple[int, int]) -> None:
        super().__init__()
        height, width = image_hw(image_size)
        patch = model.patch_size
        if min(height, width) <= 0 or height % patch or width % patch:
            raise ValueError(f"Dinov3Export: image size {height}x{width} (HxW) is not a positive multiple of "
                             f"the patch size {patch}")
        self.model = model
        self.image_size = (height, width)
        with torch.no_grad():
            sin, cos = model.rope((height // patch, width // patch))
        self.register_buffer("rope_sin", sin.clone(), persistent=False)
        self.register_buffer("rope_cos", cos.clone(), persistent=False)
        self._set_io(height, width, (height // patch) * (width // patch), model.embed_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.prepare_tokens(images)
        features = self.model.features_from_tokens(tokens, (self.rope_sin, self.rope_cos))
        return features["x_norm_patchtokens"], features["x_norm_clstoken"]


class SamEncoderExport(nn.Module):
    """SAM image encoder: ``images`` (B, 3, 1024, 1024) -> ``image_embeddings`` (B, 256, 64, 64)."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam
        self.img_size = sam.spec.img_size
        grid = sam.spec.embedding_size
        self.io = GraphIO(
            inputs=(io.SAM_ENCODER_INPUT,), outputs=(io.SAM_ENCODER_OUTPUT,),
            shapes={io.SAM_ENCODER_INPUT: ["batch", 3, self.img_size, self.img_size],
                    io.SAM_ENCODER_OUTPUT: ["batch", sam.spec.prompt_embed_dim, grid, grid]})

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Random ``images`` (batch 1 by default: tracing the full encoder is the costly part)."""
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, 3, self.img_size, self.img_size, generator=gen),)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.sam.encode_image(images)


class SamDecoderExport(nn.Module):
    """SAM prompt encoder + mask decoder for P prompt sets against one image embedding.

    Args:
        sam: a :class:`refseg.models.sam.Sam` (its prompt and decoder methods are the graph).
        mask_outputs: ``"all"`` returns the 4 mask-token outputs (index 0 the single-mask output,
            1..3 the multimask outputs) so one graph serves both modes; ``"multi"`` returns
            1..3 and ``"single"`` index 0, like SAM's ``multimask_output`` fixed at export time.

    Forward inputs/outputs: see the module docstring; returns ``low_res_masks`` (P, C, 256, 256)
    logits and ``iou_predictions`` (P, C), C = 4 / 3 / 1.
    """

    def __init__(self, sam: nn.Module, mask_outputs: str = "all") -> None:
        super().__init__()
        if mask_outputs not in MASK_OUTPUTS:
            raise ValueError(f"SamDecoderExport: mask_outputs must be one of {MASK_OUTPUTS}, "
                             f"got {mask_outputs!r}")
        self.sam = sam
        self.mask_outputs = mask_outputs
        with torch.no_grad():
            self.register_buffer("dense_pe", sam.prompt_encoder.get_dense_pe().clone(),
                                 persistent=False)
        dim = sam.spec.prompt_embed_dim
        grid = sam.spec.embedding_size
        low = 4 * grid
        count = {"all": 4, "multi": 3, "single": 1}[mask_outputs]
        self.io = GraphIO(
            inputs=io.SAM_DECODER_INPUTS, outputs=io.SAM_DECODER_OUTPUTS,
            shapes={io.SAM_DECODER_EMBEDDINGS: [1, dim, grid, grid],
                    io.SAM_DECODER_COORDS: ["prompt_sets", "points", 2],
                    io.SAM_DECODER_LABELS: ["prompt_sets", "points"],
                    io.SAM_DECODER_MASK_INPUT: ["mask_sets", 1, low, low],
                    io.SAM_DECODER_HAS_MASK: [1],
                    io.SAM_DECODER_MASKS: ["prompt_sets", count, low, low],
                    io.SAM_DECODER_IOU: ["prompt_sets", count]})

    def example_inputs(self, prompt_sets: int = 2, points: int = 4) -> tuple[torch.Tensor, ...]:
        """Random embedding, points (with one padding point per set), a shared zero mask input."""
        gen = torch.Generator().manual_seed(0)
        _, dim, grid, _ = self.io.shapes[io.SAM_DECODER_EMBEDDINGS]
        embedding = torch.randn(1, dim, grid, grid, generator=gen)
        coords = torch.rand(prompt_sets, points, 2, generator=gen) * 1024
        labels = torch.randint(0, 2, (prompt_sets, points), generator=gen).float()
        labels[:, -1] = -1
        mask_input = torch.zeros(1, 1, 4 * grid, 4 * grid)
        return embedding, coords, labels, mask_input, torch.zeros(1)

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor, mask_input: torch.Tensor,
                has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.sam.embed_packed_prompts(point_coords, point_labels)
        dense = self.sam.embed_mask_prompt(mask_input, has_mask_input)
        masks, iou = self.sam.decode_all_masks(image_embeddings, sparse, dense, self.dense_pe)
        if self.mask_outputs == "multi":
            return masks[:, 1:], iou[:, 1:]
        if self.mask_outputs == "single":
            return masks[:, :1], iou[:, :1]
        return masks, iou

