"""Models: DINOv2 (ViT-S/B/L/g, with or without registers), DINOv3 (ViT-S/S+/B/L/H+ 16) and SAM
(ViT-B/L/H, MedSAM).

State-dict keys are the official ones, so official checkpoint files load as they are.
"""
from .build import build_dinov2, build_dinov3, build_sam
from .checkpoints import CheckpointError
from .dinov2 import DINOV2_SPECS, DinoVisionTransformer
from .dinov3 import DINOV3_SPECS, Dinov3VisionTransformer
from .sam import SAM_SPECS, Sam

__all__ = ["build_dinov2", "build_dinov3", "build_sam", "CheckpointError", "DINOV2_SPECS", "DINOV3_SPECS",
           "DinoVisionTransformer", "Dinov3VisionTransformer", "SAM_SPECS", "Sam"]
