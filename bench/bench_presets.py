"""Cost per image of every preset: same run, same images, same (random-weight) models.

    python bench/bench_presets.py [--images 2] [--sam-depth 2] [--presets sat,protosam,...] [--json out.json]

Every preset runs its own pipeline (method, image size S, knobs) with ONE shared model pair so that
the rows differ only by what the method does: DINOv2 ViT-S/14 and SAM ViT-B (``--sam-depth``
encoder blocks; 12 = the full model, 2 keeps a 2-core CPU run short — the SAM encoder is one call
per target for every preset, PerSAM adds one per reference, cached). Weights are random (speed
does not depend on them). The first Kvasir image is the reference, the next ``--images`` are the
targets, each segmented alone after one warm-up target. Output: a Markdown table of wall seconds per
image and the per-stage split (``SegmentationResult.timings``), optionally JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from refseg.config import PRESETS, SegmenterConfig
from refseg.io import raster
from refseg.segmenter import Segmenter
from refseg.testing.random_checkpoints import random_dinov2_model, random_sam_model, write_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "kvasir_seg5"
STAGES = ("dinov2", "matching", "prompts", "sam_encoder", "decoder", "postprocess")


def checkpoints(folder: Path, sam_depth: int) -> tuple[Path, Path]:
    """Random official-format checkpoints: SAM ViT-B with ``sam_depth`` blocks, DINOv2 ViT-S/14."""
    return (write_model(random_sam_model("vit_b", depth=sam_depth if sam_depth != 12 else None),
                        folder / "sam_vit_b.pth"),
            write_model(random_dinov2_model("vits14"), folder / "dinov2_vits14_pretrain.pth"))


def bench_preset(name: str, ckpt: tuple[Path, Path], ref, targets) -> dict:
    cfg = SegmenterConfig.from_preset(name, dinov2="vits14", sam="vit_b", batch_size=1, device="cpu")
    seg = Segmenter(cfg, sam_checkpoint=ckpt[0], dinov2_checkpoint=ckpt[1], device="cpu")
    start = time.perf_counter()
    seg.set_reference(*ref)
    seg.segment(targets[0])  # warm-up (and PerSAM's reference encoding)
    first = time.perf_counter() - start
    walls, stages = [], {s: [] for s in STAGES}
    for image in targets:
        t = time.perf_counter()
        result = seg.segment(image)
        walls.append(time.perf_counter() - t)
        for s in STAGES:
            stages[s].append(result.timings.get(s, 0.0))
    return {"preset": name, "method": cfg.method, "image_size": cfg.image_size,
            "s_per_image": float(np.mean(walls)), "reference_and_warmup_s": first,
            "stages_s": {s: float(np.mean(v)) for s, v in stages.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images/ and masks/")
    parser.add_argument("--images", type=int, default=2, help="targets timed per preset")
    parser.add_argument("--sam-depth", type=int, default=2, help="SAM ViT-B encoder blocks (12 = full)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    names = sorted(p.name for p in (args.data / "images").iterdir())
    if len(names) < args.images + 1:
        parser.error(f"{args.data}/images holds {len(names)} images, need {args.images + 1}")
    ref = (raster.read_image(args.data / "images" / names[0]), raster.read_mask(args.data / "masks" / names[0]))
    targets = [raster.read_image(args.data / "images" / n) for n in names[1:args.images + 1]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoints(Path(tmp), args.sam_depth)
        for name in args.presets.split(","):
            rows.append(bench_preset(name.strip(), ckpt, ref, targets))
    sys.stdout.write(f"DINOv2 ViT-S/14 + SAM ViT-B ({args.sam_depth} blocks), random weights, "
                     f"{torch.get_num_threads()} threads, {len(targets)} Kvasir targets\n\n")
    sys.stdout.write("| preset | S | s / image | " + " | ".join(STAGES) + " |\n")
    sys.stdout.write("|---|---|---|" + "---|" * len(STAGES) + "\n")
    for r in rows:
        cells = " | ".join(f"{r['stages_s'][s]:.2f}" for s in STAGES)
        sys.stdout.write(f"| {r['preset']} | {r['image_size']} | {r['s_per_image']:.2f} | {cells} |\n")
    if args.json:
        args.json.write_text(json.dumps({"sam_depth": args.sam_depth, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
