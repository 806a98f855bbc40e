"""Test helpers for volumes: a small crop of the TotalSegmentator CT, and DICOM series written from it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA

TOTALSEG = SHARED_DATA / "totalseg_ct"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ct_crop(folder: Path, z: slice = slice(8, 14), step: int = 1) -> tuple[Path, Path]:
    """Write a crop of example_ct_sm / example_seg (every ``step``-th voxel in-plane, slices ``z``) as
    NIfTI with the right affine; returns (ct path, label path)."""
    nib = pytest.importorskip("nibabel")
    if not (TOTALSEG / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"TotalSegmentator CT not found at {TOTALSEG}")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
        img = nib.load(str(TOTALSEG / name))
        data = np.asanyarray(img.dataobj)[::step, ::step, z]
        affine = img.affine.copy()
        affine[:3, :3] = img.affine[:3, :3] * np.array([step, step, 1])
        affine[:3, 3] = img.affine[:3, :3] @ np.array([0, 0, z.start]) + img.affine[:3, 3]
        header = img.header.copy()
        new = nib.Nifti1Image(data, affine, header=header)
        new.header["descrip"] = b"refseg test crop"
        path = folder / name.replace("example_", "crop_")
        new.to_filename(str(path))
        out.append(path)
    return out[0], out[1]


def write_dicom_series(folder: Path, data: np.ndarray, affine: np.ndarray, uid: str = "1.2.826.0.1.3680043.8.498.1",
                       shuffle_seed: int | None = 0, skip: tuple[int, ...] = (),
                       instance_numbers: bool = False) -> list[Path]:
    """Write a NIfTI volume (RAS+ ``affine``, int16 HU ``data[i, j, k]``) as a CT DICOM series in a
    transposed + flipped storage: DICOM pixel (row r, column c) of file slice kk is voxel
    (i = c, j = J-1-r, k = K-1-kk). Values stored as uint16 with RescaleIntercept -2048. Files are named
    in shuffled order; slices in ``skip`` are left out (a gap). ``instance_numbers``: file slice kk gets
    InstanceNumber kk + 1 (the order per-slice masks follow with ``--pair-by order``)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    n_i, n_j, n_k = data.shape
    lps = LPS @ affine
    x_dir = lps[:3, 0] / np.linalg.norm(lps[:3, 0])    # increasing column c = increasing i
    y_dir = -lps[:3, 1] / np.linalg.norm(lps[:3, 1])   # increasing row r = decreasing j
    spacing = [float(np.linalg.norm(lps[:3, 1])), float(np.linalg.norm(lps[:3, 0]))]
    order = list(range(n_k))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    paths = []
    for number, kk in enumerate(order):
        if kk in skip:
            continue
        k = n_k - 1 - kk
        pixel = data[:, ::-1, k].T  # [r, c] = data[c, J-1-r, k]
        ipp = lps @ np.array([0, n_j - 1, k, 1.0])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{number:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", uid, uid + ".9"
        if instance_numbers:
            ds.InstanceNumber = kk + 1
        ds.ImagePositionPatient = [float(v) for v in ipp[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*x_dir, *y_dir)]
        ds.PixelSpacing = spacing
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = pixel.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -2048
        ds.PixelData = (pixel.astype(np.int32) + 2048).astype(np.uint16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def synthetic_volume(folder: Path, name: str = "vol", shape: tuple[int, int, int] = (64, 64, 6), label: int = 5,
                     seed: int = 0, affine: np.ndarray | None = None) -> tuple[Path, Path]:
    """A small CT-like NIfTI volume (HU, int16) with a bright block of 8-px random texture in the middle of
    every slice, and its label map marking the block with ``label`` on slices 1..K-2; returns (image, labels).
    Sized for DINOv2 at 56 px: the block covers whole 14-px patches."""
    nib = pytest.importorskip("nibabel")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    i, j, k = shape
    texture = np.kron(rng.integers(-200, 200, (i // 8, j // 8, k)), np.ones((8, 8, 1)))
    data = (-800 + texture).astype(np.int16)
    data[16:48, 16:48] += 900
    labels = np.zeros(shape, np.uint8)
    labels[16:48, 16:48, 1:k - 1] = label
    affine = np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine
    paths = (folder / f"{name}.nii.gz", folder / f"{name}_labels.nii.gz")
    nib.Nifti1Image(data, affine).to_filename(str(paths[0]))
    nib.Nifti1Image(labels, affine).to_filename(str(paths[1]))
    return paths
