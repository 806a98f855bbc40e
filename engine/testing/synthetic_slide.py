"""A synthetic pyramidal slide for tests and benchmarks, written tile by tile (any size, little memory).

Content, in level-0 pixels: white glass (with +-3 grey-level noise) and a rectangle of pink "tissue"
covering ``tissue`` (x0, y0, x1, y1, fractions of the slide) holding purple discs ("glomeruli") of
radius ``radius`` on a square lattice of period ``period``. Lower levels render the same scene at
2x, 4x ... coarser sampling. Layouts: ``"ome"`` (OME-TIFF, levels as SubIFDs: tifffile) or ``"pages"``
(generic tiled TIFF, levels as pages: tifffile and OpenSlide). Deflate-compressed tiles.

    python -m refseg.testing.synthetic_slide slide.tif --size 4096 --mpp 0.5
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from refseg.optional import require

GLASS = (247, 247, 247)
TISSUE = (236, 170, 200)
STRUCTURE = (120, 50, 140)


_NOISE = (np.random.default_rng(0).integers(-3, 4, size=(64, 64, 1))).astype(np.int16)


def render(x0: int, y0: int, w: int, h: int, downsample: int, width: int, height: int,
           tissue: tuple[float, float, float, float], period: int, radius: int) -> np.ndarray:
    """(h, w, 3) uint8 of the scene at level ``downsample`` (power of two), region (x0, y0) of that level.

    Pixel (i, j) samples level-0 point ((x0 + j + 0.5) * downsample, (y0 + i + 0.5) * downsample); the
    +-3 grey-level noise is a function of the pixel (period 64), not of the tile it is rendered in.
    """
    xs = (np.arange(x0, x0 + w) + 0.5) * downsample
    ys = (np.arange(y0, y0 + h) + 0.5) * downsample
    tx0, ty0, tx1, ty1 = tissue
    inside = (((ys >= ty0 * height) & (ys < ty1 * height))[:, None]
              & ((xs >= tx0 * width) & (xs < tx1 * width))[None, :])
    dx2 = (np.mod(xs, period) - period / 2) ** 2
    dy2 = (np.mod(ys, period) - period / 2) ** 2
    disc = inside & (dy2[:, None] + dx2[None, :] < radius * radius)
    out = np.empty((h, w, 3), np.int16)
    out[:] = GLASS
    out[inside] = TISSUE
    out[disc] = STRUCTURE
    out += _NOISE[np.arange(y0, y0 + h) % 64][:, np.arange(x0, x0 + w) % 64]
    return np.clip(out, 0, 255).astype(np.uint8)


def structure_mask(x0: int, y0: int, w: int, h: int, width: int, height: int,
                   tissue: tuple[float, float, float, float], period: int, radius: int) -> np.ndarray:
    """(h, w) uint8 ground truth (1 = disc) of the level-0 region at (x0, y0)."""
    rgb = render(x0, y0, w, h, 1, width, height, tissue, period, radius)
    return (np.abs(rgb.astype(np.int16) - np.asarray(STRUCTURE, np.int16)).max(axis=2) < 10).astype(np.uint8)


def write_slide(path: str | Path, width: int = 2048, height: int | None = None, tile: int = 256,
                mpp: float = 0.5, tissue: tuple[float, float, float, float] = (0.3, 0.3, 0.7, 0.7),
                period: int = 96, radius: int = 24, layout: str = "ome", levels: int | None = None) -> Path:
    """Write the synthetic slide; returns ``path``. ``levels`` default: halve until under one tile."""
    tifffile = require("tifffile", extra="slides", purpose="Writing a synthetic slide")
    height = width if height is None else height
    if levels is None:
        levels = 1
        while max(width, height) / 2 ** levels > tile:
            levels += 1
    path = Path(path)

    def tiles(k: int) -> Iterator[np.ndarray]:
        ds = 2 ** k
        lw, lh = math.ceil(width / ds), math.ceil(height / ds)
        for y in range(0, lh, tile):
            for x in range(0, lw, tile):
                yield render(x, y, tile, tile, ds, width, height, tissue, period, radius)

    options = dict(dtype=np.uint8, tile=(tile, tile), compression="zlib", compressionargs={"level": 1},
                   photometric="rgb")
    res = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True, ome=(layout == "ome")) as tw:
        for k in range(levels):
            ds = 2 ** k
            shape = (math.ceil(height / ds), math.ceil(width / ds), 3)
            extra = {}
            if layout == "ome":
                extra = ({"subifds": levels - 1, "metadata": {"axes": "YXS", "PhysicalSizeX": mpp,
                                                              "PhysicalSizeY": mpp}} if k == 0
                         else {"subfiletype": 1, "metadata": None})
            elif layout == "pages":
                extra = {"subfiletype": 0 if k == 0 else 1, "metadata": None}
            else:
                raise ValueError(f"layout: expected 'ome' or 'pages', got {layout!r}")
            tw.write(tiles(k), shape=shape, resolution=(res / ds, res / ds), resolutionunit="CENTIMETER",
                     **options, **extra)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic pyramidal slide (tests, benchmarks).")
    parser.add_argument("path")
    parser.add_argument("--size", type=int, default=4096, help="level-0 side in pixels")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--layout", choices=["ome", "pages"], default="ome")
    args = parser.parse_args(argv)
    write_slide(args.path, args.size, mpp=args.mpp, layout=args.layout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
