"""``refseg bench``: the benchmark suite from the command line.

    refseg bench --quick -o /tmp/bench --readme README.md    # small models, CPU, ~30 min
    refseg bench -o bench_h100 --device cuda                 # every model and backend (GPU)
    refseg bench -o out --sam-checkpoint sam_vit_b_01ec64.pth --dinov2-checkpoint dinov2_vitb14_pretrain.pth

Writes ``DIR/results.json``, ``DIR/results.md`` and ``DIR/throughput.png``. Without checkpoints,
random ones in the official format are written to ``DIR/checkpoints`` (speed numbers only).
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("refseg.bench")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``refseg bench`` on the ``refseg`` command's sub-parsers."""
    p = subparsers.add_parser(
        "bench", help="benchmark suite: per-stage speed, memory, accuracy vs a research-style baseline",
        description="Measure every model on every backend present, the matching + prompt stage and the "
                    "pipeline end to end, against a research-style implementation in the same run.")
    p.add_argument("-o", "--output", required=True, help="output folder (results.json, results.md, throughput.png)")
    p.add_argument("--quick", action="store_true",
                   help="small models (DINOv2-S at 224/518, SAM-B), gbmseg + sat presets, 8 images x 3 passes, "
                        "streaming at batch 1/4/16: about half an hour on an idle 2-core CPU")
    p.add_argument("-d", "--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint (official format); decides the pipelines' SAM size")
    p.add_argument("--dinov2-checkpoint", help="DINOv2 checkpoint (official format); decides their DINOv2 size")
    p.add_argument("--data", help="folder with kvasir_seg5/ and gbmseg_example/ (default: ../shared/data "
                                  "beside the source checkout; synthetic images when absent)")
    p.add_argument("--backends", help="comma-separated variants to run besides torch-fp32 "
                                      "(e.g. torch-bf16,onnxruntime); default: every one present")
    p.add_argument("--budget", type=float, default=-1.0,
                   help="stop starting rows after this many seconds (default: 3600 with --quick, none otherwise; "
                        "0 = no limit)")
    p.add_argument("--image-size", type=int, help="DINOv2 input side of the --quick pipeline (default 518)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: all cores); "
                                              "1 gives steadier numbers on a CPU shared with other work")
    p.add_argument("--images", type=int, help="images per end-to-end pass (default 8; fewer targets are cycled)")
    p.add_argument("--stream-batches", help="comma-separated batch sizes of the streaming rows (default 1,4,16)")
    p.add_argument("--repeats", type=int, help="passes per end-to-end row (default 3): rows give median and spread")
    p.add_argument("--no-baseline", action="store_true", help="skip the research-style baseline rows")
    p.add_argument("--readme", metavar="README.md",
                   help="also regenerate the results table between the refseg-bench markers of this file")
    p.add_argument("--from-results", metavar="results.json",
                   help="do not measure: rewrite the report (and --readme) from an earlier results.json")
    p.set_defaults(func=_cmd_bench)
    return p


def _batches(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise ValueError(f"--stream-batches {text!r}: give positive integers separated by commas")
    return batches


def _cmd_bench(args: argparse.Namespace) -> int:
    from refseg.benchmark import run_suite, write_report

    if args.image_size is not None and (args.image_size <= 0 or args.image_size % 14):
        raise ValueError(f"--image-size {args.image_size}: must be a positive multiple of 14")
    budget = None if args.budget == 0 else args.budget
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    if args.from_results:
        from refseg.benchmark.report import read_results

        results = read_results(args.from_results)
    else:
        results = run_suite(args.output, quick=args.quick, device=args.device, sam_checkpoint=args.sam_checkpoint,
                            dinov2_checkpoint=args.dinov2_checkpoint, data_dir=args.data, backends=backends,
                            budget_s=budget, image_size=args.image_size, baseline=not args.no_baseline,
                            threads=args.threads, images=args.images, repeats=args.repeats,
                            stream_batches=_batches(args.stream_batches))
    paths = write_report(results, args.output)
    if args.readme:
        from refseg.benchmark.report import update_readme

        paths["readme"] = update_readme(results, args.readme)
    ratios = results["ratios"]
    lines = [f"refseg bench: {len(results['rows'])} rows, {len(results['skipped_rows'])} skipped, "
             f"{results['wall_s']:.0f} s on {results['device']}"]
    for key in ("end_to_end_vs_baseline", "end_to_end_best_vs_baseline", "prompt_stage_vs_baseline"):
        if ratios.get(key):
            lines.append(f"  {key}: {ratios[key]:.2f}x")
    for name, entry in (ratios.get("streaming_vs_per_image") or {}).items():
        lines.append(f"  streaming_vs_per_image {name}: " + ", ".join(
            f"{b} {e['ratio']:.2f}x" for b, e in entry.items() if e.get("ratio")))
    if results["random_weights"]:
        lines.append(f"  random weights written to {args.output}/checkpoints: speed numbers only")
    lines += [f"  wrote {p}" for p in paths.values()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
