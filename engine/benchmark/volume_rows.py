"""The volume rows of ``refseg bench --volume``: per-slice matching vs ``--propagate`` (SAM 2 memory) on the
sample CT, with slices/s, peak memory and per-structure volume Dice against the label map.

    refseg bench --volume -o OUT                                     # random weights: speed numbers only
    refseg bench --volume -o OUT --sam-checkpoint sam_vit_b_01ec64.pth --sam2-checkpoint sam2.1_hiera_tiny.pt \\
        --dinov2-checkpoint dinov2_vitb14_pretrain.pth -d cuda

Data: ``totalseg_ct/example_ct_sm.nii.gz`` and its labels ``example_seg.nii.gz`` in the bench data folder
(``--data``, ``$REFSEG_BENCH_DATA`` or ``shared/data`` beside the source checkout, as for the suite's other
data: :func:`refseg.benchmark.data.default_data_dir`). The reference is the sample's even axial slices with
their labels, the target its odd slices (another file of the same anatomy at twice the slice spacing:
cross-volume mode); ``slices`` ``"A:B"`` keeps canonical target slices A..B-1.

Both modes run what ``refseg segment`` runs (its own parser, then :func:`refseg.jobs.run_segment`: preset
``sat``, the same DINOv2 file and input side, the same labels, window and device); ``--propagate`` gets the
SAM 2 file, ``--max-area-ratio 2``. Per mode one row: the volume record's ``seconds`` and
``slices_per_second`` (the volume's wall time, models loaded before), the whole mode's wall and process CPU
seconds (model loading included), peak memory over the mode (:func:`refseg.benchmark.measure.peak_memory`:
CUDA's peak allocation, or the process RSS peak on a CPU; both modes run in one process, so the second
starts from what the first left resident) and the Dice of every structure over the segmented target slices
against the target's label map (the ``refseg eval`` code, :func:`refseg.eval.metrics_volume.evaluate_volume`;
``None`` where a structure is in neither). Checkpoints not given are found like the suite's
(``$REFSEG_CHECKPOINT_DIR``, cache) or written with random weights in the official format: then the Dice
figures are meaningless and the report says so.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

SECTION = "volume"
TITLE = "Volume: per-slice matching vs --propagate"
DATASET = "totalseg_ct"
FILES = ("example_ct_sm.nii.gz", "example_seg.nii.gz")
STRUCTURES = {1: "spleen", 5: "liver", 6: "stomach"}
"""Default labels of the TotalSegmentator sample (label value: structure)."""
WINDOW = "abdomen"
MODELS = {"sam": "vit_b", "sam2": "sam2.1_hiera_t", "dinov2": "vitb14"}
"""Models whose random weights are written when no checkpoint is given or found (per-slice SAM, SAM 2, DINOv2)."""
RANDOM_NOTE = ("**Random weights: the Dice figures are meaningless** (random features match nothing in "
               "particular); only the speeds mean something.")


def sample_folder(data_dir: str | os.PathLike | None = None) -> Path:
    """``DATA/totalseg_ct`` (``data_dir`` or :func:`~refseg.benchmark.data.default_data_dir`), checked.

    Raises:
        ValueError: the folder or one of :data:`FILES` is missing (names the path).
    """
    from .data import default_data_dir

    folder = (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / DATASET
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder}: no {', '.join(missing)} (the TotalSegmentator sample CT that --volume "
                         "segments); give the folder holding totalseg_ct/ with --data")
    return folder


def split_volume(sample: Path, folder: Path) -> tuple[Path, Path, Path, Path]:
    """Write (reference CT, reference labels, target CT, target labels) into ``folder``: the even and the odd
    slices (last array axis) of the sample, each with its affine (slice step doubled, origin shifted)."""
    import numpy as np

    from refseg.optional import require

    nib = require("nibabel", "io", "refseg bench --volume (NIfTI)")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for parity, role in ((0, "reference"), (1, "target")):
        for name in FILES:
            img = nib.load(str(sample / name))
            affine = img.affine.copy()
            affine[:3, 2] = img.affine[:3, 2] * 2
            affine[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, parity]) + img.affine[:3, 3]
            path = folder / f"{role}_{name.removeprefix('example_')}"
            data = np.asanyarray(img.dataobj)[..., parity::2]
            nib.Nifti1Image(data, affine, header=img.header).to_filename(str(path))
            out.append(path)
    return tuple(out)


def checkpoints(out: Path, sam=None, sam2=None, dinov2=None) -> tuple[dict[str, Path], dict[str, bool], dict, bool]:
    """The three checkpoint files: explicit ones as given (their models are recognised by ``refseg segment``),
    the others found or written with random weights (:class:`~refseg.benchmark.context.CheckpointStore`).

    Returns:
        (file per kind, whether the model name must be passed (store files), sources, random_weights).

    Raises:
        ValueError: an explicit file does not exist (names it).
    """
    from .context import CheckpointStore

    store = CheckpointStore(out / "checkpoints")
    files, named, sources = {}, {}, {}
    for kind, given in (("sam", sam), ("sam2", sam2), ("dinov2", dinov2)):
        if given is not None:
            files[kind] = Path(given).expanduser()
            if not files[kind].is_file():
                raise ValueError(f"--{kind}-checkpoint {files[kind]}: file does not exist")
            named[kind] = False
            sources[f"{kind}:{files[kind].name}"] = {"path": str(files[kind]), "source": "explicit"}
        else:
            files[kind], named[kind] = store.path(kind, MODELS[kind]), True
    return files, named, {**sources, **store.sources}, store.random_weights


def run_segment_argv(argv: list[str]) -> int:
    """Run ``refseg segment ARGV`` in this process (its own parser, then :func:`refseg.jobs.run_segment`);
    returns the exit code. Bad input raises ``ValueError`` as the job raises it."""
    from refseg.cli import build_parser
    from refseg.jobs import run_segment

    return run_segment(build_parser().parse_args(["segment", *argv]))


def measure_mode(mode: str, argv: list[str], out: Path, gt: Path, labels: list[int], slices: str | None,
                 device) -> dict:
    """One row: ``refseg segment ARGV -o OUT`` timed, its memory peak, its volume record and its Dice.

    Raises:
        RuntimeError: the segmentation exited non-zero (names the summary to read).
    """
    from refseg.eval.metrics_volume import evaluate_volume

    from .measure import peak_memory, synchronize

    wall, cpu = time.perf_counter(), time.process_time()
    with peak_memory(device) as memory:
        code = run_segment_argv([*argv, "-o", str(out)])
        synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    summary_path = out.with_name(out.name.replace(".nii.gz", ".summary.json"))
    if code != 0:
        raise RuntimeError(f"{mode}: refseg segment exited with {code}; see {summary_path}")
    summary = json.loads(summary_path.read_text())
    record = summary["volumes"][0]
    score = evaluate_volume(out, gt, labels, slices=slices)
    return {"section": SECTION, "label": f"volume {mode}", "mode": mode, "dataset": DATASET,
            "models": summary.get("models"), "slices": record["slices_segmented"], "seconds": record["seconds"],
            "slices_per_second": record["slices_per_second"], "wall_s": wall, "cpu_s": cpu,
            **memory.to_dict(), "dice": {str(c): score.dice.get(c) for c in labels},
            "output": str(out), "propagation": record.get("propagation")}


def run_volume_rows(out_dir: str | os.PathLike, device: str = "auto", sam_checkpoint=None, sam2_checkpoint=None,
                    dinov2_checkpoint=None, data_dir=None, labels: list[int] | None = None,
                    slices: str | None = None, image_size: int | None = None, sam2_image_size: int | None = None,
                    threads: int | None = None) -> dict:
    """Measure both modes and return the results dict (what ``results.json`` holds; rows of section
    :data:`SECTION`, written by :func:`refseg.benchmark.report.write_report`).

    Args:
        out_dir: output folder: ``data/`` (the split sample), ``checkpoints/`` (random files), the two label
            maps ``per_slice.nii.gz`` / ``propagate.nii.gz`` with their summaries.
        device: ``auto``, ``cpu``, ``cuda``, ...
        sam_checkpoint, sam2_checkpoint, dinov2_checkpoint: official-format files (per-slice SAM, SAM 2 of
            ``--propagate``, DINOv2 of both); missing ones are found or random (see the module doc).
        data_dir: folder holding ``totalseg_ct/``.
        labels: label values to segment and score (default :data:`STRUCTURES`).
        slices: canonical target slices ``"A:B"`` (default all 15).
        image_size: DINOv2 input side (default 518); sam2_image_size: SAM 2 input side (default the model's).
        threads: CPU threads for torch (default all cores).

    Raises:
        ValueError: missing data or checkpoint file, bad sizes or slices (before any model loads).
        RuntimeError: a mode's segmentation failed.
    """
    from refseg.io.volume import slice_range
    from refseg.runtime.torch_backend import resolve_device

    from .suite import compute_ratios, run_header, start_run

    wall = time.perf_counter()
    labels = list(labels or STRUCTURES)
    image_size = image_size or 518
    if image_size <= 0 or image_size % 14:
        raise ValueError(f"--image-size {image_size}: must be a positive multiple of 14")
    if sam2_image_size is not None and (sam2_image_size <= 0 or sam2_image_size % 32):
        raise ValueError(f"--sam2-image-size {sam2_image_size}: must be a positive multiple of 32")
    sample = sample_folder(data_dir)
    load_start = start_run(threads)
    dev = resolve_device(device)
    out = Path(out_dir)
    ref, ref_labels, target, target_labels = split_volume(sample, out / "data")
    slice_range(slices, _depth(target), str(target), "axis 2")  # a bad A:B is refused before any model loads
    files, named, sources, random = checkpoints(out, sam_checkpoint, sam2_checkpoint, dinov2_checkpoint)

    def model(kind: str, flag: str) -> list[str]:
        return [*([flag, MODELS[kind]] if named[kind] else []), f"--{'sam' if kind == 'sam2' else kind}-checkpoint",
                str(files[kind])]

    common = ["-r", str(ref), "-m", str(ref_labels), "-i", str(target), "--label", *map(str, labels),
              "--window", WINDOW, *model("dinov2", "--dinov2"), "--image-size", str(image_size), "-d", str(dev),
              "--progress", "off", *(["--slices", slices] if slices else [])]
    sam2_size = ["--sam-image-size", str(sam2_image_size)] if sam2_image_size else []
    rows = []
    for mode, argv, name in (
            ("per-slice matching", [*common, *model("sam", "--sam")], "per_slice.nii.gz"),
            ("--propagate", [*common, "--propagate", *model("sam2", "--sam"), "--max-area-ratio", "2", *sam2_size],
             "propagate.nii.gz")):
        log.info("volume row %s", mode)
        rows.append(measure_mode(mode, argv, out / name, target_labels, labels, slices, dev))
    per_slice, propagate = (r.get("models") or {} for r in rows)
    settings = (f"Reference: even slices of the sample CT, target: its odd slices{' ' + slices if slices else ''}"
                f"; preset sat, DINOv2 {per_slice.get('dinov2')} at {image_size}, per-slice SAM "
                f"{per_slice.get('sam')}, --propagate {propagate.get('sam')} at "
                f"{sam2_image_size or 'its own input side'}, window {WINDOW}, device {dev}; Dice over the "
                "segmented target slices.")
    return {**run_header(dev, load_start), "quick": False, "volume": True,
            "config": {"settings": settings, "labels": labels,
                       "structures": {str(c): STRUCTURES.get(c) for c in labels}, "slices": slices,
                       "image_size": image_size, "sam2_image_size": sam2_image_size, "window": WINDOW},
            "checkpoints": sources, "random_weights": random,
            "data": [{"name": DATASET, "source": str(sample), "reference": str(ref), "target": str(target)}],
            "rows": rows, "skipped_rows": [], "parity": {}, "ratios": compute_ratios(rows), "notes": [],
            "wall_s": time.perf_counter() - wall}


def _depth(path: Path) -> int:
    """Number of slices along the last axis of a NIfTI file (the split is written in RAS+ order)."""
    import nibabel as nib

    return int(nib.load(str(path)).shape[2])
