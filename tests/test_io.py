"""Tests of refseg.io: image / mask reading, atomic writers, overlays, output naming and the run summary."""
from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refseg.io import (IMAGE_SUFFIXES, ImageReadError, OutputPaths, atomic_write_bytes, atomic_writer,
                       is_done, is_image_file, list_images, mask_to_png_array, output_paths, overlay, read_image,
                       read_mask, to_rgb_uint8, unique_stems, write_json, write_png)
from refseg.io.writers import BOX_COLOUR, NEGATIVE_COLOUR, POSITIVE_COLOUR, class_colour
from refseg.optional import MissingDependencyError, available

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KVASIR = DATA / "kvasir_seg5"
GBM_MASK = DATA / "gbmseg_example" / "reference_mask" / "001_264193_2.png"
# Polyp pixel counts (mask value > 127) from kvasir_seg5/SOURCES.md.
KVASIR_POLYP_PX = {
    "cju0qkwl35piu0993l0dewei2": 93043,
    "cju0qoxqj9q6s0835b43399p4": 390295,
    "cju0qx73cjw570799j4n5cjze": 104400,
    "cju0roawvklrq0799vmjorwfv": 35632,
    "cju0rx1idathl0835detmsp84": 23706,
}

RNG = np.random.default_rng(0)


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _tiff_rgb16(data: np.ndarray) -> bytes:
    """Minimal little-endian baseline TIFF with 3 uint16 samples per pixel (Pillow cannot write these)."""
    height, width, _ = data.shape
    pixels = data.astype("<u2").tobytes()
    bps_offset, pix_offset = 8, 14
    ifd_offset = pix_offset + len(pixels) + (len(pixels) % 2)
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 3, bps_offset), (259, 3, 1, 1),
               (262, 3, 1, 2), (273, 4, 1, pix_offset), (277, 3, 1, 3), (278, 3, 1, height),
               (279, 4, 1, len(pixels)), (284, 3, 1, 1)]
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<3H", 16, 16, 16) + pixels)
    out += b"\x00" * (ifd_offset - len(out))
    out += struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        if kind == 3 and count == 1:
            out += struct.pack("<HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, kind, count, value)
    return bytes(out + struct.pack("<I", 0))


def _png_rgb16(data: np.ndarray) -> bytes:
    """Minimal 16-bit RGB PNG (Pillow cannot write these)."""
    height, width, _ = data.shape
    raw = b"".join(b"\x00" + data[y].astype(">u2").tobytes() for y in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ read_image
def test_suffixes_are_case_insensitive():
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"} == set(IMAGE_SUFFIXES)
    assert is_image_file("A.PNG") and is_image_file("b.JpEg") and is_image_file("c.TIF")
    assert not is_image_file("d.nii.gz") and not is_image_file("e.txt")


def test_read_grayscale_rgb_rgba_bmp_exact(tmp_path):
    gray = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgba = RNG.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    for name, array in [("g.png", gray), ("c.png", rgb), ("a.png", rgba), ("b.bmp", rgb), ("g.bmp", gray),
                        ("t.tif", rgb)]:
        out = read_image(_save(tmp_path / name, array))
        assert out.dtype == np.uint8 and np.array_equal(out, array), name


def test_read_jpeg_is_close(tmp_path):
    smooth = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (48, 1))
    rgb = np.stack([smooth, smooth[::-1], np.full_like(smooth, 128)], axis=2).astype(np.uint8)
    out = read_image(_save(tmp_path / "x.JPG", rgb, quality=95))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).max() <= 8  # lossy codec tolerance


def test_read_16bit_png_and_tiff_exact(tmp_path):
    array = RNG.integers(0, 65536, (17, 23), dtype=np.uint16)
    for name in ("a.png", "b.tif", "c.tiff"):
        out = read_image(_save(tmp_path / name, array))
        assert out.dtype == np.uint16 and np.array_equal(out, array), name


def test_read_float_tiff_one_bit_palette_and_la(tmp_path):
    floats = RNG.random((9, 11)).astype(np.float32)
    assert np.array_equal(read_image(_save(tmp_path / "f.tif", floats)), floats)
    bits = RNG.random((9, 11)) > 0.5
    out = read_image(_save(tmp_path / "b.png", bits))
    assert out.dtype == bool and np.array_equal(out, bits)
    palette = Image.fromarray(RNG.integers(0, 4, (9, 11), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(tmp_path / "p.png")
    expected = np.asarray(palette.convert("RGB"))
    assert np.array_equal(read_image(tmp_path / "p.png"), expected)
    la = RNG.integers(0, 256, (9, 11, 2), dtype=np.uint8)
    out = read_image(_save(tmp_path / "la.png", la))
    assert out.shape == (9, 11, 4)
    assert np.array_equal(out[..., 0], la[..., 0]) and np.array_equal(out[..., 3], la[..., 1])


def test_read_16bit_rgb_tiff_uses_tifffile(tmp_path):
    data = RNG.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.tif"
    path.write_bytes(_tiff_rgb16(data))
    if available("tifffile"):
        out = read_image(path)
        assert out.dtype == np.uint16 and np.array_equal(out, data)
    else:
        with pytest.raises(MissingDependencyError, match=r"refseg\[io\].*|tifffile"):
            read_image(path)


def test_read_16bit_rgb_png_warns(tmp_path, caplog):
    data = (np.arange(4 * 6 * 3, dtype=np.uint16) * 900).reshape(4, 6, 3)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_rgb16(data))
    with caplog.at_level(logging.WARNING, logger="refseg.io.raster"):
        out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    assert np.array_equal(out, (data >> 8).astype(np.uint8))  # Pillow keeps the high byte
    assert "16-bit colour PNG" in caplog.text


def test_exif_orientation_ignored_and_multipage_first_frame(tmp_path, caplog):
    rgb = RNG.integers(0, 256, (10, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" tag
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    pages = [Image.fromarray(np.full((6, 8), v, np.uint8)) for v in (10, 20)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with caplog.at_level(logging.WARNING, logger="refseg.io.raster"):
        assert read_image(tmp_path / "rot.jpg").shape == (10, 16, 3)  # stored grid, not rotated
        assert np.array_equal(read_image(tmp_path / "stack.tif"), np.full((6, 8), 10, np.uint8))
    assert "EXIF orientation 6 is ignored" in caplog.text and "2 frames" in caplog.text


@pytest.mark.parametrize("problem", ["missing", "empty", "not_image", "truncated_png", "truncated_jpeg",
                                     "too_small", "folder"])
def test_read_image_bad_inputs(tmp_path, problem):
    noise = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    if problem == "missing":
        path, words = tmp_path / "none.png", "does not exist"
    elif problem == "empty":
        path, words = tmp_path / "empty.png", "0 bytes"
        path.write_bytes(b"")
    elif problem == "not_image":
        path, words = tmp_path / "text.png", "not a recognised image"
        path.write_bytes(b"this is not an image, just some text\n" * 10)
    elif problem in ("truncated_png", "truncated_jpeg"):
        path = _save(tmp_path / ("cut.png" if problem == "truncated_png" else "cut.jpg"), noise)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        words = "truncated"
    elif problem == "too_small":
        path, words = _save(tmp_path / "line.png", noise[:1, :, 0].copy()), "too small"
    else:
        path, words = tmp_path / "dir.png", "not a regular file"
        path.mkdir()
    with pytest.raises(ImageReadError, match=words) as info:
        read_image(path)
    assert path.name in str(info.value)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------ to_rgb_uint8
def _reference_window(values: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(values, [0.5, 99.5], method="inverted_cdf")
    return np.clip(np.rint((values.astype(np.float64) - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def test_to_rgb_uint8_grayscale_rgba_bool():
    gray = RNG.integers(0, 256, (6, 8), dtype=np.uint8)
    out = to_rgb_uint8(gray)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], gray) for c in range(3))
    rgba = RNG.integers(0, 256, (6, 8, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 0)  # fully transparent: colour kept, not composited on black
    out = to_rgb_uint8(rgba)
    assert np.array_equal(out, rgba[..., :3]) and tuple(out[0, 0]) == (200, 100, 50)
    mask = RNG.random((6, 8)) > 0.5
    assert np.array_equal(to_rgb_uint8(mask)[..., 1], np.where(mask, 255, 0))
    assert np.array_equal(to_rgb_uint8(gray[..., None]), to_rgb_uint8(gray))


def test_to_rgb_uint8_uint16_percentile_window():
    # Microscopy-like: values fill 200..3000 of the 16-bit range plus a few hot pixels.
    image = RNG.integers(200, 3000, (64, 80), dtype=np.uint16)
    image[0, :5] = 65535
    out = to_rgb_uint8(image)
    ref = _reference_window(image)
    assert np.abs(out[..., 0].astype(int) - ref).max() <= 1  # float32 vs float64 rounding
    assert out[0, 0, 0] == 255 and out.max() == 255 and out.min() == 0
    assert np.unique(out).size > 200  # the contrast of the data is used, not the dtype range
    # RGB uint16 uses one window for all channels (colour balance kept).
    rgb = RNG.integers(0, 4000, (32, 32, 3), dtype=np.uint16)
    assert np.abs(to_rgb_uint8(rgb).astype(int) - _reference_window(rgb)).max() <= 1


def test_to_rgb_uint8_signed_ct_and_degenerate_windows():
    ct = RNG.integers(-1024, 1500, (40, 40)).astype(np.int16)
    assert np.abs(to_rgb_uint8(ct)[..., 2].astype(int) - _reference_window(ct)).max() <= 1
    assert not to_rgb_uint8(np.full((5, 5), 1234, np.uint16)).any()
    # Nearly constant: p0.5 == p99.5, so min..max is used and the outliers stay visible.
    sparse = np.full((40, 40), 100, np.uint16)
    sparse[0, 0], sparse[1, 1] = 0, 200
    out = to_rgb_uint8(sparse)[..., 0]
    assert (out[0, 0], out[1, 1], out[5, 5]) == (0, 255, 128)


def test_to_rgb_uint8_float_min_max():
    image = np.linspace(-2.0, 3.0, 6 * 7, dtype=np.float32).reshape(6, 7)
    image[0, 0], image[0, 1], image[0, 2] = np.nan, np.inf, -np.inf
    out = to_rgb_uint8(image)[..., 0]
    finite = image[np.isfinite(image)]
    expected = np.rint((image - finite.min()) / (finite.max() - finite.min()) * 255)
    valid = np.isfinite(image)
    assert np.abs(out[valid].astype(int) - expected[valid]).max() <= 1
    assert (out[0, 0], out[0, 1], out[0, 2]) == (0, 255, 0)
    assert not to_rgb_uint8(np.full((4, 4), 0.7, np.float64)).any()
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))


# ------------------------------------------------------------------------------------------------ read_mask
def test_read_mask_binary_and_labels(tmp_path):
    binary = (RNG.random((16, 20)) > 0.6).astype(np.uint8)
    out = read_mask(_save(tmp_path / "b.png", binary * 255))
    assert out.dtype == np.int64 and np.array_equal(out, binary)
    assert np.array_equal(read_mask(_save(tmp_path / "b01.png", binary)), binary)
    labels = RNG.choice(np.array([0, 1, 2, 5], np.uint8), (16, 20))
    assert np.array_equal(read_mask(_save(tmp_path / "l.png", labels)), labels)
    labels16 = RNG.choice(np.array([0, 7, 300, 4000], np.uint16), (16, 20))
    assert np.array_equal(read_mask(_save(tmp_path / "l16.png", labels16)), labels16)
    assert np.array_equal(read_mask(_save(tmp_path / "b16.tif", binary.astype(np.uint16) * 65535)), binary)
    assert np.array_equal(read_mask(_save(tmp_path / "bits.png", binary.astype(bool))), binary)


def test_read_mask_rgb_equal_channels_palette_and_colour_error(tmp_path):
    binary = (RNG.random((16, 20)) > 0.5).astype(np.uint8)
    rgb = np.repeat((binary * 255)[..., None], 3, axis=2)
    assert np.array_equal(read_mask(_save(tmp_path / "rgb.png", rgb)), binary)
    rgba = np.concatenate([rgb, np.full((16, 20, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(read_mask(_save(tmp_path / "rgba.png", rgba)), binary)
    indices = RNG.integers(0, 3, (16, 20), dtype=np.uint8)
    palette = Image.fromarray(indices, "P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    palette.save(tmp_path / "voc.png")
    assert np.array_equal(read_mask(tmp_path / "voc.png"), indices)
    coloured = rgb.copy()
    coloured[0, 0] = (255, 0, 0)
    with pytest.raises(ImageReadError, match="differing R, G, B") as info:
        read_mask(_save(tmp_path / "colour.png", coloured))
    assert "colour.png" in str(info.value)


def test_read_mask_jpeg_threshold_and_warning(tmp_path, caplog):
    binary = np.zeros((64, 64), np.uint8)
    binary[16:48, 10:40] = 1
    out = read_mask(_save(tmp_path / "m.jpg", binary * 255, quality=90))
    assert np.array_equal(out, binary)  # JPEG ringing stays far from 128 on a blocky mask
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    with caplog.at_level(logging.WARNING, logger="refseg.io.raster"):
        out = read_mask(_save(tmp_path / "ramp.jpeg", ramp, quality=100))
    assert "not clearly binary" in caplog.text
    assert set(np.unique(out)) == {0, 1}
    # RGB JPEG of a grey mask: compression makes channels differ slightly; still read as binary.
    rgb = np.repeat((binary * 255)[..., None], 3, axis=2)
    rgb[binary == 1] = (250, 255, 246)
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=90, subsampling=2)
    assert np.array_equal(read_mask(tmp_path / "rgb.jpg"), binary)
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[binary == 1] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "red.jpg", quality=90)
    with pytest.raises(ImageReadError, match="red.jpg.*differing R, G, B"):
        read_mask(tmp_path / "red.jpg")


@pytest.mark.skipif(not KVASIR.is_dir(), reason=f"test data {KVASIR} not present")
def test_read_mask_kvasir_jpeg_counts():
    masks = list_images(KVASIR / "masks")
    assert [m.stem for m in masks] == sorted(KVASIR_POLYP_PX)
    for path in masks:
        mask = read_mask(path)
        image = read_image(KVASIR / "images" / path.name)
        assert mask.shape == image.shape[:2]
        assert set(np.unique(mask)) == {0, 1}
        assert int(mask.sum()) == KVASIR_POLYP_PX[path.stem], path.name


@pytest.mark.skipif(not GBM_MASK.is_file(), reason=f"test data {GBM_MASK} not present")
def test_read_mask_gbmseg_rgb_png():
    mask = read_mask(GBM_MASK)
    assert mask.shape == (512, 512) and int(mask.sum()) == 46386 and set(np.unique(mask)) == {0, 1}


# ------------------------------------------------------------------------------------------------ list_images
def test_list_images(tmp_path):
    tiny = np.zeros((4, 4), np.uint8)
    for name in ("b.png", "a.JPG", "c.tiff", ".hidden.png", "notes.txt", "vol.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    _save(tmp_path / "d.bmp", tiny)
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "c.tiff", "d.bmp"]
    assert list_images(tmp_path / "d.bmp") == [tmp_path / "d.bmp"]
    with pytest.raises(ValueError, match="unsupported file type"):
        list_images(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir.*no image"):
        list_images(empty)


# ------------------------------------------------------------------------------------------------ writers
def test_atomic_write_bytes_and_no_leftovers(tmp_path):
    target = tmp_path / "deep" / "out.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _leftovers(target.parent) == []


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"version": 1})
    before = target.read_bytes()
    with pytest.raises(TypeError, match=r"obj\['bad'\].*object"):
        write_json(target, {"version": 2, "bad": object()})  # serialiser fails
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_writer(target, "w") as handle:  # fails half-way through writing
            handle.write('{"version": ')
            raise RuntimeError("disk full")
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="cannot write"):
        write_png(tmp_path / "x.png", np.zeros((4, 4), np.float32))
    assert not (tmp_path / "x.png").exists() and _leftovers(tmp_path) == []


def test_write_json_converts_numpy(tmp_path):
    target = tmp_path / "p.json"
    obj = {"z": np.int64(3), "a": np.float32(0.5), "arr": np.arange(3, dtype=np.uint8), "path": Path("x/y.png"),
           "nan": float("nan"), "flag": np.bool_(True), "pts": np.array([[1.5, 2.0]]), np.int32(7): "int key"}
    write_json(target, obj)
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == {"z": 3, "a": 0.5, "arr": [0, 1, 2], "path": "x/y.png", "nan": None,
                                "flag": True, "pts": [[1.5, 2.0]], "7": "int key"}
    assert list(json.loads(text)) == ["z", "a", "arr", "path", "nan", "flag", "pts", "7"]  # not sorted
    assert text.startswith('{\n  "z": 3,')  # indent 2


def test_write_png_round_trip(tmp_path):
    arrays = {"g.png": RNG.integers(0, 256, (9, 13), dtype=np.uint8),
              "c.png": RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8),
              "a.png": RNG.integers(0, 256, (9, 13, 4), dtype=np.uint8),
              "w.png": RNG.integers(0, 65536, (9, 13), dtype=np.uint16)}
    for name, array in arrays.items():
        write_png(tmp_path / name, array)
        out = read_image(tmp_path / name)
        assert out.dtype == array.dtype and np.array_equal(out, array), name
    for bad in (np.zeros((4, 4), np.int64), np.zeros((4, 4), bool), np.zeros((4, 4, 3), np.uint16)):
        with pytest.raises(ValueError, match="bad.png"):
            write_png(tmp_path / "bad.png", bad)
    assert _leftovers(tmp_path) == []


def test_mask_to_png_array_round_trip(tmp_path):
    binary = RNG.random((10, 12)) > 0.5
    one = mask_to_png_array(binary.astype(np.int64), 1)
    assert one.dtype == np.uint8 and set(np.unique(one)) == {0, 255}
    write_png(tmp_path / "one.png", one)
    assert np.array_equal(read_mask(tmp_path / "one.png"), binary)
    labels = RNG.integers(0, 4, (10, 12))
    multi = mask_to_png_array(labels, 3)
    assert multi.dtype == np.uint8 and np.array_equal(multi, labels)
    write_png(tmp_path / "multi.png", multi)
    assert np.array_equal(read_mask(tmp_path / "multi.png"), labels)
    wide = labels * 100  # max 300
    assert mask_to_png_array(wide, 3).dtype == np.uint16
    write_png(tmp_path / "wide.png", mask_to_png_array(wide, 3))
    assert np.array_equal(read_mask(tmp_path / "wide.png"), wide)
    with pytest.raises(ValueError, match="negative"):
        mask_to_png_array(labels - 1, 3)
    with pytest.raises(ValueError, match="65535"):
        mask_to_png_array(np.full((2, 2), 70000), 2)
    with pytest.raises(ValueError, match="integer"):
        mask_to_png_array(np.zeros((2, 2), np.float32), 1)


def test_overlay_colours():
    image = np.full((100, 120, 3), 40, np.uint8)
    labels = np.zeros((100, 120), np.int64)
    labels[20:60, 30:80] = 1
    labels[70:90, 90:110] = 2
    points = np.array([[10.0, 10.0], [100.0, 15.0], [50.0, 95.0]])
    out = overlay(image, labels, points=points, point_labels=np.array([1, 0, -1]), box=(5, 65, 60, 98),
                  alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert tuple(out[10, 10]) == POSITIVE_COLOUR and tuple(out[15, 100]) == NEGATIVE_COLOUR
    assert tuple(out[95, 50]) == (40, 40, 40)  # label -1 (padding) is not drawn
    for (y, x), label in (((40, 55), 1), ((80, 100), 2)):  # interior: alpha blend
        expected = np.rint(0.5 * 40 + 0.5 * np.asarray(class_colour(label)))
        assert np.array_equal(out[y, x], expected)
    assert tuple(out[20, 55]) == class_colour(1) and tuple(out[59, 55]) == class_colour(1)  # contour
    assert tuple(out[65, 30]) == BOX_COLOUR and tuple(out[80, 5]) == BOX_COLOUR
    assert tuple(out[5, 60]) == (40, 40, 40)  # background untouched
    assert tuple(overlay(image, labels, points=[[60, 40]])[40, 60]) == POSITIVE_COLOUR  # default: positive
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, labels[:50])
    with pytest.raises(ValueError, match="point_labels"):
        overlay(image, labels, points=points, point_labels=[1])


def test_output_paths_and_input_protection(tmp_path):
    paths = output_paths(tmp_path / "out", Path("in/case_01.jpg"))
    assert paths == OutputPaths(mask=tmp_path / "out" / "case_01.png", prompts=tmp_path / "out" / "case_01.json",
                                overlay=tmp_path / "out" / "case_01_overlay.png")
    assert output_paths(tmp_path, "a.jpg", stem="a_jpg").mask == tmp_path / "a_jpg.png"
    source = _save(tmp_path / "img.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="overwrite the input"):
        output_paths(tmp_path, source)


def test_unique_stems():
    assert unique_stems([Path("a.png"), Path("a.jpg"), Path("b.tif")]) == {
        Path("a.png"): "a", Path("a.jpg"): "a_jpg", Path("b.tif"): "b"}
    # Case-insensitive clash, a clash with another input's stem, and the same name in two folders.
    stems = unique_stems(["x/a.png", "x/A.JPG", "x/a_jpg.png", "y/a.png"])
    assert stems == {Path("x/a.png"): "a", Path("x/A.JPG"): "A_jpg_2", Path("x/a_jpg.png"): "a_jpg",
                     Path("y/a.png"): "a_png"}
    assert len({s.casefold() for s in stems.values()}) == 4


def test_is_done(tmp_path):
    paths = output_paths(tmp_path, "case.jpg")
    assert not is_done(paths)
    paths.mask.write_bytes(b"")
    assert not is_done(paths)
    write_png(paths.mask, RNG.integers(0, 256, (64, 64), dtype=np.uint8))
    assert is_done(paths) and is_done(paths.mask)
    data = paths.mask.read_bytes()
    paths.mask.write_bytes(data[: len(data) // 2])
    assert not is_done(paths)
    paths.mask.write_bytes(b"not a png at all")
    assert not is_done(paths)
    _save(paths.mask, np.zeros((8, 8), np.uint8), format="JPEG")  # readable, but not a PNG
    assert not is_done(paths)
