"""`SegmenterConfig`: one frozen dataclass holding every knob of the pipeline, with named presets.

Presets (see docs/algorithm.md):

* ``gbmseg`` — parity with the released GBMSeg code (§1): DINOv2 ViT-g/14 at 560, Euclidean matching,
  strict "all pixels" grid rule with the release's skip-last-row/column quirk, hard negatives, radii
  0 / 64 / 128 / 64 *pixels of the target image*, one SAM ViT-L decoder call, single-mask output.
* ``sat`` — our default (§2): DINOv2 ViT-B/14 at 518, cosine matching, radii 0.125 × the target's
  longer side for positives, negatives and the exclusion zone, no hard negatives, k-means thinning,
  ``multimask_output=True``.
* ``sat-v3`` — ``sat`` matching with DINOv3 ViT-B/16 at 512 (518 rounded to a multiple of 16), its
  positional component projected out (``feature_debias="auto"``; docs/dinov3.md).

Radii representation: ``radius_unit`` says how ``pos_radius``, ``neg_radius``, ``exclusion_radius``
and ``hard_radius`` are read. ``"pixel"``: absolute distances in pixels of the target image (what the
release did: 64 px whatever the image size); ``"side"``: fractions of the target's longer side
``max(H, W)`` (0.125 ⇒ 64 px on a 512² image). Distances are always measured between (x, y) points in
target pixel coordinates.

Usage::

    cfg = SegmenterConfig.from_preset("sat", dinov2="vitl14")
    cfg = cfg.override_from_strings(["metric=euclidean", "kmeans_k=0"])
    cfg = cfg.with_encoder("dinov3", "vitl16")   # DINOv3-L/16, S rounded to a multiple of 16
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from typing import Any, Optional

# The matching encoder's patch side in pixels: the one place grids, reference pooling, prompts, the exporters
# and (through refseg_params / the export manifest) the C++ core read it from (SegmenterConfig.patch_size).
# tests/test_config.py checks it against every model spec of each family.
ENCODER_PATCH_SIZE = {"dinov2": 14, "dinov3": 16}
DINOV2_MODELS = ("vits14", "vitb14", "vitl14", "vitg14",
                 "vits14_reg", "vitb14_reg", "vitl14_reg", "vitg14_reg")
DINOV3_MODELS = ("vits16", "vits16plus", "vitb16", "vitl16", "vitl16_sat493m", "vith16plus")
# "center" (feature_norm.center_positions) is not offered: it would make a target's mask depend on the
# images that share its batch (docs/dinov3.md).
FEATURE_DEBIAS = ("auto", "none", "project")
SAM_MODELS = ("vit_b", "vit_l", "vit_h", "medsam")
SAM2_MODELS = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l",
               "sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l", "medsam2")
"""SAM 2 / 2.1 (Hiera tiny, small, base_plus, large) and MedSAM2: the names of refseg.models.SAM2_SPECS."""
FEATURE_KEYS = ("x_norm_patchtokens", "x_prenorm")
_CHOICES = {
    "encoder": tuple(ENCODER_PATCH_SIZE),
    "dinov2": DINOV2_MODELS,
    "dinov3": DINOV3_MODELS,
    "feature_debias": FEATURE_DEBIAS,
    "sam": SAM_MODELS + SAM2_MODELS,
    "feature_key": FEATURE_KEYS,
    "metric": ("euclidean", "cosine"),
    "grid_rule": ("all", "any", "fraction"),
    "matcher": ("nn", "hungarian"),
    "radius_unit": ("pixel", "side"),
    "precision": ("fp32", "fp16", "bf16", "auto"),
    "method": ("match", "protosam", "topk", "matcher", "persam"),
    "proto_components": ("all", "largest", "confident"),
    "topk_confidence": ("prototype", "similarity"),
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class SegmenterConfig:
    """Every setting of the refseg pipeline (immutable; derive variants with :meth:`replace`).

    Encoders: ``encoder`` — the matching encoder, ``dinov2`` (model ``dinov2``, official hub name) or
    ``dinov3`` (model ``dinov3``: ``vits16`` ... ``vith16plus``); ``sam`` (``vit_b``/``vit_l``/``vit_h``/``medsam``,
    or a SAM 2 model of :data:`SAM2_MODELS`), ``sam_image_size`` (SAM 2 only: its square input side, a multiple
    of 32; None = the model's, 1024, MedSAM2 512),
    ``image_size`` S of the square matching-encoder input (a multiple of :attr:`patch_size`, 14 for DINOv2
    and 16 for DINOv3; grid S/patch per side), ``feature_key`` (which ``forward_features`` entry is matched).
    ``feature_debias`` removes the positional component of the tokens before they are matched
    (:mod:`refseg.pipeline.feature_norm`): ``project`` (INSID3's projection, rank ``debias_rank``), ``none``,
    or ``auto`` = ``project`` for DINOv3, ``none`` for DINOv2 (docs/dinov3.md).
    Grid: ``grid_rule`` — ``all`` (cell FG only if all patch × patch pixels are FG, BG only if all are BG,
    mixed cells ignored), ``any`` (FG if any pixel is FG, else BG), ``fraction`` (FG if the FG share
    ≥ ``grid_fraction``, BG if the BG share ≥ ``grid_fraction``, else ignored);
    ``gbmseg_skip_last`` ignores the last grid row and column like the release's scan.
    Matching: ``metric``; ``matcher`` ``nn`` (nearest neighbour) or ``hungarian`` (one-to-one
    assignment); ``cycle_check`` (back-match must land in the same class); ``hard_negatives``;
    ``gbmseg_offimage_quirk`` reproduces the release's off-image point (553, −7) in S space.
    Physical space: radii (see module docstring for ``radius_unit``; 0 = de-duplicate only);
    ``kmeans_k`` (0 = off) thins every class holding more than K points to K points;
    ``max_points`` (0 = no cap) caps points per prompt set (positives + negatives);
    ``fallback`` supplies one point when a class ends up empty.
    Decoding: ``use_box`` (box from the positive extent), ``multimask_output`` (then argmax
    predicted IoU), ``drop_absent`` (SAM 2 only: a prompt set whose object-score logit is <= 0 gives no
    mask, instead of the mask ``SAM2ImagePredictor`` would still return; SAM (ViT) has no object score),
    ``keep_largest_contour``, ``min_component_fraction`` (drop components smaller
    than this share of the largest; 0 = off), ``fill_holes``.
    Runtime: ``batch_size`` targets per encoder call, ``precision`` of the encoders (``auto``:
    bf16 on CUDA GPUs with bf16, fp16 on older ones, fp32 on CPUs; see
    :func:`refseg.runtime.torch_backend.resolve_precision`), ``device``
    (None = the Segmenter's ``device`` argument, ``auto`` by default; e.g. ``--set device=cpu``).
    Method (``method``; ``match`` is the matching pipeline above, the others are stage modules of
    :mod:`refseg.pipeline.methods`, docs/algorithm.md §3–§5):
    ``protosam`` — ``proto_threshold`` (pooled-mask share making a 2×2 cell a local prototype),
    ``proto_scale`` (cosine multiplier), ``proto_components`` (``all`` components, the ``largest``,
    or the most ``confident`` one);
    ``topk`` — ``topk_k`` positives / ``topk_neg_k`` negatives per class, ``topk_nms_kernel``
    (max-pool window in grid cells, odd), ``topk_confidence`` (``prototype`` probability or NN
    ``similarity``), ``topk_flip`` (horizontal-flip test-time augmentation),
    ``topk_uncertainty_weight`` (score = mean probability − weight × std over references/views);
    ``matcher`` — ``matcher_centres`` (k-means++ K), ``matcher_sample_range`` (subset sizes,
    inclusive), ``matcher_max_subsets`` (cap on decoded subsets), ``matcher_keep_half_above``,
    ``matcher_alpha`` / ``matcher_beta`` / ``matcher_exp`` (score = α·EMD score + β·purity·coverage^exp),
    ``matcher_purity_filter`` / ``matcher_coverage_filter`` / ``matcher_emd_filter`` (0 = off),
    ``matcher_merge`` (masks united), ``matcher_score_threshold`` (share of the best score);
    ``persam`` — ``persam_refinements`` (0, 1 = mask prompt, 2 = mask prompt then box).
    """

    name: str = "sat"
    # encoders
    encoder: str = "dinov2"
    dinov2: str = "vitb14"
    dinov3: str = "vitb16"
    sam: str = "vit_b"
    sam_image_size: Optional[int] = None
    image_size: int = 518
    feature_key: str = "x_norm_patchtokens"
    feature_debias: str = "auto"
    debias_rank: int = 20
    # mask -> patch grid
    grid_rule: str = "all"
    grid_fraction: float = 0.95
    gbmseg_skip_last: bool = False
    # feature-space matching
    metric: str = "cosine"
    matcher: str = "nn"
    cycle_check: bool = True
    hard_negatives: bool = False
    gbmseg_offimage_quirk: bool = False
    # physical-space prompt engineering
    radius_unit: str = "side"
    pos_radius: float = 0.125
    neg_radius: float = 0.125
    exclusion_radius: float = 0.125
    hard_radius: float = 0.125
    kmeans_k: int = 16
    kmeans_iters: int = 100
    kmeans_seed: int = 0
    max_points: int = 0
    fallback: bool = True
    # SAM decoding and post-processing
    use_box: bool = False
    multimask_output: bool = True
    drop_absent: bool = True
    keep_largest_contour: bool = False
    min_component_fraction: float = 0.3
    fill_holes: bool = False
    # runtime
    batch_size: int = 16
    precision: str = "auto"
    device: Optional[str] = None
    # method family (docs/algorithm.md §3–§5)
    method: str = "match"
    proto_threshold: float = 0.95
    proto_scale: float = 20.0
    proto_components: str = "all"
    topk_k: int = 20
    topk_neg_k: int = 20
    topk_nms_kernel: int = 3
    topk_confidence: str = "prototype"
    topk_flip: bool = True
    topk_uncertainty_weight: float = 1.0
    matcher_centres: int = 8
    matcher_sample_range: tuple[int, int] = (4, 6)
    matcher_max_subsets: int = 128
    matcher_keep_half_above: int = 40
    matcher_alpha: float = 1.0
    matcher_beta: float = 1.0
    matcher_exp: float = 1.0
    matcher_purity_filter: float = 0.0
    matcher_coverage_filter: float = 0.0
    matcher_emd_filter: float = 0.0
    matcher_merge: int = 10
    matcher_score_threshold: float = 0.7
    persam_refinements: int = 2

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"SegmenterConfig.{key}={value!r} is not one of {', '.join(allowed)}")
        patch = self.patch_size
        if self.image_size <= 0 or self.image_size % patch:
            near = max(patch, round(self.image_size / patch) * patch)
            raise ValueError(f"SegmenterConfig.image_size={self.image_size} must be a positive multiple of the "
                             f"{self.encoder.replace('dino', 'DINO')} patch size {patch} (e.g. {near}; with_encoder() "
                             "rounds it)")
        if self.debias_rank < 1:
            raise ValueError(f"SegmenterConfig.debias_rank={self.debias_rank} must be >= 1")
        if not 0.5 <= self.grid_fraction <= 1.0:
            raise ValueError(f"SegmenterConfig.grid_fraction={self.grid_fraction} must lie in "
                             "[0.5, 1] (FG needs at least half of a cell's pixels)")
        for key in ("pos_radius", "neg_radius", "exclusion_radius", "hard_radius",
                    "min_component_fraction"):
            if getattr(self, key) < 0:
                raise ValueError(f"SegmenterConfig.{key}={getattr(self, key)} must be >= 0")
        if self.radius_unit == "side":
            for key in ("pos_radius", "neg_radius", "exclusion_radius", "hard_radius"):
                if getattr(self, key) > 2.0:
                    raise ValueError(f"SegmenterConfig.{key}={getattr(self, key)} is read as a fraction "
                                     "of the image side (radius_unit='side'); use radius_unit='pixel' "
                                     "for pixel radii")
        if self.min_component_fraction > 1:
            raise ValueError(f"SegmenterConfig.min_component_fraction={self.min_component_fraction} "
                             "must lie in [0, 1]")
        for key in ("kmeans_k", "max_points"):
            if getattr(self, key) < 0:
                raise ValueError(f"SegmenterConfig.{key}={getattr(self, key)} must be >= 0 (0 = off)")
        if self.kmeans_iters < 1:
            raise ValueError(f"SegmenterConfig.kmeans_iters={self.kmeans_iters} must be >= 1")
        if self.sam_image_size is not None and (self.sam_image_size <= 0 or self.sam_image_size % 32):
            raise ValueError(f"SegmenterConfig.sam_image_size={self.sam_image_size} must be a positive multiple "
                             "of 32 (SAM 2's input side) or None")
        if self.batch_size < 1:
            raise ValueError(f"SegmenterConfig.batch_size={self.batch_size} must be >= 1")
        if self.max_points == 1:
            raise ValueError("SegmenterConfig.max_points=1 leaves no room for a negative; use 0 (no cap) "
                             "or >= 2")
        self._check_method_fields()

    def _check_method_fields(self) -> None:
        """Validate the knobs of the method family (see the class docstring)."""
        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"SegmenterConfig.{key}={getattr(self, key)!r} {rule}")

        if not 0.0 < self.proto_threshold <= 1.0:
            raise bad("proto_threshold", "must lie in (0, 1]")
        if self.proto_scale <= 0:
            raise bad("proto_scale", "must be > 0")
        for key in ("topk_k", "matcher_centres", "matcher_max_subsets", "matcher_merge"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("topk_neg_k", "matcher_keep_half_above", "topk_uncertainty_weight", "matcher_alpha",
                    "matcher_beta", "matcher_exp", "matcher_purity_filter", "matcher_coverage_filter",
                    "matcher_emd_filter"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if self.topk_nms_kernel < 1 or self.topk_nms_kernel % 2 == 0:
            raise bad("topk_nms_kernel", "must be an odd number of grid cells >= 1")
        lo, hi = self.matcher_sample_range
        if not 1 <= lo <= hi <= self.matcher_centres:
            raise bad("matcher_sample_range", f"must satisfy 1 <= low <= high <= matcher_centres="
                      f"{self.matcher_centres}")
        if not 0.0 <= self.matcher_score_threshold <= 1.0:
            raise bad("matcher_score_threshold", "must lie in [0, 1]")
        if self.persam_refinements not in (0, 1, 2):
            raise bad("persam_refinements", "must be 0, 1 (mask prompt) or 2 (mask prompt, then box)")

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "sat", **overrides: Any) -> "SegmenterConfig":
        """The named preset (``PRESETS``) with ``overrides`` applied; unknown names raise ValueError."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def with_encoder(self, encoder: str, model: str | None = None) -> "SegmenterConfig":
        """A copy matching with ``encoder`` (``dinov2`` / ``dinov3``; ``model`` its model name, else the
        config's), ``image_size`` rounded to the nearest multiple of that encoder's patch size (518 -> 512
        for DINOv3, 512 -> 518 back), every other field kept."""
        if encoder not in ENCODER_PATCH_SIZE:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODER_PATCH_SIZE)}")
        patch = ENCODER_PATCH_SIZE[encoder]
        changes: dict[str, Any] = {"encoder": encoder,
                                   "image_size": max(patch, round(self.image_size / patch) * patch)}
        if model is not None:
            changes[encoder] = model
        return self.replace(**changes)

    def replace(self, **changes: Any) -> "SegmenterConfig":
        """A copy with ``changes`` applied (validated again); unknown keys raise ValueError."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown SegmenterConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def override_from_strings(self, items: typing.Iterable[str]) -> "SegmenterConfig":
        """Apply ``["key=value", ...]`` overrides (e.g. from a CLI), parsing each value by field type.

        bool accepts 1/0, true/false, yes/no, on/off; Optional fields accept ``none``/``null``;
        tuples accept ``a,b`` or ``(a, b)``. Raises ValueError naming the key on an unknown key or a
        value that does not parse / validate.
        """
        hints = typing.get_type_hints(type(self))
        changes: dict[str, Any] = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(f"config override {item!r} is not of the form key=value")
            if key not in hints:
                raise ValueError(f"config override {item!r}: unknown key {key!r}")
            try:
                changes[key] = _parse_value(text.strip(), hints[key])
            except ValueError as exc:
                raise ValueError(f"config override {key!r}: {exc}") from None
        return self.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain ``{field: value}`` dict (JSON-serialisable; tuples stay tuples)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- derived quantities -------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        """Patch side in pixels of the matching encoder (14 DINOv2, 16 DINOv3): grids, reference pooling,
        cell centres and the exports all read it here."""
        return ENCODER_PATCH_SIZE[self.encoder]

    @property
    def grid_size(self) -> int:
        """Patches per side of the encoder's grid, S / :attr:`patch_size`."""
        return self.image_size // self.patch_size

    @property
    def encoder_model(self) -> str:
        """Model name of the matching encoder (``dinov2`` or ``dinov3`` field, as ``encoder`` selects)."""
        return self.dinov3 if self.encoder == "dinov3" else self.dinov2

    @property
    def debias(self) -> str:
        """``feature_debias`` resolved: ``auto`` is ``project`` for DINOv3 and ``none`` for DINOv2."""
        if self.feature_debias == "auto":
            return "project" if self.encoder == "dinov3" else "none"
        return self.feature_debias

    def radius_px(self, key: str, image_size: tuple[int, int]) -> float:
        """Radius field ``key`` (e.g. ``"neg_radius"``) in pixels of an (H, W) target image."""
        value = float(getattr(self, key))
        return value if self.radius_unit == "pixel" else value * max(image_size)


def _parse_value(text: str, tp: Any) -> Any:
    """Parse ``text`` into type ``tp`` (bool, int, float, str, Optional[...], tuple[...], Literal)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _parse_value(text, a)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for a in args:
            try:
                if _parse_value(text, type(a)) == a:
                    return a
            except ValueError:
                pass
        raise ValueError(f"{text!r} is not one of {args}")
    if origin is tuple:
        parts = [p.strip() for p in text.strip("()[] ").split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_value(p, args[0]) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"{text!r} needs {len(args)} comma-separated values")
        return tuple(_parse_value(p, a) for p, a in zip(parts, args))
    if tp is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if tp is str:
        return text
    raise ValueError(f"fields of type {tp} cannot be set from a string")


PRESETS: dict[str, SegmenterConfig] = {
    "sat": SegmenterConfig(),
    # sat's matching on DINOv3 ViT-B/16 at 512 (518 rounded to a multiple of 16), positional part projected out
    "sat-v3": SegmenterConfig(name="sat-v3").with_encoder("dinov3", "vitb16"),
    "gbmseg": SegmenterConfig(
        name="gbmseg", dinov2="vitg14", sam="vit_l", image_size=560,
        grid_rule="all", gbmseg_skip_last=True,
        metric="euclidean", matcher="nn", cycle_check=True, hard_negatives=True,
        gbmseg_offimage_quirk=False,
        radius_unit="pixel", pos_radius=0.0, neg_radius=64.0, exclusion_radius=128.0, hard_radius=64.0,
        kmeans_k=0, max_points=0, fallback=False,
        use_box=False, multimask_output=False, keep_largest_contour=False, min_component_fraction=0.0,
        fill_holes=False, batch_size=1,
        # with a SAM 2 model: the decoder's mask for every prompt set, as the image predictor gives it
        # (the release had no object score; fallback=False already forces no prompt)
        drop_absent=False),
    # §3 ProtoSAM: prototypes on DINOv2-L @672 -> coarse mask -> per-component points + box.
    "protosam": SegmenterConfig(
        name="protosam", method="protosam", dinov2="vitl14", sam="vit_h", image_size=672,
        grid_rule="fraction", grid_fraction=0.5, use_box=True, multimask_output=True,
        min_component_fraction=0.0, batch_size=4),
    # §4 uncertainty-aware Top-K points (AutoPromptSeg's prompt generator) on the sat models.
    "topk": SegmenterConfig(
        name="topk", method="topk", grid_rule="fraction", grid_fraction=0.5, multimask_output=True,
        min_component_fraction=0.0),
    # §5 Matcher: x_prenorm cosine, Hungarian forward/reverse, k-means++ centres, subsets, merge.
    "matcher": SegmenterConfig(
        name="matcher", method="matcher", dinov2="vitl14", sam="vit_h", image_size=518,
        feature_key="x_prenorm", grid_rule="fraction", grid_fraction=0.5, multimask_output=True,
        min_component_fraction=0.0, batch_size=4),
    # §5 PerSAM: SAM-feature prototype, argmax/argmin points, cascaded refinement. DINOv2 is
    # loaded by the backend but unused, hence the smallest model.
    "persam": SegmenterConfig(
        name="persam", method="persam", dinov2="vits14", sam="vit_h", image_size=224,
        grid_rule="fraction", grid_fraction=0.5, multimask_output=False, min_component_fraction=0.0,
        batch_size=4),
}
