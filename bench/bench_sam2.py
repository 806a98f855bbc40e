"""SAM 2.1 tiny and base_plus next to SAM ViT-B as the pipeline's SAM stage: same run, same targets.

    python bench/bench_sam2.py [--images 2] [--models vit_b,sam2.1_hiera_t,sam2.1_hiera_b+] [--device cpu]
                               [--image-size 224] [--json out.json]

Every row is the ``sat`` preset with one shared DINOv2 ViT-S/14 (at ``--image-size``, the same for every
row) and the named SAM-family model at its full official size and input (1024), random weights in the
official format (speed does not depend on them). The first Kvasir image is the reference, the next
``--images`` are the targets (:func:`refseg.benchmark.data.load_sets`: synthetic images where the data is
absent, as on a bare GPU host), each segmented alone after one warm-up target. Each model runs in a fresh
child process so that its peak memory is its own: CPU rows report the peak resident set of that process
over model load + reference + targets (``rss_peak``), CUDA rows ``torch.cuda.max_memory_allocated``.
FLOPs per image: ``torch.utils.flop_counter`` over one ``segment()`` call (matmuls, convolutions,
attention; 2 per multiply-add) with the CPU attention kernel counted and the linear layers on ``F.linear``
for that call (the counter does not see oneDNN's GEMMs); the SAM encoder's share is its module's count.
Output: a Markdown table (s/img, SAM encoder and decoder s/img, GFLOP/img, peak MiB), optionally JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vit_b", "sam2.1_hiera_t", "sam2.1_hiera_b+")
CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU SDPA kernel's FLOPs (the flop counter knows only the CUDA kernels): the two batched matmuls."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


@contextmanager
def flop_countable():
    """Linear layers on ``F.linear`` (the counter does not see oneDNN's fused GEMM; same math) for the block."""
    from refseg.models.onednn import KILL_SWITCH

    before = os.environ.get(KILL_SWITCH)
    os.environ[KILL_SWITCH] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[KILL_SWITCH]
        else:
            os.environ[KILL_SWITCH] = before


def run_one(sam: str, folder: Path, data: Path, images: int, device: str, image_size: int) -> dict:
    """One model's row, measured in this process (the parent starts one process per model)."""
    from torch.utils.flop_counter import FlopCounterMode

    from refseg.benchmark.measure import peak_memory, synchronize
    from refseg.benchmark.data import load_sets
    from refseg.segmenter import Segmenter
    from refseg.testing.random_checkpoints import write_random_checkpoints

    [bench] = load_sets(data, max_targets=images, include_gbmseg=False)
    ref, targets = (bench.reference, bench.reference_mask), bench.targets
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
    counter = FlopCounterMode(display=False, custom_mapping={CPU_SDPA: _sdpa_flops})
    with counter, flop_countable():
        seg.segment(targets[0])
    encoder_flops = sum(counter.get_flop_counts().get(type(seg.backend.sam.image_encoder).__name__, {}).values())
    return {"sam": sam, "data": bench.name, "sam_input": seg.sam_size, "device": str(seg.device),
            "images": len(targets),
            "s_per_image": float(np.mean(walls)), "sam_encoder_s": float(np.mean(encoder)),
            "decoder_s": float(np.mean(decoder)), "gflop_per_image": counter.get_total_flops() / 1e9,
            "sam_encoder_gflop": encoder_flops / 1e9, **memory.to_dict()}


HEADER = ("| SAM stage | input | s/img | SAM encoder s/img | decoder s/img | GFLOP/img (encoder) | peak MiB |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")


def row_line(r: dict) -> str:
    """One Markdown row of the table under :data:`HEADER`."""
    return (f"| {r['sam']} | {r['sam_input']} | {r['s_per_image']:.2f} | {r['sam_encoder_s']:.2f} | "
            f"{r['decoder_s']:.3f} | {r['gflop_per_image']:.0f} ({r['sam_encoder_gflop']:.0f}) | "
            f"{r['peak_mib']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="folder holding kvasir_seg5/ (default: $REFSEG_BENCH_DATA, else "
                        "shared/data beside the checkout; synthetic images where it is absent)")
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
    if args.one:
        row = run_one(args.one, args.workdir, args.data, args.images, args.device, args.image_size)
        sys.stdout.write(json.dumps(row) + "\n")
        return 0
    sys.stdout.write(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
                     f"{args.images} targets, sat preset, DINOv2 ViT-S/14 @ {args.image_size}\n\n{HEADER}\n")
    sys.stdout.flush()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sam in args.models.split(","):  # a row as soon as it is measured (a caller's timeout keeps those)
            child = subprocess.run(
                [sys.executable, __file__, "--one", sam, "--workdir", tmp,
                 *(["--data", str(args.data)] if args.data else []),
                 "--images", str(args.images), "--device", args.device, "--image-size", str(args.image_size)],
                capture_output=True, text=True)
            if child.returncode:
                sys.stderr.write(child.stderr[-3000:])
                return child.returncode
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            sys.stdout.write(row_line(rows[-1]) + "\n")
            sys.stdout.flush()
    sys.stdout.write(f"\ntargets: {rows[0]['data']}\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
