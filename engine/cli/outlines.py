"""``refseg outlines``: a label mask file to QuPath GeoJSON, streamed tile by tile.

    refseg outlines labels.ome.tif -o labels.geojson                      # 1 px tolerance
    refseg outlines mask.png -o mask.geojson --simplify 0 --names 1=Tumor,2=Stroma

One feature per 4-connected object of each class, holes as interiors, coordinates in mask pixels
(x right, y down) times ``--scale``. Exit codes: 0 written, 2 bad input or output (nothing written).
"""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger("refseg.outlines")


def parse_names(text: str | None) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """``"1=Tumor,2=Stroma"`` -> {1: ("Tumor", colour), 2: ("Stroma", colour)} (the overlay colours)."""
    from refseg.io.geojson import class_name

    names: dict[int, tuple[str, tuple[int, int, int]]] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        value, sep, name = item.partition("=")
        try:
            label = int(value)
        except ValueError:
            label = -1
        if not sep or not name.strip() or label <= 0:
            raise ValueError(f"--names: expected VALUE=NAME pairs with VALUE >= 1, e.g. 1=Tumor,2=Stroma; got {item!r}")
        names[label] = (name.strip(), class_name(label)[1])
    return names


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``refseg outlines`` on the ``refseg`` command's sub-parsers."""
    p = subparsers.add_parser(
        "outlines", help="label mask (TIFF/OME-TIFF/PNG) to QuPath GeoJSON, streamed tile by tile",
        description="Trace every 4-connected object of a label mask (0 = background, 1..K = classes) into "
                    "a QuPath GeoJSON FeatureCollection, one feature per object, holes kept. The mask is read "
                    "one band of tiles at a time, never whole; the output is written atomically.")
    p.add_argument("labels", metavar="LABELS", help="label mask: tiled or striped TIFF / OME-TIFF (e.g. a slide "
                   "run's <stem>.ome.tif), PNG or another single-band raster")
    p.add_argument("-o", "--output", required=True, help="GeoJSON file to write")
    p.add_argument("--simplify", type=float, default=1.0, metavar="PX",
                   help="polygon tolerance in output pixels, each object on its own (default 1; 0 = exact "
                        "pixel-edge outlines)")
    p.add_argument("--names", metavar="1=Tumor,2=Stroma", help="QuPath class names (default: 'class N')")
    p.add_argument("--tile", type=int, metavar="PX", help="tracing tile side (default: about 1024, a multiple "
                                                          "of the file's tile height); rows of tiles held in memory")
    p.add_argument("--scale", type=float, default=1.0,
                   help="output pixels per mask pixel, e.g. the mask level's downsample to write level-0 "
                        "pixels (default 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes tracing tiles (default 1: in this process); more help on many-core hosts; "
                        "the output is the same")
    p.set_defaults(func=_cmd_outlines)
    return p


def _cmd_outlines(args: argparse.Namespace) -> int:
    from refseg.io.outlines_file import outline_file
    from refseg.optional import MissingDependencyError

    if args.simplify < 0 or args.scale <= 0:
        raise ValueError(f"--simplify must be >= 0 and --scale > 0, got {args.simplify}, {args.scale}")
    try:
        summary = outline_file(args.labels, args.output, simplify=args.simplify, names=parse_names(args.names),
                               tile=args.tile, scale=args.scale, workers=args.workers)
    except MissingDependencyError as exc:
        log.error("%s", exc)
        return 2
    log.info("%s: %d features (%d x %d px, tiles of %d px) in %.1f s", args.output, summary["features"],
             summary["width"], summary["height"], summary["tile"], summary["seconds"])
    return 0
