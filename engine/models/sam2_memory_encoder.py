"""SAM 2's memory encoder: a frame's features fused with its predicted mask into a memory.

Parameter names follow the official checkpoints (``memory_encoder.mask_downsampler.encoder.<i>``,
``memory_encoder.pix_feat_proj``, ``memory_encoder.fuser.layers.<j>.{dwconv, norm, pwconv1,
pwconv2, gamma}``, ``memory_encoder.out_proj``). Every released SAM 2 / 2.1 model (and MedSAM2)
uses the same encoder:

* the mask (B, 1, S, S), already squashed to probabilities and rescaled by the caller, goes through
  four stride-2 3 x 3 convolutions (channels 1 -> 4 -> 16 -> 64 -> 256, each followed by a
  channel LayerNorm and GELU) and a 1 x 1 convolution: (B, 256, S/16, S/16);
* it is added to the 1 x 1-projected stride-16 image features, fused by two ConvNeXt blocks and
  projected to ``mem_dim`` = 64 channels;
* its position encoding is the 64-channel normalised sine encoding of the grid
  (:func:`~refseg.models.sam2_neck.sine_position_encoding`, the image path's own).
"""
from __future__ import annotations

import torch
from torch import nn

from .onednn import linear
from .sam2_neck import sine_position_encoding
from .sam_image_encoder import LayerNorm2d


class MaskDownSampler(nn.Module):
    """(B, 1, S, S) mask -> (B, embed_dim, S/total_stride, S/total_stride).

    ``encoder`` is a Sequential of (conv, LayerNorm2d, GELU) per stride-``stride`` step, then a
    1 x 1 conv (indices 0..12 for the released 4-step layout).
    """

    def __init__(self, embed_dim: int = 256, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                 total_stride: int = 16) -> None:
        super().__init__()
        steps = 0
        while stride ** steps < total_stride:
            steps += 1
        if stride ** steps != total_stride:
            raise ValueError(f"MaskDownSampler: total_stride {total_stride} is not a power of stride {stride}")
        layers: list[nn.Module] = []
        channels = 1
        for _ in range(steps):
            out = channels * stride ** 2
            layers += [nn.Conv2d(channels, out, kernel_size, stride, padding), LayerNorm2d(out), nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(mask)


class CXBlock(nn.Module):
    """ConvNeXt block on (B, dim, h, w): depthwise 7 x 7 conv, channel LayerNorm, pointwise MLP
    (dim -> 4·dim -> dim, GELU) scaled per channel by ``gamma``, plus the input."""

    def __init__(self, dim: int = 256, kernel_size: int = 7, padding: int = 3) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)  # channels last for the pointwise layers
        y = linear(linear(y, self.pwconv1, "gelu"), self.pwconv2)
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """``num_layers`` :class:`CXBlock` in sequence (keys ``layers.<j>``)."""

    def __init__(self, dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """Image features + mask -> memory features and their position encoding.

    Args:
        out_dim: memory channels (``mem_dim``, 64 in every release).
        in_dim: image feature channels (256).
    """

    def __init__(self, out_dim: int = 64, in_dim: int = 256) -> None:
        super().__init__()
        self.mask_downsampler = MaskDownSampler(in_dim)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.out_dim = out_dim

    def forward(self, pix_feat: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a memory.

        Args:
            pix_feat: (B, in_dim, h, w) stride-16 image features (before any memory conditioning).
            mask: (B, 1, 16h, 16w) mask values as the memory should see them (the caller applies the
                sigmoid or binarisation and the scale / bias of the release: x20 - 10).

        Returns:
            features (B, out_dim, h, w) in ``pix_feat``'s dtype and their position encoding
            (1, out_dim, h, w) fp32 (the same for every frame).
        """
        x = self.pix_feat_proj(pix_feat.to(mask.device)) + self.mask_downsampler(mask)
        x = self.out_proj(self.fuser(x))
        pos = sine_position_encoding(x.shape[-2], x.shape[-1], self.out_dim, device=x.device)
        return x, pos
