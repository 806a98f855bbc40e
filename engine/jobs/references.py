"""The 2-D references of folder and slide jobs, read and checked before any model loads.

* ``-r IMAGE -m MASK``: a plain 2-D image used at its own pixel size (``--region x,y,w,h`` crops it);
* ``-r SLIDE --region x,y,w,h -m MASK.png``: the region (level-0 pixels) read at the processing resolution
  (``--level`` / ``--mpp``); MASK has the size of the region at that resolution or at level 0 (then resized,
  nearest);
* ``-r SLIDE -m ANNOTATIONS.geojson [--region ...]``: QuPath polygons (level-0 pixels) rasterised over the
  region (default: the annotations' bounding box grown by 25 % on each side).

Repeat ``-r``/``-m`` (and ``--region``) for n-shot references.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

GEOJSON_SUFFIXES = frozenset({".geojson", ".json"})
MAX_REFERENCE_SIDE = 8192
REGION_MARGIN = 0.25


def is_slide(path: Path, forced: bool = False) -> bool:
    """True for a whole-slide file (:func:`refseg.io.slide.is_slide_file`), or any slide suffix when
    ``forced`` (``--slide``)."""
    from refseg.io.slide import SLIDE_SUFFIXES, is_slide_file

    path = Path(path)
    return is_slide_file(path) or (forced and path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES)


def is_geojson(path: str | Path) -> bool:
    return Path(path).suffix.lower() in GEOJSON_SUFFIXES


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


def load_references(args: argparse.Namespace, window=None) -> tuple[list[tuple[np.ndarray, np.ndarray, str]], dict]:
    """Reference (image, mask, source) triples and class names {value: (name, colour)}; nothing is written
    and no model is loaded. Images stay as read (a 16-bit plain image keeps its values, so that the
    Segmenter derives its intensity window, or uses ``window``); masks are checked by
    :func:`refseg.segmenter.check_reference`.

    Raises:
        ValueError / OSError: naming the bad file or region.
    """
    from refseg.io import geojson, raster, writers
    from refseg.io.slide import SlideView, open_slide
    from refseg.segmenter import check_reference

    if len(args.reference) != len(args.reference_mask):
        raise ValueError("give one -m/--reference-mask per -r/--reference")
    if args.region and len(args.region) != len(args.reference):
        raise ValueError(f"give one --region per -r ({len(args.reference)}), got {len(args.region)}")
    regions = [_parse_region(r) for r in args.region or []] or [None] * len(args.reference)
    annotations = {m: geojson.read_annotations(m) for m in args.reference_mask
                   if is_geojson(m)}
    values = geojson.class_values([a for found in annotations.values() for a in found])
    refs = []
    for ref, msk, region in zip(map(Path, args.reference), args.reference_mask, regions):
        found = annotations.get(msk)
        source = f"{ref} + {msk}"
        if is_slide(ref, args.slide):
            with open_slide(ref, args.slide_reader or "auto") as reader:
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
        refs.append((image, check_reference(image, mask, source, window)[1], source))
    names = {v: (n, writers.class_colour(v)) for n, v in values.items()}
    for found in annotations.values():
        for a in found:
            if a.color is not None:
                names[values[a.name]] = (a.name, a.color)
    for i, name in enumerate(args.class_name or [], start=1):
        names[i] = (name, names.get(i, (name, writers.class_colour(i)))[1])
    return refs, names
