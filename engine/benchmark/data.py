"""Benchmark images: the Kvasir pairs and the GBMSeg example from ``shared/data``, or synthetic images.

A :class:`BenchSet` is one reference (image + binary mask) and the targets segmented against it.
Kvasir: the first pair (sorted by file name) is the reference, the others are targets with ground
truth. GBMSeg example: its own reference and its one target (no ground truth). When the data folder
is absent, :func:`synthetic_set` draws textured images with an elliptic "organ" so every stage still
runs (speed numbers only).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DATA_ENV = "REFSEG_BENCH_DATA"


@dataclass
class BenchSet:
    """One reference and its targets.

    Attributes:
        name: ``kvasir``, ``gbmseg`` or ``synthetic``.
        reference: (H, W, 3) uint8 RGB; reference_mask: (H, W) uint8, 1 = foreground, 0 = background.
        targets: (H_i, W_i, 3) uint8 RGB images; target_names: their file stems.
        target_masks: (H_i, W_i) bool ground truth, or None where there is none.
        source: the folder read, or ``"synthetic"``.
    """

    name: str
    reference: np.ndarray
    reference_mask: np.ndarray
    targets: list[np.ndarray] = field(default_factory=list)
    target_names: list[str] = field(default_factory=list)
    target_masks: list[np.ndarray | None] = field(default_factory=list)
    source: str = "synthetic"

    def cycled(self, n: int) -> list[int]:
        """Indices of ``n`` targets, repeating the list when it is shorter than ``n``."""
        if not self.targets:
            raise ValueError(f"bench set {self.name!r} has no target image")
        return [i % len(self.targets) for i in range(n)]

    def describe(self) -> dict:
        """JSON summary: names and sizes (H, W)."""
        return {"name": self.name, "source": self.source,
                "reference_size": list(self.reference.shape[:2]),
                "targets": [{"name": n, "size": list(t.shape[:2]), "ground_truth": m is not None}
                            for n, t, m in zip(self.target_names, self.targets, self.target_masks)]}


MIRRORS = (("fliplr", lambda a: a[:, ::-1]), ("flipud", lambda a: a[::-1]), ("rot180", lambda a: a[::-1, ::-1]))


def with_mirrors(bench_set: BenchSet, n: int) -> BenchSet:
    """``bench_set`` with mirrored copies of its targets (left-right, up-down, 180°) appended until it
    holds ``n`` distinct images or the mirrors run out; masks are mirrored with their images.

    End-to-end rows are measured on at least 8 images while the Kvasir sample has 4 targets; mirrored
    copies have the same content statistics but new patch layouts, so no two are the same input.
    """
    base = list(zip(bench_set.targets, bench_set.target_names, bench_set.target_masks))
    for suffix, flip in MIRRORS:
        for image, name, mask in base:
            if len(bench_set.targets) >= n:
                return bench_set
            bench_set.targets.append(np.ascontiguousarray(flip(image)))
            bench_set.target_names.append(f"{name}:{suffix}")
            bench_set.target_masks.append(None if mask is None else np.ascontiguousarray(flip(mask)))
    return bench_set


def default_data_dir() -> Path:
    """``$REFSEG_BENCH_DATA``, else ``shared/data`` beside the source checkout (``<repo>/../shared/data``)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    import refseg

    return Path(refseg.__file__).resolve().parents[2] / "shared" / "data"


def _read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from refseg.io.raster import read_image, read_mask, to_rgb_uint8

    image = to_rgb_uint8(read_image(image_path))
    mask = read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{mask_path}: mask size {mask.shape} differs from its image {image.shape[:2]}")
    return image, (mask != 0).astype(np.uint8)


def load_kvasir(folder: Path, max_targets: int | None = None) -> BenchSet | None:
    """``folder/images/*.jpg`` + ``folder/masks/*.jpg``: first pair = reference, the rest = targets.

    Returns None when the folder or its pairs are missing.
    """
    images = sorted((folder / "images").glob("*.jpg")) if (folder / "images").is_dir() else []
    pairs = [(p, folder / "masks" / p.name) for p in images if (folder / "masks" / p.name).is_file()]
    if len(pairs) < 2:
        return None
    reference, ref_mask = _read_pair(*pairs[0])
    out = BenchSet("kvasir", reference, ref_mask, source=str(folder))
    for image_path, mask_path in pairs[1:1 + max_targets if max_targets else None]:
        image, mask = _read_pair(image_path, mask_path)
        out.targets.append(image)
        out.target_masks.append(mask.astype(bool))
        out.target_names.append(image_path.stem)
    return out


def load_gbmseg_example(folder: Path) -> BenchSet | None:
    """The GBMSeg release example: reference_image/, reference_mask/, target_image/ (one PNG each)."""
    from refseg.io.raster import read_image, to_rgb_uint8

    try:
        ref_img = next((folder / "reference_image").glob("*.png"))
        ref_msk = folder / "reference_mask" / ref_img.name
        target = next((folder / "target_image").glob("*.png"))
    except (StopIteration, OSError):
        return None
    if not ref_msk.is_file():
        return None
    reference, mask = _read_pair(ref_img, ref_msk)
    return BenchSet("gbmseg", reference, mask, [to_rgb_uint8(read_image(target))], [target.stem], [None],
                    source=str(folder))


def synthetic_set(num_targets: int = 4, size: tuple[int, int] = (416, 480), seed: int = 0) -> BenchSet:
    """Textured RGB images (H, W) = ``size`` with one bright ellipse each; masks mark the ellipse."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]

    def draw() -> tuple[np.ndarray, np.ndarray]:
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        base = rng.normal(90, 25, size=(h, w, 3)) + 30 * np.sin(xx / 9.0)[..., None]
        base[mask] += np.array([110, 60, 20]) + rng.normal(0, 15, size=(int(mask.sum()), 3))
        return np.clip(base, 0, 255).astype(np.uint8), mask

    reference, ref_mask = draw()
    out = BenchSet("synthetic", reference, ref_mask.astype(np.uint8))
    for i in range(num_targets):
        image, mask = draw()
        out.targets.append(image)
        out.target_masks.append(mask)
        out.target_names.append(f"synthetic_{i}")
    return out


def load_sets(data_dir: str | os.PathLike | None = None, max_targets: int | None = None,
              include_gbmseg: bool = True) -> list[BenchSet]:
    """Kvasir (and the GBMSeg example) from ``data_dir``; one synthetic set when neither is there."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    sets = []
    kvasir = load_kvasir(root / "kvasir_seg5", max_targets)
    if kvasir is not None:
        sets.append(kvasir)
    if include_gbmseg:
        gbm = load_gbmseg_example(root / "gbmseg_example")
        if gbm is not None:
            sets.append(gbm)
    if not sets:
        log.warning("no benchmark data under %s (kvasir_seg5, gbmseg_example): using synthetic images", root)
        sets.append(synthetic_set(max_targets or 4))
    return sets
