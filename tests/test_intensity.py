"""Intensity windows: named / explicit windows, and one window for a reference and all its targets."""
import numpy as np
import pytest

from refseg.io.intensity import WINDOW_PRESETS, Window, auto_window, parse_window
from refseg.io.raster import to_rgb_uint8


def test_parse_window_presets_and_level_width():
    w = parse_window("40,400")
    assert (w.lo, w.hi, w.level, w.width) == (-160.0, 240.0, 40.0, 400.0)
    assert parse_window(" -600 , 1500 ").lo == -1350.0
    for name, (level, width) in WINDOW_PRESETS.items():
        w = parse_window(name.upper())
        assert (w.level, w.width, w.source) == (level, width, name)
    assert set(WINDOW_PRESETS) >= {"abdomen", "liver", "lung", "bone", "brain"}
    for bad in ("40", "a,b", "40,0", "40,-5", "soft", "1,2,3"):
        with pytest.raises(ValueError, match="LEVEL,WIDTH"):
            parse_window(bad)


def test_window_apply_clips_and_handles_non_finite():
    w = Window.from_level_width(40, 400)  # -160 .. 240 HU
    hu = np.array([-1000, -160, 40, 240, 3000], np.int16)
    assert w.apply(hu).tolist() == [0, 0, 128, 255, 255]
    f = np.array([np.nan, np.inf, -np.inf, 40.0], np.float32)
    assert w.apply(f).tolist() == [0, 255, 0, 128]
    with pytest.raises(ValueError):
        Window(5.0, 5.0)


def test_auto_window_percentiles_and_floats():
    rng = np.random.default_rng(0)
    image = rng.integers(200, 3000, (64, 64)).astype(np.uint16)
    image[0, :5] = 65535  # hot pixels are outside p99.5
    w = auto_window(image)
    assert 200 <= w.lo < 240 and 2960 < w.hi < 3000
    vol = rng.normal(0, 1, (8, 8, 8)).astype(np.float32)
    vol[0, 0, 0] = np.nan
    w = auto_window(vol, (0.5, 99.5))
    finite = vol[np.isfinite(vol)]
    assert finite.min() < w.lo < w.hi < finite.max()  # volumes: percentiles also for floats
    assert auto_window(np.full((4, 4), 3, np.int16)) is None


def test_to_rgb_uint8_uses_a_given_window():
    ct = np.array([[-1000, 0], [100, 2000]], np.int16)
    out = to_rgb_uint8(ct, parse_window("0,200"))
    assert out.shape == (2, 2, 3) and out[..., 0].tolist() == [[0, 128], [255, 255]]
    assert np.array_equal(to_rgb_uint8(np.uint8([[1, 2]]), parse_window("0,200")), to_rgb_uint8(np.uint8([[1, 2]])))


def test_segmenter_windows_targets_with_the_reference_window(small_checkpoints):
    """A CT-like target whose own percentiles differ from the reference's gets the REFERENCE's window."""
    from refseg.segmenter import SegmentationResult, Segmenter

    sam, dino = small_checkpoints
    seg = Segmenter.from_preset("sat", sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu", image_size=112)
    rng = np.random.default_rng(1)
    ref = rng.integers(-1000, 1000, (64, 64)).astype(np.int16)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 8:40] = 1
    target = rng.integers(-200, 300, (64, 64)).astype(np.int16)  # narrower range: own window would stretch it
    seen = []
    prepare = seg.prepare_target

    def capture(image, source="image"):  # what the models get, after the window
        target = prepare(image, source)
        seen.append(target.rgb)
        return target

    seg.prepare_target = capture
    seg.segment_prepared = lambda targets: [SegmentationResult(mask=np.zeros(t.rgb.shape[:2], np.uint8))
                                            for t in targets]
    seg.set_reference(ref, mask)
    assert (seg.window.lo, seg.window.hi) == (auto_window(ref).lo, auto_window(ref).hi)
    seg.segment_batch([target])
    expected = auto_window(ref).apply(target)
    assert np.array_equal(seen[0][..., 0], expected)
    assert not np.array_equal(seen[0], to_rgb_uint8(target))  # its own window differs: the test is not vacuous
    seg.set_window(parse_window("abdomen"))
    seg.set_reference(ref, mask)
    seg.segment_batch([target])
    assert seg.window.source == "abdomen" and np.array_equal(seen[1][..., 0], parse_window("abdomen").apply(target))


def test_cli_bad_window_is_refused_before_models(tmp_path):
    from PIL import Image

    from refseg.cli import main

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "r.png")
    m = np.zeros((32, 32), np.uint8)
    m[4:20, 4:20] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    code = main(["segment", "-r", str(tmp_path / "r.png"), "-m", str(tmp_path / "m.png"), "-i", str(tmp_path / "r.png"),
                 "-o", str(tmp_path / "out"), "--window", "softish", "--sam-checkpoint", str(tmp_path / "none.pth")])
    assert code == 2 and not (tmp_path / "out").exists()
