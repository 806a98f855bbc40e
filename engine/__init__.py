"""refseg: one-shot, reference-guided, training-free medical image segmentation.

Label one reference image; refseg segments the same structure in any number of targets by matching
DINOv2 patch features and turning the matches into SAM prompts::

    import refseg
    seg = refseg.Segmenter.from_preset("sat", sam_checkpoint="sam_vit_b_01ec64.pth",
                                       dinov2_checkpoint="dinov2_vitb14_pretrain.pth")
    seg.set_reference(ref_image, ref_mask)
    result = seg.segment(target_image)      # result.mask: (H, W) uint8 label map

Public names are imported lazily so that ``import refseg`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Segmenter": "refseg.segmenter",
    "SegmentationResult": "refseg.segmenter",
    "SegmenterConfig": "refseg.config",
    "Predictor": "refseg.predictor",
    "VideoPredictor": "refseg.video_predictor",
    "PRESETS": "refseg.config",
    "engineer_points": "refseg.pipeline.prompts",
    "read_mask": "refseg.io.raster",
    "build_dinov2": "refseg.models",
    "build_sam": "refseg.models",
    "CheckpointError": "refseg.models.checkpoints",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refseg' has no attribute {name!r}")
