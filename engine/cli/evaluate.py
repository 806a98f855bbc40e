"""``refseg eval``: Dice / IoU of predictions against ground truth — 2-D mask folders, or NIfTI label maps
(scored by :mod:`refseg.eval.metrics_volume`, resampled by world coordinates when the two grids store the
same space in another voxel order)."""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("refseg")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``refseg eval``."""
    p = sub.add_parser("eval", help="Dice/IoU of predicted masks against ground truth")
    p.add_argument("-p", "--pred", required=True, help="predicted masks: a folder of <stem>.png, or a NIfTI "
                   "label map / folder of them")
    p.add_argument("-g", "--gt", required=True, help="ground truth: a folder of masks (same stems), or a NIfTI "
                   "label map / folder of them")
    p.add_argument("--threshold", type=float, default=None,
                   help="binarise every ground-truth mask (any format) at >= this value and score binary; "
                        "default: JPEG at 128, two-valued masks binary, other values are classes")
    p.add_argument("--pair-by", choices=["stem", "order"], default="stem",
                   help="pair predictions with ground truth by file stem (default) or by sorted file order")
    p.add_argument("--json", metavar="FILE", help="also write per-image and mean figures to FILE (JSON)")
    g = p.add_argument_group("volumes (NIfTI label maps)")
    g.add_argument("--label", type=int, nargs="+", help="structures (label values) to score; default: every "
                   "label in ground truth or prediction")
    g.add_argument("--per-slice", action="store_true", help="also print Dice per slice")
    g.add_argument("--axis", type=int, choices=(0, 1, 2), default=2,
                   help="slice axis of --per-slice and --slices in RAS+ canonical orientation (2 = axial)")
    g.add_argument("--slices", help="score only slices A:B along --axis (as refseg segment --slices)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from refseg.eval.metrics import evaluate_folders
    from refseg.eval.metrics_volume import format_volume_table, evaluate_volumes, is_volume_eval

    if is_volume_eval(args.pred, args.gt):
        scores = evaluate_volumes(args.pred, args.gt, labels=args.label, per_slice=args.per_slice, axis=args.axis,
                                  slices=args.slices)
        sys.stdout.write(format_volume_table(scores, args.per_slice) + "\n")
        for s in scores:
            if s.error:
                log.error("%s: %s", s.gt_path, s.error)
        if args.json:
            from refseg.io.writers import write_json

            write_json(args.json, [s.to_dict() for s in scores])
        return 0 if any(s.dice and s.pred_path for s in scores) else 1
    if args.slices or args.label or args.per_slice:
        raise ValueError("--label / --per-slice / --slices score NIfTI label maps; -p and -g are 2-D masks")
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
