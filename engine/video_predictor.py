"""Video / volume predictor for SAM 2 checkpoints with sam2's ``SAM2VideoPredictor`` names and outputs.

Prompt an object on one or more frames (slices), then propagate it through the video with SAM 2's
memory::

    predictor = refseg.VideoPredictor(sam_checkpoint="sam2.1_hiera_tiny.pt", device="cpu")
    state = predictor.init_state(frames=ct_slices)           # or video_path="frames/" (<index>.jpg)
    predictor.add_new_points_or_box(state, frame_idx=40, obj_id=1, points=[[210, 180]], labels=[1])
    predictor.add_new_mask(state, frame_idx=60, obj_id=2, mask=label_slice == 5)
    for frame_idx, obj_ids, mask_logits in predictor.propagate_in_video(state):
        masks = (mask_logits > 0).cpu().numpy()               # (objects, 1, H, W)
    for frame_idx, obj_ids, mask_logits in predictor.propagate_in_video(state, reverse=True):
        ...

What matches sam2 1.1.0's ``build_sam2_video_predictor(config, ckpt)`` (its default post-processing):
frames resized with Pillow's bicubic filter to the model input and ImageNet-normalised; objects
tracked one by one, each with its own memory bank; a prompted frame becomes a conditioning frame
(points: the multimask output for one click, dynamic multimask for more; a mask is used as output);
prompted frames enter memory binarised; tracked frames use the best of three masks; background holes
of at most ``fill_hole_area`` (8) low-resolution pixels are filled; yielded masks are fp32 logits
(objects, 1, H, W) on the device, -1024 where the object score says "absent". Points added to an
already tracked frame correct it (memory-conditioned, kept as a non-conditioning frame).

What differs: frames are read and encoded on demand and the image features of only the last
``feature_cache_frames`` frames are kept (sam2 holds every frame as a float32 model input); frames
may be arrays of any dtype (one intensity window for all, see :mod:`refseg.io.video_frames`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from refseg.io.intensity import Window
from refseg.io.video_frames import VideoFrames
from refseg.models.build import checkpoint_family
from refseg.models.checkpoints import CheckpointError, load_state_dict
from refseg.models.sam2 import get_spec
from refseg.models.sam2_memory import NO_OBJ_SCORE, FrameFeatures, HeadsOutput, sam2_video_from_state_dict
from refseg.models.sam2_memory_bank import FrameOutput, MemoryBank
from refseg.models.sam2_state_dict import infer_sam2_name
from refseg.models.sam2_transforms import PIXEL_MEAN, PIXEL_STD, transform_coords
from refseg.pipeline.postprocess import label_components
from refseg.runtime.torch_backend import resolve_device

log = logging.getLogger(__name__)


def frame_pixels(rgb: np.ndarray, image_size: int, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, S, S) float32 model input as sam2's video loader makes it:
    Pillow bicubic resize to S x S, / 255, then ImageNet mean / std."""
    resized = np.asarray(Image.fromarray(rgb).resize((image_size, image_size), Image.Resampling.BICUBIC))
    x = torch.from_numpy(resized / 255.0).float().permute(2, 0, 1).to(device)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(PIXEL_STD, dtype=torch.float32, device=device)[:, None, None]
    return ((x - mean) / std)[None]


def _cpu_tensor(values) -> torch.Tensor:
    """A prompt given as a list, numpy array or tensor (any device) as a CPU tensor."""
    return values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))


def fill_small_holes(mask_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Set background regions (logit <= 0, 8-connected) of at most ``max_area`` pixels to logit 0.1.
    (N, 1, h, w) -> same shape (sam2's ``fill_holes_in_mask_scores``)."""
    out = mask_logits.clone()
    for n in range(mask_logits.shape[0]):
        labels, sizes = label_components(mask_logits[n, 0] <= 0, connectivity=8)
        small = torch.cat([sizes.new_zeros(1, dtype=torch.bool), sizes <= max_area])
        out[n, 0] = torch.where(small[labels], torch.full_like(out[n, 0], 0.1), out[n, 0])
    return out


@dataclass
class VideoState:
    """The inference state of one video (sam2's ``inference_state``; pass it back to every call).

    ``state["num_frames"]``, ``["video_height"]``, ``["video_width"]``, ``["obj_ids"]`` and
    ``["device"]`` read as in sam2.
    """

    frames: VideoFrames
    device: torch.device
    storage_device: torch.device
    obj_ids: list = field(default_factory=list)
    point_inputs: list[dict] = field(default_factory=list)     # per object: frame -> (coords, labels)
    mask_inputs: list[dict] = field(default_factory=list)      # per object: frame -> (1, 1, S, S)
    banks: list[MemoryBank] = field(default_factory=list)      # per object: consolidated outputs
    temp: list[MemoryBank] = field(default_factory=list)       # per object: outputs of new prompts
    tracked: list[dict] = field(default_factory=list)          # per object: frame -> tracked in reverse
    features: OrderedDict = field(default_factory=OrderedDict)  # frame -> FrameFeatures, last few only

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def video_height(self) -> int:
        return self.frames.height

    @property
    def video_width(self) -> int:
        return self.frames.width

    def __getitem__(self, key: str):
        if key not in ("num_frames", "video_height", "video_width", "obj_ids", "device"):
            raise KeyError(key)
        return getattr(self, key)


class VideoPredictor:
    """sam2's ``SAM2VideoPredictor`` for SAM 2 / 2.1 / MedSAM2 checkpoints (see the module docstring).

    Args:
        sam_checkpoint: official ``sam2*_hiera_*.pt`` or MedSAM2 file (every key is loaded, strictly).
        device: where the model runs: ``"auto"`` (CUDA when available, else CPU; the default), ``"cpu"``, ...
        sam: model name when the file name and weights cannot tell (``"medsam2"``); None infers it.
        image_size: square model input side, a multiple of 32 (default the model's; the official
            ``image_size`` setting).
        apply_postprocessing: sam2's switch: dynamic multimask, binarised prompted masks in memory
            and hole filling (``fill_hole_area`` 8). False: none of them.
        fill_hole_area: override the hole size (0: off).
        feature_cache_frames: how many frames' image features stay cached (>= 1).
    """

    def __init__(self, sam_checkpoint: str | os.PathLike, device: str | torch.device = "auto", *,
                 sam: str | None = None, image_size: int | None = None, apply_postprocessing: bool = True,
                 fill_hole_area: int | None = None, feature_cache_frames: int = 2) -> None:
        if image_size is not None and (image_size <= 0 or image_size % 32):
            raise ValueError(f"VideoPredictor: image_size must be a positive multiple of 32, got {image_size}")
        if feature_cache_frames < 1:
            raise ValueError(f"VideoPredictor: feature_cache_frames must be >= 1, got {feature_cache_frames}")
        path = Path(sam_checkpoint)
        state = load_state_dict(path)
        family = checkpoint_family(state)
        if family != "SAM 2":
            raise CheckpointError(f"{path}: this is a {family} checkpoint; the video predictor needs SAM 2 / 2.1 "
                                  f"or MedSAM2 (its memory modules)")
        spec = get_spec(sam or infer_sam2_name(state, str(path)))
        if image_size is not None:
            spec = dataclasses.replace(spec, image_size=image_size)
        model = sam2_video_from_state_dict(state, spec, source=str(path))
        del state
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.image_size = model.image_size
        self.dynamic_multimask = apply_postprocessing
        self.binarize_prompted_masks = apply_postprocessing
        self.fill_hole_area = (8 if apply_postprocessing else 0) if fill_hole_area is None else fill_hole_area
        self.feature_cache_frames = feature_cache_frames
        log.info("VideoPredictor: %s from %s on %s", spec.name, path, self.device)

    # -- state ----------------------------------------------------------------------------------------

    def init_state(self, video_path: str | os.PathLike | None = None, offload_video_to_cpu: bool = False,
                   offload_state_to_cpu: bool = False, async_loading_frames: bool = False, *,
                   frames: Sequence[np.ndarray] | None = None, window: Window | None = None) -> VideoState:
        """A new state for a folder of ``<index>.jpg`` frames (``video_path``) or for ``frames``, a
        sequence of (H, W) / (H, W, 3) arrays of any dtype (``window``: their intensity window; None:
        automatic over all frames). Frames are always read on demand and kept on the host as given, so
        ``offload_video_to_cpu`` and ``async_loading_frames`` (sam2's) change nothing;
        ``offload_state_to_cpu`` keeps the memory bank on the CPU."""
        source = VideoFrames(video_path, frames, window)
        storage = torch.device("cpu") if offload_state_to_cpu else self.device
        log.info("VideoPredictor: %d frames of %dx%d px (W x H) from %s", len(source), source.width,
                 source.height, source.source)
        return VideoState(source, self.device, storage)

    def reset_state(self, inference_state: VideoState) -> None:
        """Forget every object, prompt and result (the frames stay)."""
        s = inference_state
        for part in (s.obj_ids, s.point_inputs, s.mask_inputs, s.banks, s.temp, s.tracked):
            part.clear()

    def _obj_idx(self, s: VideoState, obj_id) -> int:
        if obj_id not in s.obj_ids:
            s.obj_ids.append(obj_id)
            for part, new in ((s.point_inputs, dict), (s.mask_inputs, dict), (s.banks, MemoryBank),
                              (s.temp, MemoryBank), (s.tracked, dict)):
                part.append(new())
        return s.obj_ids.index(obj_id)

    @staticmethod
    def _check_frame(s: VideoState, frame_idx: int) -> None:
        if not 0 <= frame_idx < s.num_frames:
            raise IndexError(f"frame_idx {frame_idx} is outside the video's {s.num_frames} frames")

    def _features(self, s: VideoState, frame_idx: int) -> FrameFeatures:
        """The frame's image features, from the cache of the last few frames or encoded now."""
        self._check_frame(s, frame_idx)
        if frame_idx in s.features:
            s.features.move_to_end(frame_idx)
            return s.features[frame_idx]
        pixels = frame_pixels(s.frames.rgb(frame_idx), self.image_size, self.device)
        features = self.model.encode_frame(pixels)
        s.features[frame_idx] = features
        while len(s.features) > self.feature_cache_frames:
            s.features.popitem(last=False)
        return features

    # -- prompts --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add_new_points_or_box(self, inference_state: VideoState, frame_idx: int, obj_id, points=None,
                              labels=None, clear_old_points: bool = True, normalize_coords: bool = True,
                              box=None) -> tuple[int, list, torch.Tensor]:
        """Click points and / or a box on a frame for one object.

        Args:
            points: (N, 2) (x, y) pixels of the frame (with ``normalize_coords=False``: fractions of
                the width / height); labels: (N,) 1 foreground, 0 background.
            box: (4,) XYXY pixels; comes before the points (needs ``clear_old_points``).
            clear_old_points: replace this frame's earlier points of the object instead of adding.

        Returns:
            (frame_idx, obj_ids, mask logits (objects, 1, H, W) of every object on this frame).
        """
        s = inference_state
        self._check_frame(s, frame_idx)
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be provided together")
        if points is None and box is None:
            raise ValueError("at least one of points or box must be provided as input")
        if box is not None and not clear_old_points:
            raise ValueError("cannot add a box without clearing old points (a box must come before any point)")
        points = torch.zeros(0, 2) if points is None else _cpu_tensor(points).float()
        labels = torch.zeros(0, dtype=torch.int32) if labels is None else _cpu_tensor(labels).to(torch.int32)
        points, labels = points.reshape(1, -1, 2), labels.reshape(1, -1)
        if points.shape[1] != labels.shape[1]:
            raise ValueError(f"points (N, 2) and labels (N,) must match, got {points.shape[1]} and {labels.shape[1]}")
        if box is not None:
            corners = _cpu_tensor(box).float().reshape(1, 2, 2)
            points = torch.cat([corners, points], dim=1)
            labels = torch.cat([torch.tensor([[2, 3]], dtype=torch.int32), labels], dim=1)
        if normalize_coords:
            points = transform_coords(points, (s.video_height, s.video_width), self.image_size)
        else:
            points = points * self.image_size
        points, labels = points.to(self.device), labels.to(self.device)
        obj = self._obj_idx(s, obj_id)
        old = None if clear_old_points else s.point_inputs[obj].get(frame_idx)
        if old is not None:
            points, labels = torch.cat([old[0], points], dim=1), torch.cat([old[1], labels], dim=1)
        s.point_inputs[obj][frame_idx] = (points, labels)
        s.mask_inputs[obj].pop(frame_idx, None)
        return self._add_prompt(s, obj, frame_idx, points=(points, labels))

    add_new_points = add_new_points_or_box  # sam2's deprecated name

    @torch.inference_mode()
    def add_new_mask(self, inference_state: VideoState, frame_idx: int, obj_id, mask) -> tuple[int, list, torch.Tensor]:
        """A mask (H', W') (bool or 0 / 1, any size: resized to the model input) for one object on a
        frame. Returns as :meth:`add_new_points_or_box`."""
        s = inference_state
        self._check_frame(s, frame_idx)
        mask = _cpu_tensor(mask).bool()
        if mask.dim() != 2:
            raise ValueError(f"add_new_mask: mask must be (H, W), got {tuple(mask.shape)}")
        mask = mask[None, None].float().to(self.device)
        if tuple(mask.shape[-2:]) != (self.image_size, self.image_size):
            mask = F.interpolate(mask, (self.image_size, self.image_size), mode="bilinear", align_corners=False,
                                 antialias=True)
            mask = (mask >= 0.5).float()
        obj = self._obj_idx(s, obj_id)
        s.mask_inputs[obj][frame_idx] = mask
        s.point_inputs[obj].pop(frame_idx, None)
        return self._add_prompt(s, obj, frame_idx, mask=mask)

    def _add_prompt(self, s: VideoState, obj: int, frame_idx: int, points=None, mask=None):
        """Decode a prompted frame for one object (no memory encoding yet) and report every object's
        logits on it at the video's resolution."""
        init = frame_idx not in s.tracked[obj]
        reverse = False if init else s.tracked[obj][frame_idx]
        storage = s.temp[obj].cond if init else s.temp[obj].non_cond  # corrections stay non-conditioning
        prev_logits = None
        previous = storage.get(frame_idx) or s.banks[obj].get(frame_idx)
        if points is not None and previous is not None:
            prev_logits = previous.pred_masks.to(self.device).clamp(-32.0, 32.0)
        out, _ = self._run_frame(s, obj, frame_idx, init, reverse, points, mask, prev_logits, encode_memory=False)
        storage[frame_idx] = out
        logits = []
        for o in range(len(s.obj_ids)):
            found = (s.temp[o].cond if init else s.temp[o].non_cond).get(frame_idx) or s.banks[o].get(frame_idx)
            logits.append(self._video_res(s, found.pred_masks) if found is not None else
                          torch.full((1, 1, s.video_height, s.video_width), NO_OBJ_SCORE, device=self.device))
        return frame_idx, list(s.obj_ids), torch.cat(logits)

    def _run_frame(self, s: VideoState, obj: int, frame_idx: int, init: bool, reverse: bool, points=None,
                   mask=None, prev_logits=None, encode_memory: bool = True) -> tuple[FrameOutput, torch.Tensor]:
        """Track or decode one frame for one object; returns its stored output and (1, 1, S/4, S/4) logits."""
        features = self._features(s, frame_idx)
        memory = None
        if not init and mask is None:
            memory = self.model.memory_tokens(frame_idx, s.banks[obj], reverse, s.num_frames,
                                              features.vision.dtype)
        coords, labels = points if points is not None else (None, None)
        heads = self.model.track_frame(features, memory, coords, labels, mask, prev_logits, self.dynamic_multimask)
        low_res = heads.low_res_masks
        if self.fill_hole_area > 0:
            low_res = fill_small_holes(low_res, self.fill_hole_area)
        memory_features = None
        if encode_memory:
            memory_features = self._encode_memory(s, features, heads.high_res_masks, heads, binarize=False)
        out = FrameOutput(low_res.to(s.storage_device), heads.obj_ptr, heads.object_score_logits, memory_features)
        return out, low_res

    def _encode_memory(self, s: VideoState, features: FrameFeatures, high_res_masks: torch.Tensor,
                       heads: HeadsOutput | FrameOutput, binarize: bool) -> torch.Tensor:
        feats, _ = self.model.encode_memory(features, high_res_masks, heads.object_score_logits, binarize)
        return feats.to(torch.bfloat16).to(s.storage_device)  # sam2 stores memories in bfloat16

    def _video_res(self, s: VideoState, low_res: torch.Tensor) -> torch.Tensor:
        low_res = low_res.to(self.device)
        if tuple(low_res.shape[-2:]) == (s.video_height, s.video_width):
            return low_res
        return F.interpolate(low_res, (s.video_height, s.video_width), mode="bilinear", align_corners=False)

    # -- propagation ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state: VideoState) -> None:
        """Encode the memories of the newly prompted frames and move them into the memory banks."""
        s = inference_state
        if not s.obj_ids:
            raise RuntimeError("No input points or masks are provided for any object; please add inputs first.")
        for obj, obj_id in enumerate(s.obj_ids):
            for temp, bank in ((s.temp[obj].non_cond, s.banks[obj].non_cond), (s.temp[obj].cond, s.banks[obj].cond)):
                for frame_idx, out in temp.items():
                    if out.maskmem_features is None:
                        high_res = F.interpolate(out.pred_masks.to(self.device), (self.image_size, self.image_size),
                                                 mode="bilinear", align_corners=False)
                        out.maskmem_features = self._encode_memory(s, self._features(s, frame_idx), high_res, out,
                                                                   binarize=self.binarize_prompted_masks)
                    bank[frame_idx] = out
                temp.clear()
            if not s.banks[obj].cond:
                raise RuntimeError(f"No input points or masks are provided for object id {obj_id}; "
                                   f"please add inputs first.")
            for frame_idx in s.banks[obj].cond:
                s.banks[obj].non_cond.pop(frame_idx, None)

    @torch.inference_mode()
    def propagate_in_video(self, inference_state: VideoState, start_frame_idx: int | None = None,
                           max_frame_num_to_track: int | None = None, reverse: bool = False
                           ) -> Iterator[tuple[int, list, torch.Tensor]]:
        """Track every object through the video, one frame at a time.

        Args:
            start_frame_idx: first frame (default: the earliest prompted frame of any object).
            max_frame_num_to_track: frames to go past the start (default: to the video's end).
            reverse: towards frame 0 instead of the end.

        Yields:
            (frame_idx, obj_ids, mask logits (objects, 1, H, W) fp32 on the device; > 0: in the mask).
        """
        s = inference_state
        self.propagate_in_video_preflight(s)
        if start_frame_idx is None:
            start_frame_idx = min(t for bank in s.banks for t in bank.cond)
        self._check_frame(s, start_frame_idx)
        if max_frame_num_to_track is None:
            max_frame_num_to_track = s.num_frames
        if reverse:
            end = max(start_frame_idx - max_frame_num_to_track, 0)
            order = range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else range(0)
        else:
            end = min(start_frame_idx + max_frame_num_to_track, s.num_frames - 1)
            order = range(start_frame_idx, end + 1)
        for frame_idx in order:
            logits = []
            for obj in range(len(s.obj_ids)):
                bank = s.banks[obj]
                if frame_idx in bank.cond:
                    low_res = bank.cond[frame_idx].pred_masks.to(self.device)
                else:
                    bank.non_cond[frame_idx], low_res = self._run_frame(s, obj, frame_idx, False, reverse)
                s.tracked[obj][frame_idx] = reverse
                logits.append(low_res)
            yield frame_idx, list(s.obj_ids), self._video_res(s, torch.cat(logits))
