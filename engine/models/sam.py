"""SAM models: named specs, the model, loading official checkpoints, and deterministic random weights.

``SAM_SPECS`` holds ``vit_b``, ``vit_l``, ``vit_h`` (the official releases) and ``medsam`` (MedSAM:
the ViT-B layout fine-tuned on medical images). ``Sam(spec)`` has exactly the official state-dict keys
(``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``); ``pixel_mean`` / ``pixel_std`` are
non-persistent buffers, as in the official model, so they are not part of checkpoints.

Typical use::

    model = build_sam("vit_b")    # refseg.models.build: finds / downloads sam_vit_b_01ec64.pth
    batch = prepare_images([rgb_uint8], model.img_size)          # refseg.models.sam_transforms
    emb = model.encode_image(batch.pixels)                        # (1, 256, 64, 64)
    low_res, iou = model.decode(emb, point_coords=pts, point_labels=lab, multimask_output=False)
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .checkpoints import CheckpointError, CheckpointSource, load_into, unwrap_state_dict
from .norms import LayerNorm2d
from .sam_image_encoder import ImageEncoderViT
from .sam_mask_decoder import MaskDecoder
from .sam_prompt_encoder import PromptEncoder
from .sam_transforms import PIXEL_MEAN, PIXEL_STD

log = logging.getLogger(__name__)

_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


def default_global_attn_indexes(depth: int) -> tuple[int, ...]:
    """Last block of each of ``min(4, depth // 2)`` equal groups: (2, 5, 8, 11) for 12 blocks,
    (5, 11, 17, 23) for 24, (7, 15, 23, 31) for 32; (1,) for 2 and (1, 3) for 4 blocks, so reduced
    encoders keep windowed blocks followed by a global one."""
    groups = max(1, min(4, depth // 2))
    return tuple((k + 1) * depth // groups - 1 for k in range(groups))


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM variant (and where its official checkpoint comes from).

    The prompt encoder and mask decoder are the same for all variants (width 256); ``img_size``
    is the square model input (1024), giving an (img_size/16)² image embedding.
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    checkpoint: CheckpointSource | None = None
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for 1024 inputs)."""
        return self.img_size // self.patch_size

    def with_depth(self, depth: int, global_attn_indexes: tuple[int, ...] | None = None) -> SamSpec:
        """Same widths and heads with ``depth`` encoder blocks (for fast tests).

        Global blocks default to :func:`default_global_attn_indexes`; the result has no checkpoint
        and is named ``<name>_d<depth>``.
        """
        indexes = default_global_attn_indexes(depth) if global_attn_indexes is None \
            else tuple(global_attn_indexes)
        return dataclasses.replace(self, name=f"{self.name}_d{depth}", depth=depth,
                                   global_attn_indexes=indexes, checkpoint=None)


def _official(name: str, dim: int, depth: int, heads: int, file: str, digest: str) -> SamSpec:
    return SamSpec(name, dim, depth, heads, default_global_attn_indexes(depth),
                   CheckpointSource(file, _URL + file, sha256_prefix=digest))


SAM_SPECS: dict[str, SamSpec] = {
    "vit_b": _official("vit_b", 768, 12, 12, "sam_vit_b_01ec64.pth", "01ec64"),
    "vit_l": _official("vit_l", 1024, 24, 16, "sam_vit_l_0b3195.pth", "0b3195"),
    "vit_h": _official("vit_h", 1280, 32, 16, "sam_vit_h_4b8939.pth", "4b8939"),
    "medsam": SamSpec("medsam", 768, 12, 12, default_global_attn_indexes(12),
                      CheckpointSource("medsam_vit_b.pth", None)),
}


class Sam(nn.Module):
    """SAM: ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` plus pixel statistics.

    Buffers ``pixel_mean`` / ``pixel_std`` (3, 1, 1) are the RGB statistics on the 0–255 scale.
    ``mask_threshold`` (0.0) turns logits into masks.
    """

    mask_threshold: float = 0.0

    def __init__(self, spec: SamSpec | str) -> None:
        super().__init__()
        if isinstance(spec, str):
            spec = get_spec(spec)
        self.spec = spec
        grid = spec.embedding_size
        self.image_encoder = ImageEncoderViT(
            img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim,
            depth=spec.depth, num_heads=spec.num_heads, out_chans=spec.prompt_embed_dim,
            window_size=spec.window_size, global_attn_indexes=spec.global_attn_indexes)
        self.prompt_encoder = PromptEncoder(spec.prompt_embed_dim, (grid, grid),
                                            (spec.img_size, spec.img_size), mask_in_chans=16)
        self.mask_decoder = MaskDecoder(transformer_dim=spec.prompt_embed_dim)
        self.register_buffer("pixel_mean", torch.empty(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.empty(3, 1, 1), persistent=False)
        self.reset_pixel_stats()

    def reset_pixel_stats(self) -> None:
        """(Re)write ``pixel_mean`` / ``pixel_std`` (needed after ``to_empty``)."""
        with torch.no_grad():
            self.pixel_mean.copy_(torch.tensor(PIXEL_MEAN).view(3, 1, 1))
            self.pixel_std.copy_(torch.tensor(PIXEL_STD).view(3, 1, 1))

    @property
    def img_size(self) -> int:
        """Side of the square model input in pixels (1024)."""
        return self.spec.img_size

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised, zero-padded images (B, 3, S, S) -> image embeddings (B, 256, S/16, S/16)."""
        return self.image_encoder(pixels)

    def decode(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor | None = None,
               point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
               mask_input: torch.Tensor | None = None,
               multimask_output: bool = True, point_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for B prompt sets.

        Args:
            image_embeddings: (1 or B, 256, h, w); batch 1 is shared by all prompt sets.
            point_coords: (B, N, 2) (x, y) pixels in the model-input frame (after
                ``sam_transforms.resize_coords``); point_labels: (B, N) 1 fg, 0 bg, −1 padding.
            boxes: (B, 4) XYXY in the model-input frame; mask_input: (B, 1, 256, 256) logits.
            multimask_output: 3 masks per set when True, 1 when False.
            point_mask: (B, N) bool or None; False marks points that only pad sets of different
                lengths into one batch: unlike a −1 label (a token the other tokens attend to, as
                in the official predictor) they are invisible, so every set decodes exactly as it
                would alone with its own N.

        Returns:
            low_res_masks (B, M, 4h, 4w) logits and iou_predictions (B, M).
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("Sam.decode: point_coords and point_labels must be given together")
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        prompt_mask = None
        if point_mask is not None:
            extra = sparse.shape[1] - point_mask.shape[1]  # the encoder's own pad point or box corners
            prompt_mask = torch.cat([point_mask.bool(), point_mask.new_ones(point_mask.shape[0], extra,
                                                                            dtype=torch.bool)], 1)
        return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse,
                                 dense, multimask_output, prompt_mask)


    def embed_packed_prompts(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """Sparse prompt embeddings from prompts packed as points, the official SAM ONNX convention.

        Args:
            point_coords: (P, N, 2) (x, y) pixels of the model-input frame.
            point_labels: (P, N) float: 1 positive, 0 negative, −1 padding ("not a point"), 2 / 3 the
                top-left / bottom-right box corners (see :func:`refseg.runtime.io_names.pack_prompts`).

        Returns:
            (P, N, 256): what the prompt encoder gives for the same (points, box), one token per column.
        """
        pe = self.prompt_encoder
        sparse = pe.embed_points(point_coords, point_labels, pad=False)
        # embed_points gives labels 2/3 the positional encoding alone; the box path adds the corner embeddings.
        lab = point_labels[..., None]
        zero = sparse.new_zeros(())
        sparse = sparse + torch.where(lab == 2, pe.point_embeddings[2].weight, zero)
        return sparse + torch.where(lab == 3, pe.point_embeddings[3].weight, zero)

    def embed_mask_prompt(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """Dense prompt embedding with the mask prompt switched by a tensor (traceable, no Python branch).

        Args:
            mask_input: (M, 1, 256, 256) low-res logits, M = 1 (shared) or P.
            has_mask_input: (1,) float, 1.0 embeds ``mask_input``, 0.0 gives ``no_mask_embed``.

        Returns:
            (M, 256, 64, 64) dense embedding (64 = the image-embedding side).
        """
        pe = self.prompt_encoder
        use_mask = has_mask_input.reshape(1, 1, 1, 1)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return use_mask * pe.embed_masks(mask_input) + (1 - use_mask) * no_mask

    def decode_all_masks(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                         image_pe: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask decoder returning every mask token: masks (P, 4, 256, 256) logits and IoU (P, 4).

        Index 0 is the single-mask output, 1..3 the multimask ones. ``image_pe`` (1, 256, 64, 64)
        defaults to ``prompt_encoder.get_dense_pe()`` (an exporter passes it precomputed).
        """
        if image_pe is None:
            image_pe = self.prompt_encoder.get_dense_pe()
        return self.mask_decoder.predict_masks(image_embeddings, image_pe, sparse, dense)


def get_spec(name: str) -> SamSpec:
    """``SAM_SPECS[name]`` with an error listing the known names."""
    if name not in SAM_SPECS:
        raise KeyError(f"unknown SAM model {name!r}; known: {', '.join(SAM_SPECS)}")
    return SAM_SPECS[name]


def _shape(sd: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{source}: not a SAM checkpoint (no key {key!r}; first keys: "
                              f"{', '.join(list(sd)[:5])})")
    return tuple(sd[key].shape)


def infer_sam_spec(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> SamSpec:
    """Read the encoder architecture off the tensor shapes of an official-format SAM state dict.

    Width from ``patch_embed``, depth from the block count, heads from the rel-pos table width,
    global blocks from the rel-pos table length, input size from ``pos_embed``. Returns the matching
    entry of ``SAM_SPECS`` (``vit_b`` for MedSAM, which has the same layout) or, for any other
    layout (e.g. reduced-depth test models), a new spec named ``custom``.

    Raises:
        CheckpointError: the dict is not a SAM state dict.
    """
    dim = _shape(state_dict, "image_encoder.patch_embed.proj.weight", source)[0]
    pos = _shape(state_dict, "image_encoder.pos_embed", source)
    patch = _shape(state_dict, "image_encoder.patch_embed.proj.weight", source)[-1]
    depth = 0
    while f"image_encoder.blocks.{depth}.norm1.weight" in state_dict:
        depth += 1
    if depth == 0:
        raise CheckpointError(f"{source}: not a SAM checkpoint (no image_encoder.blocks.*)")
    grid = pos[1]
    global_idx, window, heads = [], 0, 0
    for i in range(depth):
        table = _shape(state_dict, f"image_encoder.blocks.{i}.attn.rel_pos_h", source)
        heads = dim // table[1]
        if table[0] == 2 * grid - 1:
            global_idx.append(i)
        else:
            window = (table[0] + 1) // 2
    window = window or 14
    for spec in SAM_SPECS.values():
        if (spec.embed_dim, spec.depth, spec.num_heads, spec.global_attn_indexes, spec.img_size,
                spec.window_size) == (dim, depth, heads, tuple(global_idx), grid * patch, window):
            return spec
    return SamSpec("custom", dim, depth, heads, tuple(global_idx), None, img_size=grid * patch,
                   patch_size=patch, window_size=window)


def infer_sam_name(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> str:
    """Name in ``SAM_SPECS`` of the layout of ``state_dict`` (``vit_b`` / ``vit_l`` / ``vit_h``).

    Raises:
        CheckpointError: not a SAM state dict, or a layout that no named spec has.
    """
    spec = infer_sam_spec(state_dict, source)
    if spec.name == "custom":
        raise CheckpointError(f"{source}: SAM layout (dim {spec.embed_dim}, depth {spec.depth}, "
                              f"heads {spec.num_heads}, global {spec.global_attn_indexes}) matches "
                              f"none of {', '.join(SAM_SPECS)}")
    return spec.name


def sam_from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str | SamSpec | None = None,
                        source: str = "state dict") -> Sam:
    """Build a :class:`Sam` and load ``state_dict`` strictly (fp32, CPU, eval mode).

    Args:
        state_dict: official-format keys; a ``{"model": sd}`` / ``{"state_dict": sd}`` wrapper is
            accepted (MedSAM-style redistributions).
        name: a ``SAM_SPECS`` name or a spec; None infers it with :func:`infer_sam_spec`.
        source: file name or description used in error messages.

    Raises:
        CheckpointError: listing missing / unexpected keys and shape mismatches.
    """
    state_dict = unwrap_state_dict(state_dict, source)
    if name is None:
        spec = infer_sam_spec(state_dict, source)
    else:
        spec = name if isinstance(name, SamSpec) else get_spec(name)
    model = _uninitialised(spec)  # every value is overwritten by the load
    load_into(model, state_dict, source)
    return model.eval()


def _uninitialised(spec: SamSpec) -> Sam:
    # Skips the default init (seconds for ViT-H); parameters hold garbage until overwritten.
    with torch.device("meta"):
        model = Sam(spec)
    model.to_empty(device="cpu")
    model.reset_pixel_stats()
    return model


def _random_value(module: nn.Module, leaf: str, noise: torch.Tensor, key: str) -> torch.Tensor:
    if isinstance(module, (nn.LayerNorm, LayerNorm2d)):
        return 1 + 0.1 * noise if leaf == "weight" else 0.05 * noise
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        if leaf == "bias":
            return 0.02 * noise
        # ConvTranspose2d weights are (in, out, k, k); with stride == kernel each output pixel sees
        # one tap per input channel.
        fan_in = noise.shape[0] if isinstance(module, nn.ConvTranspose2d) else noise[0].numel()
        return noise / math.sqrt(fan_in)
    if isinstance(module, nn.Embedding) or leaf == "positional_encoding_gaussian_matrix":
        return noise
    if leaf in ("rel_pos_h", "rel_pos_w", "pos_embed"):
        return 0.1 * noise
    raise TypeError(f"init_random_: no rule for {key} in {type(module).__name__}")


@torch.no_grad()
def init_random_(model: Sam, seed: int = 0) -> Sam:
    """Overwrite every parameter and persistent buffer with deterministic random values, in place.

    Values are drawn from a CPU generator seeded with ``seed``, in state-dict order, so they do not
    depend on the device or dtype of ``model``: linear / conv weights N(0, 1/fan_in), their biases
    0.02·N(0, 1), LayerNorm weights 1 + 0.1·N(0, 1) and biases 0.05·N(0, 1), embeddings and the
    Fourier matrix N(0, 1), ``pos_embed`` and the rel-pos tables 0.1·N(0, 1). Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        noise = torch.randn(tuple(tensor.shape), generator=gen)
        tensor.copy_(_random_value(modules[owner], leaf, noise, key))
    return model


def random_sam(spec: SamSpec | str, seed: int = 0) -> Sam:
    """A CPU fp32 :class:`Sam` in eval mode with :func:`init_random_` weights (no default init)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    return init_random_(_uninitialised(spec), seed).eval()
