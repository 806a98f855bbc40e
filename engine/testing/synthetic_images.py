"""Smoke-run data: a labelled reference and a few targets, 2-D crops of the synthetic slide's scene (pink
tissue holding purple discs, :mod:`refseg.testing.synthetic_slide`), so that ``refseg segment`` can be tried
offline with random checkpoints (the masks then mean nothing)::

    python -m refseg.testing.synthetic_images smoke/ [--count 4] [--size 256]

writes ``smoke/ref.png``, ``smoke/ref_mask.png`` (0/255: the discs) and ``smoke/images/target_NN.png``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image

from refseg.testing.synthetic_slide import render, structure_mask

log = logging.getLogger(__name__)

SCENE = 4096            # side of the scene the crops are cut from (level-0 px)
TISSUE = (0.0, 0.0, 1.0, 1.0)
PERIOD, RADIUS = 96, 24


def write_images(folder: str | Path, count: int = 4, size: int = 256) -> tuple[Path, Path, Path]:
    """Write the reference pair and ``count`` targets of ``size`` x ``size`` px (each crop at another offset,
    so the discs sit elsewhere). Returns (reference, reference mask, folder of targets)."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    scene = (SCENE, SCENE, TISSUE, PERIOD, RADIUS)
    Image.fromarray(render(0, 0, size, size, 1, *scene)).save(folder / "ref.png")
    Image.fromarray(structure_mask(0, 0, size, size, *scene) * 255).save(folder / "ref_mask.png")
    for i in range(count):
        offset = 37 * (i + 1)
        Image.fromarray(render(offset, 2 * offset, size, size, 1, *scene)).save(images / f"target_{i:02d}.png")
    return folder / "ref.png", folder / "ref_mask.png", images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refseg.testing.synthetic_images",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=4, help="target images (default 4)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ref, mask, images = write_images(args.folder, args.count, args.size)
    log.info("wrote %s, %s and %d targets in %s", ref, mask, args.count, images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
