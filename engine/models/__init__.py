"""Models: DINOv2 (ViT-S/B/L/g, with or without registers), DINOv3 (ViT-S/S+/B/L/H+ 16), SAM (ViT-B/L/H,
MedSAM) and SAM 2 for images (SAM 2 / 2.1 Hiera tiny, small, base_plus, large; MedSAM2).

State-dict keys are the official ones, so official checkpoint files load as they are.
"""
from .build import build_dinov2, build_dinov3, build_sam, build_sam2, build_sam_family
from .checkpoints import CheckpointError
from .dinov2 import DINOV2_SPECS, DinoVisionTransformer
from .dinov3 import DINOV3_SPECS, Dinov3VisionTransformer
from .sam import SAM_SPECS, Sam
from .sam2 import SAM2_SPECS, Sam2

__all__ = ["build_dinov2", "build_dinov3", "build_sam", "build_sam2", "build_sam_family", "CheckpointError", "DINOV2_SPECS",
           "DINOV3_SPECS", "DinoVisionTransformer", "Dinov3VisionTransformer", "SAM_SPECS", "Sam", "SAM2_SPECS",
           "Sam2"]
