"""DINOv2 ViT-S/B/L/g 14 backbones (with and without registers), checkpoint-compatible with the
official ``dinov2`` release.

``DinoVisionTransformer(spec).state_dict()`` has exactly the keys and shapes of the official
hub checkpoints (``dinov2_vitb14_pretrain.pth``, ``dinov2_vitb14_reg4_pretrain.pth``, ...; the
``block_chunks=0`` layout ``blocks.<i>.*``), so those files load as they are with
:func:`dinov2_from_state_dict`.

Position embeddings are stored for the 518x518 training size (a 37x37 grid plus the cls slot) and
resized for other inputs exactly as the official code does:

* grid equal to the stored 37x37 grid: the table is used as it is (no resampling);
* otherwise the 37x37 table is resampled in float32 with ``F.interpolate(mode="bicubic",
  align_corners=False, antialias=False)`` given a *scale factor* ``((h + 0.1) / 37, (w + 0.1) / 37)``
  for an ``h x w`` patch grid (not an output size). The +0.1 (``interpolate_offset``) makes the
  output size floor to ``(h, w)`` and also slightly shifts the sampling positions, so it changes the
  values; the April-2023 PyPI release hard-codes it, and the later release that added register
  tokens exposes ``interpolate_offset`` / ``interpolate_antialias`` whose hub defaults (0.1 and
  False) give the same computation. ``interpolate_offset=0`` in a spec selects the later code's
  other path (``size=(h, w)``).

Register tokens (the ``*_reg`` models) carry no position embedding: they are inserted right after
the cls token once position embeddings have been added, before the first block.
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from refseg.models.checkpoints import CheckpointError, CheckpointSource, load_into
from refseg.models.norms import LayerNorm32
from refseg.models.vit_layers import LAYER_NORM_EPS, Block, LayerScale, PatchEmbed, backbone_outputs

log = logging.getLogger(__name__)

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class Dinov2Spec:
    """Architecture of one official DINOv2 backbone.

    Attributes:
        name: short name, e.g. ``"vitb14"`` or ``"vitb14_reg"``.
        embed_dim, depth, num_heads: transformer width, number of blocks, attention heads.
        ffn: ``"mlp"`` (GELU MLP, ratio 4) or ``"swiglu"`` (fused SwiGLU, ViT-g only).
        num_register_tokens: 0, or 4 for the register variants.
        checkpoint: official file name and download URL.
        patch_size: patch side in pixels (14).
        img_size: training image side the position table is stored for (518 -> 37x37 grid).
        interpolate_offset, interpolate_antialias: position-embedding resampling settings (see the
            module docstring); the official hub models use 0.1 and False.
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str
    num_register_tokens: int
    checkpoint: CheckpointSource
    patch_size: int = 14
    img_size: int = 518
    mlp_ratio: float = 4.0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    @property
    def pos_grid(self) -> int:
        """Side of the stored position-embedding grid (37 for 518 / 14)."""
        return self.img_size // self.patch_size


def _spec(arch: str, embed_dim: int, depth: int, num_heads: int, ffn: str, registers: bool) -> Dinov2Spec:
    base = f"dinov2_{arch}"
    filename = f"{base}_reg4_pretrain.pth" if registers else f"{base}_pretrain.pth"
    return Dinov2Spec(
        name=f"{arch}_reg" if registers else arch, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, ffn=ffn, num_register_tokens=4 if registers else 0,
        checkpoint=CheckpointSource(filename, f"{DINOV2_BASE_URL}/{base}/{filename}"))


_ARCHS = (("vits14", 384, 12, 6, "mlp"), ("vitb14", 768, 12, 12, "mlp"),
          ("vitl14", 1024, 24, 16, "mlp"), ("vitg14", 1536, 40, 24, "swiglu"))

DINOV2_SPECS: dict[str, Dinov2Spec] = {
    spec.name: spec
    for registers in (False, True)
    for spec in (_spec(*arch, registers=registers) for arch in _ARCHS)
}


def get_spec(name: str) -> Dinov2Spec:
    """The :class:`Dinov2Spec` called ``name``; ValueError listing the known names otherwise."""
    try:
        return DINOV2_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown DINOv2 model {name!r}; known: {', '.join(DINOV2_SPECS)}") from None


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int], offset: float = 0.1,
                          antialias: bool = False) -> torch.Tensor:
    """Resize a square position table to a ``grid_hw = (h, w)`` patch grid as official DINOv2 does.

    Args:
        pos_embed: (1, 1 + M*M, D), the cls slot first, then an M x M grid in row-major (y, x) order.
        grid_hw: target patch grid (rows, columns). Only Python ints: computed from static shapes.
        offset: added to the target size before forming the bicubic scale factor (0.1 officially);
            0 resamples to ``size=(h, w)`` instead.
        antialias: passed to ``F.interpolate`` (False officially).

    Returns:
        (1, 1 + h*w, D) float32; the table itself (in its own dtype) when ``(h, w) == (M, M)``.
    """
    grid_h, grid_w = (int(v) for v in grid_hw)
    stored = int(pos_embed.shape[1]) - 1
    side = math.isqrt(stored)
    if side * side != stored:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} does not hold a square grid")
    if (grid_h, grid_w) == (side, side):
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        resized = F.interpolate(grid, scale_factor=((grid_h + offset) / side, (grid_w + offset) / side),
                                mode="bicubic", antialias=antialias)
    else:
        resized = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=antialias)
    if tuple(resized.shape[-2:]) != (grid_h, grid_w):
        raise RuntimeError(f"position embedding resized to {tuple(resized.shape[-2:])}, "
                           f"expected {(grid_h, grid_w)} (interpolate_offset={offset})")
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat((table[:, :1], resized), dim=1)


class DinoVisionTransformer(nn.Module):
    """Head-less DINOv2 ViT with official parameter names (eval-mode inference).

    Input: images (B, 3, H, W), ImageNet-normalised, H and W multiples of 14 (non-square allowed).
    Token order everywhere: ``[cls, registers (R), patches (N = H/14 * W/14, row-major y, x)]``.
    """

    def __init__(self, spec: Dinov2Spec) -> None:
        super().__init__()
        self.spec = spec
        dim = spec.embed_dim
        self.embed_dim = dim
        self.patch_size = spec.patch_size
        self.num_register_tokens = spec.num_register_tokens
        # Parameters are declared in the official order so state_dict() lists keys like the files.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.pos_grid ** 2, dim))
        if spec.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, spec.num_register_tokens, dim))
        else:
            self.register_parameter("register_tokens", None)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(spec.patch_size, 3, dim)
        self.blocks = nn.ModuleList(
            Block(dim, spec.num_heads, spec.ffn, spec.mlp_ratio) for _ in range(spec.depth))
        self.norm = LayerNorm32(dim, eps=LAYER_NORM_EPS)

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DINOv2 {self.spec.name}: expected images (B, 3, H, W), "
                             f"got shape {tuple(x.shape)}")
        # Python ints (static shapes), also under ONNX tracing where shapes may be traced tensors.
        height, width = int(x.shape[-2]), int(x.shape[-1])
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"DINOv2 {self.spec.name}: input size {height}x{width} (HxW) is not a "
                             f"multiple of the patch size {p}; resize to e.g. "
                             f"{max(p, height // p * p)}x{max(p, width // p * p)}")
        return height // p, width // p

    def position_embedding(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """The position table for a (rows, cols) patch grid: (1, 1 + rows * cols, D), cls first.

        The stored table resampled bicubically as the official model does; an exporter computes it
        once for a fixed input side and passes it to :meth:`tokens_with_positions`.
        """
        return interpolate_pos_embed(self.pos_embed, grid_hw, self.spec.interpolate_offset,
                                     self.spec.interpolate_antialias)

    def tokens_with_positions(self, x: torch.Tensor, pos_embed: torch.Tensor,
                              masks: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`prepare_tokens` with a given position table (from :meth:`position_embedding`).

        Args:
            x: (B, 3, H, W) normalised images, H and W multiples of 14.
            pos_embed: (1, 1 + N, D) for the grid of ``x``, N = (H/14) * (W/14).
            masks: optional (B, N) bool patch mask (replaced by ``mask_token``), normally None.

        Returns:
            input tokens (B, 1 + R + N, D) of the first block: cls, R register tokens, patches.
        """
        grid_h, grid_w = self._check_input(x)
        if int(pos_embed.shape[-2]) != 1 + grid_h * grid_w:
            raise ValueError(f"DINOv2 {self.spec.name}: position table of {int(pos_embed.shape[-2])} rows "
                             f"for a {grid_h}x{grid_w} patch grid (needs {1 + grid_h * grid_w})")
        tokens = self.patch_embed(x)
        batch = tokens.shape[0]
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.to(tokens.dtype).expand(batch, -1, -1), tokens), dim=1)
        tokens = tokens + pos_embed.to(tokens.dtype)
        if self.register_tokens is not None:  # registers go after cls, once positions are added
            registers = self.register_tokens.to(tokens.dtype).expand(batch, -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> input tokens (B, 1 + R + N, D) of the first block.

        ``masks`` (B, N) bool replaces the masked patch embeddings by ``mask_token`` (as in
        training; not needed for inference).
        """
        return self.tokens_with_positions(x, self.position_embedding(self._check_input(x)), masks)

    def features_from_tokens(self, tokens: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        """The blocks and the final LayerNorm on input tokens (B, 1 + R + N, D): :meth:`forward_features`'s dict."""
        prenorm = tokens
        for block in self.blocks:
            prenorm = block(prenorm)
        return backbone_outputs(prenorm, self.norm(prenorm), self.num_register_tokens, masks)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        """Run the backbone; keys as the official ``forward_features``.

        Args:
            x: (B, 3, H, W) normalised images, H and W multiples of 14.
            masks: optional (B, N) bool patch mask (training-time masking), normally None.

        Returns:
            ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens``
            (B, N, D) with N = (H/14) * (W/14) in row-major order, all after the final LayerNorm;
            ``x_prenorm`` (B, 1 + R + N, D) before it; ``masks`` as given.

        Raises:
            ValueError: ``x`` is not (B, 3, H, W) or a side is not a multiple of 14.
        """
        return self.features_from_tokens(self.prepare_tokens(x, masks), masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised cls token (B, D), like the official head-less model in eval mode."""
        return self.forward_features(x)["x_norm_clstoken"]


_CHUNKED_KEY = re.compile(r"^blocks\.\d+\.\d+\.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def infer_dinov2_name(state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>") -> str:
    """Name of the :data:`DINOV2_SPECS` entry whose layout ``state_dict`` has.

    Looks at the embedding width (``cls_token``), the number of ``blocks.<i>``, ``register_tokens``,
    the FFN kind (``mlp.w12`` = SwiGLU, ``mlp.fc1`` = MLP) and the patch size.

    Raises:
        CheckpointError: no known layout matches; the message lists what was seen.
    """
    keys = list(state_dict)
    if any(_CHUNKED_KEY.match(k) for k in keys):
        raise CheckpointError(f"{source}: keys use the chunked-blocks layout (blocks.<chunk>.<i>.*); "
                              "official hub checkpoints use blocks.<i>.* (block_chunks=0)")
    cls = state_dict.get("cls_token")
    embed_dim = int(cls.shape[-1]) if cls is not None else None
    depth = len({int(m.group(1)) for m in map(_BLOCK_KEY.match, keys) if m})
    registers = state_dict.get("register_tokens")
    num_registers = int(registers.shape[1]) if registers is not None and registers.ndim == 3 else 0
    ffn = ("swiglu" if any(k.endswith(".mlp.w12.weight") for k in keys)
           else "mlp" if any(k.endswith(".mlp.fc1.weight") for k in keys) else None)
    proj = state_dict.get("patch_embed.proj.weight")
    patch = int(proj.shape[-1]) if proj is not None else None
    for name, spec in DINOV2_SPECS.items():
        if (embed_dim, depth, num_registers, ffn, patch) == (
                spec.embed_dim, spec.depth, spec.num_register_tokens, spec.ffn, spec.patch_size):
            return name
    known = "; ".join(f"{s.name}: dim {s.embed_dim}, {s.depth} blocks, {s.num_register_tokens} "
                      f"registers, {s.ffn}" for s in DINOV2_SPECS.values())
    raise CheckpointError(
        f"{source}: not a known DINOv2 layout (seen: cls_token dim {embed_dim}, {depth} blocks, "
        f"{num_registers} register tokens, ffn {ffn}, patch size {patch}, {len(keys)} keys, "
        f"first keys {', '.join(keys[:5])}); known: {known}")


def dinov2_from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str | None = None,
                           source: str = "<state dict>") -> DinoVisionTransformer:
    """Build a :class:`DinoVisionTransformer` holding ``state_dict`` (official keys), in eval mode.

    The model is built on the meta device and takes the state dict's tensors as its parameters
    (``load_state_dict(assign=True)``): no second copy of the weights is made, and the model has the
    tensors' device and dtype. The caller should not modify those tensors afterwards.

    Args:
        state_dict: official-format ``{key: tensor}`` (see :func:`refseg.models.checkpoints.load_state_dict`).
        name: a :data:`DINOV2_SPECS` name, or None to infer it with :func:`infer_dinov2_name`.
        source: the file name (or other description) used in error messages.

    Raises:
        CheckpointError: unknown layout, or keys/shapes that do not fit ``name`` (message names
            ``source`` and lists missing/unexpected keys and shape mismatches).
        ValueError: ``name`` is not a known model.
    """
    if name is None:
        name = infer_dinov2_name(state_dict, source)
    spec = get_spec(name)
    with torch.device("meta"):
        model = DinoVisionTransformer(spec)
    with warnings.catch_warnings():
        # load_into validates keys and shapes, then copies into meta tensors, which is a no-op.
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        load_into(model, state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    log.debug("built DINOv2 %s from %s", name, source)
    return model.eval()


TOKEN_STD = 0.5
WEIGHT_STD = 0.02
BIAS_STD = 0.02


def _truncated_normal_(value: torch.Tensor, std: float, gen: torch.Generator) -> None:
    # Rejection sampling: redraw the ~4.6 % of N(0, 1) samples beyond +-2; much faster on the CPU
    # than nn.init.trunc_normal_'s erfinv (which takes minutes for ViT-g's 1.1 B weights).
    flat = value.view(-1)
    flat.normal_(generator=gen)
    redraw = (flat.abs() > 2.0).nonzero().squeeze(1)
    while redraw.numel():
        fresh = torch.randn(redraw.numel(), generator=gen)
        flat[redraw] = fresh
        redraw = redraw[fresh.abs() > 2.0]
    value.mul_(std)


@torch.no_grad()
def init_random_(model: DinoVisionTransformer, seed: int) -> DinoVisionTransformer:
    """Fill every parameter with deterministic random values (for tests), in place.

    Values are drawn on the CPU from ``torch.Generator().manual_seed(seed)`` in parameter order, so
    the same seed gives the same tensors on every device. Linear/conv weights: truncated normal,
    std 0.02, cut at +-2 std (rejection sampled); all biases: N(0, 0.02^2); LayerNorm weights:
    1 + 0.1 N(0, 1); layer-scale gammas: U(0.1, 1); cls/register/mask tokens and position
    embeddings: N(0, 0.5^2), comparable to the patch embeddings so position resampling matters.

    Raises:
        ValueError: the model's parameters are on the meta device (call ``to_empty`` first).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            where = f"{module_name}.{param_name}" if module_name else param_name
            if param.is_meta:
                raise ValueError(f"init_random_: parameter {where} is on the meta device; "
                                 "materialise the model with .to_empty(device=...) first")
            # Drawn in float32 on the CPU (so every device gets the same values), in place when the
            # parameter already lives there.
            in_place = (param.device.type == "cpu" and param.dtype == torch.float32
                        and param.is_contiguous())
            value = param.data if in_place else torch.empty(param.shape, dtype=torch.float32)
            if isinstance(module, nn.LayerNorm) and param_name == "weight":
                value.normal_(generator=gen).mul_(0.1).add_(1.0)
            elif isinstance(module, LayerScale):
                value.uniform_(0.1, 1.0, generator=gen)
            elif param_name == "bias":
                value.normal_(0.0, BIAS_STD, generator=gen)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                _truncated_normal_(value, WEIGHT_STD, gen)
            else:  # cls_token, pos_embed, register_tokens, mask_token
                value.normal_(0.0, TOKEN_STD, generator=gen)
            if not in_place:
                param.copy_(value)
    return model
