"""``refseg bench``: the benchmark suite from the command line.

    refseg bench --quick -o /tmp/bench --readme README.md    # small models, CPU, ~30 min
    refseg bench -o bench_h100 --device cuda                 # every model and backend (GPU)
    refseg bench -o out --sam-checkpoint sam_vit_b_01ec64.pth --dinov2-checkpoint dinov2_vitb14_pretrain.pth
    refseg bench --volume -o out/vol --sam-checkpoint sam_vit_b_01ec64.pth \
        --sam2-checkpoint sam2.1_hiera_tiny.pt --dinov2-checkpoint dinov2_vitb14_pretrain.pth   # CT volume rows

Writes ``DIR/results.json``, ``DIR/results.md`` and ``DIR/throughput.png`` (``--volume``: the first two).
Without checkpoints, random ones in the official format are written to ``DIR/checkpoints`` (speed numbers
only). ``--volume`` runs only the volume comparison (:mod:`refseg.benchmark.volume_rows`), not the suite.
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
                    "pipeline end to end, against a research-style implementation in the same run; with --volume, "
                    "per-slice matching vs --propagate on the sample CT instead.")
    p.add_argument("-o", "--output", required=True, help="output folder (results.json, results.md, throughput.png)")
    p.add_argument("--quick", action="store_true",
                   help="small models (DINOv2-S at 224/518, SAM-B), gbmseg + sat presets, 8 images x 3 passes, "
                        "streaming at batch 1/4/16: about half an hour on an idle 2-core CPU")
    p.add_argument("-d", "--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint (official format); decides the pipelines' SAM size")
    p.add_argument("--dinov2-checkpoint", help="DINOv2 checkpoint (official format); decides their DINOv2 size")
    p.add_argument("--data", help="folder with kvasir_seg5/ and gbmseg_example/ (--volume: totalseg_ct/) "
                                  "(default: $REFSEG_BENCH_DATA, else ../shared/data beside the source checkout; "
                                  "synthetic images when absent, except for --volume)")
    p.add_argument("--backends", help="comma-separated variants to run besides torch-fp32 "
                                      "(e.g. torch-bf16,onnxruntime); default: every one present")
    p.add_argument("--budget", type=float, default=-1.0,
                   help="stop starting rows after this many seconds (default: 3600 with --quick, none otherwise; "
                        "0 = no limit)")
    p.add_argument("--image-size", type=int, help="DINOv2 input side of the --quick pipeline and of --volume "
                                                  "(default 518)")
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
    g = p.add_argument_group("--volume: per-slice matching vs --propagate on the sample CT (docs/propagate.md)")
    g.add_argument("--volume", action="store_true",
                   help="run only the volume comparison (not the suite; slow): `refseg segment` per slice and with "
                        "--propagate on the TotalSegmentator sample CT (reference: its even slices, target: its odd "
                        "slices), slices/s, peak memory and per-structure Dice against the label map (`refseg "
                        "eval`); --sam-checkpoint is the per-slice SAM. Rows in results.json / results.md; with "
                        "random weights the Dice figures are meaningless and the table says so")
    g.add_argument("--sam2-checkpoint", help="SAM 2 / 2.1 / MedSAM2 checkpoint of --propagate (default: found, "
                                             "else random sam2.1_hiera_t)")
    g.add_argument("--label", type=int, nargs="+", help="label values to segment and score (default 1 5 6: "
                                                        "spleen, liver, stomach)")
    g.add_argument("--slices", help="canonical target slices A:B (Python range; default all 15)")
    g.add_argument("--sam2-image-size", type=int, help="SAM 2 input side of --propagate, a multiple of 32 "
                                                      "(default: the model's)")
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


SUITE_ONLY = ("quick", "backends", "images", "stream_batches", "repeats", "no_baseline", "readme", "from_results")
VOLUME_ONLY = ("sam2_checkpoint", "label", "slices", "sam2_image_size")


def _refuse_mixed(args: argparse.Namespace) -> None:
    """Options of the suite with --volume, or of --volume without it: refused, naming them."""
    def given(names):
        return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, False)]

    wrong = given(SUITE_ONLY) + (["--budget"] if args.budget != -1.0 else []) if args.volume else given(VOLUME_ONLY)
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: {'not used by --volume' if args.volume else 'only with --volume'}")


def _cmd_bench(args: argparse.Namespace) -> int:
    from refseg.benchmark import run_suite, write_report

    _refuse_mixed(args)
    if args.volume:
        return _cmd_volume(args)
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
    if args.readme and results.get("volume"):
        raise ValueError(f"--readme: {args.from_results} holds --volume rows; the README table is the suite's")
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


def _cmd_volume(args: argparse.Namespace) -> int:
    from refseg.benchmark import write_report
    from refseg.benchmark.volume_rows import run_volume_rows

    results = run_volume_rows(args.output, device=args.device, sam_checkpoint=args.sam_checkpoint,
                              sam2_checkpoint=args.sam2_checkpoint, dinov2_checkpoint=args.dinov2_checkpoint,
                              data_dir=args.data, labels=args.label, slices=args.slices, image_size=args.image_size,
                              sam2_image_size=args.sam2_image_size, threads=args.threads)
    paths = write_report(results, args.output)
    lines = [f"refseg bench --volume: {results['wall_s']:.0f} s on {results['device']}"]
    lines += [f"  {r['mode']}: {r['slices']} slices, {r['slices_per_second']:.3g} slices/s, Dice "
              + ", ".join(f"{c}: {'-' if d is None else f'{d:.3f}'}" for c, d in r["dice"].items())
              for r in results["rows"]]
    if results["random_weights"]:
        lines.append(f"  random weights written to {args.output}/checkpoints: the Dice figures are meaningless")
    lines += [f"  wrote {p}" for p in paths.values()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
