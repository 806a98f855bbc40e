"""FLOPs per pipeline stage, computed from the architectures, and GPU peak throughput by card name.

Counting convention (the one timm's GMAC counts use, doubled): one multiply-accumulate = 2 FLOPs;
matrix products, convolutions and the two attention products (Q·Kᵀ and P·V) are counted;
normalisations, activations, softmax, additions and interpolation are not. The figures this gives
are those of docs/performance.md: SAM image encoder @1024² B / L / H = 0.97 / 2.99 / 5.96 TFLOP,
DINOv2 @518² S / B / L / g = 0.093 / 0.303 / 1.01 / 3.57 TFLOP (g @560: 4.26), prompt encoder + mask
decoder 3.6 GFLOP per prompt set of one point.

SAM's windowed blocks pad the 64×64 token map to 70×70 (a multiple of the 14-token window) before
the attention's projections, and compute those projections on the padded tokens; the MLP runs on
the unpadded map. The decomposed relative-position terms cost ``N·(h + w)·D`` per block.
"""
from __future__ import annotations

import math

from refseg.models.dinov2 import DINOV2_SPECS
from refseg.models.dinov3 import DINOV3_SPECS
from refseg.models.sam import SAM_SPECS

SAM_DECODER_DIM = 256       # transformer width of the prompt encoder / mask decoder
SAM_DECODER_MLP = 2048      # MLP width inside the two-way transformer
SAM_DECODER_DEPTH = 2       # two-way attention blocks
SAM_MASK_TOKENS = 4         # 3 multimask outputs + 1 single-mask output (all are always decoded)
SAM_UPSCALE = (64, 32)      # channels of the two transposed convolutions (k = 2, stride 2)


def _swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width of DINOv2-g's fused SwiGLU: 2/3 of the MLP width rounded up to a multiple of 8."""
    return (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


def vit_block_macs(tokens: int, dim: int, ffn_macs_per_token: int, attn_tokens: int | None = None,
                   groups: int = 1) -> int:
    """MACs of one pre-norm transformer block on ``tokens`` tokens of width ``dim``.

    ``attn_tokens`` tokens (default ``tokens``) go through the q/k/v/out projections and attend
    within ``groups`` equal groups (windows); the feed-forward runs on ``tokens`` tokens.
    """
    attn_tokens = tokens if attn_tokens is None else attn_tokens
    per_group = attn_tokens // groups
    projections = 4 * attn_tokens * dim * dim
    attention = 2 * groups * per_group * per_group * dim  # Q·Kᵀ and P·V
    return projections + attention + tokens * ffn_macs_per_token


def plain_vit_flops(patches: int, extra_tokens: int, dim: int, depth: int, ffn_macs_per_token: int,
                    patch_size: int, batch: int = 1) -> float:
    """FLOPs of a plain ViT (DINOv2, DINOv3): patch embedding of ``patches`` patches, then ``depth`` global
    blocks on the patches plus ``extra_tokens`` (cls, registers). DINOv3's rotary position terms are
    element-wise (not counted)."""
    macs = patches * dim * 3 * patch_size ** 2
    macs += depth * vit_block_macs(patches + extra_tokens, dim, ffn_macs_per_token)
    return 2.0 * macs * batch


def dinov2_flops(name: str = "vitb14", image_size: int = 518, batch: int = 1) -> float:
    """FLOPs of ``forward_features`` of DINOv2 ``name`` on ``batch`` images of ``image_size``²."""
    spec = DINOV2_SPECS[name]
    grid = image_size // spec.patch_size
    d = spec.embed_dim
    if spec.ffn == "swiglu":
        hidden = _swiglu_hidden(d, spec.mlp_ratio)
        ffn = 3 * d * hidden  # w12: D -> 2h, w3: h -> D
    else:
        ffn = 2 * d * int(d * spec.mlp_ratio)
    return plain_vit_flops(grid * grid, 1 + spec.num_register_tokens, d, spec.depth, ffn, spec.patch_size, batch)


def dinov3_flops(name: str = "vitb16", image_size: int | tuple[int, int] = 512, batch: int = 1) -> float:
    """FLOPs of ``forward_features`` of DINOv3 ``name`` on ``batch`` images of ``image_size``² (or (H, W))."""
    spec = DINOV3_SPECS[name]
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    patches = (height // spec.patch_size) * (width // spec.patch_size)
    d, hidden = spec.embed_dim, spec.ffn_hidden
    ffn = (3 if spec.ffn == "swiglu" else 2) * d * hidden  # w1, w2: D -> h, w3: h -> D | fc1, fc2
    return plain_vit_flops(patches, 1 + spec.num_register_tokens, d, spec.depth, ffn, spec.patch_size, batch)


def sam_encoder_flops(name: str = "vit_b", batch: int = 1) -> float:
    """FLOPs of SAM's image encoder ``name`` (vit_b / vit_l / vit_h / medsam) at its 1024² input."""
    spec = SAM_SPECS[name]
    side = spec.img_size // spec.patch_size          # 64
    tokens = side * side
    d = spec.embed_dim
    win = spec.window_size
    padded_side = math.ceil(side / win) * win        # 70
    windows = (padded_side // win) ** 2              # 25
    ffn = 2 * d * 4 * d
    patch = tokens * d * 3 * spec.patch_size ** 2
    macs = patch
    for i in range(spec.depth):
        if i in spec.global_attn_indexes:
            macs += vit_block_macs(tokens, d, ffn) + tokens * 2 * side * d
        else:
            padded = padded_side * padded_side
            macs += vit_block_macs(tokens, d, ffn, attn_tokens=padded, groups=windows) + padded * 2 * win * d
    out = spec.prompt_embed_dim
    macs += tokens * d * out + tokens * out * out * 9  # neck: 1×1 conv, 3×3 conv
    return 2.0 * macs * batch


def _attention_macs(nq: int, nk: int, dim: int, inner: int) -> int:
    """q (nq×dim→inner), k and v (nk×dim→inner), out (nq×inner→dim), plus the two products."""
    return nq * dim * inner + 2 * nk * dim * inner + nq * inner * dim + 2 * nq * nk * inner


def sam_decoder_flops(num_points: int = 1, prompt_sets: int = 1, box: bool = False,
                      embedding_side: int = 64) -> float:
    """FLOPs of SAM's prompt encoder + mask decoder for ``prompt_sets`` sets of ``num_points`` points.

    Without a box the official prompt encoder appends one padding point, so a set holds
    ``num_points + 1`` sparse tokens (``num_points + 2`` box corners otherwise). The decoder runs every
    set against its own copy of the image embedding.
    """
    d, half = SAM_DECODER_DIM, SAM_DECODER_DIM // 2
    nk = embedding_side * embedding_side
    sparse = num_points + (2 if box else 1)
    nq = 1 + SAM_MASK_TOKENS + sparse
    block = (_attention_macs(nq, nq, d, d)            # self-attention of the tokens
             + _attention_macs(nq, nk, d, half)       # tokens -> image
             + nq * 2 * d * SAM_DECODER_MLP           # token MLP
             + _attention_macs(nk, nq, d, half))      # image -> tokens
    macs = SAM_DECODER_DEPTH * block + _attention_macs(nq, nk, d, half)  # final tokens -> image
    c1, c2 = SAM_UPSCALE
    side = embedding_side
    macs += (side * side) * d * c1 * 4 + (2 * side) ** 2 * c1 * c2 * 4  # two 2×2 transposed convs
    macs += SAM_MASK_TOKENS * (2 * d * d + d * c2)                         # hypernetwork MLPs
    macs += SAM_MASK_TOKENS * c2 * (4 * side) ** 2                         # masks = hyper · upscaled
    macs += 2 * d * d + d * SAM_MASK_TOKENS                                # IoU head
    macs += sparse * 2 * (d // 2)                                          # point positional encoding
    return 2.0 * macs * prompt_sets


def matching_flops(ref_tokens: int, tgt_tokens: int, dim: int, batch: int = 1) -> float:
    """FLOPs of one dense similarity (cosine or Euclidean via the matrix product) per target."""
    return 2.0 * ref_tokens * tgt_tokens * dim * batch


def pipeline_flops(dinov2: str, image_size: int, sam: str, prompt_sets: int = 1,
                   points_per_set: int = 1, dinov2_passes: int = 1) -> dict[str, float]:
    """FLOPs per target image of the whole pipeline, by stage (and ``total``).

    ``dinov2_passes``: DINOv2 image encodings per target — 1 with the reference cached; the
    research-style code encodes (reference, target) once per label set, i.e. 4.
    """
    grid = image_size // DINOV2_SPECS[dinov2].patch_size
    stages = {
        "dinov2": dinov2_flops(dinov2, image_size) * dinov2_passes,
        "matching": matching_flops(grid * grid, grid * grid, DINOV2_SPECS[dinov2].embed_dim),
        "sam_encoder": sam_encoder_flops(sam),
        "decoder": sam_decoder_flops(points_per_set, prompt_sets),
    }
    stages["total"] = sum(stages.values())
    return stages


# Dense peak throughput (TFLOP/s, no sparsity) from NVIDIA's data sheets, by precision.
# Matched against torch.cuda.get_device_name() by the first key contained in it (order matters).
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"fp16": 989.0, "bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 PCIe", {"fp16": 756.0, "bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"fp16": 835.0, "bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"fp16": 989.0, "bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),   # SXM ("H100 80GB HBM3")
    ("A100", {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def gpu_peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Dense peak TFLOP/s of the card called ``device_name`` at ``precision`` (fp16/bf16/tf32/fp32).

    ``None`` for unknown cards (CPU rows never get a fraction of peak).
    """
    if not device_name:
        return None
    for key, peaks in GPU_PEAKS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def achieved(flops: float | None, seconds: float | None, peak_tflops: float | None = None
             ) -> dict[str, float | None]:
    """``{"tflops": achieved TFLOP/s, "fraction_of_peak": tflops / peak}`` (``None`` where unknown)."""
    if not flops or not seconds or seconds <= 0:
        return {"tflops": None, "fraction_of_peak": None}
    tflops = flops / seconds / 1e12
    return {"tflops": tflops, "fraction_of_peak": tflops / peak_tflops if peak_tflops else None}
