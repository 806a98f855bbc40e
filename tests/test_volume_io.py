"""Volume input / output without models: NIfTI round trip, DICOM series (order, geometry, rescale, several
series, gaps, compressed data), bad files, canonical slicing."""
import gzip
import logging

import numpy as np
import pytest

from volume_data import LPS, ct_crop, write_dicom_series

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

from refseg.io.dicom import DicomReadError, dicom_affine, read_dicom_series  # noqa: E402
from refseg.io.volume import (VolumeReadError, put_slice_view, read_label_volume, read_nifti,  # noqa: E402
                              read_volume, reorientation, slice_view, write_label_volume)


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    return ct_crop(tmp_path_factory.mktemp("crop"))


def test_nifti_round_trip_keeps_geometry_and_header(crop, tmp_path):
    ct_path, seg_path = crop
    ct = read_volume(ct_path)
    labels = read_label_volume(seg_path)
    assert ct.data.dtype == np.int16 and ct.orientation() == "RAS"
    out = write_label_volume(tmp_path / "sub" / "out.nii.gz", labels.data, ct)
    with open(out, "rb") as handle:
        assert handle.read(2) == b"\x1f\x8b"  # gzip
    back = nib.load(str(out))
    src = nib.load(str(ct_path))
    assert back.shape == src.shape and np.array_equal(back.affine, src.affine)
    assert back.get_data_dtype() == np.uint8
    assert int(back.header["sform_code"]) == int(src.header["sform_code"]) == 2
    assert int(back.header["qform_code"]) == int(src.header["qform_code"])
    assert np.allclose(back.header.get_zooms(), src.header.get_zooms())
    assert back.header["descrip"].tobytes().rstrip(b"\0") == b"refseg test crop"
    assert np.array_equal(np.asanyarray(back.dataobj), labels.data)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left over


def test_canonical_slice_view_round_trip_and_orientation():
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    lps_affine = LPS @ np.diag([2.0, 2.0, 3.0, 1.0])  # stored L->R flipped: i -> left, j -> posterior
    turn = reorientation(lps_affine)
    can = turn.apply(data)
    assert np.array_equal(can, data[::-1, ::-1, :])
    assert np.array_equal(turn.undo(can), data)
    view = slice_view(can, 2, 3)
    # radiological axial view: top row = most anterior, left column = patient right (x smallest)
    assert view.shape == (5, 4) and view[0, 0] == can[-1, -1, 3] and view[-1, -1] == can[0, 0, 3]
    out = np.zeros_like(can)
    for axis in range(3):
        out[:] = 0
        put_slice_view(out, axis, 1, slice_view(can, axis, 1))
        assert np.array_equal(np.take(out, 1, axis), np.take(can, 1, axis))


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_dicom_series_shuffled_and_flipped_matches_the_nifti(crop, tmp_path):
    ct_path, _ = crop
    ct = read_nifti(ct_path)
    files = write_dicom_series(tmp_path / "dcm", ct.data, ct.affine)
    series = read_dicom_series(tmp_path / "dcm")
    # Sorted along the normal, not by file name; pixels transposed + flipped relative to the NIfTI.
    assert series.data.shape == (ct.shape[1], ct.shape[0], ct.shape[2])
    assert series.data.dtype == np.int16  # RescaleIntercept applied: back to HU
    assert [p.name for p in series.files] != sorted(p.name for p in files)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(series.data, series.affine))
    assert np.array_equal(np.asanyarray(canonical.dataobj), ct.data)
    assert np.allclose(canonical.affine, ct.affine, atol=1e-4)
    # Affine vs nibabel's own DICOM wrapper (LPS, voxel (row, column) of one slice).
    from nibabel.nicom.dicomwrappers import wrapper_from_data

    for k in (0, len(series.files) - 1):
        wrapper = wrapper_from_data(pydicom.dcmread(str(series.files[k])))
        ras = LPS @ wrapper.affine
        assert np.allclose(series.affine[:3, :2], ras[:3, :2], atol=1e-5)
        assert np.allclose(series.affine @ [0, 0, k, 1], ras[:, 3], atol=1e-4)
    assert np.allclose(np.cross(*np.reshape(pydicom.dcmread(str(files[0])).ImageOrientationPatient, (2, 3))),
                       [0, 0, -1])  # slice normal points to the feet: a non-trivial storage


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_oblique_affine_matches_nibabel(tmp_path):
    from nibabel.nicom.dicomwrappers import wrapper_from_data

    theta = np.deg2rad(20)
    x = np.array([np.cos(theta), np.sin(theta), 0.0])
    y = np.array([0.0, np.cos(0.3), -np.sin(0.3)])
    y -= x * (x @ y)
    y /= np.linalg.norm(y)
    normal = np.cross(x, y)
    ds = pydicom.Dataset()
    ds.ImagePositionPatient = [10.0, -20.0, 30.0]
    ds.ImageOrientationPatient = [*x, *y]
    ds.PixelSpacing = [0.7, 0.9]
    ds.Rows, ds.Columns = 4, 5
    step = 2.5 * normal
    ours = dicom_affine(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, step)
    theirs = LPS @ wrapper_from_data(ds).affine
    assert np.allclose(ours[:3, :2], theirs[:3, :2]) and np.allclose(ours[:3, 3], theirs[:3, 3])
    assert np.allclose(ours[:3, 2], LPS[:3, :3] @ step)
    # nibabel's single-slice normal is Y x X (right-handed in (row, column, slice)); ours is the measured
    # step between slices: parallel to it.
    assert np.isclose(abs(ours[:3, 2] @ theirs[:3, 2]) / np.linalg.norm(ours[:3, 2]), 1.0)


def test_several_series_gap_and_series_choice(crop, tmp_path, caplog):
    ct = read_nifti(crop[0])
    folder = tmp_path / "mixed"
    write_dicom_series(folder, ct.data, ct.affine, uid="1.2.3.1", skip=(2,))
    small = ct.data[:, :, :2]
    for p in write_dicom_series(tmp_path / "other", small, ct.affine, uid="1.2.3.2"):
        p.rename(folder / f"B_{p.name}")
    with caplog.at_level(logging.WARNING):
        series = read_dicom_series(folder)
    assert series.series_uid == "1.2.3.1" and series.data.shape[2] == ct.shape[2] - 1
    text = caplog.text
    assert "2 series found" in text and "1.2.3.2" in text and "--series" in text
    assert "gap of 6.00 mm" in text and "slices missing" in text
    assert read_dicom_series(folder, series_uid="1.2.3.2").data.shape[2] == 2
    with pytest.raises(DicomReadError, match="no series '9.9'"):
        read_dicom_series(folder, series_uid="9.9")


def test_truncated_and_compressed_dicom_are_named(crop, tmp_path):
    ct = read_nifti(crop[0])
    files = write_dicom_series(tmp_path / "t", ct.data[:, :, :3], ct.affine)
    raw = files[1].read_bytes()
    files[1].write_bytes(raw[: len(raw) - 500])
    with pytest.raises(VolumeReadError, match=files[1].name):
        read_volume(tmp_path / "t")
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    files[1].write_bytes(raw)
    ds = pydicom.dcmread(str(files[0]))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(files[0]), enforce_file_format=True)
    with pytest.raises(VolumeReadError, match=rf"{files[0].name}.*compressed.*JPEG 2000.*pylibjpeg"):
        read_volume(tmp_path / "t")


def test_bad_nifti_inputs(crop, tmp_path, caplog):
    ct_path, _ = crop
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(ct_path.read_bytes()[:2000])
    with pytest.raises(VolumeReadError, match=r"trunc\.nii\.gz: truncated or corrupt"):
        read_volume(truncated)
    flat = tmp_path / "flat.nii.gz"
    nib.Nifti1Image(np.zeros((8, 9), np.int16), np.eye(4)).to_filename(str(flat))
    with pytest.raises(VolumeReadError, match=r"flat\.nii\.gz: expected a 3-D volume.*2-D image"):
        read_volume(flat)
    four = tmp_path / "four.nii.gz"
    nib.Nifti1Image(np.zeros((4, 4, 4, 1), np.int16), np.eye(4)).to_filename(str(four))
    assert read_volume(four).shape == (4, 4, 4)
    nan = tmp_path / "nan.nii.gz"
    values = np.ones((4, 4, 4), np.float32)
    values[0, 0, :2] = [np.nan, np.inf]
    nib.Nifti1Image(values, np.eye(4)).to_filename(str(nan))
    with caplog.at_level(logging.WARNING):
        assert read_volume(nan).shape == (4, 4, 4)
    assert "nan.nii.gz: 2 non-finite voxel(s)" in caplog.text
    labels = tmp_path / "frac.nii.gz"
    nib.Nifti1Image(values * 0.5, np.eye(4)).to_filename(str(labels))
    with pytest.raises(VolumeReadError, match="frac.nii.gz: label map holds non-integer"):
        read_label_volume(labels)
    gz = tmp_path / "bad.nii.gz"
    gz.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(VolumeReadError, match="bad.nii.gz"):
        read_volume(gz)
