"""The ``refseg`` command line: ``segment``, ``eval``, ``info`` (and ``export``/``bench`` when present).

Exit codes: 0 success, 1 some inputs failed (the others were written), 2 bad arguments or a
reference that cannot be used (nothing was run).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

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
    p.add_argument("--preset", default="sat", help="configuration preset (sat, gbmseg)")
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
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="encoder precision")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any SegmenterConfig field (repeatable)")
    p.add_argument("--save-prompts", action="store_true", help="write <stem>.json with prompts/scores")
    p.add_argument("--overlay", action="store_true", help="write <stem>_overlay.png")
    p.add_argument("--resume", action="store_true", help="skip inputs whose mask is already written")
    from refseg.slide_cli import add_arguments as add_slide_arguments

    add_slide_arguments(p)
    p.set_defaults(func=_cmd_segment)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="Dice/IoU of predicted masks against ground truth")
    p.add_argument("-p", "--pred", required=True, help="folder of predicted masks (<stem>.png)")
    p.add_argument("-g", "--gt", required=True, help="folder of ground-truth masks (same stems)")
    p.add_argument("--threshold", type=int, default=128, help="binarise ground truth at >= this value")
    p.set_defaults(func=_cmd_eval)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what is available: torch, CUDA, triton, ONNX Runtime, TensorRT, caches")
    p.set_defaults(func=_cmd_info)


def _config_from_args(args: argparse.Namespace):
    from refseg.config import SegmenterConfig

    explicit = {k: v for k, v in {
        "sam": args.sam, "dinov2": args.dinov2, "batch_size": args.batch_size,
        "image_size": args.image_size, "metric": args.metric, "precision": args.precision,
    }.items() if v is not None}
    config = SegmenterConfig.from_preset(args.preset, **explicit)
    return config.override_from_strings(args.overrides) if args.overrides else config


def _cmd_segment(args: argparse.Namespace) -> int:
    from refseg.io import raster
    from refseg.runner import run_folder
    from refseg.segmenter import Segmenter, check_reference
    from refseg.slide_cli import cmd_segment as segment_slides, wants_slides

    if wants_slides(args):  # slides in, or a slide / GeoJSON reference (refseg.slide_cli)
        return segment_slides(args, _config_from_args(args))
    if len(args.reference) != len(args.reference_mask):
        raise ValueError("give one -m/--reference-mask per -r/--reference")
    config = _config_from_args(args)
    # Everything about the references is checked before any model is loaded.
    references = [(*check_reference(raster.read_image(img), raster.read_mask(msk), msk), msk)
                  for img, msk in zip(args.reference, args.reference_mask)]
    inputs = raster.list_images(args.input)
    segmenter = Segmenter(config, sam_checkpoint=args.sam_checkpoint,
                          dinov2_checkpoint=args.dinov2_checkpoint, device=args.device,
                          backend=args.backend, engine_dir=args.engine_dir)
    for image, mask, source in references:
        segmenter.add_reference(image, mask, source=source)
    summary = run_folder(segmenter, inputs, Path(args.output), save_prompts=args.save_prompts,
                         overlay=args.overlay, resume=args.resume)
    return 1 if summary.failed else 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from refseg.metrics import evaluate_folders

    report = evaluate_folders(args.pred, args.gt, threshold=args.threshold)
    sys.stdout.write(report.format_table() + "\n")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from refseg.runtime.environment import describe

    sys.stdout.write(describe() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refseg", description="One-shot reference-guided segmentation "
                                     "(DINOv2 matching + SAM prompting), training-free.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment(sub)
    _add_eval(sub)
    _add_info(sub)
    for module in ("refseg.export.cli", "refseg.bench_cli"):
        try:
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        except ImportError as exc:
            if exc.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)  # info by default for progress lines
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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
