"""Targets -> encoder inputs: validation on the host, pixels to the device once, resizes and normalisation.

A target goes through three steps:

1. :func:`prepare_target` (reader threads): RGB uint8 conversion (with the intensity window), the
   too-small check. On the CPU path it also resizes for both encoders with PIL (DINOv2: bicubic to S×S;
   SAM: bilinear, longer side ``sam_size``). On the accelerator path it stages the pixels instead:
2. :func:`stage_targets`: the uint8 pixels go to the device, once — on CUDA from pinned memory, non-blocking,
   on a side stream, with an event marking the end. The stream's readers run ahead of the models, so the
   copies of the next batches overlap the batch being computed.
3. :func:`dinov2_inputs` / :func:`sam_inputs`: the encoders' float32 inputs, on the device. Accelerator
   path: PIL's resizes computed there bit for bit (:mod:`.resample`), targets of one size together, then
   the normalisations; CPU path: the resized arrays normalised. Both give the same tensors.

MedSAM's own pre-processing (a Gaussian-filtered cubic spline, scipy) stays on the host readers on both
paths; its min-max normalisation then runs on the device. SAM 2's (the target stretched to its S x S input
with antialiased bilinear interpolation on [0, 1] values, then ImageNet mean / std:
:func:`refseg.models.sam2_transforms.normalize_resize`) runs in :func:`sam_inputs` on both paths, targets of
one size together, from the reader's pixels (CPU path) or the staged ones (accelerator path).
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.io.intensity import Window
from refseg.io.raster import to_rgb_uint8
from refseg.models.sam2_transforms import normalize_resize
from refseg.models.sam_transforms import (medsam_resize, normalize_pad, preprocess_shape, preprocessing_for,
                                          resize_image)
from refseg.pipeline.accelerator import accelerator_path, to_device
from refseg.pipeline.features import normalize_dinov2, resize_rgb
from refseg.pipeline.resample import pil_resize


@dataclass
class PreparedTarget:
    """One target ready for the encoders (:func:`prepare_target`).

    Attributes:
        rgb: (H, W, 3) uint8, the target in its own geometry.
        dinov2: (S, S, 3) uint8 resized for DINOv2 (bicubic), or None on the accelerator path.
        sam: (h, w, 3) uint8 resized so the longer side is SAM's input side (before padding); MedSAM:
            its stretched (side, side, 3) square; None on the accelerator path (SAM) and for SAM 2.
        sam_input_size: (h, w) of the image inside SAM's square input ((side, side) for MedSAM and SAM 2).
        pixels: (H, W, 3) uint8 on the device once :func:`stage_targets` copied it, else None.
    """

    rgb: np.ndarray
    dinov2: Optional[np.ndarray]
    sam: Optional[np.ndarray]
    sam_input_size: tuple[int, int]
    pixels: Optional[torch.Tensor] = None
    _ready: object = field(default=None, repr=False)  # CUDA event: the copy to the device has ended

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the target."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


def prepare_target(image: np.ndarray, *, image_size: int, patch_size: int, sam_size: int,
                   device: torch.device, preprocessing: str = "sam", window: Optional[Window] = None,
                   source: str = "image") -> PreparedTarget:
    """Validate one target and prepare it for the encoders (the work of the stream's reader threads).

    Args:
        image: (H, W) or (H, W, C) array of any dtype (:func:`refseg.io.raster.to_rgb_uint8`).
        image_size: matching-encoder input side S; patch_size: its patch side (an image must hold one patch);
            sam_size: SAM's input side.
        preprocessing: the SAM model's (:func:`refseg.models.sam_transforms.preprocessing_for`): ``sam``,
            ``medsam`` or ``sam2``.
        device: the models' device (decides the path, :func:`.accelerator.accelerator_path`).

    Raises:
        ValueError: naming ``source``: not (H, W)/(H, W, C), or smaller than one patch.
    """
    try:
        rgb = to_rgb_uint8(np.asarray(image), window)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    if min(rgb.shape[:2]) < patch_size:
        raise ValueError(f"{source}: {rgb.shape[1]}x{rgb.shape[0]} (W x H) is smaller than one "
                         f"{patch_size}x{patch_size} patch")
    rgb = np.require(rgb, requirements="CW")  # torch.from_numpy needs writable C arrays
    if preprocessing == "medsam":
        sam, input_size = np.require(medsam_resize(rgb, sam_size), requirements="CW"), (sam_size, sam_size)
    elif preprocessing == "sam2":  # stretched in sam_inputs
        sam, input_size = None, (sam_size, sam_size)
    else:
        sam, input_size = None, preprocess_shape(rgb.shape[0], rgb.shape[1], sam_size)
    if accelerator_path(device):
        target = PreparedTarget(rgb, None, sam, input_size)
        stage_targets([target], device)
        return target
    if preprocessing == "sam":
        sam = np.require(resize_image(rgb, sam_size), requirements="CW")
    return PreparedTarget(rgb, np.require(resize_rgb(rgb, image_size), requirements="CW"), sam, input_size)


_side_streams: dict[torch.device, object] = {}
_side_lock = threading.Lock()


def _side_stream(device: torch.device):
    """The copy stream of ``device`` (one per device, shared by the reader threads)."""
    with _side_lock:
        if device not in _side_streams:
            _side_streams[device] = torch.cuda.Stream(device)
        return _side_streams[device]


def stage_targets(targets: list[PreparedTarget], device: torch.device) -> None:
    """Copy the targets' uint8 pixels to ``device`` (accelerator path; nothing to do on the CPU path).

    On CUDA the copies run non-blocking on a side stream from pinned memory, and an event marks their
    end: :func:`dinov2_inputs` / :func:`sam_inputs` make the compute stream wait for it, so staging
    the next batch while this one computes overlaps the two.
    """
    device = torch.device(device)
    if not accelerator_path(device):
        return
    if device.type != "cuda":
        for t in targets:
            t.pixels = torch.from_numpy(t.rgb) if t.pixels is None else t.pixels
        return
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        for t in targets:
            if t.pixels is None:
                # pinned: a truly asynchronous copy; the caching host allocator keeps the buffer until it ran
                t.pixels = torch.from_numpy(t.rgb).pin_memory().to(device, non_blocking=True)
                t._ready = torch.cuda.Event()
                t._ready.record(stream)


def _device_pixels(targets: list[PreparedTarget], device: torch.device) -> list[torch.Tensor]:
    """Each target's (H, W, 3) uint8 pixels on ``device``, the compute stream waiting for their copy."""
    stage_targets(targets, device)
    if torch.device(device).type == "cuda":
        current = torch.cuda.current_stream(device)
        for t in targets:
            if t._ready is not None:
                current.wait_event(t._ready)
                t.pixels.record_stream(current)  # the allocator must not reuse it before we are done
                t._ready = None
    return [t.pixels for t in targets]


def _by_size(targets: list[PreparedTarget]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        groups[t.size].append(i)
    return groups


def dinov2_inputs(targets: list[PreparedTarget], backend, config: SegmenterConfig) -> torch.Tensor:
    """(B, 3, S, S) float32 ImageNet-normalised DINOv2 inputs on ``backend.device``, S = ``config.image_size``."""
    device, image_size = torch.device(backend.device), config.image_size
    if not accelerator_path(device):
        resized = torch.from_numpy(np.stack([t.dinov2 for t in targets])).permute(0, 3, 1, 2)
        return normalize_dinov2(resized.float()).to(device)
    pixels = _device_pixels(targets, device)
    out = torch.empty(len(targets), 3, image_size, image_size, device=device)
    for members in _by_size(targets).values():
        batch = torch.stack([pixels[i] for i in members])
        resized = pil_resize(batch, (image_size, image_size), "bicubic")
        out[to_device(members, device)] = normalize_dinov2(resized)
    return out


def sam_inputs(targets: list[PreparedTarget], backend, config: SegmenterConfig) -> torch.Tensor:
    """(B, 3, side, side) float32 SAM inputs on ``backend.device`` (side = ``backend.sam_size``):
    (x − mean) / std and zero padding (SAM), MedSAM's min-max scaling of its stretched square, or SAM 2's
    stretch and ImageNet normalisation."""
    device, sam_size = torch.device(backend.device), backend.sam_size
    preprocessing = preprocessing_for(config.sam)
    if preprocessing == "sam2":
        pixels = (_device_pixels(targets, device) if accelerator_path(device)
                  else [torch.from_numpy(t.rgb) for t in targets])
        out = torch.empty(len(targets), 3, sam_size, sam_size, device=device)
        for members in _by_size(targets).values():
            batch = torch.stack([pixels[i] for i in members]).to(device).permute(0, 3, 1, 2)
            out[to_device(members, device)] = normalize_resize(batch, sam_size)
        return out
    if preprocessing == "medsam":  # min-max to [0, 1] of the whole image, float64 as its script
        values = to_device(torch.stack([torch.from_numpy(t.sam) for t in targets]), device)
        values = values.permute(0, 3, 1, 2).double()
        lo = values.amin((1, 2, 3), keepdim=True)
        hi = values.amax((1, 2, 3), keepdim=True)
        return ((values - lo) / (hi - lo).clamp(min=1e-8)).float()
    if not accelerator_path(device):
        return torch.cat([normalize_pad(torch.from_numpy(t.sam).to(device).permute(2, 0, 1), sam_size)
                          for t in targets])
    pixels = _device_pixels(targets, device)
    out = torch.empty(len(targets), 3, sam_size, sam_size, device=device)
    for members in _by_size(targets).values():
        batch = torch.stack([pixels[i] for i in members])
        h, w = targets[members[0]].sam_input_size
        out[to_device(members, device)] = normalize_pad(pil_resize(batch, (h, w), "bilinear"), sam_size)
    return out
