"""Interactive predictor for every SAM-family checkpoint: SAM ViT-B/L/H, MedSAM, SAM 2 / 2.1, MedSAM2.

The names, arguments, coordinate frames and outputs of segment-anything's ``SamPredictor`` and sam2's
``SAM2ImagePredictor``: set an image once, then prompt it many times::

    predictor = refseg.Predictor(sam_checkpoint="sam2.1_hiera_tiny.pt", device="cpu")
    predictor.set_image(rgb)                                   # (H, W, 3) uint8
    masks, scores, low_res = predictor.predict(point_coords=np.array([[320, 240]]),
                                               point_labels=np.array([1]))
    # masks (3, H, W) bool, scores (3,), low_res (3, 256, 256) logits (to pass back as mask_input)

The model family comes from the checkpoint's keys (a Hiera trunk: SAM 2; a ViT: SAM); MedSAM and
MedSAM2 are recognised by their file names (``medsam*`` / ``MedSAM2*``) or by ``sam="medsam"`` /
``sam="medsam2"``. Every family keeps its own frames: SAM resizes the longest side to 1024 and pads,
MedSAM and SAM 2 stretch the image to a square; prompts are always (x, y) pixels of the image as given.
With SAM 2, ``predict(..., multimask_output=False)`` uses dynamic multimask via stability, as
``build_sam2`` sets it up by default (``dynamic_multimask=False`` switches it off, as
``build_sam2(..., apply_postprocessing=False)`` does); SAM 2's low-resolution logits are clamped to
[-32, 32] as ``SAM2ImagePredictor`` returns them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import torch

from refseg.models import sam2_transforms, sam_transforms
from refseg.models.build import checkpoint_family, sam_name_from_file
from refseg.models.checkpoints import CheckpointError, load_state_dict
from refseg.models.sam import SAM_SPECS, infer_sam_spec, sam_from_state_dict
from refseg.models.sam import get_spec as sam_get_spec
from refseg.models.sam2 import SAM2_SPECS, Sam2, get_spec
from refseg.models.sam2_state_dict import infer_sam2_name, sam2_from_state_dict
from refseg.runtime.torch_backend import resolve_device

log = logging.getLogger(__name__)


class Predictor:
    """``set_image`` / ``predict`` (and ``set_image_batch`` / ``predict_batch``) on a SAM-family model.

    Args:
        sam_checkpoint: an official SAM (``sam_vit_*.pth``), MedSAM (``medsam_vit_b.pth``), SAM 2 / 2.1
            (``sam2*_hiera_*.pt``) or MedSAM2 (``MedSAM2_*.pt``) file.
        device: where the model runs: ``"auto"`` (CUDA when available, else CPU; the default), ``"cpu"``,
            ``"cuda"``, ...
        sam: model name, to say what the weights cannot (``"medsam"``, ``"medsam2"``); None infers it.
        mask_threshold: logit above which a pixel is in the mask (0.0).
        dynamic_multimask: SAM 2 only: with ``multimask_output=False``, fall back to the best multimask
            output when the single mask is unstable (the official default post-processing).
        image_size: SAM 2 only: the square model input side, a multiple of 32 (default: the model's,
            1024, 512 for MedSAM2). SAM 2 runs at other sizes (the official ``image_size`` setting);
            a smaller input is faster and coarser. SAM (ViT) has a fixed 1024 input.

    Raises:
        CheckpointError: a missing, unreadable or non-SAM checkpoint, or weights that do not fit.
    """

    def __init__(self, sam_checkpoint: str | os.PathLike, device: str | torch.device = "auto", *,
                 sam: str | None = None, mask_threshold: float = 0.0, dynamic_multimask: bool = True,
                 image_size: int | None = None) -> None:
        if image_size is not None and (image_size <= 0 or image_size % 32):
            raise ValueError(f"Predictor: image_size must be a positive multiple of 32, got {image_size}")
        if sam is not None and sam not in SAM_SPECS and sam not in SAM2_SPECS:
            raise ValueError(f"Predictor: unknown model {sam!r}; choose one of "
                             f"{', '.join([*SAM_SPECS, *SAM2_SPECS])}")
        self.device = resolve_device(device)
        path = Path(sam_checkpoint)
        state = load_state_dict(path)
        family = checkpoint_family(state)
        medsam = False
        if family == "SAM":
            if image_size not in (None, 1024):
                raise ValueError(f"Predictor: {path} is a SAM (ViT) checkpoint, whose input is 1024 only")
            # MedSAM is told by its name (file or ``sam``); its layout still comes from the weights.
            medsam = (sam or sam_name_from_file(path)) == "medsam"
            spec = sam_get_spec(sam) if sam is not None else infer_sam_spec(state, str(path))
            if medsam and spec.name == "vit_b":
                spec = SAM_SPECS["medsam"]
            model = sam_from_state_dict(state, spec, source=str(path))
        elif family == "SAM 2":
            spec = get_spec(sam or infer_sam2_name(state, str(path)))
            if image_size is not None:
                spec = dataclasses.replace(spec, image_size=image_size)
            model = sam2_from_state_dict(state, spec, source=str(path))
        else:
            raise CheckpointError(f"{path}: this is a {family} checkpoint, not a SAM-family one")
        del state
        self.model = model.to(self.device).eval()
        self.is_sam2 = isinstance(model, Sam2)
        self.mask_threshold = mask_threshold
        self.dynamic_multimask = dynamic_multimask
        self.image_size = model.image_size if self.is_sam2 else model.img_size
        self.preprocessing = "sam2" if self.is_sam2 else ("medsam" if medsam else "sam")
        log.info("Predictor: %s (%s) from %s on %s", model.spec.name, family, path, self.device)
        self.reset_predictor()

    def reset_predictor(self) -> None:
        """Forget the image(s) set."""
        self._features = None
        self._original_sizes: list[tuple[int, int]] = []
        self._input_sizes: list[tuple[int, int]] = []
        self._is_batch = False

    reset_image = reset_predictor  # segment-anything's name

    @property
    def is_image_set(self) -> bool:
        return self._features is not None

    @property
    def original_size(self) -> tuple[int, int]:
        """(H, W) of the image set (of the last one in batch mode)."""
        self._require_image()
        return self._original_sizes[-1]

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode one (H, W, 3) uint8 image (``image_format`` ``"RGB"`` or ``"BGR"``; a PIL image works too)."""
        self._encode([self._as_rgb(image, image_format, "set_image(image)")])

    @torch.no_grad()
    def set_image_batch(self, image_list: list[np.ndarray]) -> None:
        """Encode several (H, W, 3) uint8 RGB images in one encoder batch, for :meth:`predict_batch`."""
        if not isinstance(image_list, (list, tuple)) or not image_list:
            raise ValueError("set_image_batch: image_list must be a non-empty list of (H, W, 3) uint8 images")
        self._encode([self._as_rgb(im, "RGB", f"set_image_batch(image_list[{i}])") for i, im in enumerate(image_list)])
        self._is_batch = True

    def get_image_embedding(self) -> torch.Tensor:
        """The image embedding(s) (B, 256, h, w) (for SAM 2 the stride-16 level the decoder attends to)."""
        self._require_image()
        return self._features.image_embed if self.is_sam2 else self._features

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                multimask_output: bool = True, return_logits: bool = False,
                normalize_coords: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts on the image set with :meth:`set_image`.

        Args:
            point_coords: (N, 2) (x, y) pixels of the image as given (or (B, N, 2) for B objects);
                with ``normalize_coords=False``, fractions of the width / height instead.
            point_labels: (N,) (or (B, N)) 1 foreground, 0 background.
            box: (4,) XYXY pixels (or (B, 4) for B objects).
            mask_input: (1, h, w) low-resolution logits from an earlier call (or (B, 1, h, w)),
                h = w = 256 (128 for MedSAM2).
            multimask_output: three masks per prompt when True (better for one ambiguous click).
            return_logits: return logits instead of boolean masks.

        Returns:
            masks (C, H, W): bool for SAM / MedSAM, 0/1 float32 for SAM 2 / MedSAM2 (what each official
            predictor returns), float32 logits with ``return_logits``; iou_predictions (C,) and
            low_res_logits (C, h, w) float32, C = 3 or 1; a leading B axis for B objects.
        """
        self._require_image()
        if self._is_batch:
            raise RuntimeError("Predictor.predict: images were set with set_image_batch; use predict_batch")
        return self._predict(0, point_coords, point_labels, box, mask_input, multimask_output, return_logits,
                             normalize_coords)

    def predict_batch(self, point_coords_batch: list | None = None, point_labels_batch: list | None = None,
                      box_batch: list | None = None, mask_input_batch: list | None = None,
                      multimask_output: bool = True, return_logits: bool = False,
                      normalize_coords: bool = True) -> tuple[list, list, list]:
        """:meth:`predict` for every image of :meth:`set_image_batch`: each ``*_batch`` is a list with
        one entry (or None) per image. Returns lists of masks, iou_predictions and low_res_logits."""
        self._require_image()
        if not self._is_batch:
            raise RuntimeError("Predictor.predict_batch: set the images with set_image_batch first")
        count = len(self._original_sizes)
        for name, value in (("point_coords_batch", point_coords_batch), ("point_labels_batch", point_labels_batch),
                            ("box_batch", box_batch), ("mask_input_batch", mask_input_batch)):
            if value is not None and len(value) != count:
                raise ValueError(f"predict_batch: {name} has {len(value)} entries for {count} images")
        results = [self._predict(i, *(None if v is None else v[i] for v in (point_coords_batch, point_labels_batch,
                                                                             box_batch, mask_input_batch)),
                                 multimask_output, return_logits, normalize_coords) for i in range(count)]
        return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]

    # -- internals ---------------------------------------------------------------------------------

    def _require_image(self) -> None:
        if self._features is None:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

    @staticmethod
    def _as_rgb(image, image_format: str, name: str) -> np.ndarray:
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"{name}: image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name}: expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
        return image[..., ::-1] if image_format == "BGR" else image

    def _encode(self, images: list[np.ndarray]) -> None:
        self.reset_predictor()
        if self.is_sam2:
            batch = sam2_transforms.prepare_images(images, self.image_size, self.device)
        else:
            batch = sam_transforms.prepare_images(images, self.image_size, self.device,
                                                  preprocessing=self.preprocessing)
        self._features = self.model.encode_image(batch.pixels)
        self._original_sizes, self._input_sizes = batch.original_sizes, batch.input_sizes

    def _to_input_frame(self, points: np.ndarray, index: int, normalize_coords: bool) -> torch.Tensor:
        """(..., 2) (x, y) of the original image (or fractions of it) -> float32 input-frame pixels."""
        h, w = self._original_sizes[index]
        if self.is_sam2:
            coords = torch.as_tensor(points, dtype=torch.float32, device=self.device)
            if not normalize_coords:  # already fractions: the official code only scales them
                return coords * self.image_size
            return sam2_transforms.transform_coords(coords, (h, w), self.image_size)
        points = np.asarray(points, dtype=np.float64)
        if not normalize_coords:
            points = points * np.array([w, h])
        input_size = self._input_sizes[index] if self.preprocessing == "medsam" else None
        coords = sam_transforms.resize_coords(points, (h, w), self.image_size, input_size)
        return torch.as_tensor(coords, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def _predict(self, index: int, point_coords, point_labels, box, mask_input, multimask_output: bool,
                 return_logits: bool, normalize_coords: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        coords = labels = boxes = masks_in = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("predict: point_labels must be supplied if point_coords is supplied.")
            point_coords = np.asarray(point_coords)
            point_labels = np.asarray(point_labels)
            if point_coords.shape[-1:] != (2,) or point_coords.ndim not in (2, 3) \
                    or point_labels.shape != point_coords.shape[:-1]:
                raise ValueError(f"predict: point_coords must be (N, 2) or (B, N, 2) (x, y) and point_labels "
                                 f"(N,) or (B, N), got {point_coords.shape} and {point_labels.shape}")
            coords = self._to_input_frame(point_coords, index, normalize_coords)
            labels = torch.as_tensor(point_labels, dtype=torch.int32, device=self.device)
            if coords.dim() == 2:
                coords, labels = coords[None], labels[None]
        if box is not None:
            box = np.asarray(box)
            if box.shape[-1:] != (4,) or box.ndim > 2:
                raise ValueError(f"predict: box must be (4,) or (B, 4) XYXY, got {box.shape}")
            boxes = self._to_input_frame(box.reshape(-1, 2, 2), index, normalize_coords).reshape(-1, 4)
        if mask_input is not None:
            masks_in = torch.as_tensor(np.asarray(mask_input), dtype=torch.float32, device=self.device)
            if masks_in.dim() == 3:
                masks_in = masks_in[None]
            low = 4 * self.image_size // 16
            if masks_in.dim() != 4 or tuple(masks_in.shape[1:]) != (1, low, low):
                raise ValueError(f"predict: mask_input must be (1, {low}, {low}) or (B, 1, {low}, {low}) "
                                 f"low-resolution logits, got {tuple(masks_in.shape)}")
        if self.is_sam2:
            low_res, iou, _ = self.model.decode(self._features.select(index), coords, labels, boxes, masks_in,
                                                multimask_output, self.dynamic_multimask)
            masks = sam2_transforms.postprocess_masks(low_res, self._original_sizes[index])
            low_res = low_res.clamp(-32.0, 32.0)
        else:
            low_res, iou = self.model.decode(self._features[index:index + 1], coords, labels, boxes, masks_in,
                                             multimask_output)
            masks = sam_transforms.postprocess_masks(low_res, self._input_sizes[index], self._original_sizes[index],
                                                     self.image_size, direct=self.preprocessing == "medsam")
        if not return_logits:
            masks = masks > self.mask_threshold
            if self.is_sam2:  # SAM2ImagePredictor returns 0/1 float32 masks, SamPredictor booleans
                masks = masks.float()
        out = (masks, iou.float(), low_res.float())
        return tuple(t.squeeze(0).cpu().numpy() if t.shape[0] == 1 else t.cpu().numpy() for t in out)
