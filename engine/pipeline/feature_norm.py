"""Removing the positional component of patch tokens before they are matched across images.

DINOv3's patch tokens respond to absolute image position as well as to content (its RoPE attention
makes this stronger than in DINOv2): a reference patch then also matches target patches at the same
place, whatever they show. Two training-free remedies, both on the tokens (B, N, D) of one grid:

* ``"project"`` (INSID3, Cuttano et al., CVPR 2026, arXiv:2603.28480; code ``visinf/INSID3``): encode a
  content-free image (all-zero pixels, i.e. black, normalised like every input) at the working size; its
  L2-normalised tokens, centred over the positions, span the positional subspace; the top ``rank`` left
  singular vectors ``U`` (D, rank) are a basis of it. Tokens are L2-normalised, projected on the orthogonal
  complement ``x - (x U) Uᵀ`` and L2-normalised again. INSID3 uses rank 20 for keypoint correspondence
  with ViT-B at 768 px (SPair-71k PCK@0.10 46.8 -> 52.6) and 500 for its segmentation pipeline with ViT-L at
  1024 px. The basis depends on the model and the grid: compute it once per (encoder, H, W).
* ``"center"``: subtract, at every position, the mean token over the images encoded together
  (``x_b(p) - mean_b x_b(p)``). An additive component shared by all images at a position cancels
  exactly; it needs several images on one grid (with only two, each becomes the negative of the other).

``"none"`` leaves the tokens as they are (DINOv2's presets). The pipeline offers ``"project"`` and ``"none"``
through ``SegmenterConfig.feature_debias`` (``"auto"``: project for DINOv3, none for DINOv2): every method
encodes references and targets with :func:`encode_for_matching`, which applies the projection with the basis
of :func:`matching_basis` (computed once per backend, input side, rank and feature key, then cached, on the
backend's device). ``"center"`` stays a library function: in the pipeline it would make a target's mask
depend on the other images of its batch.
"""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from refseg.pipeline.features import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from refseg.config import SegmenterConfig

DEBIAS_MODES = ("none", "center", "project")
DEFAULT_RANK = 20  # INSID3's rank for patch-to-patch correspondence (ViT-B); see the module docstring


def blank_image(height: int, width: int, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """The content-free input INSID3 encodes: an all-zero (black) image normalised like every input.

    Returns:
        (1, 3, height, width) float32, channel c filled with ``-mean[c] / std[c]``.
    """
    values = [-m / s for m, s in zip(mean, std)]
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, height, width).contiguous()


def positional_basis(noise_tokens: torch.Tensor, rank: int = DEFAULT_RANK) -> torch.Tensor:
    """Orthonormal basis of the positional subspace from the tokens of content-free image(s).

    Args:
        noise_tokens: (N, D) or (B, N, D) patch tokens of :func:`blank_image` (B images on one grid).
        rank: number of directions kept, 1 <= rank < min(B*N, D).

    Returns:
        (D, rank) float32 with orthonormal columns (the top left singular vectors of the L2-normalised
        tokens centred over the positions), on the tokens' device.

    Raises:
        ValueError: bad shapes or rank.
    """
    tokens = noise_tokens.reshape(-1, noise_tokens.shape[-1]) if noise_tokens.ndim == 3 else noise_tokens
    if tokens.ndim != 2:
        raise ValueError(f"positional_basis: expected (N, D) or (B, N, D) tokens, got {tuple(noise_tokens.shape)}")
    count, dim = tokens.shape
    if not 1 <= rank < min(count, dim):
        raise ValueError(f"positional_basis: rank must be in [1, {min(count, dim) - 1}] for {count} tokens of "
                         f"width {dim}, got {rank}")
    normed = F.normalize(tokens.float(), dim=-1)
    centred = (normed - normed.mean(dim=0, keepdim=True)).T  # (D, N): one column per position
    left, _, _ = torch.linalg.svd(centred, full_matrices=False)
    return left[:, :rank].contiguous()


def basis_from_encoder(encode: Callable[[torch.Tensor], torch.Tensor], height: int, width: int,
                       rank: int = DEFAULT_RANK, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """:func:`positional_basis` of ``encode(blank_image(height, width))``.

    Args:
        encode: images (B, 3, H, W) float32 -> patch tokens (B, N, D) (any backend's encoder; the same
            tokens the matching uses, e.g. ``x_norm_patchtokens``).
        height, width: the input size the tokens to be debiased come from.

    Returns:
        (D, rank) float32 basis.
    """
    with torch.no_grad():
        tokens = encode(blank_image(height, width, mean, std))
    return positional_basis(tokens, rank)


def project_out(tokens: torch.Tensor, basis: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Remove the span of ``basis`` from ``tokens``: ``x - (x U) Uᵀ``.

    Args:
        tokens: (..., D).
        basis: (D, k) with orthonormal columns (:func:`positional_basis`).
        normalize: L2-normalise the tokens before and after the projection (INSID3); False applies the
            plain linear projection.

    Returns:
        Tokens of the same shape, in float32, orthogonal to every column of ``basis``.
    """
    if basis.ndim != 2 or basis.shape[0] != tokens.shape[-1]:
        raise ValueError(f"project_out: basis {tuple(basis.shape)} does not fit tokens of width {tokens.shape[-1]}")
    x = tokens.float()
    u = basis.to(device=x.device, dtype=torch.float32)
    if normalize:
        x = F.normalize(x, dim=-1)
    x = x - (x @ u) @ u.T
    return F.normalize(x, dim=-1) if normalize else x


def center_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Subtract the per-position mean over the images: (B, N, D) -> (B, N, D) float32, B >= 2."""
    if tokens.ndim != 3 or tokens.shape[0] < 2:
        raise ValueError(f"center_positions: needs (B, N, D) tokens of B >= 2 images on one grid, "
                         f"got {tuple(tokens.shape)}")
    x = tokens.float()
    return x - x.mean(dim=0, keepdim=True)


def debias(tokens: torch.Tensor, mode: str, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the mitigation ``mode`` (one of :data:`DEBIAS_MODES`) to tokens (B, N, D) of one grid.

    ``"project"`` needs ``basis`` (:func:`basis_from_encoder` for the same encoder and input size);
    ``"center"`` needs B >= 2; ``"none"`` returns ``tokens`` unchanged.
    """
    if mode == "none":
        return tokens
    if mode == "center":
        return center_positions(tokens)
    if mode == "project":
        if basis is None:
            raise ValueError("debias: mode 'project' needs the positional basis (basis_from_encoder)")
        return project_out(tokens, basis)
    raise ValueError(f"debias: mode must be one of {DEBIAS_MODES}, got {mode!r}")


_bases: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()  # backend -> {key: (D, k)}
_bases_lock = threading.Lock()


def matching_basis(backend, config: "SegmenterConfig") -> torch.Tensor | None:
    """The positional basis (D, ``config.debias_rank``) float32 of ``backend``'s encoder at
    ``config.image_size``, on the backend's device, or None when ``config.debias`` is not ``"project"``.

    Computed once per (backend, S, rank, feature key) from :func:`blank_image` through
    ``backend.encode_dinov2`` (the tokens the matcher uses) and cached for the backend's lifetime; the
    first reference encoding computes it, so no batch of targets pays for it (on a GPU its SVD is the
    only host synchronisation, once).
    """
    if config.debias != "project":
        return None
    key = (config.image_size, config.debias_rank, config.feature_key)
    with _bases_lock:
        cached = _bases.setdefault(backend, {})
        if key not in cached:
            blank = blank_image(config.image_size, config.image_size).to(backend.device)
            with torch.inference_mode():
                cached[key] = positional_basis(backend.encode_dinov2(blank), config.debias_rank)
        return cached[key]


def encode_for_matching(backend, images: torch.Tensor, config: "SegmenterConfig") -> torch.Tensor:
    """Encode images for matching: ``backend.encode_dinov2`` then ``config.debias``.

    Args:
        backend: a :class:`refseg.runtime.backend.Backend` (its matching encoder, DINOv2 or DINOv3).
        images: (B, 3, S, S) ImageNet-normalised float32, S = ``config.image_size``.

    Returns:
        (B, G², D) patch tokens: the encoder's as they are (``"none"``: float32, or fp16 / bf16 when the
        encoders run in it), or projected and L2-normalised float32 (``"project"``), on the backend's device.
    """
    tokens = backend.encode_dinov2(images)
    basis = matching_basis(backend, config)
    return tokens if basis is None else project_out(tokens, basis)
