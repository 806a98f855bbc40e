"""Output files: atomic writers, mask PNGs, overlays and output naming (the run summary: ``run_summary``).

Every file is written atomically: the bytes go to a hidden temporary file in the destination folder, are
flushed and fsync'ed, then ``os.replace`` puts them in place. A crash or an exception therefore never
leaves a half-written output, and an existing file is either fully replaced or left untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import logging
import math
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

POSITIVE_COLOUR = (0, 255, 0)
NEGATIVE_COLOUR = (255, 0, 0)
BOX_COLOUR = (255, 255, 0)
# Class fill colours (class k uses entry (k - 1) mod len); pure green / red are left to the point prompts.
CLASS_COLOURS = ((30, 144, 255), (255, 127, 14), (148, 103, 189), (23, 190, 207), (227, 119, 194),
                 (188, 189, 34), (140, 86, 75), (255, 215, 0), (0, 128, 128), (127, 127, 127))


# --------------------------------------------------------------------------------------------- atomic files
_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    """The process umask: read from ``/proc/self/status`` on Linux (no side effect); elsewhere set and
    restored under a lock (a file another thread creates at that instant gets the stricter 0o077 mask)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Permission bits a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_current_umask() & 0o777


def _apply_mode(fd: int, path: Path) -> None:
    """Give the temporary file (0600 from mkstemp) the mode ``path`` would get from ``open``: the existing
    file's mode when replacing one, otherwise the umask's normal mode."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = new_file_mode()
    try:
        os.fchmod(fd, mode)
    except (AttributeError, OSError):  # no fchmod on Windows; some file systems refuse chmod
        pass


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Context manager yielding a file object whose content replaces ``path`` atomically on success.

    ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text). The parent folder is created if needed. The file gets the
    permissions a plain ``open`` would give it (the umask's normal mode, or the replaced file's mode), not
    the temporary file's 0600. On an exception
    inside the block the temporary file is removed, ``path`` is left as it was and the exception propagates.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _apply_mode(fd, path)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (POSIX); silently skipped where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(targets: Iterable[str | os.PathLike]) -> int:
    """Delete the temporary files :func:`atomic_writer` left for these targets when a run was killed
    mid-write (``.<name>.<random>.tmp`` beside each target file; for a target folder, every such file in
    it). Returns how many were removed."""
    removed = 0
    for target in map(Path, targets):
        pattern = ".*.tmp" if target.is_dir() else f".{glob.escape(target.name)}.*.tmp"
        for stale in (target if target.is_dir() else target.parent).glob(pattern):
            with contextlib.suppress(OSError):
                stale.unlink()
                removed += 1
                log.debug("removed %s, left by an interrupted run", stale)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + ``os.replace``)."""
    with atomic_writer(path, "wb") as handle:
        handle.write(data)


def jsonable(obj: Any, where: str = "obj") -> Any:
    """Convert numpy scalars/arrays, paths, tuples and sets to JSON types; NaN / inf become null."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj), where)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if isinstance(key, (np.integer, np.floating, np.bool_)):
                key = key.item()
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(f"{where}: dict key {key!r} of type {type(key).__name__} is not JSON-able")
            out[key] = jsonable(value, f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted(jsonable(v, where) for v in obj)
    raise TypeError(f"{where}: object of type {type(obj).__name__} is not JSON-serialisable")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON (indent 2, keys in insertion order) atomically.

    numpy scalars and arrays, ``Path`` objects, tuples, sets and dataclasses are converted; non-finite
    floats are written as ``null`` so the file is strict JSON. ``TypeError`` names the offending entry.
    """
    with atomic_writer(path, "w") as handle:
        json.dump(jsonable(obj), handle, indent=2, sort_keys=False, allow_nan=False)
        handle.write("\n")


def write_png(path: str | os.PathLike, array: np.ndarray, compress_level: int = 1) -> None:
    """Write ``array`` as PNG atomically.

    ``array``: (H, W) uint8 or uint16 (16-bit grayscale), or (H, W, 3) / (H, W, 4) uint8 (RGB / RGBA).
    ``compress_level`` 0-9 (zlib); the default 1 is fast and label masks compress well at any level.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2 and array.dtype in (np.uint8, np.uint16):
        image = Image.fromarray(np.ascontiguousarray(array))
    elif array.ndim == 3 and array.shape[2] in (3, 4) and array.dtype == np.uint8:
        image = Image.fromarray(np.ascontiguousarray(array), "RGB" if array.shape[2] == 3 else "RGBA")
    else:
        raise ValueError(f"{path}: cannot write array of shape {array.shape} and dtype {array.dtype} as PNG; "
                         f"expected (H, W) uint8/uint16 or (H, W, 3|4) uint8")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------- masks, overlay
def mask_to_png_array(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Encode (H, W) integer labels for a mask PNG.

    ``num_classes`` counts foreground classes. One class: 0 / 255 uint8 (every non-zero label -> 255).
    Several: the label values themselves, uint8 when the largest is <= 255, else uint16.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels: expected shape (H, W), got {labels.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected an integer or bool array, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels: negative label {labels.min()} cannot be stored in a PNG")
    if num_classes == 1:
        return np.where(labels > 0, np.uint8(255), np.uint8(0))
    top = int(labels.max()) if labels.size else 0
    if top > np.iinfo(np.uint16).max:
        raise ValueError(f"labels: largest label {top} exceeds 65535, the 16-bit PNG limit")
    return labels.astype(np.uint8 if top <= 255 else np.uint16)


def class_colour(label: int) -> tuple[int, int, int]:
    """RGB colour of foreground class ``label`` (>= 1) in overlays."""
    return CLASS_COLOURS[(int(label) - 1) % len(CLASS_COLOURS)]


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour of another label (or on the image border)."""
    padded = np.pad(labels, 1, mode="constant", constant_values=-1)
    centre = padded[1:-1, 1:-1]
    edge = ((centre != padded[:-2, 1:-1]) | (centre != padded[2:, 1:-1])
            | (centre != padded[1:-1, :-2]) | (centre != padded[1:-1, 2:]))
    return edge & (labels > 0)


def overlay(image_rgb: np.ndarray, labels: np.ndarray, points: np.ndarray | None = None,
            point_labels: np.ndarray | None = None, box: Sequence[float] | None = None,
            alpha: float = 0.45) -> np.ndarray:
    """Draw a segmentation and its prompts over an image for visual checks.

    image_rgb: (H, W, 3) uint8. labels: (H, W) ints, 0 = background; class k is filled with
    :func:`class_colour` (k) blended at ``alpha`` and outlined (1 px, opaque) in the same colour.
    points: (N, 2) (x, y) pixels; point_labels: (N,) 1 = positive (green), 0 = negative (red), other values
    (e.g. SAM's -1 padding) are not drawn; all positive when None. box: (x0, y0, x1, y1) pixels, drawn as a
    yellow outline. Returns a new (H, W, 3) uint8 array.
    """
    image_rgb = np.asarray(image_rgb)
    labels = np.asarray(labels)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"image_rgb: expected (H, W, 3) uint8, got {image_rgb.shape} {image_rgb.dtype}")
    if labels.shape != image_rgb.shape[:2]:
        raise ValueError(f"labels: shape {labels.shape} does not match image {image_rgb.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    labels = labels.astype(np.int64)
    out = image_rgb.astype(np.float32)
    edge = _boundary(labels)
    for label in np.unique(labels[labels > 0]):
        colour = np.asarray(class_colour(label), np.float32)
        region = labels == label
        out[region] = (1.0 - alpha) * out[region] + alpha * colour
        out[edge & region] = colour
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(result)
    height, width = labels.shape
    if box is not None:
        box = np.asarray(box, np.float64).reshape(-1)
        if box.shape != (4,):
            raise ValueError(f"box: expected (x0, y0, x1, y1), got {box.size} values")
        x0, y0, x1, y1 = box.tolist()
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=BOX_COLOUR,
                       width=max(1, round(min(height, width) / 256)))
    if points is not None:
        points = np.asarray(points, np.float64).reshape(-1, 2) if np.size(points) else np.zeros((0, 2))
        if point_labels is None:
            point_labels = np.ones(len(points), np.int64)
        point_labels = np.asarray(point_labels).reshape(-1)
        if point_labels.shape[0] != points.shape[0]:
            raise ValueError(f"point_labels: {point_labels.shape[0]} labels for {points.shape[0]} points")
        radius = max(2, round(min(height, width) / 100))
        for (x, y), flag in zip(points.tolist(), point_labels.tolist()):
            if flag not in (0, 1):
                continue
            fill = POSITIVE_COLOUR if flag == 1 else NEGATIVE_COLOUR
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=(255, 255, 255))
    return np.asarray(result, dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------- naming
@dataclasses.dataclass(frozen=True)
class OutputPaths:
    """Files written for one input: ``mask`` OUTDIR/<stem>.png, ``prompts`` OUTDIR/<stem>.json,
    ``overlay`` OUTDIR/<stem>_overlay.png."""
    mask: Path
    prompts: Path
    overlay: Path


def output_paths(outdir: str | os.PathLike, input_path: str | os.PathLike,
                 stem: str | None = None) -> OutputPaths:
    """Output file names for ``input_path`` in ``outdir``; ``stem`` overrides the input's stem (pass the
    value from :func:`unique_stems` in a batch). Raises ``ValueError`` if the mask would overwrite the input."""
    outdir, input_path = Path(outdir), Path(input_path)
    stem = input_path.stem if stem is None else stem
    paths = OutputPaths(mask=outdir / f"{stem}.png", prompts=outdir / f"{stem}.json",
                        overlay=outdir / f"{stem}_overlay.png")
    if input_path.exists() and any(p.exists() and p.samefile(input_path) for p in dataclasses.astuple(paths)):
        raise ValueError(f"{input_path}: output in {outdir} would overwrite the input image; "
                         f"choose another output folder")
    return paths


def unique_stems(paths: Iterable[str | os.PathLike]) -> dict[Path, str]:
    """Map each input path to an output stem that no other input in the batch shares.

    Rule: in the given order, the first path with a given stem keeps it; a later path with the same stem
    (compared case-insensitively, as on macOS / Windows file systems) gets ``<stem>_<suffix>`` (suffix
    without the dot, lower case), e.g. [a.png, a.jpg] -> "a", "a_jpg"; if that is taken too, ``_2``, ``_3``
    ... are appended. Feed the same sorted list on every run (``list_images`` sorts) so that ``--resume``
    finds the same names.
    """
    result: dict[Path, str] = {}
    taken: set[str] = set()
    ordered = [Path(p) for p in paths]
    own = {p.stem.casefold() for p in ordered}
    for path in ordered:
        if path in result:
            continue
        stem = path.stem
        if stem.casefold() in taken:
            stem = f"{path.stem}_{path.suffix.lstrip('.').lower() or 'file'}"
            base, count = stem, 2
            # Avoid both stems already given out and stems of other inputs that come later.
            while stem.casefold() in taken or stem.casefold() in own:
                stem, count = f"{base}_{count}", count + 1
        taken.add(stem.casefold())
        result[path] = stem
    return result


def is_done(paths: OutputPaths | str | os.PathLike) -> bool:
    """True when the mask file (``paths.mask`` or the given path) exists and is a readable PNG; used by
    ``--resume`` to skip finished inputs. PNG chunk checksums are verified without a full decode."""
    mask = paths.mask if isinstance(paths, OutputPaths) else Path(paths)
    try:
        if not mask.is_file() or mask.stat().st_size == 0:
            return False
        with Image.open(mask) as im:
            if im.format != "PNG":
                return False
            im.verify()
        return True
    except (OSError, SyntaxError, ValueError) as exc:
        log.info("%s: existing output is unreadable (%s); it will be redone", mask, exc)
        return False


# --------------------------------------------------------------------------------------------- output folder
def prepare_output_folder(outdir: str | os.PathLike) -> Path:
    """Create ``outdir`` if needed and prove that files can be created in it (a hidden probe file is
    written and removed), before any model work.

    Raises:
        ValueError: naming the path, when it is an existing file, cannot be created, or is not writable.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"{outdir}: the output path is an existing file, not a folder; "
                         f"give -o a folder (it is created if missing)")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{outdir}: cannot create the output folder ({exc.strerror or exc})") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".refseg-write-check.", dir=outdir)
    except OSError as exc:
        raise ValueError(f"{outdir}: the output folder is not writable ({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)
    return outdir


