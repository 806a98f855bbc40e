"""Models: DINOv2 (ViT-S/B/L/g, with or without registers) and SAM (ViT-B/L/H, MedSAM).

State-dict keys are the official ones, so official checkpoint files load as they are.
"""
from .build import build_dinov2, build_sam
from .checkpoints import CheckpointError
from .dinov2 import DINOV2_SPECS, DinoVisionTransformer
from .sam import SAM_SPECS, Sam

__all__ = ["build_dinov2", "build_sam", "CheckpointError", "DINOV2_SPECS", "DinoVisionTransformer",
           "SAM_SPECS", "Sam"]
