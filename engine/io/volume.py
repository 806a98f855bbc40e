"""CT / MRI volumes: NIfTI and DICOM series in, NIfTI label maps out, and the slice view the models see.

Conventions:

* A :class:`Volume` holds ``data`` as stored, ``data[i, j, k]`` (NIfTI voxel order; for DICOM series
  ``[row, column, slice]``, see :mod:`refseg.io.dicom`) and ``affine``, the (4, 4) map from voxel
  (i, j, k, 1) to world millimetres in **RAS+** (+x towards the patient's Right, +y Anterior, +z Superior;
  NIfTI's convention; DICOM's LPS+ is converted with ``diag(-1, -1, 1, 1)``).
* Slicing works on the **canonical** array: the volume's axes permuted / flipped (never resampled) to the
  closest RAS+ orientation (``nibabel.as_closest_canonical``'s rule). Axis 0 is then left -> right
  (sagittal slices), 1 posterior -> anterior (coronal), 2 inferior -> superior (axial). So a reference and
  a target in different storage orders (an RAS NIfTI and an LPS DICOM series) give slices of the same
  anatomical orientation, and ``--axis 2`` always means axial slices numbered from the feet up.
* :func:`slice_view` turns canonical slice k into the 2-D image given to the models, in the radiological
  view: ``image = plane[::-1, ::-1].T`` where ``plane = canonical.take(k, axis)``; for axial slices the
  image's top is anterior and its left is the patient's right, for coronal / sagittal the top is superior.
  :func:`put_slice_view` is its inverse.
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refseg.io.dicom import DicomReadError, dicom_files, read_dicom_series
from refseg.io.writers import atomic_write_bytes
from refseg.optional import require

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeReadError(ValueError):
    """A volume could not be read or used; the message names the file and the problem."""


@dataclass
class Volume:
    """A 3-D image as read from disk.

    Attributes:
        data: (I, J, K) array as stored (int16 / uint8 / float32 ...; scaling of the file applied).
        affine: (4, 4) float64 voxel -> RAS+ mm.
        path: the file or folder it came from.
        header: the NIfTI header (``None`` for DICOM), copied to label maps written for this volume.
        slice_files: for DICOM series, the file of each index k (array order); empty for NIfTI.
        slice_instances: for DICOM series, the InstanceNumber of each index k (``None`` where absent).
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path
    header: Any = None
    slice_files: list[Path] = field(default_factory=list)
    slice_instances: list[int | None] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    def orientation(self) -> str:
        """Axis codes of the stored array, e.g. ``"RAS"`` or ``"LPS"`` (nibabel ``aff2axcodes``)."""
        nib = _nibabel()
        return "".join(nib.aff2axcodes(self.affine))


def _nibabel():
    return require("nibabel", extra="io", purpose="Reading and writing NIfTI volumes")


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True for a ``.nii`` / ``.nii.gz`` file name (case-insensitive; the file is not opened)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_volume_path(path: str | os.PathLike) -> bool:
    """True for a NIfTI file name, or a folder holding DICOM files or sub-folders that do / NIfTI files
    (a folder of volumes)."""
    path = Path(path)
    if is_nifti_path(path):
        return True
    if not path.is_dir():
        return False
    if dicom_files(path) or any(is_nifti_path(p) for p in path.iterdir()):
        return True
    return any(p.is_dir() and dicom_files(p) for p in path.iterdir())


def volume_stem(path: str | os.PathLike) -> str:
    """Name without ``.nii`` / ``.nii.gz`` (a DICOM folder keeps its name)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeReadError(f"{path}: expected a 3-D volume, got an array of shape {data.shape}"
                              + (" (a 2-D image: use the image commands)" if data.ndim == 2 else ""))
    if min(data.shape) < 1:
        raise VolumeReadError(f"{path}: empty volume of shape {data.shape}")
    return data


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file (scl_slope / scl_inter applied; a trailing 4th axis of length 1
    is dropped).

    Raises:
        VolumeReadError: missing / truncated / corrupt file, not 3-D.
    """
    nib = _nibabel()
    path = Path(path)
    if not path.is_file():
        raise VolumeReadError(f"{path}: file does not exist")
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        raise VolumeReadError(f"{path}: truncated or corrupt NIfTI file ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # nibabel's ImageFileError and friends
        raise VolumeReadError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    data = _as_3d(np.asarray(data), path)
    return Volume(data=data, affine=np.asarray(image.affine, np.float64), path=path, header=image.header)


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a NIfTI file or a DICOM series folder (see :func:`refseg.io.dicom.read_dicom_series`).

    Non-finite voxels (NaN / inf) are reported in one warning naming the file; windows ignore them
    (NaN shows as the window's bottom, +inf as its top).
    """
    path = Path(path)
    if is_nifti_path(path):
        volume = read_nifti(path)
    elif path.is_dir():
        try:
            series = read_dicom_series(path, series_uid=series_uid)
        except DicomReadError as exc:
            raise VolumeReadError(str(exc)) from exc
        volume = Volume(data=_as_3d(series.data, path), affine=series.affine, path=path,
                        slice_files=series.files, slice_instances=series.instance_numbers)
    else:
        raise VolumeReadError(f"{path}: not a NIfTI file (.nii, .nii.gz) or a DICOM series folder")
    if np.issubdtype(volume.data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(volume.data)))
        if bad:
            log.warning("%s: %d non-finite voxel(s) (NaN / inf); they are ignored by the window and shown "
                        "as its bottom (NaN, -inf) or top (+inf)", path, bad)
    return volume


def read_label_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI label map: integer values >= 0 (floats holding integers are accepted) -> int64 data.

    Raises:
        VolumeReadError: unreadable, not 3-D, non-integer / negative / non-finite values.
    """
    volume = read_nifti(path)
    data = volume.data
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or not np.array_equal(data, np.rint(data)):
            raise VolumeReadError(f"{volume.path}: label map holds non-integer or non-finite values")
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        raise VolumeReadError(f"{volume.path}: label map has unsupported dtype {data.dtype}")
    data = data.astype(np.int64)
    if data.size and data.min() < 0:
        raise VolumeReadError(f"{volume.path}: label map holds negative values (min {data.min()})")
    volume.data = data
    return volume


PAIR_BY = ("stem", "order")


def _order_pairs(masks: list[Path], volume: Volume, folder: Path) -> list[tuple[int, Path]]:
    files = volume.slice_files
    if len(masks) != len(files):
        raise VolumeReadError(f"{folder}: {len(masks)} mask file(s) but the series {volume.path} has "
                              f"{len(files)} files; --pair-by order needs one mask per file")
    numbers = volume.slice_instances
    if numbers and all(n is not None for n in numbers):
        ranked = sorted(range(len(files)), key=lambda k: (numbers[k], files[k].name))
    else:  # no InstanceNumber on some file: the files' names give the order
        ranked = sorted(range(len(files)), key=lambda k: files[k].name)
    return list(zip(ranked, masks))


def read_slice_masks(folder: str | os.PathLike, volume: Volume, pair_by: str = "stem") -> np.ndarray:
    """Label volume from per-slice masks (``.png``) of a DICOM series; label values are kept as stored in
    the files (like a NIfTI label map: a 0/255 mask gives label 255).

    Pairing (``pair_by``): ``stem``, a mask ``<stem>.png`` per DICOM file ``<stem>.dcm`` (a file without a
    mask is an unlabelled slice, 0); ``order``, the i-th mask by file name for the i-th file of the series by
    InstanceNumber (by file name when a file has none), one mask per file. Each mask is (Rows, Columns) as
    the DICOM pixels. Returns (I, J, K) int64 in ``volume.data``'s order.

    Raises:
        VolumeReadError: ``volume`` is not a DICOM series, no mask matches (``stem``: the message suggests
            ``--pair-by order``), the counts differ (``order``), or a mask's size differs.
    """
    from refseg.io.raster import read_label_map

    folder = Path(folder)
    if pair_by not in PAIR_BY:
        raise ValueError(f"--pair-by must be one of {', '.join(PAIR_BY)}, got {pair_by!r}")
    if not volume.slice_files:
        raise VolumeReadError(f"{folder}: per-slice PNG masks need a DICOM series reference, "
                              f"{volume.path} is not one")
    masks = sorted((p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")),
                   key=lambda p: p.name)
    if pair_by == "order":
        pairs = _order_pairs(masks, volume, folder)
    else:
        by_stem = {p.stem: p for p in masks}
        pairs = [(k, by_stem[f.stem]) for k, f in enumerate(volume.slice_files) if f.stem in by_stem]
        if not pairs:
            raise VolumeReadError(
                f"{folder}: no <stem>.png mask matches a file of the series {volume.path} (masks "
                f"{', '.join(p.name for p in masks[:3]) or 'none'}{' ...' if len(masks) > 3 else ''}; files "
                f"{', '.join(f.name for f in volume.slice_files[:3])} ...); masks named in the series' order "
                f"(e.g. organ_000.png ...) pair with --pair-by order")
    labels = np.zeros(volume.shape, np.int64)
    for k, mask_path in pairs:
        mask = read_label_map(mask_path)
        if mask.shape != volume.shape[:2]:
            raise VolumeReadError(f"{mask_path}: mask size {mask.shape} differs from the DICOM slice "
                                  f"{volume.shape[:2]} (rows, columns) of {volume.slice_files[k].name}")
        labels[:, :, k] = mask
    return labels


def slice_range(text: str | None, count: int, where: str, axis_name: str = "") -> list[int]:
    """The slice indices ``A:B`` selects out of ``count`` (Python range rules: A, B optional, negative from
    the end); ``None`` selects all.

    Raises:
        ValueError: a malformed range, or one that lies outside ``0:count`` or selects nothing, naming
            ``where`` (the volume) and how many slices it has.
    """
    if text is None:
        return list(range(count))
    start, sep, stop = str(text).partition(":")
    if not sep:
        raise ValueError(f"--slices {text!r}: expected A:B (e.g. 10:20; A or B may be left out)")
    try:
        a = int(start) if start.strip() else None
        b = int(stop) if stop.strip() else None
    except ValueError:
        raise ValueError(f"--slices {text!r}: A and B must be whole numbers") from None
    axis = f" along {axis_name}" if axis_name else ""
    if any(v is not None and not -count <= v <= count for v in (a, b)):
        raise ValueError(f"--slices {text}: {where} has {count} slices{axis}; A and B must lie within "
                         f"0:{count} (or -{count}:0 from the end)")
    chosen = list(range(count))[slice(a, b)]
    if not chosen:
        raise ValueError(f"--slices {text}: selects no slice of the {count} slices{axis} of {where}")
    return chosen


def canonical_length(path: str | os.PathLike, axis: int, series_uid: str | None = None) -> int:
    """Slices of a volume file along canonical ``axis`` (see the module doc), read from the NIfTI header
    alone; a DICOM series is read."""
    path = Path(path)
    if is_nifti_path(path):
        nib = _nibabel()
        try:
            image = nib.load(str(path))
        except Exception as exc:
            raise VolumeReadError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
        shape, affine = image.shape[:3], image.affine
    else:
        volume = read_volume(path, series_uid=series_uid)
        shape, affine = volume.shape, volume.affine
    stored_axis = int(_nibabel().orientations.io_orientation(affine)[:, 0].tolist().index(axis))
    return int(shape[stored_axis])


def write_label_volume(path: str | os.PathLike, labels: np.ndarray, like: Volume) -> Path:
    """Write ``labels`` (same shape as ``like``) as a NIfTI label map with ``like``'s affine and header
    (sform / qform codes, descriptions and other fields kept; dtype uint8, or uint16 above 255; scaling
    reset to identity). ``.nii.gz`` is gzip-compressed. Written atomically (no partial file on failure).
    """
    nib = _nibabel()
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != like.shape:
        raise ValueError(f"{path}: label shape {labels.shape} differs from the volume {like.shape}")
    top = int(labels.max()) if labels.size else 0
    dtype = np.uint8 if top <= 255 else np.uint16
    header = like.header.copy() if like.header is not None else None
    image = nib.Nifti1Image(labels.astype(dtype), like.affine, header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if header is None:
        image.set_sform(like.affine, code=1)
        image.set_qform(like.affine, code=1)
    data = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6)
    atomic_write_bytes(path, data)
    return path


def is_readable_nifti(path: str | os.PathLike) -> bool:
    """True when ``path`` is a NIfTI file whose data decode fully (used by ``--resume``)."""
    try:
        read_nifti(path)
        return True
    except (VolumeReadError, ValueError) as exc:
        log.info("%s: existing output is unreadable (%s); it will be redone", path, exc)
        return False


# ------------------------------------------------------------------------------ canonical orientation
@dataclass(frozen=True)
class Reorientation:
    """Axis permutation / flips between a stored array and its closest RAS+ canonical array."""

    to_canonical: np.ndarray   # nibabel orientation transform (3, 2)
    from_canonical: np.ndarray

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Stored (I, J, K) -> canonical array (a view where possible)."""
        return _nibabel().orientations.apply_orientation(data, self.to_canonical)

    def undo(self, data: np.ndarray) -> np.ndarray:
        """Canonical array -> stored order."""
        return _nibabel().orientations.apply_orientation(data, self.from_canonical)


def canonical_affine(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The voxel -> RAS+ affine of the canonical array of a volume stored with ``affine`` and ``shape``
    (``nibabel.as_closest_canonical``'s affine): two volumes store the same grid in another voxel order
    exactly when their canonical shapes and affines agree."""
    orientations = _nibabel().orientations
    ornt = orientations.io_orientation(affine)
    return np.asarray(affine, np.float64) @ orientations.inv_ornt_aff(ornt, shape)


def reorientation(affine: np.ndarray) -> Reorientation:
    """The :class:`Reorientation` of a volume with this voxel -> RAS+ affine."""
    orientations = _nibabel().orientations
    stored = orientations.io_orientation(affine)
    ras = orientations.axcodes2ornt(("R", "A", "S"))
    return Reorientation(orientations.ornt_transform(stored, ras), orientations.ornt_transform(ras, stored))


def slice_view(canonical: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2-D image of canonical slice ``index`` along ``axis`` in the radiological view (see module doc)."""
    return np.ascontiguousarray(np.take(canonical, index, axis=axis)[::-1, ::-1].T)


def put_slice_view(canonical: np.ndarray, axis: int, index: int, image: np.ndarray) -> None:
    """Write a 2-D image in :func:`slice_view`'s geometry back into slice ``index`` of ``canonical``."""
    plane = np.asarray(image).T[::-1, ::-1]
    index_tuple = [slice(None)] * 3
    index_tuple[axis] = index
    canonical[tuple(index_tuple)] = plane
