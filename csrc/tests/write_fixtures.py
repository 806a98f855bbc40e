"""Write the C++ prompt-engine fixtures with the torch path (REFSEG_DISABLE_NATIVE=1): random
candidate sets on pixel lattices and off them, under several configs, plus grid-labelling cases at the
DINOv2 (14) and DINOv3 (16) patch sizes.

    python csrc/tests/write_fixtures.py OUT_FILE
"""
from __future__ import annotations

import math
import os
import sys

os.environ["REFSEG_DISABLE_NATIVE"] = "1"  # the reference is the torch path

import torch  # noqa: E402

from refseg.config import SegmenterConfig  # noqa: E402
from refseg.pipeline.grid import binary_to_grid  # noqa: E402
from refseg.pipeline.prompts import engineer_prompt_batch  # noqa: E402

CONFIGS = [
    ("sat", SegmenterConfig.from_preset("sat")),
    ("sat_pixel_k4", SegmenterConfig.from_preset("sat", radius_unit="pixel", pos_radius=6.0, neg_radius=6.0,
                                                  exclusion_radius=10.0, kmeans_k=4, kmeans_seed=3)),
    ("sat_box_cap", SegmenterConfig.from_preset("sat", use_box=True, max_points=10)),
    ("gbmseg", SegmenterConfig.from_preset("gbmseg")),
    ("gbmseg_quirk", SegmenterConfig.from_preset("gbmseg", gbmseg_offimage_quirk=True)),
]


def fmt_points(pts) -> str:
    return f"{len(pts)} " + " ".join(f"{float(x)!r} {float(y)!r}" for x, y in pts)


def main(out_path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    lines = []
    for name, cfg in CONFIGS:
        for case in range(3):
            h, w = int(torch.randint(40, 300, (1,), generator=gen)), int(torch.randint(40, 300, (1,), generator=gen))
            integral = case < 2 or cfg.kmeans_k == 0
            sets = []
            for n in (int(torch.randint(0, 60, (1,), generator=gen)), 80, 25):
                pts = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([w * 1.1, h * 1.1]) - 3
                sets.append(pts.round() if integral else pts)
            pos, neg, hard = sets
            use_hard = case != 1
            batch = engineer_prompt_batch([pos], [neg], [hard] if use_hard else None, image_sizes=(h, w),
                                          config=cfg, dtype=torch.float64)
            n = int(batch.num_points[0])
            pts, labels = batch.points[0, :n].tolist(), batch.labels[0, :n].tolist()
            box = batch.boxes[0].tolist() if batch.boxes is not None else [math.nan] * 4
            head = [f"prompt {name}_{case}", int(cfg.gbmseg_offimage_quirk), int(cfg.radius_unit == "pixel"),
                    cfg.pos_radius, cfg.neg_radius, cfg.exclusion_radius, cfg.hard_radius, cfg.kmeans_k,
                    cfg.kmeans_iters, cfg.kmeans_seed, cfg.max_points, int(cfg.fallback), int(cfg.use_box), h, w]
            lines.append(" ".join(str(v) for v in head))
            lines.append(fmt_points(pos.tolist()))
            lines.append(fmt_points(neg.tolist()))
            lines.append(f"{int(use_hard)} " + fmt_points(hard.tolist() if use_hard else []))
            lines.append(f"{n} " + " ".join(f"{x!r} {y!r} {lab}" for (x, y), lab in zip(pts, labels)))
            lines.append(" ".join(repr(v) for v in box))
    for patch, side in ((14, 56), (16, 64)):
        for rule_id, (rule, fraction, skip) in enumerate([("all", 0.95, False), ("any", 0.95, True),
                                                          ("fraction", 0.7, False)]):
            coarse = torch.rand(1, 1, 5, 5, generator=gen)
            mask = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")[0, 0] > 0.5
            labels = binary_to_grid(mask, patch_size=patch, rule=rule, fraction=fraction, skip_last=skip)
            bits = "".join("1" if v else "0" for v in mask.flatten().tolist())
            lines.append(f"grid {side} {patch} {rule_id} {fraction!r} {int(skip)} {bits}")
            lines.append(" ".join(str(v) for v in labels.flatten().tolist()))
    with open(out_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
