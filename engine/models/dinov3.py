"""DINOv3 ViT-S/16, S+/16, B/16, L/16 and H+/16 backbones, checkpoint-compatible with the official
``dinov3`` release (``facebookresearch/dinov3``).

``Dinov3VisionTransformer(spec).state_dict()`` has exactly the keys and shapes of the official
``.pth`` files (``dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth``, ...): ``cls_token`` (1, 1, D),
``storage_tokens`` (1, 4, D) (the register tokens), ``mask_token`` (1, D), ``patch_embed.proj.*``,
``rope_embed.periods`` (head_dim / 4,), ``blocks.<i>.{norm1, attn.qkv, attn.qkv.bias_mask, attn.proj,
ls1.gamma, norm2, mlp.fc1/fc2 | mlp.w1/w2/w3, ls2.gamma}``, ``norm``; the satellite ViT-L adds
``local_cls_norm`` (a training-only norm, loaded and unused, as the official eval does). The Hugging
Face layout (``config.json`` + ``model.safetensors``) is converted to these keys by
:mod:`refseg.models.dinov3_hf`.

What differs from DINOv2 (:mod:`refseg.models.dinov2`), as the official code computes it:

* no position table: rotary position embeddings (RoPE) on the queries and keys of the patch tokens
  (not the cls / register tokens) in every block. Patch centres are normalised per axis to [-1, 1]
  (``normalize_coords="separate"``): ``c = 2 (i + 0.5) / n - 1``; angles ``2π c / periods`` for
  y then x, tiled twice over the head dimension; computed in float32 (``pos_embed_rope_dtype="fp32"``)
  and applied as ``q cos + rotate_half(q) sin``. Any grid (non-square too) works; nothing is resampled;
* 16-px patches, 4 register tokens inserted after cls before the first block, LayerNorm eps 1e-5;
* the qkv bias is multiplied by ``bias_mask`` (1 for q and v, 0 for k): the key bias is masked out.
  Loading folds the mask into the bias (:class:`MaskedBiasLinear`), so the linear layer runs unchanged;
* S+ and H+ use a SwiGLU FFN with separate ``w1`` (gate), ``w2`` (value), ``w3`` (output) layers,
  hidden width ``int(D * ratio * 2/3)`` rounded up to a multiple of 8 (1536 for S+, 5120 for H+).

The 7B/16 model (no qkv bias, SwiGLU aligned to 64, 4096 wide) is not supported.
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
from refseg.models.onednn import linear
from refseg.models.norms import LayerNorm32
from refseg.models.vit_layers import LayerScale, Mlp, PatchEmbed, backbone_outputs

log = logging.getLogger(__name__)

DINOV3_LICENSE_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
DINOV3_HF_ORG = "facebook"
LAYER_NORM_EPS = 1e-5
ROPE_BASE = 100.0


@dataclass(frozen=True)
class Dinov3Spec:
    """Architecture of one official DINOv3 ViT backbone.

    Attributes:
        name: short name, e.g. ``"vitb16"``, ``"vits16plus"``, ``"vitl16_sat493m"``.
        embed_dim, depth, num_heads: transformer width, number of blocks, attention heads.
        ffn: ``"mlp"`` (GELU) or ``"swiglu"`` (S+/H+).
        ffn_ratio: hidden width / embed_dim before the SwiGLU 2/3 rule (4 or 6).
        checkpoint: official file name (gated download: no URL), with the Hugging Face folder name.
        hf_repo: the Hugging Face hub repository of the same weights.
        patch_size: 16; num_register_tokens: 4; rope_base: 100.
        local_cls_norm: the checkpoint carries ``local_cls_norm.*`` (satellite ViT-L; unused at eval).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str
    ffn_ratio: float
    checkpoint: CheckpointSource
    hf_repo: str
    patch_size: int = 16
    num_register_tokens: int = 4
    rope_base: float = ROPE_BASE
    local_cls_norm: bool = False

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the FFN: ``D * ratio`` (MLP), or the SwiGLU 2/3 rule aligned to 8."""
        hidden = int(self.embed_dim * self.ffn_ratio)
        if self.ffn == "mlp":
            return hidden
        d = int(hidden * 2 / 3)
        return d + (-d % 8)


def _spec(arch: str, embed_dim: int, depth: int, num_heads: int, ffn: str, ratio: float, digest: str,
          weights: str = "lvd1689m") -> Dinov3Spec:
    stem = f"dinov3_{arch}_pretrain_{weights}"
    hf_name = f"dinov3-{arch}-pretrain-{weights}"
    name = arch if weights == "lvd1689m" else f"{arch}_{weights}"
    source = CheckpointSource(f"{stem}-{digest}.pth", None, sha256_prefix=digest, folder=hf_name,
                              access=DINOV3_LICENSE_URL)
    return Dinov3Spec(name, embed_dim, depth, num_heads, ffn, ratio, source, f"{DINOV3_HF_ORG}/{hf_name}",
                      local_cls_norm=weights == "sat493m")


# The official hub configurations (dinov3/hub/backbones.py); the digest is the file name's sha256 prefix.
DINOV3_SPECS: dict[str, Dinov3Spec] = {spec.name: spec for spec in (
    _spec("vits16", 384, 12, 6, "mlp", 4, "08c60483"),
    _spec("vits16plus", 384, 12, 6, "swiglu", 6, "4057cbaa"),
    _spec("vitb16", 768, 12, 12, "mlp", 4, "73cec8be"),
    _spec("vitl16", 1024, 24, 16, "mlp", 4, "8aa4cbdd"),
    _spec("vitl16", 1024, 24, 16, "mlp", 4, "eadcf0ff", weights="sat493m"),
    _spec("vith16plus", 1280, 32, 20, "swiglu", 6, "7c1da9a5"),
)}


def get_spec(name: str) -> Dinov3Spec:
    """The :class:`Dinov3Spec` called ``name``; ValueError listing the known names otherwise."""
    try:
        return DINOV3_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown DINOv3 model {name!r}; known: {', '.join(DINOV3_SPECS)}") from None


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """The official RoPE periods ``base ** (2 k / (head_dim / 2))``, k < head_dim / 4, float32."""
    quarter = head_dim // 4
    return base ** (2 * torch.arange(quarter, dtype=torch.float32) / (head_dim // 2))


class RopeEmbedding(nn.Module):
    """Sine and cosine tables of the patch grid; holds the official ``periods`` buffer (head_dim/4,).

    The periods stay float32 when the model is cast to fp16/bf16 (``.to(dtype)``, ``.half()``): the
    official RoPE runs in float32 (``pos_embed_rope_dtype="fp32"``) and bf16 would round 1.3335 to 1.336.
    """

    def __init__(self, head_dim: int, base: float = ROPE_BASE) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
        self.register_buffer("periods", rope_periods(head_dim, base))

    def _apply(self, fn, recurse: bool = True):
        before = self.periods
        super()._apply(fn, recurse)
        after = self.periods
        if (before is not None and after is not None and not before.is_meta and not after.is_meta
                and before.dtype == torch.float32 and after.dtype != torch.float32):
            self.periods = before.to(device=after.device)  # a dtype cast: keep the float32 values
        return self

    def forward(self, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each (rows * cols, head_dim) float32, patches in row-major (y, x) order."""
        rows, cols = (int(v) for v in grid_hw)
        periods = self.periods.float()
        ys = (torch.arange(rows, dtype=torch.float32, device=periods.device) + 0.5) / rows
        xs = (torch.arange(cols, dtype=torch.float32, device=periods.device) + 0.5) / cols
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
        angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # (N, 2, head_dim / 4)
        angles = angles.flatten(1, 2).tile(2)  # (N, head_dim): [y freqs, x freqs] twice
        return torch.sin(angles), torch.cos(angles)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the last ``sin.shape[0]`` tokens of ``x`` (B, heads, N, head_dim) in float32.

    The first ``N - sin.shape[0]`` tokens (cls, registers) are returned unchanged; the result has
    ``x``'s dtype.
    """
    prefix = int(x.shape[-2]) - int(sin.shape[-2])
    patches = x[..., prefix:, :].float()
    first, second = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((x[..., :prefix, :], rotated.to(x.dtype)), dim=-2)


def official_bias_mask(out_features: int) -> torch.Tensor:
    """The official qkv ``bias_mask`` (out_features,): 1 for q and v, 0 for the key third."""
    mask = torch.ones(out_features)
    mask[out_features // 3: 2 * out_features // 3] = 0.0
    return mask


class MaskedBiasLinear(nn.Linear):
    """``nn.Linear`` with the official ``bias_mask`` buffer (1 for q and v, 0 for k).

    The official layer computes ``x Wᵀ + bias * bias_mask`` at every call; here the product is folded
    into ``bias`` whenever a state dict is loaded, so the layer runs as a plain linear layer (and
    through :func:`refseg.models.onednn.linear`). ``state_dict()`` therefore returns the masked bias.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)
        self.register_buffer("bias_mask", official_bias_mask(out_features))
        self.register_load_state_dict_post_hook(MaskedBiasLinear._fold_mask)

    @staticmethod
    def _fold_mask(module: "MaskedBiasLinear", incompatible_keys) -> None:
        with torch.no_grad():
            folded = module.bias * module.bias_mask.to(module.bias.dtype)
        module.bias = nn.Parameter(folded, requires_grad=module.bias.requires_grad)


class RopeAttention(nn.Module):
    """Self-attention with RoPE on the patch tokens: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = MaskedBiasLinear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = linear(x, self.qkv).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        sin, cos = rope
        out = F.scaled_dot_product_attention(apply_rope(q, sin, cos), apply_rope(k, sin, cos), v)
        return linear(out.transpose(1, 2).reshape(batch, tokens, dim), self.proj)


class SwiGLU(nn.Module):
    """The official SwiGLU FFN: ``w3(silu(w1 x) * w2 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, self.w1)) * linear(x, self.w2), self.w3)


class Dinov3Block(nn.Module):
    """``x + ls1(attn(norm1(x), rope))`` then ``x + ls2(mlp(norm2(x)))``: (B, N, D) -> (B, N, D)."""

    def __init__(self, spec: Dinov3Spec) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.norm1 = LayerNorm32(dim, eps=LAYER_NORM_EPS)
        self.attn = RopeAttention(dim, spec.num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = LayerNorm32(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, spec.ffn_hidden) if spec.ffn == "mlp" else SwiGLU(dim, spec.ffn_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Dinov3VisionTransformer(nn.Module):
    """Head-less DINOv3 ViT with official parameter names (eval-mode inference).

    Input: images (B, 3, H, W), ImageNet-normalised (LVD-1689M weights), H and W multiples of 16
    (non-square allowed). Token order: ``[cls, registers (4), patches (N = H/16 * W/16, row-major)]``.
    """

    def __init__(self, spec: Dinov3Spec) -> None:
        super().__init__()
        self.spec = spec
        dim = spec.embed_dim
        self.embed_dim = dim
        self.patch_size = spec.patch_size
        self.num_register_tokens = spec.num_register_tokens
        # Declared in the official order so that state_dict() lists keys as the files do.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if spec.num_register_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, spec.num_register_tokens, dim))
        else:
            self.register_parameter("storage_tokens", None)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(spec.patch_size, 3, dim)
        self.rope_embed = RopeEmbedding(spec.head_dim, spec.rope_base)
        self.blocks = nn.ModuleList(Dinov3Block(spec) for _ in range(spec.depth))
        self.norm = LayerNorm32(dim, eps=LAYER_NORM_EPS)
        # The satellite ViT-L's norm for local crops: trained, stored, never used at inference.
        self.local_cls_norm = LayerNorm32(dim, eps=LAYER_NORM_EPS) if spec.local_cls_norm else None

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid (rows, cols) of images ``x`` (B, 3, H, W); ValueError for other shapes."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DINOv3 {self.spec.name}: expected images (B, 3, H, W), got shape {tuple(x.shape)}")
        height, width = int(x.shape[-2]), int(x.shape[-1])  # Python ints, also under tracing
        p = self.patch_size
        if height % p or width % p or not height or not width:
            raise ValueError(f"DINOv3 {self.spec.name}: input size {height}x{width} (HxW) is not a multiple "
                             f"of the patch size {p}; resize to e.g. {max(p, height // p * p)}x"
                             f"{max(p, width // p * p)}")
        return height // p, width // p

    def rope(self, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (sin, cos) tables for a (rows, cols) grid, each (rows * cols, head_dim) float32.

        An exporter computes them once for a fixed input size and passes them to
        :meth:`features_from_tokens`.
        """
        return self.rope_embed(grid_hw)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> input tokens (B, 1 + R + N, D) of the first block.

        ``masks`` (B, N) bool replaces masked patch embeddings by ``mask_token`` (training-time
        masking; not needed for inference).
        """
        self.grid(x)
        tokens = self.patch_embed(x)
        batch = tokens.shape[0]
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        parts = [self.cls_token.to(tokens.dtype).expand(batch, -1, -1)]
        if self.storage_tokens is not None:
            parts.append(self.storage_tokens.to(tokens.dtype).expand(batch, -1, -1))
        return torch.cat(parts + [tokens], dim=1)

    def features_from_tokens(self, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                             masks: torch.Tensor | None = None) -> dict:
        """The blocks and the final norm on input tokens (B, 1 + R + N, D) with the grid's RoPE tables."""
        prenorm = tokens
        for block in self.blocks:
            prenorm = block(prenorm, rope)
        return backbone_outputs(prenorm, self.norm(prenorm), self.num_register_tokens, masks)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        """Run the backbone; the same keys as refseg's DINOv2.

        Args:
            x: (B, 3, H, W) normalised images, H and W multiples of 16.
            masks: optional (B, N) bool patch mask (training-time masking), normally None.

        Returns:
            ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, 4, D) (the official
            ``x_storage_tokens``), ``x_norm_patchtokens`` (B, N, D), N = (H/16)(W/16) row-major, all
            after the final LayerNorm; ``x_prenorm`` (B, 1 + 4 + N, D) before it; ``masks`` as given.

        Raises:
            ValueError: ``x`` is not (B, 3, H, W) or a side is not a multiple of 16.
        """
        rope = self.rope(self.grid(x))
        return self.features_from_tokens(self.prepare_tokens(x, masks), rope, masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised cls token (B, D), like the official model in eval mode."""
        return self.forward_features(x)["x_norm_clstoken"]


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def infer_dinov3_name(state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>") -> str:
    """Name of the :data:`DINOV3_SPECS` entry whose layout an official-key ``state_dict`` has.

    Reads the width (``cls_token``), the number of ``blocks.<i>``, the register count, the FFN kind
    and width (``mlp.fc1`` / ``mlp.w1``), the head width (``rope_embed.periods``), the patch size and
    the presence of ``local_cls_norm``.

    Raises:
        CheckpointError: no known layout matches; the message lists what was seen.
    """
    keys = list(state_dict)

    def dim(key: str, axis: int) -> int | None:
        value = state_dict.get(key)
        return int(value.shape[axis]) if value is not None and value.ndim > axis else None

    seen = {
        "embed_dim": dim("cls_token", -1),
        "depth": len({int(m.group(1)) for m in map(_BLOCK_KEY.match, keys) if m}),
        "registers": dim("storage_tokens", 1) or 0,
        "ffn": ("swiglu" if "blocks.0.mlp.w1.weight" in state_dict
                else "mlp" if "blocks.0.mlp.fc1.weight" in state_dict else None),
        "ffn_hidden": dim("blocks.0.mlp.w1.weight", 0) or dim("blocks.0.mlp.fc1.weight", 0),
        "head_dim": 4 * dim("rope_embed.periods", 0) if "rope_embed.periods" in state_dict else None,
        "patch": dim("patch_embed.proj.weight", -1),
        "local_cls_norm": "local_cls_norm.weight" in state_dict,
    }
    for name, spec in DINOV3_SPECS.items():
        if seen == {"embed_dim": spec.embed_dim, "depth": spec.depth, "registers": spec.num_register_tokens,
                    "ffn": spec.ffn, "ffn_hidden": spec.ffn_hidden, "head_dim": spec.head_dim,
                    "patch": spec.patch_size, "local_cls_norm": spec.local_cls_norm}:
            return name
    described = ", ".join(f"{k} {v}" for k, v in seen.items())
    raise CheckpointError(f"{source}: not a known DINOv3 layout (seen: {described}; {len(keys)} keys, "
                          f"first {', '.join(keys[:5])}); known: {', '.join(DINOV3_SPECS)}")


def _check_bias_masks(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    bad = [k for k, v in state_dict.items()
           if k.endswith(".attn.qkv.bias_mask") and not v.is_meta and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: qkv bias masks hold NaN/Inf ({', '.join(bad[:3])}): the file was "
                              "saved from an uninitialised model")


def dinov3_from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str | None = None,
                           source: str = "<state dict>") -> Dinov3VisionTransformer:
    """Build a :class:`Dinov3VisionTransformer` holding an official-key ``state_dict``, in eval mode.

    Built on the meta device, the model takes the state dict's tensors as its parameters
    (``load_state_dict(assign=True)``): no second copy of the weights; device and dtype are the
    tensors'. Every key must be used and every shape must fit (strict). The qkv biases are replaced
    by masked copies (:class:`MaskedBiasLinear`); the caller's tensors are not modified.

    Args:
        state_dict: official keys (a Hugging Face folder is converted by :mod:`refseg.models.dinov3_hf`).
        name: a :data:`DINOV3_SPECS` name, or None to infer it with :func:`infer_dinov3_name`.
        source: the file name used in error messages.

    Raises:
        CheckpointError: unknown layout, missing/unexpected keys or shape mismatches (listed), NaN masks.
        ValueError: ``name`` is not a known model.
    """
    if name is None:
        name = infer_dinov3_name(state_dict, source)
    spec = get_spec(name)
    _check_bias_masks(state_dict, source)
    with torch.device("meta"):
        model = Dinov3VisionTransformer(spec)
    with warnings.catch_warnings():
        # load_into validates keys and shapes, then copies into meta tensors, which is a no-op.
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        load_into(model, state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    log.debug("built DINOv3 %s from %s", name, source)
    return model.eval()
