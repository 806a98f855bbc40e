"""Peak host memory of ``refseg segment --propagate`` on a 512 x 512 CT volume (CPU, random weights).

    python bench/propagate_memory.py --sam sam2.1_hiera_t --slices 8 16 --extrapolate 300

Each (model, slice count) runs the whole job (``refseg.cli.main``: reading, planning, the matching probes
with DINOv2, anchors, SAM 2 propagation both ways, writing the NIfTI) in a fresh subprocess and reports its
peak resident memory (``VmHWM``, :func:`video_memory.peak_mib`). The volume: the TotalSegmentator sample CT
and its label map resized in-plane to 512 x 512 (bilinear / nearest), its slices repeated to ``--slices``;
the reference is the same data under another file name (cross-volume mode, every slice a candidate), label
5 (liver), ``--max-area-ratio 1000`` so that no pass stops early on random weights. Random official-format
checkpoints (SAM 2 model as named, DINOv2 of the ``sat`` preset, ViT-B/14 at 518), written once by the parent.

Per run it prints one JSON line (peak MiB, slices visited by SAM 2, probes, seconds); per model one line
with the peak for ``--extrapolate`` slices: the largest measured peak plus, per further slice, the larger of
the measured growth per slice (first and last slice count) and what a slice adds for good, counted from the
shapes: its SAM 2 memory-bank entry per label (769 KiB at a 1024 input, ``bank_kib_per_frame`` of
:mod:`video_memory`), the target's and the reference's int16 voxels (the canonical arrays are views), the
reference label map's int64 voxels twice (as read and its canonical copy) and the uint8 output twice (the
array and the copy written). Measure with a fixed ``--batch-size`` below 16 to separate that growth from the
DINOv2 batch of the probes, which grows with the slice count up to the preset's batch (16 slices) and then
stays.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from video_memory import DATA, peak_mib  # noqa: E402

LABEL = 5
BANK_KIB_PER_SLICE_1024 = 769.0
"""SAM 2 memory-bank entry per visited slice and label at a 1024 input (measured by video_memory.py)."""


def write_volume(folder: Path, slices: int, side: int = 512) -> tuple[Path, Path, Path]:
    """(target CT, reference CT, reference labels) NIfTI files of (side, side, slices), int16 / uint8."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    ct_img = nib.load(str(DATA))
    labels_img = nib.load(str(DATA.with_name("example_seg.nii.gz")))
    planes = []
    for img, mode in ((ct_img, "bilinear"), (labels_img, "nearest")):
        data = torch.from_numpy(np.asanyarray(img.dataobj).astype(np.float32)).permute(2, 0, 1)[:, None]
        big = F.interpolate(data, size=(side, side), mode=mode)[:, 0].round()
        order = [k % big.shape[0] for k in range(slices)]
        planes.append(big[order].permute(1, 2, 0).numpy())
    affine = ct_img.affine.copy()
    affine[:3, :3] = ct_img.affine[:3, :3] @ np.diag([ct_img.shape[0] / side, ct_img.shape[1] / side, 1.0])
    paths = (folder / "target.nii.gz", folder / "reference.nii.gz", folder / "labels.nii.gz")
    for path, data, dtype in zip(paths, (planes[0], planes[0], planes[1]), (np.int16, np.int16, np.uint8)):
        nib.Nifti1Image(data.astype(dtype), affine).to_filename(str(path))
    return paths


def child(folder: str, sam: str, threads: int, batch_size: int | None) -> dict:
    import torch

    from refseg.cli import main

    torch.set_num_threads(threads)
    files = json.loads((Path(folder) / "files.json").read_text())
    out = Path(folder) / "out.nii.gz"
    before = peak_mib()
    start = time.perf_counter()
    code = main(["-q", "segment", "-r", files["reference"], "-m", files["labels"], "-i", files["target"],
                 "-o", str(out), "--label", str(LABEL), "--propagate", "--sam", sam, "--sam-checkpoint", files["sam"],
                 "--dinov2-checkpoint", files["dinov2"], "-d", "cpu", "--max-area-ratio", "1000",
                 "--progress", "off", *(["--batch-size", str(batch_size)] if batch_size else [])])
    seconds = time.perf_counter() - start
    record = json.loads(out.with_name("out.summary.json").read_text())["volumes"][0]
    return {"sam": sam, "batch_size": batch_size, "exit": code, "slices": record["slices_segmented"],
            "peak_mib_imports": before,
            "peak_mib": peak_mib(), "slices_tracked": record["propagation"]["slices_tracked"],
            "probed": len(record["propagation"]["probed_slices"]),
            "label": record["propagation"]["labels"].get(str(LABEL)), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sam", nargs="+", default=["sam2.1_hiera_t"])
    parser.add_argument("--slices", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--extrapolate", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="slices per DINOv2 call of the probes (default: the "
                        "preset's 16; the probes of up to 16 slices are one batch, so a fixed smaller batch "
                        "separates what grows with the slice count from the batch's activations)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.threads, args.batch_size)))
        return
    from refseg.testing.random_checkpoints import write_random_checkpoints

    root = tempfile.TemporaryDirectory()
    dinov2 = write_random_checkpoints(Path(root.name) / "dinov2", dinov2=["vitb14"], seed=0)[0]
    for sam in args.sam:
        checkpoint = write_random_checkpoints(Path(root.name) / sam, sam=[sam], seed=0)[0]
        runs = []
        for slices in args.slices:
            folder = Path(root.name) / f"{sam}-{slices}"
            folder.mkdir()
            target, reference, labels = write_volume(folder, slices)
            (folder / "files.json").write_text(json.dumps({
                "target": str(target), "reference": str(reference), "labels": str(labels),
                "sam": str(checkpoint), "dinov2": str(dinov2)}))
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), sam, "--threads",
                                  str(args.threads), *(["--batch-size", str(args.batch_size)] if args.batch_size
                                                       else [])], check=True, capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONWARNINGS="ignore"))
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
        largest = max(runs, key=lambda r: r["peak_mib"])
        voxels = 512 * 512 / 2 ** 20  # MiB per byte of a voxel, one slice
        counted = BANK_KIB_PER_SLICE_1024 / 1024 + voxels * (2 + 2 + 2 * 8 + 2 * 1)
        line = {"sam": sam, "counted_mib_per_slice": counted}
        per_slice = counted
        if len(runs) >= 2:
            (n0, p0), (n1, p1) = [(r["slices"], r["peak_mib"]) for r in (runs[0], runs[-1])]
            line["measured_mib_per_slice"] = (p1 - p0) / (n1 - n0)
            per_slice = max(counted, line["measured_mib_per_slice"])
        line.update(extrapolated_slices=args.extrapolate, extrapolated_peak_mib=largest["peak_mib"]
                    + per_slice * (args.extrapolate - largest["slices"]))
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
