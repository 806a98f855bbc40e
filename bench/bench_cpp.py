"""C++ core vs Python, seconds per image at batch 1 and the throughput of several C++ contexts on one model.

    python bench/bench_cpp.py --export DIR [--build build] [--kvasir ../shared/data/kvasir_seg5]
                              [--targets 4] [--contexts 4] [--repeat 3]

DIR is an AOTInductor export (``refseg export --format aoti``; ctest's ``build/csrc/tests/model/export`` is a
tiny random one); the Python rows load the checkpoints its manifest records. Rows, all on the same Kvasir pair
(reference 0, targets 1..N), the ``sat`` preset at the export's S, this machine's CPU:

* prompt stage: matching post-processing + prompts, refseg._C (the C API's prompt engine) vs torch, S = 518
  (the shared similarity result excluded);
* end to end per image, batch 1: ``Segmenter.segment`` with the eager torch backend, the same Segmenter on the
  export's packages (``refseg.export.aoti.AotiPackages``), and one C++ context (refseg-threads -t 1): segment
  calls only, model loading and the reference excluded, after one warm-up call;
* throughput: refseg-threads with ``--contexts`` contexts on one model (images/s of all together).

Each figure is the median of ``--repeat`` runs. Prints one markdown table. On a shared machine the figures are
noisy: compare rows of one run, not runs. ``OMP_WAIT_POLICY=passive`` is set for both sides unless given: with
OpenMP's spinning barriers a CPU shared with other jobs made every figure several times slower (one C++ context
2.7 s per image spinning, 0.6 s passive, same machine, same minute) and the ratios meaningless.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # read by libgomp when torch loads it: before the import

import numpy as np  # noqa: E402
import torch  # noqa: E402

from refseg.config import SegmenterConfig  # noqa: E402
from refseg.kernels import match_reference  # noqa: E402
from refseg.pipeline import native  # noqa: E402
from refseg.pipeline.matching import match_candidates  # noqa: E402
from refseg.pipeline.prompts import prompts_from_candidates  # noqa: E402


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

    try:
        os.environ[native.KILL_SWITCH] = "1"
        t_torch = _time(run, repeat)
        del os.environ[native.KILL_SWITCH]
        if native.module() is None:
            sys.exit("refseg._C is not built: pip install -e .")
        return t_torch, _time(run, repeat)
    finally:
        matching._similarity_seam = seam


def load_pair(kvasir: Path, targets: int):
    """(reference RGB, reference mask 0/255, [target RGB]) from the Kvasir folder."""
    from PIL import Image

    from refseg.io.raster import read_mask

    names = sorted(p.name for p in (kvasir / "images").iterdir())[:targets + 1]
    if len(names) < targets + 1:
        sys.exit(f"{kvasir}: {len(names)} images, --targets {targets} needs {targets + 1}")
    imgs = [np.asarray(Image.open(kvasir / "images" / n).convert("RGB")) for n in names]
    mask = np.where(read_mask(kvasir / "masks" / names[0]) > 0, 255, 0).astype(np.uint8)
    return imgs[0], mask, imgs[1:]


def bench_python(export: Path, ref, mask, targets, repeat: int) -> tuple[float, float]:
    """Median seconds per image of Segmenter.segment: eager torch backend, then the export's packages."""
    from refseg.export.aoti import AotiPackages
    from refseg.segmenter import Segmenter

    manifest = json.loads((export / "manifest.json").read_text())
    ck = manifest["checkpoints"]
    if not (ck.get("sam") and ck.get("dinov2")):
        sys.exit(f"{export}: the manifest records no checkpoints; export with --sam-checkpoint/--dinov2-checkpoint")
    cfg = SegmenterConfig.from_preset("sat", image_size=manifest["image_size"], device="cpu")
    seg = Segmenter(cfg, sam_checkpoint=ck["sam"]["path"], dinov2_checkpoint=ck["dinov2"]["path"], device="cpu")
    out = []
    for backend in (seg.backend, AotiPackages(export, seg.backend)):
        seg.backend = backend
        seg.set_reference(ref, mask)
        seg.segment(targets[0])  # warm-up
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for t in targets:
                seg.segment(t)
            runs.append((time.perf_counter() - t0) / len(targets))
        out.append(statistics.median(runs))
    return out[0], out[1]


def bench_cpp(build: Path, export: Path, ref, mask, targets, contexts: int, repeat: int) -> tuple[float, float]:
    """Median (seconds per image on one context, images/s of `contexts` contexts) from refseg-threads."""
    from PIL import Image

    exe = build / "refseg-threads"
    if not exe.is_file():
        sys.exit(f"{exe} not built (cmake -S . -B build && cmake --build build)")
    per_image, throughput = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray(ref).save(tmp / "ref.ppm")
        Image.fromarray(mask).save(tmp / "mask.pgm")
        files = []
        for i, t in enumerate(targets):
            Image.fromarray(t).save(tmp / f"t{i}.ppm")
            files.append(str(tmp / f"t{i}.ppm"))
        for _ in range(repeat):
            proc = subprocess.run([str(exe), "-t", str(contexts), "-w", "1", str(export), str(tmp / "ref.ppm"),
                                   str(tmp / "mask.pgm"), *files], capture_output=True, text=True, timeout=3600)
            if proc.returncode:
                sys.exit(f"refseg-threads failed:\n{proc.stderr}")
            per_image.append(float(re.search(r"([0-9.]+) s per image", proc.stdout).group(1)))
            throughput.append(float(re.search(r"contexts on one model: .* ([0-9.]+) images/s", proc.stdout).group(1)))
    return statistics.median(per_image), statistics.median(throughput)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, required=True, help="AOTInductor export folder (refseg export --format aoti)")
    p.add_argument("--build", type=Path, default=Path("build"))
    p.add_argument("--kvasir", type=Path, default=Path("../shared/data/kvasir_seg5"))
    p.add_argument("--targets", type=int, default=4)
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    if args.targets < 1 or args.contexts < 1 or args.repeat < 1:
        p.error("--targets, --contexts and --repeat must be >= 1")
    t_torch, t_native = bench_prompts("sat", 518, 20)
    ref, mask, targets = load_pair(args.kvasir, args.targets)
    py_eager, py_aoti = bench_python(args.export, ref, mask, targets, args.repeat)
    cpp_one, cpp_many = bench_cpp(args.build, args.export, ref, mask, targets, args.contexts, args.repeat)
    rows = [
        ("prompt stage (match post-processing + prompts, S=518), s/img", f"{t_torch:.4f}", f"{t_native:.4f}",
         f"{t_torch / t_native:.2f}x"),
        ("end to end, batch 1, eager torch backend vs one C++ context, s/img", f"{py_eager:.3f}", f"{cpp_one:.3f}",
         f"{py_eager / cpp_one:.2f}x"),
        ("end to end, batch 1, Python on the same AOTI packages vs one C++ context, s/img", f"{py_aoti:.3f}",
         f"{cpp_one:.3f}", f"{py_aoti / cpp_one:.2f}x"),
        (f"throughput, {args.contexts} C++ contexts on one model vs one, images/s", f"{1 / cpp_one:.2f} (one)",
         f"{cpp_many:.2f}", f"{cpp_many * cpp_one:.2f}x"),
    ]
    sys.stdout.write("| row | Python (or one context) | C++ | ratio |\n|---|---|---|---|\n")
    for row in rows:
        sys.stdout.write("| " + " | ".join(row) + " |\n")
    sys.stdout.write(f"\n{len(targets)} Kvasir targets, median of {args.repeat}; {os.cpu_count()} CPU(s), torch "
                     f"{torch.__version__}, {torch.get_num_threads()} intra-op threads, OMP_WAIT_POLICY="
                     f"{os.environ['OMP_WAIT_POLICY']}, load average {os.getloadavg()[0]:.1f}; export {args.export}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
