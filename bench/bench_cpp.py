"""C++ core vs Python, ratios from one run on this machine.

    python bench/bench_cpp.py                      # prompt stage: C++ (refseg._C) vs torch, per image
    python bench/bench_cpp.py --export DIR --build build --kvasir ../shared/data/kvasir_seg5
                                                   # + end to end: refseg-cli vs the Python pipeline

Prompt stage = matching post-processing + candidates -> prompts (the same match result and config for
both engines; the similarity matrix itself is shared and excluded). End to end = one reference, N targets,
the same AOTInductor packages (``refseg export --format aoti``); the C++ time is refseg-cli's wall time
for N targets minus that for 1, over N - 1 (package loading and reference excluded), the Python time is ``Segmenter.segment`` per target on those packages
(``refseg.export.aoti.AotiPackages``) after loading. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from refseg.config import SegmenterConfig
from refseg.kernels import match_reference
from refseg.pipeline import native
from refseg.pipeline.matching import match_candidates
from refseg.pipeline.prompts import prompts_from_candidates


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def bench_prompts(preset: str, image_size: int, repeat: int) -> tuple[float, float]:
    """Seconds per image (torch, C++) of match post-processing + prompt engineering."""
    cfg = SegmenterConfig.from_preset(preset, image_size=image_size)
    g = cfg.grid_size
    gen = torch.Generator().manual_seed(0)
    ref, tgt = torch.randn(g * g, 384, generator=gen), torch.randn(1, g * g, 384, generator=gen)
    yy, xx = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    disc = ((yy - g / 2) ** 2 + (xx - g / 2) ** 2 < (g / 3) ** 2).flatten()
    labels = torch.where(disc, 1, 0).to(torch.int8)[None]
    res = match_reference(ref[None], tgt, metric=cfg.metric)
    import refseg.pipeline.matching as matching

    seam = matching._similarity_seam
    matching._similarity_seam = lambda: (lambda *a, **k: res)  # the shared similarity result

    def run():
        cand = match_candidates(ref, labels, tgt, cfg)
        prompts_from_candidates(cand, cfg, (512, 512))

    os.environ[native.KILL_SWITCH] = "1"
    t_torch = _time(run, repeat)
    del os.environ[native.KILL_SWITCH]
    if native.module() is None:
        sys.exit("refseg._C is not built: pip install -e .")
    try:
        return t_torch, _time(run, repeat)
    finally:
        matching._similarity_seam = seam


def bench_end_to_end(export: Path, build: Path, kvasir: Path, targets: int) -> tuple[float, float]:
    from PIL import Image

    from refseg.export.aoti import AotiPackages
    from refseg.segmenter import Segmenter

    names = sorted(p.name for p in (kvasir / "images").iterdir())[:targets + 1]
    imgs = [np.asarray(Image.open(kvasir / "images" / n).convert("RGB")) for n in names]
    mask = np.where(np.asarray(Image.open(kvasir / "masks" / names[0]).convert("L")) > 127, 255, 0).astype(np.uint8)
    manifest = __import__("json").loads((export / "manifest.json").read_text())
    cfg = SegmenterConfig.from_preset("sat", image_size=manifest["image_size"], device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(tmp / f"{i}.png")
        Image.fromarray(mask).save(tmp / "mask.png")
        (tmp / "out").mkdir()

        def cli(n: int) -> float:
            t0 = time.perf_counter()
            subprocess.run([str(build / "refseg-cli"), str(export), str(tmp / "0.png"), str(tmp / "mask.png"),
                            str(tmp / "out")] + [str(tmp / f"{i}.png") for i in range(1, n + 1)], check=True,
                           capture_output=True)
            return time.perf_counter() - t0

        # per target without the package loading and the reference: (t(N targets) - t(1)) / (N - 1)
        t_cpp = (cli(targets) - cli(1)) / (targets - 1)
    ck = manifest["checkpoints"]
    seg = Segmenter(cfg, sam_checkpoint=ck["sam"]["path"], dinov2_checkpoint=ck["dinov2"]["path"], device="cpu")
    seg.backend = AotiPackages(export, seg.backend)
    seg.set_reference(imgs[0], mask)
    t0 = time.perf_counter()
    for im in imgs[1:]:
        seg.segment(im)
    return (time.perf_counter() - t0) / targets, t_cpp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sat")
    p.add_argument("--image-size", type=int, default=518)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--export", type=Path, help="AOTInductor export folder (enables the end-to-end rows)")
    p.add_argument("--build", type=Path, default=Path("build"))
    p.add_argument("--kvasir", type=Path, default=Path("../shared/data/kvasir_seg5"))
    p.add_argument("--targets", type=int, default=3, help="end-to-end targets (>= 2)")
    args = p.parse_args(argv)
    if args.targets < 2:
        p.error("--targets must be >= 2")
    t_torch, t_cpp = bench_prompts(args.preset, args.image_size, args.repeat)
    rows = [("prompt stage (match post-processing + prompts)", t_torch, t_cpp)]
    if args.export:
        rows.append(("end to end per target (same AOTI packages)",) + bench_end_to_end(
            args.export, args.build, args.kvasir, args.targets))
    sys.stdout.write(f"| stage ({args.preset}; prompt stage at S={args.image_size}) | Python s/img | C++ s/img | speed-up |\n|---|---|---|---|\n")
    for name, py, cpp in rows:
        sys.stdout.write(f"| {name} | {py:.4f} | {cpp:.4f} | {py / cpp:.2f}x |\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
