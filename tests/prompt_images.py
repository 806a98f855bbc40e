"""A synthetic RGB test image for the predictor tests (tests/test_predictor.py, tests/test_sam2_parity.py)."""
from __future__ import annotations

import numpy as np


def make_image(height: int, width: int, seed: int) -> np.ndarray:
    """(height, width, 3) uint8: smooth gradients, a bright disc and noise, so the encoders see structure;
    odd, non-square sizes exercise the resize and the frames of the prompts."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    disc = ((y - height * 0.45) ** 2 + (x - width * 0.55) ** 2) < (min(height, width) * 0.25) ** 2
    base = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * disc], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
