"""``refseg segment``: its arguments (every mode's options on one parser) and the hand-over to the jobs.

The job is chosen from ``-i`` / ``-r`` (:func:`refseg.jobs.job_for`): 2-D images, volumes or slides. An
option that the chosen mode would not use is refused with a message naming it (exit 2); mode options have
no parser default, the jobs apply the defaults named in their help.
"""
from __future__ import annotations

import argparse


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--reference", required=True, action="append",
                   help="reference image, slide or volume (repeat -r/-m for n-shot)")
    p.add_argument("-m", "--reference-mask", required=True, action="append",
                   help="reference mask: 0 = background, non-zero = foreground (several values = classes); a "
                        "label volume, a folder of per-slice PNG masks or a GeoJSON file")
    p.add_argument("-i", "--input", required=True, help="image, folder of images, volume, folder of volumes, "
                   "slide or folder of slides")
    p.add_argument("-o", "--output", required=True, help="output folder (a single volume: OUT.nii.gz)")
    p.add_argument("--preset", default="sat", help="configuration preset: sat, sat-v3, gbmseg, protosam, topk, "
                   "matcher, persam (`refseg presets` lists their stages and models)")
    p.add_argument("--sam", help="SAM model name: vit_b, vit_l, vit_h, medsam, or SAM 2: sam2.1_hiera_t|s|b+|l, "
                   "sam2_hiera_t|s|b+|l, medsam2 (`refseg presets` lists them; --propagate needs SAM 2); default: "
                   "preset's. A SAM 2 file given to --sam-checkpoint is recognised from its keys")
    p.add_argument("--dinov2", help="DINOv2 model name (vits14 ... vitg14_reg); default: preset's")
    p.add_argument("--dinov3", help="DINOv3 model name (vits16 ... vith16plus): match with DINOv3 (gated weights, "
                   "looked up in $REFSEG_CHECKPOINT_DIR / ~/.cache/refseg, never downloaded)")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint file (official format)")
    p.add_argument("--dinov2-checkpoint", help="DINOv2 checkpoint file (official format)")
    p.add_argument("--dinov3-checkpoint", help="DINOv3 checkpoint: an official .pth or a Hugging Face folder "
                   "(config.json + model.safetensors); matches with DINOv3, model inferred from it, the preset's "
                   "image side rounded to a multiple of 16 unless --image-size")
    p.add_argument("-d", "--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", default="torch", help="torch (default), onnxruntime, tensorrt, auto")
    p.add_argument("--engine-dir", help="folder written by `refseg export` (exported backends)")
    p.add_argument("--batch-size", type=int, help="items (images, slices, tiles) per model call; default: the "
                   "preset's, 1 for slides on a CPU")
    p.add_argument("--image-size", type=int, help="matching-encoder input side S (a multiple of 14 for DINOv2, "
                   "16 for DINOv3)")
    p.add_argument("--metric", choices=["cosine", "euclidean"], help="feature matching metric")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "auto"],
                   help="encoder precision (auto: bf16 on CUDA with bf16, else fp16 there; fp32 on CPUs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both encoders (CUDA graphs on CUDA; pays off on long runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any SegmenterConfig field (repeatable)")
    p.add_argument("--resume", action="store_true", help="skip inputs whose outputs are already written "
                   "(refused if they were written with other settings)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: recompute everything when the settings differ")
    p.add_argument("--progress", choices=["auto", "bar", "log", "off"], default="auto",
                   help="progress per image / slice / tile: bar on a terminal, INFO log lines otherwise (auto)")
    g = p.add_argument_group("Ray (any mode)")
    g.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="segment on a pool of Ray actors: a local cluster, or ADDRESS ('auto', 'ray://host:10001')")
    g.add_argument("--ray-workers", type=int, help="segmentation actors (default: one per GPU, else 1)")
    g.add_argument("--gpus-per-worker", type=float, help="GPUs reserved by each Ray actor (default 0: CPU actors)")


def _add_images(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("2-D images")
    g.add_argument("--save-prompts", action="store_true", help="write <stem>.json with prompts/scores")
    g.add_argument("--overlay", action="store_true", help="write <stem>_overlay.png (slides always write one)")
    g.add_argument("--window", help="intensity window LEVEL,WIDTH in the file's units (e.g. 40,400) or a preset: "
                   "abdomen, liver, lung, bone, brain; default: the reference's own window (volumes: p0.5..p99.5 "
                   "of the reference volume); images and volumes")


def _add_volumes(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("volumes (NIfTI files, DICOM series folders)")
    g.add_argument("--label", type=int, nargs="+", help="label values of the reference label map to segment, "
                   "written with these values (default: all present); one prompt set per label")
    g.add_argument("--axis", type=int, choices=(0, 1, 2), help="slicing axis of the RAS+ canonical orientation: "
                   "0 sagittal, 1 coronal, 2 axial (default)")
    g.add_argument("--slices", help="target slices A:B along --axis (Python range, canonical order)")
    g.add_argument("--reference-slices", help="comma-separated reference slice indices to use "
                   "(default: every slice holding the label)")
    g.add_argument("--pool-references", action="store_true", help="use every labelled reference slice at once "
                   "(n-shot) instead of the slice of matching relative position")
    g.add_argument("--reference-chunks", type=int, help="chunks of the relative-position choice (ProtoSAM "
                   "protocol; default 3)")
    g.add_argument("--series", help="SeriesInstanceUID to read when a DICOM folder holds several")
    g.add_argument("--pair-by", choices=["stem", "order"], help="per-slice PNG masks of a DICOM series: by file "
                   "stem (default) or the i-th mask by name for the i-th file by InstanceNumber")
    g = p.add_argument_group("volumes with SAM 2 memory (docs/propagate.md)")
    g.add_argument("--propagate", action="store_true", help="prompt a few anchor slices per label from the "
                   "matching, then propagate through the label's extent with SAM 2 memory (--sam / "
                   "--sam-checkpoint: a SAM 2, SAM 2.1 or MedSAM2 model; default sam2.1_hiera_t)")
    g.add_argument("--anchors", type=int, help="anchor slices per label, spread over its extent (default 3; "
                   "same-volume mode: the labelled slices)")
    g.add_argument("--max-area-ratio", type=float, help="drop (and report) a propagated mask larger than this "
                   "multiple of the label's largest reference area (default 2.0)")
    g.add_argument("--sam-image-size", type=int, help="SAM 2 input side, a multiple of 32 (default: the "
                   "model's, 1024; MedSAM2 512)")


def _add_slides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("whole-slide images")
    g.add_argument("--slide", action="store_true", help="read -i (and slide-suffixed -r) as slides even when a "
                   ".tif looks like a plain image")
    g.add_argument("--region", action="append", default=[], metavar="X,Y,W,H",
                   help="reference region of the matching -r, level-0 pixels (repeat per -r)")
    res = g.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, help="pyramid level to process (0 = full resolution)")
    res.add_argument("--mpp", type=float, help="microns per pixel to process at (nearest level, resampled)")
    g.add_argument("--tile-size", type=int, help="tile side in pixels (default: image_size rounded to 16)")
    g.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles (default: ~1/8 tile)")
    g.add_argument("--min-tissue", type=float, help="tissue share of a tile needed to run it (default 0.01)")
    g.add_argument("--no-tissue-detection", action="store_true", help="segment every tile")
    g.add_argument("--thumbnail-size", type=int, help="tissue-detection thumbnail side, px (default 2048)")
    g.add_argument("--preview-size", type=int, help="overlay preview side, px (default 2048)")
    g.add_argument("--simplify", type=float, help="GeoJSON polygon tolerance, level-0 px (default: one "
                   "processing pixel; 0 = exact pixel outlines)")
    g.add_argument("--class-name", action="append", default=[], help="QuPath class name of label 1, 2, ...")
    g.add_argument("--slide-reader", choices=["auto", "tifffile", "openslide"], help="default: auto")
    g.add_argument("--keep-tiles", action="store_true", help="keep OUTDIR/<stem>.tiles after a complete run")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``refseg segment``."""
    p = sub.add_parser("segment", help="segment images, volumes or slides from labelled references",
                       description="Segment every image / volume / slide of INPUT like the labelled reference.")
    _add_common(p)
    _add_images(p)
    _add_volumes(p)
    _add_slides(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from refseg.jobs import run_segment

    return run_segment(args)
