"""SAM 2.1 tiny and base_plus next to SAM ViT-B as the pipeline's SAM stage: same run, same targets.

    python bench/bench_sam2.py [--images 2] [--models vit_b,sam2.1_hiera_t,sam2.1_hiera_b+] [--device cpu]
                               [--image-size 224] [--json out.json]

Every row is the ``sat`` preset with one shared DINOv2 ViT-S/14 (at ``--image-size``, the same for every
row) and the named SAM-family model at its full official size and input (1024), random weights in the
official format (speed does not depend on them). The first Kvasir image is the reference, the next
``--images`` are the targets, each segmented alone after one warm-up target. Each model runs in a fresh
child process so that its peak memory is its own: CPU rows report the peak resident set of that process
over model load + reference + targets (``rss_peak``), CUDA rows ``torch.cuda.max_memory_allocated``.
FLOPs per image: ``torch.utils.flop_counter`` over one ``segment()`` call (matmuls, convolutions,
attention; 2 per multiply-add), the SAM encoder's share counted separately over ``encode_sam``.
Output: a Markdown table (s/img, SAM encoder and decoder s/img, GFLOP/img, peak MiB), optionally JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "kvasir_seg5"
MODELS = ("vit_b", "sam2.1_hiera_t", "sam2.1_hiera_b+")


def run_one(sam: str, folder: Path, data: Path, images: int, device: str, image_size: int) -> dict:
    """One model's row, measured in this process (the parent starts one process per model)."""
    from torch.utils.flop_counter import FlopCounterMode

    from refseg.benchmark.measure import peak_memory, synchronize
    from refseg.io import raster
    from refseg.pipeline.inputs import sam_inputs
    from refseg.segmenter import Segmenter
    from refseg.testing.random_checkpoints import write_random_checkpoints

    names = sorted(p.name for p in (data / "images").iterdir())
    ref = (raster.read_image(data / "images" / names[0]), raster.read_mask(data / "masks" / names[0]))
    targets = [raster.read_image(data / "images" / n) for n in names[1:images + 1]]
    sam_file, dino_file = write_random_checkpoints(folder / sam, sam=[sam], dinov2=["vits14"])
    with peak_memory(device) as memory:
        seg = Segmenter.from_preset("sat", sam_checkpoint=sam_file, dinov2_checkpoint=dino_file, device=device,
                                    sam=sam, dinov2="vits14", image_size=image_size, batch_size=1)
        seg.set_reference(*ref)
        seg.segment(targets[0])  # warm-up
        walls, encoder, decoder = [], [], []
        for image in targets:
            synchronize(seg.device)
            start = time.perf_counter()
            result = seg.segment(image)
            synchronize(seg.device)
            walls.append(time.perf_counter() - start)
            encoder.append(result.timings.get("sam_encoder", 0.0))
            decoder.append(result.timings.get("decoder", 0.0))
    with FlopCounterMode(display=False) as total:
        seg.segment(targets[0])
    prepared = seg.prepare_target(targets[0])
    with FlopCounterMode(display=False) as enc:
        seg.backend.encode_sam(sam_inputs([prepared], seg.backend, seg.config))
    return {"sam": sam, "sam_input": seg.sam_size, "device": str(seg.device), "images": len(targets),
            "s_per_image": float(np.mean(walls)), "sam_encoder_s": float(np.mean(encoder)),
            "decoder_s": float(np.mean(decoder)), "gflop_per_image": total.get_total_flops() / 1e9,
            "sam_encoder_gflop": enc.get_total_flops() / 1e9, **memory.to_dict()}


def table(rows: list[dict]) -> str:
    lines = ["| SAM stage | input | s/img | SAM encoder s/img | decoder s/img | GFLOP/img (encoder) | peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['sam']} | {r['sam_input']} | {r['s_per_image']:.2f} | {r['sam_encoder_s']:.2f} | "
                     f"{r['decoder_s']:.3f} | {r['gflop_per_image']:.0f} ({r['sam_encoder_gflop']:.0f}) | "
                     f"{r['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images/ and masks/")
    parser.add_argument("--images", type=int, default=2, help="targets timed per model")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated SAM-family names")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--image-size", type=int, default=224, help="DINOv2 input side (same for every row)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure this model, print JSON
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    names = sorted(p.name for p in (args.data / "images").iterdir())
    if len(names) < args.images + 1:
        parser.error(f"{args.data}/images holds {len(names)} images, need {args.images + 1}")
    if args.one:
        row = run_one(args.one, args.workdir, args.data, args.images, args.device, args.image_size)
        sys.stdout.write(json.dumps(row) + "\n")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sam in args.models.split(","):
            child = subprocess.run(
                [sys.executable, __file__, "--one", sam, "--workdir", tmp, "--data", str(args.data),
                 "--images", str(args.images), "--device", args.device, "--image-size", str(args.image_size)],
                capture_output=True, text=True)
            if child.returncode:
                sys.stderr.write(child.stderr[-3000:])
                return child.returncode
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            logging.warning("%s: %.2f s/img", sam, rows[-1]["s_per_image"])
    sys.stdout.write(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
                     f"{args.images} targets, sat preset, DINOv2 ViT-S/14 @ {args.image_size}\n\n{table(rows)}\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
