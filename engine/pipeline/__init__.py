"""Pipeline stages: features -> grid -> matching -> prompts -> decode / post-process.

Prompt stages exported here: :func:`mask_to_grid` / :func:`grids_from_config` (reference mask ->
patch labels), :func:`match_candidates` (feature-space candidates), :func:`engineer_points` /
:func:`engineer_prompt_batch` / :func:`prompts_from_candidates` (physical-space prompts).
"""
from .grid import (binary_to_grid, cell_centres, cells_to_pixels, grids_from_config, label_mask_to_grids,
                   mask_to_grid)
from .matching import Candidates, candidates_to_points, match_candidates
from .prompts import (PromptBatch, engineer_padded, engineer_points, engineer_prompt_batch,
                      prompts_from_candidates)

__all__ = [
    "binary_to_grid", "cell_centres", "cells_to_pixels", "grids_from_config", "label_mask_to_grids",
    "mask_to_grid", "Candidates", "candidates_to_points", "match_candidates", "PromptBatch",
    "engineer_padded", "engineer_points", "engineer_prompt_batch", "prompts_from_candidates",
]
