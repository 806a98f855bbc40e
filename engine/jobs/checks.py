"""Checks a job makes before any model loads: flags that fit the mode, extras installed, output usable
(slice ranges: :func:`refseg.io.volume.slice_range`). Each raises ``ValueError`` (or
:class:`refseg.optional.MissingDependencyError`) with one message naming the flag, file or package; the CLI
turns both into exit code 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from refseg.optional import require

MODE_WORDS = {"folder": "a folder or file of 2-D images", "volume": "volumes (NIfTI / DICOM)",
              "slide": "whole-slide images"}

# flag -> (argparse dest, modes that honour it). Options with a default other than None/False are listed
# by their dest only when the CLI gives them a None default (the jobs apply the documented default).
FLAG_MODES: dict[str, tuple[str, tuple[str, ...]]] = {
    "--save-prompts": ("save_prompts", ("folder",)),
    "--overlay": ("overlay", ("folder", "slide")),  # slides always write <stem>_overlay.png
    "--window": ("window", ("folder", "volume")),
    "--label": ("label", ("volume",)),
    "--axis": ("axis", ("volume",)),
    "--slices": ("slices", ("volume",)),
    "--reference-slices": ("reference_slices", ("volume",)),
    "--pool-references": ("pool_references", ("volume",)),
    "--reference-chunks": ("reference_chunks", ("volume",)),
    "--series": ("series", ("volume",)),
    "--pair-by": ("pair_by", ("volume",)),
    "--propagate": ("propagate", ("volume",)),
    "--anchors": ("anchors", ("volume",)),
    "--max-area-ratio": ("max_area_ratio", ("volume",)),
    "--sam-image-size": ("sam_image_size", ("volume",)),
    # slide references (--region, --level, --mpp, --slide-reader) also serve folder jobs
    "--region": ("region", ("folder", "slide")),
    "--level": ("level", ("folder", "slide")),
    "--mpp": ("mpp", ("folder", "slide")),
    "--slide-reader": ("slide_reader", ("folder", "slide")),
    "--tile-size": ("tile_size", ("slide",)),
    "--overlap": ("overlap", ("slide",)),
    "--min-tissue": ("min_tissue", ("slide",)),
    "--no-tissue-detection": ("no_tissue_detection", ("slide",)),
    "--thumbnail-size": ("thumbnail_size", ("slide",)),
    "--preview-size": ("preview_size", ("slide",)),
    "--simplify": ("simplify", ("slide",)),
    "--class-name": ("class_name", ("slide",)),
    "--keep-tiles": ("keep_tiles", ("slide",)),
}


def given(args: argparse.Namespace, dest: str) -> bool:
    """True when the option was given (its value is not the parser's None / False / [] default)."""
    value = getattr(args, dest, None)
    return value is not None and value is not False and value != []


def check_flags(args: argparse.Namespace, mode: str) -> None:
    """Refuse every option the ``mode`` would not honour, naming it and the mode, and options that need
    another one (``--force`` without ``--resume``, ``--ray-workers`` without ``--ray``)."""
    wrong = [flag for flag, (dest, modes) in FLAG_MODES.items() if mode not in modes and given(args, dest)]
    if wrong:
        raise ValueError(f"{' '.join(wrong)}: not used for {MODE_WORDS[mode]} (-i {args.input}); remove "
                         f"{'it' if len(wrong) == 1 else 'them'}")
    if args.force and not args.resume:
        raise ValueError("--force goes with --resume (recompute outputs written under other settings); "
                         "without --resume every input is computed anyway")
    if args.ray is None and (given(args, "ray_workers") or given(args, "gpus_per_worker")):
        raise ValueError("--ray-workers / --gpus-per-worker go with --ray")
    if not given(args, "propagate"):
        alone = [flag for flag in PROPAGATE_FLAGS if given(args, FLAG_MODES[flag][0])]
        if alone:
            raise ValueError(f"{' '.join(alone)}: go{'es' if len(alone) == 1 else ''} with --propagate")


PROPAGATE_FLAGS = ("--anchors", "--max-area-ratio", "--sam-image-size")
"""Options of ``--propagate`` only."""


def check_propagation(args: argparse.Namespace, config) -> str | None:
    """``--propagate``: the options that fit it, and the SAM 2 checkpoint, before any model loads.

    Refused, naming the option: a per-slice SAM name (``--sam vit_b``), a SAM checkpoint of another family
    (the message names the SAM 2 models), a preset whose method is not ``match`` (the anchors' prompts are
    the match method's), and the options propagation does not use: ``--backend`` other than torch,
    ``--engine-dir``, ``--compile``, ``--precision`` other than fp32.

    Returns:
        The SAM 2 model name (``--sam``, read off ``--sam-checkpoint``, or the default ``sam2.1_hiera_t``).
    """
    from refseg.models.build import DEFAULT_SAM2, sam2_checkpoint_name
    from refseg.models.sam2 import SAM2_SPECS

    if args.sam is not None and args.sam not in SAM2_SPECS:
        raise ValueError(f"--sam {args.sam}: --propagate runs SAM 2 memory; name one of {', '.join(SAM2_SPECS)} "
                         f"(or give its --sam-checkpoint)")
    if config.method != "match":
        raise ValueError(f"--preset {args.preset}: its method {config.method!r} has no anchor prompts for "
                         f"--propagate; use a preset of the match method (sat, gbmseg)")
    unused = [flag for flag, value in (("--backend", args.backend not in (None, "torch")),
                                      ("--engine-dir", args.engine_dir is not None), ("--compile", args.compile),
                                      ("--precision", args.precision not in (None, "fp32"))) if value]
    if unused:
        raise ValueError(f"{' '.join(unused)}: not used by --propagate (SAM 2 memory and the matching run "
                         f"with torch in fp32); remove {'it' if len(unused) == 1 else 'them'}")
    if args.sam_checkpoint is not None:
        return sam2_checkpoint_name(args.sam_checkpoint, args.sam)
    return args.sam or DEFAULT_SAM2


def require_extras(mode: str, args: argparse.Namespace, dicom: bool = False) -> None:
    """Import every optional package the run will need, before any model loads: nibabel (and pydicom for
    DICOM series) for volumes, tifffile for slides and what their GeoJSON outlines need (OpenCV, rasterio,
    shapely >= 2.1: :func:`refseg.io.outlines.require_outlines`), ray for ``--ray``."""
    if mode == "volume":
        require("nibabel", "io", "Volumes (NIfTI)")
        if dicom:
            require("pydicom", "io", "DICOM series")
    if mode == "slide":
        require("tifffile", "slides", "Whole-slide outputs (pyramidal OME-TIFF)")
        from refseg.io.outlines import require_outlines

        require_outlines()
    if args.ray is not None:
        from refseg.jobs.ray_pool import require_ray

        require_ray()


def output_file(path: Path, suffixes: Sequence[str]) -> Path:
    """Check that ``path`` can be written as an output file (its folder created and writable, the path not
    a folder), before any model work. Returns the path."""
    from refseg.io.writers import prepare_output_folder

    path = Path(path)
    if not path.name.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{path}: an output file must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name ending in {' or '.join(suffixes)}")
    try:
        prepare_output_folder(path.parent)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot write the output here: {exc}") from None
    return path
