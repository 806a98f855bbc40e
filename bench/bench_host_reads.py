"""Host reads and stage times of one ``segment_prepared`` batch (random weights, Kvasir pairs or synthetic).

    python bench/bench_host_reads.py --batches 2,8                   # tiny models, blocky 96x128 targets
    python bench/bench_host_reads.py --models base --batches 2 --kvasir ../shared/data/kvasir_seg5
    REFSEG_ACCELERATOR_PATH=1 TRITON_INTERPRET=1 python bench/bench_host_reads.py   # the GPU's code path

Counts with :class:`refseg.runtime.host_reads.HostReadCounter` (the reads a CUDA run would wait for: item /
bool / int / float, tolist, cpu, numpy, nonzero, boolean-mask indexing, unique, equal) and prints one JSON
line per batch size: reads in total and by kind (``--trace``: by source line), per-stage seconds per
image, and the mask areas (to compare runs). ``tiny`` = DINOv2-S @112 + SAM ViT-B (2 blocks, 256 px
input), a 128x160 two-class reference and 96x128 targets of random 8-px blocks (tests/test_stream.py's
images); ``base`` = DINOv2-B @518 + SAM-B on 768x1024 synthetic targets, or the Kvasir pairs.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from refseg.benchmark.headline import Plan, reference_mask, synthetic_images, write_models
from refseg.runtime.host_reads import HostReadCounter
from refseg.segmenter import Segmenter


def _blocks(rng, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 of random 8x8 blocks."""
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", choices=("tiny", "base"), default="tiny")
    parser.add_argument("--preset", default="sat")
    parser.add_argument("--batches", default="2,8")
    parser.add_argument("--kvasir", type=Path, help="folder with images/ and masks/ (default: synthetic targets)")
    parser.add_argument("--trace", action="store_true", help="count reads by source line")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    plan = Plan.dry_run() if args.models == "tiny" else Plan()
    batches = [int(b) for b in args.batches.split(",")]
    if args.kvasir:
        from refseg.io.raster import list_images, read_image, read_mask

        paths = list_images(args.kvasir / "images")
        reference, mask = read_image(paths[0]), read_mask(args.kvasir / "masks" / paths[0].name)
        targets = [read_image(p) for p in paths[1:]]
    elif args.models == "tiny":
        reference = _blocks(np.random.default_rng(0), 128, 160)
        mask = np.zeros((128, 160), np.int64)
        mask[20:90, 20:70] = 1
        mask[40:120, 90:150] = 2  # two classes: prompt sets of different lengths per target
        rng = np.random.default_rng(1)
        targets = [_blocks(rng, 96, 128) for _ in range(8)]
    else:
        images = synthetic_images(plan, 5, seed=1)
        reference, targets, mask = images[0], images[1:], reference_mask(plan)
    with tempfile.TemporaryDirectory() as tmp:
        sam, dino = write_models(plan, Path(tmp))
        seg = Segmenter.from_preset(args.preset, sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu",
                                    image_size=plan.image_size, batch_size=max(batches))
        seg.set_reference(reference, mask)
        for n in batches:
            batch = [targets[i % len(targets)] for i in range(n)]
            seg.segment_prepared([seg.prepare_target(t) for t in batch])  # warm-up
            prepared = [seg.prepare_target(t) for t in batch]
            with HostReadCounter(trace=args.trace) as reads:
                start = time.perf_counter()
                results = seg.segment_prepared(prepared)
                wall = time.perf_counter() - start
            print(json.dumps({"batch": n, "host_reads": reads.total, "by_kind": dict(reads.by_kind),
                              **({"sites": dict(reads.sites)} if args.trace else {}), "wall_s": round(wall, 3),
                              "stages_s_per_image": {k: round(v, 4) for k, v in results[0].timings.items()},
                              "mask_pixels": [int((r.mask > 0).sum()) for r in results],
                              "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
