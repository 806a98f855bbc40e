"""Per-slice matching vs ``--propagate`` (SAM 2 memory) on the sample CT: slices/s and per-structure Dice.

    python bench/propagate_compare.py -o /tmp/propcmp                                # random weights (speed only)
    python bench/propagate_compare.py -o out --sam-checkpoint sam_vit_b_01ec64.pth \\
        --sam2-checkpoint sam2.1_hiera_tiny.pt --dinov2-checkpoint dinov2_vitb14_pretrain.pth -d cuda

The reference is the even axial slices of ``shared/data/totalseg_ct/example_ct_sm.nii.gz`` with their
labels (``example_seg.nii.gz``), the target the odd slices (another file of the same anatomy at twice the
slice spacing: cross-volume mode; ``--slices A:B`` keeps canonical target slices A..B-1). Both modes run
through the CLI (``refseg segment``, the same preset, DINOv2, image size, labels and window); per mode the
table gives the slices/s of the volume record (``slices_per_second``: the volume's wall time, models
loaded before) and the Dice of every structure over the whole target volume against its label map (the
``refseg eval`` code, :func:`refseg.eval.metrics_volume.evaluate_volume`). Without checkpoints random
official-format ones are written: then the Dice figures are meaningless (random features match nothing in
particular) and only the speeds mean something; the table says so. Writes ``OUT/results.md`` and
``OUT/results.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalseg_ct"
STRUCTURES = {1: "spleen", 5: "liver", 6: "stomach"}


def split_volume(folder: Path, data: Path = DATA) -> tuple[Path, Path, Path, Path]:
    """(reference CT, reference labels, target CT, target labels): the even / odd slices of the sample."""
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for parity in (0, 1):
        for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
            img = nib.load(str(data / name))
            affine = img.affine.copy()
            affine[:3, 2] = img.affine[:3, 2] * 2
            affine[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, parity]) + img.affine[:3, 3]
            path = folder / f"{'reference' if parity == 0 else 'target'}_{name.removeprefix('example_')}"
            nib.Nifti1Image(np.asanyarray(img.dataobj)[..., parity::2], affine, header=img.header).to_filename(
                str(path))
            out.append(path)
    return tuple(out)


def run_mode(name: str, argv: list[str], out: Path, gt: Path, labels: list[int]) -> dict:
    from refseg.cli import main
    from refseg.eval.metrics_volume import evaluate_volume

    code = main([*argv, "-o", str(out)])
    if code != 0:
        raise SystemExit(f"{name}: refseg segment exited with {code}")
    record = json.loads(out.with_name(out.name.replace(".nii.gz", ".summary.json")).read_text())["volumes"][0]
    score = evaluate_volume(out, gt, labels)
    return {"mode": name, "slices": record["slices_segmented"], "seconds": record["seconds"],
            "slices_per_second": record["slices_per_second"],
            "dice": {str(c): score.dice.get(c) for c in labels}}


def table(rows: list[dict], labels: list[int], settings: str, random: bool) -> str:
    head = ["mode", "slices", "s", "slices/s"] + [f"Dice {STRUCTURES.get(c, c)} ({c})" for c in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        dice = [("–" if r["dice"][str(c)] is None else f"{r['dice'][str(c)]:.3f}") for c in labels]
        lines.append(f"| {r['mode']} | {r['slices']} | {r['seconds']:.1f} | {r['slices_per_second']:.3f} | "
                     + " | ".join(dice) + " |")
    note = ("**Random weights: the Dice figures are meaningless** (random features match nothing in particular); "
            "only the speeds mean something, and those are CPU timings of one run.\n\n" if random else "")
    return f"{note}{settings}\n\n" + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--label", nargs="+", type=int, default=list(STRUCTURES))
    parser.add_argument("--slices", help="canonical target slices A:B (default: all 15)")
    parser.add_argument("--sam", default="vit_b", help="per-slice SAM (default vit_b)")
    parser.add_argument("--sam-checkpoint")
    parser.add_argument("--sam2", default="sam2.1_hiera_t", help="--propagate model (default sam2.1_hiera_t)")
    parser.add_argument("--sam2-checkpoint")
    parser.add_argument("--sam2-image-size", type=int, help="--sam-image-size of --propagate (default the model's)")
    parser.add_argument("--dinov2", default="vitb14")
    parser.add_argument("--dinov2-checkpoint")
    parser.add_argument("--image-size", type=int, default=518, help="DINOv2 input side (default 518)")
    parser.add_argument("--window", default="abdomen")
    parser.add_argument("-d", "--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out = args.output
    ref, ref_labels, target, target_labels = split_volume(out / "data")
    random = not (args.sam_checkpoint and args.sam2_checkpoint and args.dinov2_checkpoint)
    if random:
        from refseg.testing.random_checkpoints import write_random_checkpoints

        folder = out / "checkpoints"
        args.sam_checkpoint = args.sam_checkpoint or str(write_random_checkpoints(folder, sam=[args.sam])[0])
        args.sam2_checkpoint = args.sam2_checkpoint or str(write_random_checkpoints(folder, sam=[args.sam2])[0])
        args.dinov2_checkpoint = args.dinov2_checkpoint or str(
            write_random_checkpoints(folder, dinov2=[args.dinov2])[0])
    common = ["segment", "-r", str(ref), "-m", str(ref_labels), "-i", str(target), "--label",
              *map(str, args.label), "--window", args.window, "--dinov2", args.dinov2, "--dinov2-checkpoint",
              args.dinov2_checkpoint, "--image-size", str(args.image_size), "-d", args.device, "--progress", "off",
              *(["--slices", args.slices] if args.slices else [])]
    rows = [run_mode("per-slice matching", [*common, "--sam", args.sam, "--sam-checkpoint", args.sam_checkpoint],
                     out / "per_slice.nii.gz", target_labels, args.label),
            run_mode("--propagate", [*common, "--propagate", "--sam", args.sam2, "--sam-checkpoint",
                                     args.sam2_checkpoint, "--max-area-ratio", "2",
                                     *(["--sam-image-size", str(args.sam2_image_size)] if args.sam2_image_size
                                       else [])], out / "propagate.nii.gz", target_labels, args.label)]
    crop = f" {args.slices}" if args.slices else ""
    settings = (f"Reference: even slices of the sample CT, target: its odd slices{crop}"
                f"; preset sat, DINOv2 {args.dinov2} at {args.image_size}, per-slice SAM {args.sam} (1024), "
                f"--propagate {args.sam2} at {args.sam2_image_size or 'its own input size'}, window {args.window}, "
                f"device {args.device}.")
    (out / "results.json").write_text(json.dumps({"random_weights": random, "settings": settings, "rows": rows},
                                                 indent=1))
    (out / "results.md").write_text(table(rows, args.label, settings, random))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
