"""The ``refseg`` command line: ``segment``, ``eval``, ``info`` (and ``export``/``bench`` when present).

Exit codes: 0 success, 1 some inputs failed (the others were written) or, for ``eval``, no ground truth
could be scored against a prediction, 2 bad arguments, an unusable output folder, missing checkpoints or a
reference that cannot be used (nothing was run).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("refseg")


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment an image or a folder from one labelled reference",
                       description="Segment every image of INPUT like the labelled reference.")
    p.add_argument("-r", "--reference", required=True, action="append",
                   help="reference image (repeat -r/-m for n-shot)")
    p.add_argument("-m", "--reference-mask", required=True, action="append",
                   help="reference mask: 0 = background, non-zero = foreground (several values = classes)")
    p.add_argument("-i", "--input", required=True, help="image file or folder of images")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--preset", default="sat", help="configuration preset: sat, gbmseg, protosam, topk, "
                   "matcher, persam (`refseg presets` lists their stages and models)")
    p.add_argument("--sam", help="SAM model name (vit_b, vit_l, vit_h, medsam); default: preset's")
    p.add_argument("--dinov2", help="DINOv2 model name (vits14 ... vitg14_reg); default: preset's")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint file (official format)")
    p.add_argument("--dinov2-checkpoint", help="DINOv2 checkpoint file (official format)")
    p.add_argument("-d", "--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", default="torch", help="torch (default), onnxruntime, tensorrt, auto")
    p.add_argument("--engine-dir", help="folder written by `refseg export` (exported backends)")
    p.add_argument("--batch-size", type=int, help="targets encoded together")
    p.add_argument("--image-size", type=int, help="DINOv2 input side S (multiple of 14)")
    p.add_argument("--metric", choices=["cosine", "euclidean"], help="feature matching metric")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "auto"],
                   help="encoder precision (auto: bf16/fp16 on CUDA, bf16 on CPUs with native bf16, "
                        "else fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both encoders (CUDA graphs on CUDA; pays off on long runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any SegmenterConfig field (repeatable)")
    p.add_argument("--save-prompts", action="store_true", help="write <stem>.json with prompts/scores")
    p.add_argument("--overlay", action="store_true", help="write <stem>_overlay.png")
    p.add_argument("--resume", action="store_true", help="skip inputs whose mask is already written "
                   "(refused if the output folder was written with other settings)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: recompute everything when the settings differ")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto",
                   help="per-image progress: bar on a terminal, log lines otherwise (auto)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray Data: a local cluster, or ADDRESS ('auto', 'ray://host:10001')")
    p.add_argument("--ray-workers", type=int, help="segmentation actors (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs reserved by each Ray actor (default 0: CPU actors)")
    from refseg.volume_job import add_arguments as add_volume_arguments
    add_volume_arguments(p)
    from refseg.slide_cli import add_arguments as add_slide_arguments
    add_slide_arguments(p)
    p.set_defaults(func=_cmd_segment)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="Dice/IoU of predicted masks against ground truth")
    p.add_argument("-p", "--pred", required=True, help="folder of predicted masks (<stem>.png)")
    p.add_argument("-g", "--gt", required=True, help="folder of ground-truth masks (same stems)")
    p.add_argument("--threshold", type=float, default=None,
                   help="binarise every ground-truth mask (any format) at >= this value and score binary; "
                        "default: JPEG at 128, two-valued masks binary, other values are classes")
    p.add_argument("--pair-by", choices=["stem", "order"], default="stem",
                   help="pair predictions with ground truth by file stem (default) or by sorted file order")
    p.add_argument("--json", metavar="FILE", help="also write per-image and mean figures to FILE (JSON)")
    from refseg.metrics_volume import add_arguments as add_volume_eval_arguments
    add_volume_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what is available: torch, CUDA, triton, ONNX Runtime, TensorRT, caches")
    p.set_defaults(func=_cmd_info)


def _add_presets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the configuration presets with their stages and default models")
    p.set_defaults(func=_cmd_presets)


def _cmd_presets(args: argparse.Namespace) -> int:
    from refseg.config import PRESETS
    from refseg.pipeline.methods import describe_presets

    for row in describe_presets(PRESETS):
        sys.stdout.write(f"{row['preset']:<9} method={row['method']:<8} dinov2={row['dinov2']}  sam={row['sam']}\n"
                         f"          {row['stages']}\n")
    return 0


def _config_from_args(args: argparse.Namespace):
    from refseg.config import SegmenterConfig

    explicit = {k: v for k, v in {
        "sam": args.sam, "dinov2": args.dinov2, "batch_size": args.batch_size,
        "image_size": args.image_size, "metric": args.metric, "precision": args.precision,
    }.items() if v is not None}
    config = SegmenterConfig.from_preset(args.preset, **explicit)
    return config.override_from_strings(args.overrides) if args.overrides else config


def _cmd_segment(args: argparse.Namespace) -> int:
    from refseg import volume_job
    from refseg.io import raster, writers
    from refseg.io.intensity import parse_window
    from refseg.models.build import check_model_names, resolve_model_checkpoints
    from refseg.runner import finish_run, plan_folder, run_folder, run_settings
    from refseg.segmenter import Segmenter, check_reference, reference_digest
    from refseg.slide_cli import cmd_segment as segment_slides, wants_slides

    if wants_slides(args):  # slides in, or a slide / GeoJSON reference (refseg.slide_cli)
        return segment_slides(args, _config_from_args(args))
    if len(args.reference) != len(args.reference_mask):
        raise ValueError("give one -m/--reference-mask per -r/--reference")
    config = _config_from_args(args)
    if volume_job.is_volume_job(args):
        return volume_job.run(args, config)
    window = parse_window(args.window) if args.window else None
    # Everything about the references is checked before any model is loaded; the images stay as read,
    # so that the Segmenter derives the intensity window of 16-bit / float references itself.
    references = []
    for img, msk in zip(args.reference, args.reference_mask):
        image = raster.read_image(img)
        references.append((image, check_reference(image, raster.read_mask(msk), msk, window)[1], msk))
    inputs = raster.list_images(args.input)
    outdir = writers.prepare_output_folder(args.output)  # a file / uncreatable / unwritable -o stops here
    settings = run_settings(config, [reference_digest(img, msk) for img, msk, _ in references],
                            args.sam_checkpoint, args.dinov2_checkpoint, args.backend)
    settings["window"] = args.window  # an explicit window changes the masks too
    plan = plan_folder(inputs, outdir, args.resume, args.force, settings)
    plan.summary.config = config.to_dict()
    if not plan.todo:  # nothing left: no model is loaded
        log.info("nothing to do: all %d inputs are done or failed before reading", len(inputs))
        summary = finish_run(plan)
        return 1 if summary.failed or summary.write_error else 0
    # Both checkpoints are located (every missing one in one message) and the names given with
    # --dinov2/--sam checked against them, still before any model is loaded.
    dinov2_checkpoint, sam_checkpoint = args.dinov2_checkpoint, args.sam_checkpoint
    if args.engine_dir is None or dinov2_checkpoint or sam_checkpoint:
        dinov2_path, sam_path = resolve_model_checkpoints(config.dinov2, config.sam, dinov2_checkpoint,
                                                          sam_checkpoint)
        check_model_names(args.dinov2 if dinov2_checkpoint else None, args.sam if sam_checkpoint else None,
                          dinov2_path, sam_path)
    if args.ray is not None:
        return _segment_on_ray(args, config, references, plan, window)
    segmenter = Segmenter(config, sam_checkpoint=sam_checkpoint, dinov2_checkpoint=dinov2_checkpoint,
                          device=args.device, backend=args.backend, engine_dir=args.engine_dir,
                          compile=args.compile)
    segmenter.set_window(window)
    for image, mask, source in references:
        segmenter.add_reference(image, mask, source=source)
    summary = run_folder(segmenter, inputs, outdir, save_prompts=args.save_prompts,
                         overlay=args.overlay, plan=plan, progress=args.progress)
    return 1 if summary.failed or summary.write_error else 0


def _segment_on_ray(args: argparse.Namespace, config, references, plan, window) -> int:
    from refseg.distributed import WorkerSpec, segment_dataset

    spec = WorkerSpec(config, sam_checkpoint=args.sam_checkpoint, dinov2_checkpoint=args.dinov2_checkpoint,
                      device=args.device, backend=args.backend, engine_dir=args.engine_dir, window=window)
    summary = segment_dataset(None, plan.outdir, references, spec, plan=plan,
                              address=None if args.ray == "local" else args.ray,
                              num_workers=args.ray_workers, gpus_per_worker=args.gpus_per_worker,
                              save_prompts=args.save_prompts, overlay=args.overlay)
    return 1 if summary.failed or summary.write_error else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from refseg.metrics import evaluate_folders
    from refseg.metrics_volume import is_volume_eval, run_volume_eval

    if is_volume_eval(args):
        return run_volume_eval(args)
    report = evaluate_folders(args.pred, args.gt, threshold=args.threshold, pair_by=args.pair_by)
    sys.stdout.write(report.format_table() + "\n")
    if args.json:
        from refseg.io.writers import write_json

        write_json(args.json, report.to_dict())
    if report.n_paired == 0:
        log.error("no ground-truth mask of %s could be scored against a prediction of %s (%d missing, %d "
                  "errors); check the folders and --pair-by", args.gt, args.pred, len(report.missing),
                  len(report.errors))
        return 1
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from refseg.runtime.environment import describe

    sys.stdout.write(describe() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refseg", description="One-shot reference-guided segmentation "
                                     "(DINOv2 matching + SAM prompting), training-free.")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="debug messages too (default: info)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_eval(sub)
    _add_info(sub)
    _add_presets(sub)
    for module in ("refseg.export.cli", "refseg.bench_cli", "refseg.outlines_cli"):
        try:
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        except ImportError as exc:
            if exc.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # info by default (progress lines), -q warnings only, -v/-vv debug
    level = logging.WARNING if args.quiet else logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("PIL").setLevel(max(level, logging.WARNING))  # no PNG chunk / plugin debug lines
    start = time.perf_counter()
    try:
        code = args.func(args)
    except (ValueError, OSError) as exc:  # CheckpointError, ImageReadError, config errors ...
        log.error("%s", exc)
        return 2
    log.debug("done in %.2f s", time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
