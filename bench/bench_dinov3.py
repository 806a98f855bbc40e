"""DINOv3-B/16 against DINOv2-B/14 as the matching encoder, at the same image side, in one run.

    python bench/bench_dinov3.py [--sizes 224,448] [--images 2] [--sam-depth 2] [--json out.json]

Each row is one encoder at one side S (a multiple of 14 and 16: 224, 448, 672): its FLOPs per image
(:mod:`refseg.benchmark.flops`, the convention of docs/performance.md), the wall seconds of one
``backend.encode_dinov2`` call on one image (median of ``--repeats`` after a warm-up; DINOv3 includes
nothing else, the positional projection runs on the tokens afterwards), and the seconds per image of the
whole ``Segmenter.segment`` (sat preset; DINOv3: sat-v3, i.e. the INSID3 projection on) with SAM ViT-B cut
to ``--sam-depth`` blocks, after one warm-up target. Weights are random (speed does not depend on them),
written as the official files. The first Kvasir image is the reference, the next ``--images`` the targets.
Output: a Markdown table, optionally JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from refseg.benchmark import flops as F
from refseg.benchmark.data import default_data_dir, load_kvasir
from refseg.config import SegmenterConfig
from refseg.pipeline.features import dinov2_batch
from refseg.segmenter import Segmenter
from refseg.testing.random_checkpoints import random_sam_model, write_model, write_random_checkpoints

ENCODERS = {  # row label -> (preset, encoder, model name)
    "DINOv2-B/14": ("sat", "dinov2", "vitb14"),
    "DINOv3-B/16": ("sat-v3", "dinov3", "vitb16"),
}


def encoder_flops(encoder: str, name: str, side: int) -> float:
    return F.dinov3_flops(name, side) if encoder == "dinov3" else F.dinov2_flops(name, side)


def bench_row(label: str, side: int, ckpt: dict, ref, targets, repeats: int) -> dict:
    preset, encoder, name = ENCODERS[label]
    config = SegmenterConfig.from_preset(preset, image_size=side, batch_size=1, device="cpu")
    seg = Segmenter(config, sam_checkpoint=ckpt["sam"], device="cpu", **{f"{encoder}_checkpoint": ckpt[encoder]})
    assert seg.config.encoder == encoder  # the checkpoint selected the encoder
    batch = dinov2_batch([targets[0]], side)
    with torch.inference_mode():
        seg.backend.encode_dinov2(batch)  # warm-up
        calls = []
        for _ in range(repeats):
            t = time.perf_counter()
            seg.backend.encode_dinov2(batch)
            calls.append(time.perf_counter() - t)
    seg.set_reference(*ref)
    seg.segment(targets[0])  # warm-up (DINOv3: the positional basis is computed with the reference)
    walls = []
    for image in targets:
        t = time.perf_counter()
        seg.segment(image)
        walls.append(time.perf_counter() - t)
    grid = side // seg.config.patch_size
    return {"encoder": label, "model": name, "image_size": side, "grid": grid, "tokens": grid * grid,
            "debias": seg.config.debias, "gflop": encoder_flops(encoder, name, side) / 1e9,
            "encoder_s": statistics.median(calls), "s_per_image": statistics.mean(walls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_dir() / "kvasir_seg5",
                        help="folder with images/ and masks/")
    parser.add_argument("--sizes", default="224,448", help="comma-separated sides S (multiples of 14 and 16)")
    parser.add_argument("--images", type=int, default=2, help="targets timed per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed encoder calls per row")
    parser.add_argument("--sam-depth", type=int, default=2, help="SAM ViT-B encoder blocks (12 = full)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    bad = [s for s in sizes if s % 14 or s % 16]
    if bad:
        parser.error(f"--sizes {bad}: each side must be a multiple of 14 and of 16 (112, 224, 448, 672 ...)")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    data = load_kvasir(args.data, max_targets=args.images)
    if data is None or len(data.targets) < args.images:
        parser.error(f"{args.data}: need images/ and masks/ with {args.images + 1} Kvasir pairs")
    ref, targets = (data.reference, data.reference_mask), data.targets
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dinov2, dinov3 = write_random_checkpoints(folder, dinov2=["vitb14"], dinov3=["vitb16"])
        sam = write_model(random_sam_model("vit_b", depth=args.sam_depth if args.sam_depth != 12 else None),
                          folder / "sam_vit_b.pth")
        ckpt = {"sam": sam, "dinov2": dinov2, "dinov3": dinov3}
        for side in sizes:
            for label in ENCODERS:
                rows.append(bench_row(label, side, ckpt, ref, targets, args.repeats))
    sys.stdout.write(f"random weights, fp32, {torch.get_num_threads()} threads, SAM ViT-B ({args.sam_depth} blocks), "
                     f"{len(targets)} Kvasir targets\n\n")
    sys.stdout.write("| encoder | S | grid | GFLOP / image | encoder s / image | pipeline s / image | debias |\n")
    sys.stdout.write("|---|---|---|---|---|---|---|\n")
    for r in rows:
        sys.stdout.write(f"| {r['encoder']} | {r['image_size']} | {r['grid']}² | {r['gflop']:.1f} | "
                         f"{r['encoder_s']:.2f} | {r['s_per_image']:.2f} | {r['debias']} |\n")
    if args.json:
        args.json.write_text(json.dumps({"sam_depth": args.sam_depth, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
