"""A label mask as a tiled pyramidal OME-TIFF, written tile by tile.

Layout: one OME-TIFF image (axes YX, uint8 labels, 0 = background), deflate-compressed square tiles,
full resolution in the first IFD and each coarser level (1/2, 1/4, ... until it fits one tile) as a
SubIFD — the layout QuPath, Bio-Formats and tifffile read as a pyramid. A coarser level takes the
top-left pixel of every 2 x 2 block (nearest neighbour: labels are never blended into other labels).

Memory: only a few tiles are in memory at once. Level 0 comes from a ``tile_source(row, col)``
callback; each coarser level is built from the four child tiles of the level below, which are kept on
disk in ``work_dir`` (all-zero tiles are not stored). The file is written atomically.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from refseg.io.writers import atomic_writer
from refseg.optional import require

log = logging.getLogger(__name__)

TileSource = Callable[[int, int], "np.ndarray | None"]
"""(row, col) -> (tile, tile) uint8 labels, or ``None`` for an all-background tile."""


def _level_sizes(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while max(sizes[-1]) > tile:
        w, h = sizes[-1]
        sizes.append((math.ceil(w / 2), math.ceil(h / 2)))
    return sizes


def _down2(tiles: list[list[np.ndarray | None]], tile: int) -> np.ndarray | None:
    """Nearest 2x downsample of a 2 x 2 block of tiles (``None`` = zeros) into one tile."""
    if all(t is None for row in tiles for t in row):
        return None
    out = np.zeros((tile, tile), np.uint8)
    half = tile // 2
    for i in range(2):
        for j in range(2):
            child = tiles[i][j]
            if child is not None:
                out[i * half:(i + 1) * half, j * half:(j + 1) * half] = child[::2, ::2]
    return out if out.any() else None


def write_label_pyramid(path: str | os.PathLike, tile_source: TileSource, width: int, height: int,
                        tile: int, work_dir: str | os.PathLike, pixel_size_um: float | None = None
                        ) -> list[tuple[int, int]]:
    """Write the (height, width) uint8 label mask given by ``tile_source`` as a pyramidal OME-TIFF.

    Args:
        path: output file (``.ome.tif``); replaced atomically.
        tile_source: level-0 tiles in pixels [row * tile, (row + 1) * tile) x [col * tile, ...).
        width, height: level-0 size in pixels; pixels beyond it in edge tiles are written as 0.
        tile: TIFF tile side (multiple of 16).
        work_dir: scratch folder for the coarser levels' tiles (created, then removed).
        pixel_size_um: microns per level-0 pixel, stored as OME PhysicalSizeX/Y when known.

    Returns:
        (W, H) of every level written, finest first.
    """
    tifffile = require("tifffile", extra="slides", purpose="Writing the pyramidal mask")
    if tile % 16:
        raise ValueError(f"tile: TIFF tiles must be a multiple of 16 px, got {tile}")
    sizes = _level_sizes(width, height, tile)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)

    def store(level: int, row: int, col: int) -> Path:
        return work / f"L{level}_{row}_{col}.npy"

    def child(level: int, row: int, col: int) -> np.ndarray | None:
        w, h = sizes[level]
        if row * tile >= h or col * tile >= w:
            return None
        if level == 0:
            data = tile_source(row, col)
            if data is None:
                return None
            data = np.array(data, np.uint8, copy=True)
            if data.shape != (tile, tile):
                raise ValueError(f"tile_source({row}, {col}): expected ({tile}, {tile}), got {data.shape}")
            data[max(0, h - row * tile):, :] = 0
            data[:, max(0, w - col * tile):] = 0
            return data
        file = store(level, row, col)
        return np.load(file) if file.exists() else None

    def level_tiles(level: int) -> Iterator[np.ndarray]:
        w, h = sizes[level]
        zeros = np.zeros((tile, tile), np.uint8)
        for row in range(math.ceil(h / tile)):
            for col in range(math.ceil(w / tile)):
                if level == 0:
                    data = child(0, row, col)
                else:
                    data = _down2([[child(level - 1, 2 * row + i, 2 * col + j) for j in range(2)]
                                   for i in range(2)], tile)
                    if data is not None:
                        np.save(store(level, row, col), data)
                yield zeros if data is None else data
        if level >= 2:  # the level below is no longer needed
            for file in work.glob(f"L{level - 1}_*.npy"):
                file.unlink()

    metadata = {"axes": "YX", "Name": "refseg labels"}
    resolution = None
    if pixel_size_um:
        metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeY=pixel_size_um,
                        PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
        resolution = (1e4 / pixel_size_um, 1e4 / pixel_size_um)
    options = dict(dtype=np.uint8, tile=(tile, tile), compression="zlib", photometric="minisblack")
    try:
        with atomic_writer(path, "wb") as handle, tifffile.TiffWriter(
                tifffile.FileHandle(handle, mode="wb", name=Path(path).name), bigtiff=True, ome=True) as tw:
            w, h = sizes[0]
            tw.write(level_tiles(0), shape=(h, w), subifds=len(sizes) - 1, metadata=metadata,
                     resolution=resolution, resolutionunit="CENTIMETER" if resolution else None, **options)
            for level in range(1, len(sizes)):
                w, h = sizes[level]
                factor = 2 ** level
                tw.write(level_tiles(level), shape=(h, w), subfiletype=1, metadata=None,
                         resolution=None if resolution is None else (resolution[0] / factor,
                                                                     resolution[1] / factor),
                         resolutionunit="CENTIMETER" if resolution else None, **options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sizes


def read_label_level(path: str | os.PathLike, max_pixels: int) -> tuple[np.ndarray, int]:
    """The finest pyramid level of a mask written by :func:`write_label_pyramid` with at most
    ``max_pixels`` pixels (else the coarsest), as (H, W) uint8, and its factor to level 0 (1, 2, 4 ...)."""
    tifffile = require("tifffile", extra="slides", purpose="Reading the pyramidal mask")
    with tifffile.TiffFile(path) as tf:
        levels = tf.series[0].levels
        choice = len(levels) - 1
        for k, level in enumerate(levels):
            if level.shape[0] * level.shape[1] <= max_pixels:
                choice = k
                break
        return levels[choice].asarray(), 2 ** choice
