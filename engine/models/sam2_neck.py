"""SAM 2's FPN neck and the sine position encoding of its feature maps.

Parameter names follow the official checkpoints (``image_encoder.neck.convs.<i>.conv.{weight,bias}``;
``convs.0`` projects the lowest-resolution trunk stage, ``convs.3`` the highest). Every released SAM 2
/ 2.1 model uses the same neck: 1 x 1 lateral convolutions to 256 channels, a nearest-neighbour
top-down path into levels 2 and 3 only (levels 0 and 1 are the lateral features alone), and
``scalp=1``: the stride-32 level is computed for the top-down sum and then dropped.

The position encodings the official neck returns beside the features are used only by the memory
modules (SAM 2 video), not by the image path, so :meth:`FpnNeck.forward` does not compute them;
:func:`sine_position_encoding` gives them on demand.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class FpnNeck(nn.Module):
    """Lateral 1 x 1 convolutions + top-down fusion of the Hiera stages.

    Args:
        d_model: output channels (256).
        backbone_channel_list: trunk channels from the lowest resolution up, e.g. (768, 384, 192, 96).
        fpn_top_down_levels: levels (0 = highest resolution) that receive the upsampled coarser level.
        scalp: how many of the lowest-resolution levels to drop from the output (1).

    ``forward(stages)``: the trunk outputs, high resolution first -> the kept levels, high resolution
    first: for a 1024 input [(B, 256, 256, 256), (B, 256, 128, 128), (B, 256, 64, 64)]. Levels with a
    top-down term are fp32 (the official neck upsamples in fp32); the others keep the input dtype.
    """

    def __init__(self, d_model: int = 256, backbone_channel_list: tuple[int, ...] = (768, 384, 192, 96),
                 fpn_top_down_levels: tuple[int, ...] = (2, 3), scalp: int = 1) -> None:
        super().__init__()
        self.d_model = d_model
        self.backbone_channel_list = tuple(backbone_channel_list)
        self.fpn_top_down_levels = tuple(fpn_top_down_levels)
        self.scalp = scalp
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(dim, d_model, kernel_size=1)))
            for dim in backbone_channel_list)

    def forward(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(self.convs) - 1
        if len(stages) != n + 1:
            raise ValueError(f"FpnNeck: expected {n + 1} trunk stages, got {len(stages)}")
        out: list[torch.Tensor] = [stages[0]] * (n + 1)
        prev = None
        for i in range(n, -1, -1):  # lowest resolution first
            lateral = self.convs[n - i](stages[i])
            if i in self.fpn_top_down_levels and prev is not None:
                top_down = F.interpolate(prev.float(), scale_factor=2.0, mode="nearest")
                prev = lateral + top_down
            else:
                prev = lateral
            out[i] = prev
        return out[:len(out) - self.scalp] if self.scalp else out


def sine_position_encoding(height: int, width: int, channels: int = 256, temperature: float = 10000.0,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """The normalised sine encoding of an (height, width) grid (DETR style, SAM 2's
    ``PositionEmbeddingSine(num_pos_feats=channels, normalize=True)``): (1, channels, height, width)
    fp32, first the y half then the x half, each interleaving sin and cos over ``channels / 4``
    frequencies. Positions are 1..n scaled to (0, 2π]."""
    if channels % 4:
        raise ValueError(f"sine_position_encoding: channels must be a multiple of 4, got {channels}")
    feats = channels // 2
    eps = 1e-6
    ys = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    xs = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    ys = ys / (ys[-1:] + eps) * (2 * math.pi)
    xs = xs / (xs[-1:] + eps) * (2 * math.pi)
    dim_t = torch.arange(feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / feats)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, feats), sin/cos interleaved
        angles = pos[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(ys)[:, None, :].expand(height, width, feats)
    pos_x = encode(xs)[None, :, :].expand(height, width, feats)
    return torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1).unsqueeze(0)
