"""``refseg export``: write the ONNX graphs (and optionally TensorRT engines) of a model pair.

    refseg export --dinov2-checkpoint dinov2_vitb14_pretrain.pth \\
                  --sam-checkpoint sam_vit_b_01ec64.pth -o exports/b_b --precision fp16 \\
                  --format onnx,tensorrt
    refseg export --dinov3-checkpoint dinov3-vitb16-pretrain-lvd1689m/ --sam-checkpoint sam_vit_b_01ec64.pth \\
                  -o exports/v3_b          # DINOv3 graph at 512 (the manifest records encoder + patch size)
    refseg export --dinov3-checkpoint dinov3-vitb16-pretrain-lvd1689m/ --sam-checkpoint sam_vit_b_01ec64.pth \
                  --format aoti -o exports/v3_aoti   # C++ packages + the positional basis (positional_basis.f32)

Exit codes: 0 written; 2 bad arguments, unusable checkpoints, or TensorRT requested where it
cannot run (the ONNX graphs are written first and stay valid).
"""
from __future__ import annotations

import argparse
import logging
import sys

from refseg.config import ENCODER_PATCH_SIZE, FEATURE_DEBIAS

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt", "aoti")


def _formats(text: str) -> tuple[str, ...]:
    items = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = [f for f in items if f not in FORMATS]
    if "aoti" in items and len(items) > 1:
        raise argparse.ArgumentTypeError("--format aoti writes a folder of its own; export onnx/tensorrt separately")
    if bad or not items:
        raise argparse.ArgumentTypeError(f"--format takes a comma list of {', '.join(FORMATS)}, "
                                         f"got {text!r}")
    return items


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export`` on the ``refseg`` command's subparsers."""
    p = subparsers.add_parser(
        "export", help="export DINOv2 or DINOv3 + SAM to ONNX (and TensorRT engines)",
        description="Export DINOv2 (or DINOv3), the SAM image encoder and the SAM prompt decoder to ONNX "
                    "(opset >= 17, dynamic batch / prompt sets / points) with a manifest; "
                    "optionally build TensorRT engines into the engine cache.")
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--dinov2-checkpoint", help="official DINOv2 checkpoint (default: --dinov2's file)")
    enc.add_argument("--dinov3-checkpoint", help="DINOv3 encoder instead: an official .pth or a Hugging Face "
                     "folder (config.json + model.safetensors); model inferred from it")
    p.add_argument("--sam-checkpoint", help="official SAM checkpoint (default: --sam's file)")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--dinov2", help="DINOv2 model name when no checkpoint is given (vitb14 ...)")
    names.add_argument("--dinov3", help="DINOv3 model name (vitb16 ...): its gated file or folder is looked up in "
                       "$REFSEG_CHECKPOINT_DIR / ~/.cache/refseg, never downloaded")
    p.add_argument("--sam", help="SAM model name when no checkpoint is given (vit_b ..., sam2.1_hiera_t ...); a "
                   "SAM 2 checkpoint gives SAM 2's graphs")
    p.add_argument("--sam-image-size", type=int, help="SAM 2's input side (multiple of 32; default the model's)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="encoder precision baked into the graphs (LayerNorm/Softmax stay fp32)")
    p.add_argument("--format", type=_formats, default=("onnx",), dest="formats",
                   help="onnx (default), onnx,tensorrt, or aoti (AOTInductor packages for the C++ core)")
    p.add_argument("--image-size", type=int, help="encoder input side: a multiple of its patch size (default 518 "
                   "for DINOv2, 512 for DINOv3)")
    p.add_argument("--feature-debias", choices=FEATURE_DEBIAS, default="auto",
                   help="positional projection the export records (auto: project for DINOv3, none for DINOv2); "
                        "project writes the basis the C++ pipeline applies (docs/dinov3.md)")
    p.add_argument("--debias-rank", type=int, help="rank of that basis (default: SegmenterConfig.debias_rank, 20)")
    p.add_argument("--max-batch", type=int, default=16, help="largest encoder batch (TensorRT profiles)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("-d", "--device", default="cpu",
                   help="device to trace on (cuda is faster for the large encoders; TensorRT "
                        "engines are built on cuda, or cuda:0 when this is cpu)")
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``refseg export``; returns the exit code."""
    from refseg.optional import MissingDependencyError, require

    dinov3 = args.dinov3_checkpoint is not None or args.dinov3 is not None
    if args.dinov3_checkpoint is not None and args.dinov2 is not None:
        log.error("--dinov2 names a DINOv2 model, --dinov3-checkpoint a DINOv3 one: give one encoder")
        return 2
    if args.dinov2_checkpoint is not None and args.dinov3 is not None:
        log.error("--dinov3 names a DINOv3 model, --dinov2-checkpoint a DINOv2 one: give one encoder")
        return 2
    if args.debias_rank is not None and args.debias_rank < 1:
        log.error("--debias-rank %d: the positional basis needs a rank >= 1", args.debias_rank)
        return 2
    if args.image_size is None:
        from refseg.config import SegmenterConfig

        args.image_size = SegmenterConfig().with_encoder("dinov3" if dinov3 else "dinov2").image_size
    patch = ENCODER_PATCH_SIZE["dinov3" if dinov3 else "dinov2"]
    if args.image_size <= 0 or args.image_size % patch:
        log.error("--image-size %d is not a positive multiple of the %s patch size %d (e.g. %s)", args.image_size,
                  "DINOv3" if dinov3 else "DINOv2", patch, "512, 448" if dinov3 else "518, 560")
        return 2
    if "aoti" in args.formats:  # AOTInductor packages for the C++ core
        from refseg.export.aoti import run_from_args
        return run_from_args(args)
    try:
        require("onnx", "onnx", "refseg export")
    except MissingDependencyError as exc:
        log.error("%s", exc)
        return 2
    from refseg.export.onnx_export import export_models

    manifest = export_models(args.output, args.dinov2_checkpoint, args.sam_checkpoint,
                             dinov2=args.dinov2, sam=args.sam, precision=args.precision,
                             image_size=args.image_size, max_batch=args.max_batch, opset=args.opset,
                             device=args.device, encoder="dinov3" if dinov3 else "dinov2",
                             dinov3_checkpoint=args.dinov3_checkpoint, dinov3=args.dinov3,
                             sam_image_size=args.sam_image_size, feature_debias=args.feature_debias,
                             debias_rank=args.debias_rank)
    for key, graph in manifest["graphs"].items():
        sys.stdout.write(f"{key}: {', '.join(graph['files'])} ({graph['precision']})\n")
    if "tensorrt" in args.formats:
        return _build_engines(args, manifest)
    return 0


def _build_engines(args: argparse.Namespace, manifest: dict) -> int:
    from pathlib import Path

    import torch

    from refseg.config import SegmenterConfig
    from refseg.runtime.exported import TensorRTBackend

    if not torch.cuda.is_available():
        log.error("--format tensorrt needs a CUDA GPU; the ONNX graphs in %s are written", args.output)
        return 2
    device = torch.device(args.device if args.device.startswith("cuda") else "cuda:0")
    encoder = manifest.get("encoder", "dinov2")
    config = SegmenterConfig(precision=manifest["precision"], image_size=manifest["image_size"], encoder=encoder)
    try:
        backend = TensorRTBackend(Path(args.output), config, device, manifest)
    except (ImportError, RuntimeError, ValueError) as exc:
        log.error("TensorRT engines not built: %s (the ONNX graphs in %s are written)", exc, args.output)
        return 2
    for graph, runner in backend.runners.items():
        sys.stdout.write(f"{graph}: TensorRT engine ready ({len(runner.ranges)} profiles)\n")
    return 0
