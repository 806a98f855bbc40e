"""The tile grid of a slide and tissue detection on its thumbnail.

Grid: tiles of ``tile`` x ``tile`` view pixels overlapping by ``overlap``. Each tile owns its *core*,
the central ``core = tile - overlap`` square; cores tile the view without gaps or overlap, core (row,
col) starting at (col * core, row * core). A tile is read around its core with ``overlap / 2`` pixels
of context on every side (white outside the slide). Merge rule for overlaps: **the core wins** — every
output pixel comes from the one tile whose core holds it, so the border of each prediction (where SAM
sees the least context) is dropped, and the stitched mask does not depend on the order tiles finish.
The core side is a multiple of 16, so the output TIFF's tiles are exactly the cores.

Tissue rule: on an RGB thumbnail, saturation S = (max - min) / max of R, G, B (0 for black) is
thresholded by Otsu's method, floored at :data:`MIN_SATURATION` so that a blank slide (noise only) gives
no tissue; tissue = S > threshold. A tile is segmented when the tissue share of its core's footprint on
the thumbnail is at least ``min_tissue``; other tiles are background and written as 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_SATURATION = 0.08
"""Lowest accepted tissue threshold on saturation (0..1): glass, dust and JPEG noise stay below it."""
TIFF_TILE_MULTIPLE = 16


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a (width, height) view; see the module docstring for cores and the merge rule."""

    width: int
    height: int
    tile: int
    overlap: int

    def __post_init__(self):
        core = self.tile - self.overlap
        if self.overlap < 0 or self.overlap % 2 or core <= 0 or core % TIFF_TILE_MULTIPLE:
            good = default_overlap(self.tile)
            raise ValueError(f"tiling: tile {self.tile} with overlap {self.overlap} is not usable; the overlap "
                             f"must be even and tile - overlap a positive multiple of {TIFF_TILE_MULTIPLE} "
                             f"(e.g. overlap {good} for tile {self.tile})")

    @property
    def core(self) -> int:
        """Side of the part of each tile that goes into the output (view pixels)."""
        return self.tile - self.overlap

    @property
    def margin(self) -> int:
        """Context pixels on each side of a core."""
        return self.overlap // 2

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.core)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.core)

    def __len__(self) -> int:
        return self.rows * self.cols

    def read_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) view pixels read for tile (row, col); may reach outside the view."""
        return col * self.core - self.margin, row * self.core - self.margin, self.tile, self.tile

    def core_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x, y, w, h) view pixels owned by tile (row, col), clipped to the view."""
        x, y = col * self.core, row * self.core
        return x, y, min(self.core, self.width - x), min(self.core, self.height - y)


def default_overlap(tile: int) -> int:
    """The overlap giving a core of about 7/8 of the tile, rounded down to a multiple of 16."""
    core = max(TIFF_TILE_MULTIPLE, (int(tile * 0.875) // TIFF_TILE_MULTIPLE) * TIFF_TILE_MULTIPLE)
    return tile - core


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (maximises the between-class variance of a histogram)."""
    hist, edges = np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 1.0
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight0 = np.cumsum(hist)
    weight1 = total - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1e-12)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1e-12)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a plateau over empty bins: its middle
    return float(edges[int(round(best.mean())) + 1])


def tissue_mask(thumbnail: np.ndarray) -> tuple[np.ndarray, float]:
    """Tissue pixels of an (H, W, 3) uint8 thumbnail and the saturation threshold used (0..1)."""
    rgb = np.asarray(thumbnail, np.uint8)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = (high - low).astype(np.float32)  # high == 0 implies high - low == 0: black is unsaturated
    saturation /= np.maximum(high, 1).astype(np.float32)
    threshold = max(otsu_threshold(saturation), MIN_SATURATION)
    return saturation > threshold, threshold


def tissue_tiles(grid: TileGrid, tissue: np.ndarray, scale: float, min_tissue: float) -> np.ndarray:
    """(rows, cols) bool: tiles whose core footprint on the thumbnail holds >= ``min_tissue`` tissue.

    ``scale`` is thumbnail pixels per view pixel. Every footprint covers at least one thumbnail pixel.
    """
    th, tw = tissue.shape
    keep = np.zeros((grid.rows, grid.cols), bool)
    for row in range(grid.rows):
        for col in range(grid.cols):
            x, y, w, h = grid.core_box(row, col)
            x0, y0 = min(tw - 1, int(x * scale)), min(th - 1, int(y * scale))
            x1, y1 = max(x0 + 1, math.ceil((x + w) * scale)), max(y0 + 1, math.ceil((y + h) * scale))
            share = float(tissue[y0:y1, x0:x1].mean())
            keep[row, col] = share > 0 and share >= min_tissue
    return keep
