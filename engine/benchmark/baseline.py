"""Research-style baseline: the released GBMSeg flow (docs/algorithm.md §1) on the official packages.

Written by us to run the way the released code runs, so that ``refseg bench`` can measure the engine
against it in the same process, on the same checkpoint files (it ships inside the package, so an
installed refseg benchmarks against it too; the official packages are imported only when a baseline
model is built):

- models: the OFFICIAL ``dinov2`` (``dinov2.models.vision_transformer``, hub configuration) and
  ``segment_anything`` (``sam_model_registry`` + ``SamPredictor``) packages, fp32, eager;
- one target at a time; for every target the reference is encoded again, together with the target,
  once for the foreground and once for the background patch list (the release's ``generate()``
  called its matching function twice, each time encoding the (reference, target) pair);
- the reference mask is scanned cell by cell in Python every target (``np.all`` per 14×14 cell);
- matching: Euclidean ``torch.cdist`` + arg-min / arg-max, the cycle check as a Python loop over the
  matches with list membership (``idx in fg_list``);
- prompt engineering: per-point Python loops over lists (greedy radius grouping with list membership,
  mean distance to the opposite class, exclusion), as the release's ``automatic_prompt_engineering``;
- one ``SamPredictor`` per target: ``set_image`` then one ``predict`` with all points,
  ``multimask_output=False``.

Where the official packages (and torchvision, which ``SamPredictor`` needs) are not installed — a bare
GPU host — ``models="auto"`` runs the same flow on refseg's own fp32 modules (same architectures and
checkpoints; refseg's attention goes through SDPA, so this stand-in is if anything faster than the
official code, and ratios against it understate refseg's gain); :attr:`ResearchBaseline.models` says
which ran.

Deliberate deviations (each keeps the baseline comparable with refseg, none makes it faster): the
target goes to SAM at its original size in RGB order (the release passed a BGR array to a predictor
expecting RGB); candidate patches are walked in ascending patch index (the release walked Python
``set`` order, which is not reproducible, and the greedy grouping is order-sensitive); the
release's off-image point (patch index −1) is not produced.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from refseg.optional import MissingDependencyError, require

log = logging.getLogger(__name__)

__all__ = ["BaselineResult", "ResearchBaseline", "check_config", "engineer_prompts", "exclude",
           "indices_to_points", "load_official_dinov2", "load_official_sam", "match_candidates",
           "patch_lists", "prompt_stage", "radii_px", "refine"]

PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OFFICIAL_DINOV2 = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2"}
# SegmenterConfig fields whose value must be the release's for this baseline to mean the same thing
_RELEASE_SETTINGS = {"metric": "euclidean", "matcher": "nn", "grid_rule": "all", "cycle_check": True,
                     "kmeans_k": 0, "max_points": 0, "use_box": False, "fallback": False,
                     "multimask_output": False, "keep_largest_contour": False,
                     "min_component_fraction": 0.0, "fill_holes": False,
                     "feature_key": "x_norm_patchtokens", "gbmseg_offimage_quirk": False}


def check_config(config) -> None:
    """Raise ValueError naming every ``SegmenterConfig`` field this baseline cannot follow."""
    wrong = [f"{k}={getattr(config, k)!r} (release: {v!r})" for k, v in _RELEASE_SETTINGS.items()
             if getattr(config, k) != v]
    if config.dinov2 not in _OFFICIAL_DINOV2:
        wrong.append(f"dinov2={config.dinov2!r} (official release models: {', '.join(_OFFICIAL_DINOV2)})")
    if wrong:
        raise ValueError("research baseline follows the GBMSeg release; config differs in: " + "; ".join(wrong))


def load_official_dinov2(name: str, checkpoint, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The official DINOv2 backbone ``name`` in its hub configuration with ``checkpoint``'s weights."""
    from refseg.models.checkpoints import load_state_dict

    try:
        from dinov2.models import vision_transformer
    except ImportError as exc:
        raise MissingDependencyError(
            "the research baseline needs the official DINOv2 package 'dinov2', which is not installed: "
            "pip install --no-deps dinov2==0.0.1.dev2 (its release pins an old torch)") from exc

    factory = getattr(vision_transformer, _OFFICIAL_DINOV2[name])
    model = factory(img_size=518, patch_size=PATCH, init_values=1.0, block_chunks=0,
                    ffn_layer="swiglufused" if name == "vitg14" else "mlp")
    model.load_state_dict(load_state_dict(checkpoint), strict=True)
    return model.to(device).eval()


def load_official_sam(name: str, checkpoint, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The official SAM ``name`` (vit_b / vit_l / vit_h; medsam has the vit_b layout) built by
    ``sam_model_registry``."""
    from refseg.models.checkpoints import load_state_dict

    sam_model_registry = require("segment_anything", "bench", "the research baseline").sam_model_registry

    model = sam_model_registry["vit_b" if name == "medsam" else name]()
    model.load_state_dict(load_state_dict(checkpoint), strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------- grid
def patch_lists(mask: np.ndarray, size: int, skip_last: bool = True) -> tuple[list[int], list[int]]:
    """Reference mask (H, W) (non-zero = FG) -> (FG, BG) flat patch indices of the S×S grid.

    The mask is resized to ``size``² as a 0/255 image with PIL's default (bicubic) filter; a cell is
    FG when all its 14×14 pixels are non-zero, BG when all are zero. ``skip_last`` reproduces the
    release's scan, which stopped one cell before the last row and column.
    """
    img = Image.fromarray(np.where(np.asarray(mask) != 0, 255, 0).astype(np.uint8)).resize((size, size))
    arr = np.asarray(img)
    grid = size // PATCH
    stop = size - PATCH if skip_last else size
    fg, bg = [], []
    for y in range(0, stop, PATCH):
        for x in range(0, stop, PATCH):
            cell = arr[y:y + PATCH, x:x + PATCH]
            if np.all(cell != 0):
                fg.append((y // PATCH) * grid + x // PATCH)
            if np.all(cell == 0):
                bg.append((y // PATCH) * grid + x // PATCH)
    return fg, bg


# ------------------------------------------------------------------------------------ matching
def _forward(ref: torch.Tensor, tgt: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(ref[torch.tensor(rows, dtype=torch.long)], tgt)
    return distances.argmin(dim=1), distances.argmax(dim=1)


def _back(ref: torch.Tensor, tgt: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    return torch.cdist(tgt[matched], ref).argmin(dim=1)


def match_candidates(ref: torch.Tensor, tgt: torch.Tensor, fg: list[int], bg: list[int],
                     hard_negatives: bool = True, tgt_bg: torch.Tensor | None = None
                     ) -> tuple[list[int], list[int], list[int]]:
    """Candidate (positive, negative, hard-negative) target patch indices, ascending, de-duplicated.

    Args:
        ref, tgt: (Nr, D) and (Nt, D) patch tokens of one (reference, target) pair.
        fg, bg: reference FG / BG patch indices (from :func:`patch_lists`).
        hard_negatives: also return the hard-negative candidates.
        tgt_bg: target features of the second encoding, used for the BG forward match (the
            release's second pass); default ``tgt``.
    """
    pos, neg, hard = [], [], []
    if fg:
        nearest, farthest = _forward(ref, tgt, fg)
        back = _back(ref, tgt, nearest)
        for i in range(len(nearest)):
            if back[i].item() in fg:
                pos.append(nearest[i].item())
        if hard_negatives:
            back_far = _back(ref, tgt, farthest)
            for i in range(len(farthest)):
                if back_far[i].item() not in fg:
                    hard.append(farthest[i].item())
    if bg:
        nearest, _ = _forward(ref, tgt if tgt_bg is None else tgt_bg, bg)
        back = _back(ref, tgt, nearest)
        for i in range(len(nearest)):
            if back[i].item() in bg:
                neg.append(nearest[i].item())
    return sorted(set(pos)), sorted(set(neg)), sorted(set(hard))


def indices_to_points(indices: Sequence[int], size: int, target_hw: tuple[int, int]) -> list[list[int]]:
    """Patch indices -> [x, y] pixels of the (H, W) target: centre (14·col + 7, 14·row + 7) · (W, H) / S."""
    grid = size // PATCH
    h, w = target_hw
    points = []
    for idx in indices:
        row, col = idx // grid, idx % grid
        x, y = col * PATCH + PATCH // 2, row * PATCH + PATCH // 2
        points.append([round(x * w / size), round(y * h / size)])
    return points


# --------------------------------------------------------------------------- prompt engineering
def _sq(a: Sequence[int], b: Sequence[int]) -> float:
    return (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2


def _dedupe(points: list[list[int]]) -> list[list[int]]:
    out = []
    for p in points:
        if p not in out:
            out.append(p)
    return out


def refine(points: list[list[int]], opposite: list[list[int]], radius: float) -> list[list[int]]:
    """Greedy radius grouping: each unassigned point gathers the unassigned points within ``radius``;
    the member with the largest mean distance to ``opposite`` represents the group (ties: earliest)."""
    points = _dedupe(points)
    assigned: list[list[int]] = []
    out = []
    r2 = radius * radius
    for p in points:
        if p in assigned:
            continue
        members = [q for q in points if q not in assigned and _sq(p, q) <= r2]
        scores = []
        for q in members:
            dists = [math.sqrt(_sq(q, o)) for o in opposite]
            # exact sum: on the patch lattice mathematically equal scores are common, and they must
            # tie (then the earliest member wins, algorithm.md §1) rather than differ by rounding
            scores.append(math.fsum(dists) / max(len(dists), 1))
        out.append(members[scores.index(max(scores))])
        assigned.extend(members)
    return out


def exclude(points: list[list[int]], others: list[list[int]], radius: float) -> list[list[int]]:
    """Keep the points whose nearest point of ``others`` is at least ``radius`` away."""
    kept = []
    for p in points:
        nearest = min((_sq(p, o) for o in others), default=math.inf)
        if nearest >= radius * radius:
            kept.append(p)
    return kept


def engineer_prompts(pos: list[list[int]], neg: list[list[int]], hard: list[list[int]],
                     radii: dict[str, float]) -> tuple[list[list[int]], list[list[int]]]:
    """Physical-space stage: positives grouped (``pos``), negatives grouped (``neg``) and excluded
    around the positives (``exclusion``), hard negatives grouped (``hard``) and appended."""
    neg = _dedupe(neg)
    pos = refine(pos, neg, radii["pos"])
    neg = exclude(refine(neg, pos, radii["neg"]), pos, radii["exclusion"])
    return pos, neg + (refine(hard, pos, radii["hard"]) if hard else [])


def radii_px(config, target_hw: tuple[int, int]) -> dict[str, float]:
    """The config's four radii in pixels of an (H, W) target."""
    scale = 1.0 if config.radius_unit == "pixel" else float(max(target_hw))
    return {"pos": config.pos_radius * scale, "neg": config.neg_radius * scale,
            "exclusion": config.exclusion_radius * scale, "hard": config.hard_radius * scale}


def prompt_stage(ref: torch.Tensor, tgt: torch.Tensor, fg: list[int], bg: list[int],
                 target_hw: tuple[int, int], config, tgt_bg: torch.Tensor | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Matching + prompt engineering for one target.

    Returns:
        points (N, 2) int64 (x, y) target pixels, labels (N,) int64 (1 / 0), and seconds per stage
        (``matching``, ``prompts``).
    """
    t0 = time.perf_counter()
    pos_i, neg_i, hard_i = match_candidates(ref, tgt, fg, bg, config.hard_negatives, tgt_bg)
    t1 = time.perf_counter()
    size = config.image_size
    pos, neg = engineer_prompts(indices_to_points(pos_i, size, target_hw),
                                indices_to_points(neg_i, size, target_hw),
                                indices_to_points(hard_i, size, target_hw), radii_px(config, target_hw))
    points = np.asarray(pos + neg, dtype=np.int64).reshape(-1, 2)
    labels = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    return points, labels, {"matching": t1 - t0, "prompts": time.perf_counter() - t1}


# ------------------------------------------------------------------------------------ pipeline
@dataclass
class BaselineResult:
    """mask: (H, W) bool; points (N, 2) int64 (x, y); labels (N,) int64; timings: stage -> seconds."""

    mask: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def official_packages_missing() -> str | None:
    """Why the official-package baseline cannot run here (a missing package), or None."""
    import importlib.util

    for module in ("segment_anything", "dinov2", "torchvision"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


class ResearchBaseline:
    """The release's per-target flow on the official models.

    Args:
        config: a :class:`refseg.SegmenterConfig` with the release's settings (``gbmseg`` preset,
            any model sizes); ``config.dinov2`` / ``config.sam`` name the models of the files.
        sam_checkpoint, dinov2_checkpoint: official-format checkpoint files (the same as refseg's).
        device: torch device (everything fp32).
        models: ``official``, ``refseg`` (the same flow on refseg's fp32 eager modules) or ``auto``
            (official when installed); :attr:`models` is the one used.
    """

    def __init__(self, config, sam_checkpoint, dinov2_checkpoint, device: torch.device | str = "cpu",
                 models: str = "auto"):
        check_config(config)
        if models == "auto":
            models = "refseg" if official_packages_missing() else "official"
            if models == "refseg":
                log.warning("research baseline on refseg's fp32 modules: %s", official_packages_missing())
        self.models = models
        self.config = config
        self.device = torch.device(device)
        if models == "official":
            self.dinov2 = load_official_dinov2(config.dinov2, dinov2_checkpoint, self.device)
            self.sam = load_official_sam(config.sam, sam_checkpoint, self.device)
            self._predictor_cls = require("segment_anything", "bench", "the research baseline").SamPredictor
        else:
            from refseg.models import build_dinov2, build_sam

            self.dinov2 = build_dinov2(None, dinov2_checkpoint).to(self.device).eval()
            self.sam = build_sam(None, sam_checkpoint).to(self.device).eval()
            self._predictor_cls = _ModulePredictor

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        size = self.config.image_size
        pil = Image.fromarray(image).resize((size, size))
        if self.models == "official":
            T = require("torchvision.transforms", "bench", "the research baseline")
            transform = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
            return transform(pil)[:3]
        arr = np.asarray(pil, dtype=np.float32)[..., :3] / 255.0  # ToTensor + Normalize, in numpy
        arr = (arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    @torch.no_grad()
    def encode_pair(self, reference: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference, target) RGB uint8 -> their (T, D) ``x_norm_patchtokens``, one batch of 2."""
        batch = torch.stack([self._to_tensor(reference), self._to_tensor(target)]).to(self.device)
        tokens = self.dinov2.forward_features(batch)["x_norm_patchtokens"]
        return tokens[0], tokens[1]

    def segment(self, reference: np.ndarray, reference_mask: np.ndarray, target: np.ndarray) -> BaselineResult:
        """Segment one (H, W, 3) uint8 RGB target against the reference; everything redone per target."""
        cfg, times = self.config, {}
        self._sync()
        t = time.perf_counter()
        ref_fg, tgt_fg = self.encode_pair(reference, target)   # forward pass for the FG list
        _, tgt_bg = self.encode_pair(reference, target)        # and again for the BG list
        self._sync()
        times["dinov2"] = time.perf_counter() - t
        t = time.perf_counter()
        fg, bg = patch_lists(reference_mask, cfg.image_size, cfg.gbmseg_skip_last)
        times["grid"] = time.perf_counter() - t
        points, labels, stage = prompt_stage(ref_fg, tgt_fg, fg, bg, target.shape[:2], cfg, tgt_bg)
        times.update(stage)
        t = time.perf_counter()
        predictor = self._predictor_cls(self.sam)
        predictor.set_image(target)
        self._sync()
        times["sam_encoder"] = time.perf_counter() - t
        t = time.perf_counter()
        if len(points):
            masks, _, _ = predictor.predict(point_coords=points.astype(np.float64),
                                            point_labels=labels.astype(np.float64), multimask_output=False)
            mask = masks[0].astype(bool)
        else:  # no prompt at all: nothing to segment (refseg does the same)
            mask = np.zeros(target.shape[:2], dtype=bool)
        self._sync()
        times["decoder"] = time.perf_counter() - t
        times["total"] = sum(times.values())
        return BaselineResult(mask, points, labels, times)


class _ModulePredictor:
    """``SamPredictor``'s ``set_image`` / ``predict`` (single mask) on refseg's SAM module, fp32 eager."""

    def __init__(self, sam):
        self.sam = sam

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        from refseg.models.sam_transforms import prepare_images

        device = next(self.sam.parameters()).device
        self.prepared = prepare_images([image], self.sam.img_size, device)
        self.embedding = self.sam.encode_image(self.prepared.pixels)

    @torch.no_grad()
    def predict(self, point_coords: np.ndarray, point_labels: np.ndarray, multimask_output: bool = False):
        from refseg.models.sam_transforms import postprocess_masks, resize_coords

        size = self.prepared.original_sizes[0]
        coords = resize_coords(point_coords, size, self.sam.img_size, self.prepared.input_sizes[0])
        dev = self.embedding.device
        low, iou = self.sam.decode(self.embedding, torch.as_tensor(coords, dtype=torch.float32, device=dev)[None],
                                   torch.as_tensor(point_labels, device=dev).long()[None],
                                   multimask_output=multimask_output)
        masks = postprocess_masks(low, self.prepared.input_sizes[0], size, self.sam.img_size) > 0
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low[0].cpu().numpy()
