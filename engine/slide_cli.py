"""Whole-slide options of ``refseg segment`` and its slide route.

``refseg segment`` takes this route when ``-i`` is a slide or a folder holding slides
(:func:`refseg.io.slide.is_slide_file`: vendor suffixes always, a ``.tif``/``.tiff`` only when tiled
and pyramidal or larger than 10000 px; ``--slide`` forces any slide suffix), or when a reference
needs it (``--region``, or a GeoJSON ``-m``). References, each checked before any model is loaded:

* ``-r SLIDE --region x,y,w,h -m MASK.png``: the region (level-0 pixels) read at the processing
  resolution; MASK has the size of the region at that resolution or at level 0 (then resized, nearest);
* ``-r SLIDE -m ANNOTATIONS.geojson [--region ...]``: QuPath polygons (level-0 pixels) rasterised
  over the region (default: the annotations' bounding box grown by 25 % on each side);
* ``-r IMAGE -m MASK`` (a plain 2-D image, used at its own pixel size; ``--region`` crops it).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("refseg")

GEOJSON_SUFFIXES = frozenset({".geojson", ".json"})
MAX_REFERENCE_SIDE = 8192
REGION_MARGIN = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the whole-slide options to the ``segment`` parser."""
    g = parser.add_argument_group("whole-slide images")
    g.add_argument("--slide", action="store_true", help="read -i (and slide-suffixed -r) as slides even "
                   "when a .tif looks like a plain image")
    g.add_argument("--region", action="append", default=[], metavar="X,Y,W,H",
                   help="reference region of the matching -r, level-0 pixels (repeat per -r)")
    res = g.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, help="pyramid level to process (0 = full resolution)")
    res.add_argument("--mpp", type=float, help="microns per pixel to process at (nearest level, resampled)")
    g.add_argument("--tile-size", type=int, help="tile side in pixels (default: image_size rounded to 16)")
    g.add_argument("--overlap", type=int, help="pixels shared by neighbouring tiles (default: ~1/8 tile)")
    g.add_argument("--min-tissue", type=float, default=0.01, help="tissue share of a tile needed to run it")
    g.add_argument("--no-tissue-detection", action="store_true", help="segment every tile")
    g.add_argument("--thumbnail-size", type=int, default=2048, help="tissue-detection thumbnail side (px)")
    g.add_argument("--preview-size", type=int, default=2048, help="overlay preview side (px)")
    g.add_argument("--simplify", type=float, help="GeoJSON polygon tolerance, level-0 px (default: one "
                   "processing pixel; 0 = exact pixel outlines)")
    g.add_argument("--class-name", action="append", default=[], help="QuPath class name of label 1, 2, ...")
    g.add_argument("--slide-reader", choices=["auto", "tifffile", "openslide"], default="auto")
    g.add_argument("--keep-tiles", action="store_true", help="keep OUTDIR/<stem>.tiles after a complete run")


def _is_slide(path: Path, forced: bool) -> bool:
    from refseg.io.slide import SLIDE_SUFFIXES, is_slide_file

    return is_slide_file(path) or (forced and path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES)


def _targets(args) -> list[Path]:
    path = Path(args.input)
    if path.is_dir():
        return sorted((p for p in path.iterdir() if not p.name.startswith(".") and _is_slide(p, args.slide)),
                      key=lambda p: p.name)
    return [path] if path.exists() and _is_slide(path, args.slide) else []


def wants_slides(args: argparse.Namespace) -> bool:
    """True when ``segment`` must take the slide route (slide input, --region or a GeoJSON mask)."""
    return bool(args.slide or args.region or any(Path(m).suffix.lower() in GEOJSON_SUFFIXES
                                                  for m in args.reference_mask) or _targets(args))


def _parse_region(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(round(float(v))) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--region {text!r}: expected X,Y,W,H (four numbers, level-0 pixels)") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"--region {text!r}: width and height must be positive")
    return x, y, w, h


def _check_inside(region, size, source: str) -> None:
    x, y, w, h = region
    if x < 0 or y < 0 or x + w > size[0] or y + h > size[1]:
        raise ValueError(f"{source}: region x={x},y={y},w={w},h={h} lies outside the image "
                         f"({size[0]}x{size[1]} px at level 0)")


def _bbox(annotations, size) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = np.array([a.geometry.bounds for a in annotations]).T
    x0, y0, x1, y1 = x0.min(), y0.min(), x1.max(), y1.max()
    mx, my = (x1 - x0) * REGION_MARGIN, (y1 - y0) * REGION_MARGIN
    x0, y0 = max(0, math.floor(x0 - mx)), max(0, math.floor(y0 - my))
    x1, y1 = min(size[0], math.ceil(x1 + mx)), min(size[1], math.ceil(y1 + my))
    return x0, y0, x1 - x0, y1 - y0


def _mask_for(mask_path: Path, annotations, values, origin, downsample, size, region_l0):
    from refseg.io import geojson, raster

    if annotations is not None:
        return geojson.rasterize(annotations, origin, downsample, size, values)
    mask = raster.read_mask(mask_path)
    if mask.shape == (size[1], size[0]):
        return mask
    if region_l0 is not None and mask.shape == (region_l0[3], region_l0[2]):
        return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
    raise ValueError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but the reference region is "
                     f"{size[0]}x{size[1]} px at the processing resolution"
                     + (f" ({region_l0[2]}x{region_l0[3]} at level 0)" if region_l0 else ""))


def load_references(args) -> tuple[list[tuple[np.ndarray, np.ndarray, str]], dict]:
    """Reference (RGB image, mask, source) triples and class names {value: (name, colour)}; nothing is
    written and no model is loaded. Raises ``ValueError`` / ``OSError`` naming the bad file or region."""
    from refseg.io import geojson, raster, writers
    from refseg.io.slide import SlideView, open_slide
    from refseg.segmenter import check_reference

    if len(args.reference) != len(args.reference_mask):
        raise ValueError("give one -m/--reference-mask per -r/--reference")
    if args.region and len(args.region) != len(args.reference):
        raise ValueError(f"give one --region per -r ({len(args.reference)}), got {len(args.region)}")
    regions = [_parse_region(r) for r in args.region] or [None] * len(args.reference)
    annotations = {m: geojson.read_annotations(m) for m in args.reference_mask
                   if Path(m).suffix.lower() in GEOJSON_SUFFIXES}
    values = geojson.class_values([a for found in annotations.values() for a in found])
    refs = []
    for ref, msk, region in zip(map(Path, args.reference), args.reference_mask, regions):
        found = annotations.get(msk)
        source = f"{ref} + {msk}"
        if _is_slide(ref, args.slide):
            with open_slide(ref, args.slide_reader) as reader:
                view = SlideView.select(reader, level=args.level, mpp=args.mpp)
                if region is None:
                    if found is None:
                        raise ValueError(f"{ref}: a slide reference needs --region x,y,w,h (level-0 px) "
                                         f"or a GeoJSON annotation as -m")
                    region = _bbox(found, reader.dimensions)
                _check_inside(region, reader.dimensions, str(ref))
                ds = view.downsample
                x, y, w, h = region
                size = (max(1, round(w / ds)), max(1, round(h / ds)))
                if max(size) > MAX_REFERENCE_SIDE:
                    raise ValueError(f"{ref}: reference region is {size[0]}x{size[1]} px at the processing "
                                     f"resolution; use a smaller --region or a coarser --level/--mpp")
                image = view.read(round(x / ds), round(y / ds), *size)
                mask = _mask_for(Path(msk), found, values, (x, y), ds, size, region)
        else:
            image = raster.read_image(ref)
            full = (image.shape[1], image.shape[0])
            x, y, w, h = region or (0, 0, *full)
            _check_inside((x, y, w, h), full, str(ref))
            if found is None and region is not None and raster.read_mask(msk).shape == image.shape[:2]:
                mask = raster.read_mask(msk)[y:y + h, x:x + w]
            else:
                mask = _mask_for(Path(msk), found, values, (x, y), 1.0, (w, h), None)
            image = image[y:y + h, x:x + w]
        refs.append((*check_reference(image, mask, source), source))
    names = {v: (n, writers.class_colour(v)) for n, v in values.items()}
    for found in annotations.values():
        for a in found:
            if a.color is not None:
                names[values[a.name]] = (a.name, a.color)
    for i, name in enumerate(args.class_name, start=1):
        names[i] = (name, names.get(i, (name, writers.class_colour(i)))[1])
    return refs, names


def cmd_segment(args: argparse.Namespace, config) -> int:
    """The slide route of ``refseg segment`` (exit codes as the CLI's: 0, 1 some failed, 2 bad input)."""
    from refseg.optional import MissingDependencyError

    try:
        return _segment(args, config)
    except MissingDependencyError as exc:  # reported like a bad argument: nothing was run
        raise ValueError(str(exc)) from exc


def _segment(args: argparse.Namespace, config) -> int:
    from refseg.io import raster, writers
    from refseg.io.slide import SlideView, open_slide
    from refseg.runner import run_folder
    from refseg.runtime.slide_job import SlideJobOptions, run_slide, slide_stem
    from refseg.runtime.tiling import TileGrid, default_overlap
    from refseg.segmenter import Segmenter

    refs, names = load_references(args)
    digest = hashlib.sha256()
    for image, mask, _ in refs:
        digest.update(np.ascontiguousarray(image).tobytes())
        digest.update(np.ascontiguousarray(mask, np.int64).tobytes())
    slides = _targets(args)
    tile = args.tile_size or max(16, 16 * round(config.image_size / 16))
    overlap = default_overlap(tile) if args.overlap is None else args.overlap
    TileGrid(tile, tile, tile, overlap)  # bad tile/overlap pair: exit 2 before any model work
    outdir = Path(args.output)
    failed, ready = [], []
    for path in slides:  # open every target before loading models: bad ones are reported, not fatal
        try:
            with open_slide(path, args.slide_reader) as reader:
                SlideView.select(reader, level=args.level, mpp=args.mpp)
            ready.append(path)
        except (ValueError, OSError) as exc:
            failed.append({"slide": str(path), "error": str(exc)})
    if slides and not ready:
        raise ValueError("; ".join(f["error"] for f in failed))
    images = [] if slides else raster.list_images(args.input)
    on_ray = getattr(args, "ray", None) is not None  # tile batches on Ray actors (refseg.ray_stream)
    if on_ray and images:
        raise ValueError(f"{args.input}: --ray runs slides (tile tasks), not a folder of plain images with a "
                         f"slide reference; run this folder without --ray")
    if on_ray:
        from refseg.ray_stream import ray_segmenter_from_args

        segmenter = ray_segmenter_from_args(args, config)
    else:
        segmenter = Segmenter(config, sam_checkpoint=args.sam_checkpoint, dinov2_checkpoint=args.dinov2_checkpoint,
                              device=args.device, backend=args.backend, engine_dir=args.engine_dir)
    for image, mask, source in refs:
        segmenter.add_reference(image, mask, source=source)
    if images:
        summary = run_folder(segmenter, images, outdir, save_prompts=args.save_prompts, overlay=args.overlay,
                             resume=args.resume)
        return 1 if summary.failed else 0
    options = SlideJobOptions(level=args.level, mpp=args.mpp, tile_size=tile, overlap=overlap,
                              detect_tissue=not args.no_tissue_detection, min_tissue=args.min_tissue,
                              thumbnail_size=args.thumbnail_size, preview_size=args.preview_size,
                              simplify=args.simplify, class_names=names, reader=args.slide_reader,
                              resume=args.resume, keep_tiles=args.keep_tiles)
    outdir.mkdir(parents=True, exist_ok=True)
    stems = writers.unique_stems(ready)
    results, start = [], time.perf_counter()
    for path in ready:
        try:
            results.append(run_slide(segmenter, path, outdir, options, reference_key=digest.hexdigest(),
                                     stem=slide_stem(Path(stems[path] + path.suffix))))
        except (ValueError, OSError) as exc:
            failed.append({"slide": str(path), "error": str(exc)})
    if on_ray:
        segmenter.close()
    for failure in failed:
        log.error("%s", failure["error"])
    tile_failures = sum(r.get("tiles_failed", 0) for r in results)
    writers.write_json(outdir / "summary.json", {
        "slides": len(slides), "succeeded": len(results), "failed": failed,
        "tiles_total": sum(r.get("tiles_total", 0) for r in results),
        "tiles_background": sum(r.get("tiles_background", 0) for r in results),
        "tiles_segmented": sum(r.get("tiles_segmented", 0) for r in results),
        "tiles_resumed": sum(r.get("tiles_resumed", 0) for r in results), "tiles_failed": tile_failures,
        "elapsed_s": round(time.perf_counter() - start, 4), "results": results, "config": config.to_dict()})
    return 1 if failed or tile_failures else 0
