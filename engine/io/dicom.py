"""DICOM series input: a folder (or a list) of single-frame DICOM files -> one 3-D array + affine.

Geometry (DICOM PS3.3 C.7.6.2.1.1): ImagePositionPatient (IPP) is the centre of the first transmitted
pixel, ImageOrientationPatient (IOP) holds the direction cosines of the first row (X: direction of
increasing column index) and of the first column (Y: direction of increasing row index), PixelSpacing is
(spacing between rows, spacing between columns) in mm. All in DICOM's patient coordinates, **LPS+**
(x -> patient left, y -> posterior, z -> head).

The array is ``data[r, c, k]`` = pixel (row r, column c) of the k-th slice, slices sorted by their
position along the slice normal ``n = X x Y`` (ascending), which is nibabel's DICOM convention
(``nibabel.nicom.dicomwrappers``). The returned affine maps (r, c, k, 1) to **RAS+** millimetres, the
NIfTI convention: ``affine = diag(-1, -1, 1, 1) @ A_lps`` with
``A_lps[:3, 0] = Y * PixelSpacing[0]``, ``A_lps[:3, 1] = X * PixelSpacing[1]``,
``A_lps[:3, 2] = (IPP_last - IPP_first) / (N - 1)`` (for one slice: SliceThickness x (Y x X), nibabel's
right-handed choice) and
``A_lps[:3, 3] = IPP_first``.

RescaleSlope / RescaleIntercept are applied (CT values come out in Hounsfield units). Compressed transfer
syntaxes need a pixel-data plugin; the error names the package to install.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from refseg.optional import require

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Flip of the first two world axes between DICOM's LPS+ and NIfTI's RAS+ (its own inverse)."""

# Largest spacing between neighbouring slices, as a multiple of the median spacing, before a gap is reported.
GAP_FACTOR = 1.5
_DECODERS = ("pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (JPEG, JPEG-LS, JPEG 2000), "
             "or python-gdcm")


class DicomReadError(ValueError):
    """A DICOM file or series could not be read; the message names the file or folder and the problem."""


@dataclass
class DicomSeries:
    """One series read from disk.

    Attributes:
        data: (Rows, Columns, N) array, float32 after rescale (int16 / int32 when slope and intercept keep
            integers), ``data[r, c, k]``.
        affine: (4, 4) voxel (r, c, k) -> RAS+ mm.
        files: the file of each slice k, in array order.
        series_uid: SeriesInstanceUID.
        instance_numbers: InstanceNumber of each slice k (``None`` where a file has none).
    """

    data: np.ndarray
    affine: np.ndarray
    files: list[Path]
    series_uid: str
    instance_numbers: list[int | None] = field(default_factory=list)


def dicom_affine(ipp_first: Sequence[float], iop: Sequence[float], pixel_spacing: Sequence[float],
                 slice_step: Sequence[float]) -> np.ndarray:
    """RAS+ affine of voxel (r, c, k): see the module docstring. ``slice_step`` is the LPS vector (mm)
    from slice k to slice k + 1."""
    iop = np.asarray(iop, np.float64)
    x, y = iop[:3], iop[3:]
    lps = np.eye(4)
    lps[:3, 0] = y * float(pixel_spacing[0])
    lps[:3, 1] = x * float(pixel_spacing[1])
    lps[:3, 2] = np.asarray(slice_step, np.float64)
    lps[:3, 3] = np.asarray(ipp_first, np.float64)
    return LPS_TO_RAS @ lps


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` carries the DICOM Part 10 preamble ("DICM" at byte 128) or a .dcm suffix."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """DICOM files directly inside ``folder`` (not recursive, hidden files and DICOMDIR skipped), sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
                  and is_dicom_file(p))


def _read_header(pydicom, path: Path):
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # InvalidDicomError, EOFError, OSError ...: one message naming the file
        raise DicomReadError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _geometry(ds, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        spacing = np.asarray([float(v) for v in ds.PixelSpacing])
        shape = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomReadError(f"{path}: missing or invalid geometry (ImagePositionPatient, "
                             f"ImageOrientationPatient, PixelSpacing, Rows, Columns): {exc}") from exc
    if ipp.shape != (3,) or iop.shape != (6,) or spacing.shape != (2,):
        raise DicomReadError(f"{path}: malformed geometry tags IPP={ipp.tolist()} IOP={iop.tolist()} "
                             f"PixelSpacing={spacing.tolist()}")
    return ipp, iop, spacing, shape


def _pixels(ds, path: Path) -> np.ndarray:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        array = ds.pixel_array
    except Exception as exc:
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise DicomReadError(
                f"{path}: pixel data is compressed ({syntax.name}, {syntax}) and no installed decoder "
                f"handles it; install one of: {_DECODERS}") from exc
        raise DicomReadError(f"{path}: pixel data cannot be decoded (truncated or corrupt file?): "
                             f"{type(exc).__name__}: {exc}") from exc
    if array.ndim != 2:
        raise DicomReadError(f"{path}: expected a single-frame greyscale image, pixel array has shape "
                             f"{array.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    if slope == 1.0 and intercept == 0.0:
        return array
    return array.astype(np.float64) * slope + intercept


def read_dicom_series(source: str | os.PathLike | Sequence[str | os.PathLike],
                      series_uid: str | None = None) -> DicomSeries:
    """Read one DICOM series from a folder or a list of files (any order).

    Several series in the folder: ``series_uid`` picks one, else the one with most files is read and the
    others are named in a warning. Slices are sorted along the slice normal; a gap (a neighbour spacing
    over 1.5 x the median) is warned about, naming the files around it.

    Raises:
        DicomReadError: no DICOM file, an unreadable / truncated file (named), mixed orientations or
            sizes, duplicate positions, an unknown ``series_uid``, or compressed pixel data without a decoder.
    """
    pydicom = require("pydicom", extra="io", purpose="Reading DICOM series")
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise DicomReadError(f"{folder}: not a folder of DICOM files")
        files = dicom_files(folder)
        where = str(folder)
    else:
        files = [Path(p) for p in source]
        where = f"{len(files)} DICOM files"
    if not files:
        raise DicomReadError(f"{where}: no DICOM file found")
    headers = [(path, _read_header(pydicom, path)) for path in files]
    by_series: dict[str, list] = {}
    for path, ds in headers:
        by_series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((path, ds))
    if series_uid is not None:
        if series_uid not in by_series:
            raise DicomReadError(f"{where}: no series {series_uid!r}; found {', '.join(sorted(by_series))}")
        chosen = series_uid
    else:
        chosen = max(by_series, key=lambda uid: len(by_series[uid]))
        if len(by_series) > 1:
            others = ", ".join(f"{uid} ({len(v)} files)" for uid, v in by_series.items() if uid != chosen)
            log.warning("%s: %d series found; reading the largest, %s (%d files); others: %s "
                        "(choose with --series UID)", where, len(by_series), chosen, len(by_series[chosen]),
                        others)
    members = by_series[chosen]
    geoms = [_geometry(ds, path) for path, ds in members]
    iop0, spacing0, shape0 = geoms[0][1], geoms[0][2], geoms[0][3]
    for (path, _), (_, iop, spacing, shape) in zip(members, geoms):
        if not np.allclose(iop, iop0, atol=1e-4):
            raise DicomReadError(f"{path}: ImageOrientationPatient {iop.tolist()} differs from the series' "
                                 f"{iop0.tolist()} (mixed orientations; choose one series)")
        if shape != shape0 or not np.allclose(spacing, spacing0, atol=1e-4):
            raise DicomReadError(f"{path}: size {shape} / spacing {spacing.tolist()} differ from the series' "
                                 f"{shape0} / {spacing0.tolist()}")
    normal = np.cross(iop0[:3], iop0[3:])
    positions = np.asarray([float(g[0] @ normal) for g in geoms])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    members = [members[i] for i in order]
    ipps = [geoms[i][0] for i in order]
    steps = np.diff(positions)
    if steps.size and steps.min() < 1e-3:
        k = int(steps.argmin())
        raise DicomReadError(f"{members[k][0]} and {members[k + 1][0]}: two slices at the same position "
                             f"{positions[k]:.3f} mm (several acquisitions in one series?)")
    if steps.size > 1:
        median = float(np.median(steps))
        for k in np.nonzero(steps > GAP_FACTOR * median)[0]:
            log.warning("%s: gap of %.2f mm between %s and %s (median spacing %.2f mm): slices missing?",
                        where, steps[k], members[k][0].name, members[k + 1][0].name, median)
    slices = []
    for path, _ in members:
        try:
            ds = pydicom.dcmread(str(path))
        except Exception as exc:
            raise DicomReadError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
        slices.append(_pixels(ds, path))
    data = np.stack(slices, axis=-1)
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.rint(data)
        if np.array_equal(rounded, data) and rounded.min() >= -(2 ** 31) and rounded.max() < 2 ** 31:
            data = rounded.astype(np.int16 if rounded.min() >= -32768 and rounded.max() < 32768 else np.int32)
        else:
            data = data.astype(np.float32)
    if len(members) > 1:
        step = (ipps[-1] - ipps[0]) / (len(members) - 1)
    else:
        thickness = float(getattr(members[0][1], "SliceThickness", 1.0) or 1.0)
        step = -normal * thickness  # Y x X, right-handed in (r, c, k), as nibabel's DICOM wrapper
    affine = dicom_affine(ipps[0], iop0, spacing0, step)
    numbers = [None if getattr(ds, "InstanceNumber", None) in (None, "") else int(ds.InstanceNumber)
               for _, ds in members]
    return DicomSeries(data=data, affine=affine, files=[p for p, _ in members], series_uid=chosen,
                       instance_numbers=numbers)
