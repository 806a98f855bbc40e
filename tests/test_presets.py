"""The method-family presets end to end: config validation, `refseg presets`, and `refseg segment
--preset NAME` on a Kvasir pair with the small random checkpoints (vits14 at a small image size)."""
import json
import numpy as np
import pytest
from PIL import Image

from refseg.cli import main
from refseg.config import PRESETS, SegmenterConfig

FAMILY = ("protosam", "topk", "matcher", "persam")


def test_presets_are_registered_and_old_presets_unchanged():
    assert set(FAMILY) <= set(PRESETS)
    assert PRESETS["sat"].method == "match" and PRESETS["gbmseg"].method == "match"
    assert {p: PRESETS[p].method for p in FAMILY} == {p: p for p in FAMILY}
    proto = PRESETS["protosam"]
    assert (proto.dinov2, proto.image_size, proto.use_box) == ("vitl14", 672, True)
    m = PRESETS["matcher"]
    assert (m.dinov2, m.image_size, m.feature_key, m.matcher_centres, m.matcher_keep_half_above) == \
        ("vitl14", 518, "x_prenorm", 8, 40)
    assert PRESETS["topk"].topk_k == 20


@pytest.mark.parametrize("item, message", [
    ("method=nope", "method"), ("proto_threshold=0", "proto_threshold"), ("topk_k=0", "topk_k"),
    ("topk_nms_kernel=4", "odd"), ("matcher_sample_range=5,9", "matcher_sample_range"),
    ("persam_refinements=3", "persam_refinements"), ("matcher_score_threshold=2", "matcher_score_threshold"),
])
def test_bad_method_knobs_are_named(item, message):
    with pytest.raises(ValueError, match=message):
        SegmenterConfig.from_preset("matcher").override_from_strings([item])


def test_sample_range_parses_from_a_string():
    cfg = SegmenterConfig.from_preset("matcher").override_from_strings(["matcher_sample_range=1,3"])
    assert cfg.matcher_sample_range == (1, 3)


def test_presets_command_lists_stages_and_models(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("sat", "gbmseg", *FAMILY):
        assert f"\n{name} " in "\n" + out
    assert "dinov2=vitl14 @672" in out and "x_prenorm" in out and "cascade" in out


@pytest.fixture(scope="module")
def pair(tmp_path_factory, small_checkpoints, kvasir_dir):
    root = tmp_path_factory.mktemp("presets")
    images = sorted((kvasir_dir / "images").iterdir())
    inputs = root / "inputs"
    inputs.mkdir()

    def quarter(src, dst, resample, binary=False):  # a quarter side keeps the decoder's upsampling cheap
        im = Image.open(src)
        if binary:  # the JPEG mask has compression noise: 0 / 255 first
            im = im.convert("L").point(lambda v: 255 if v > 127 else 0)
        im.resize((im.width // 4, im.height // 4), resample).save(dst)

    target = inputs / f"{images[1].stem}.png"
    quarter(images[1], target, Image.BILINEAR)
    quarter(images[0], root / "ref.png", Image.BILINEAR)
    quarter(kvasir_dir / "masks" / images[0].name, root / "ref_mask.png", Image.NEAREST, binary=True)
    sam, dino = small_checkpoints
    common = ["--sam-checkpoint", str(sam), "--dinov2-checkpoint", str(dino), "--device", "cpu",
              "--image-size", "112", "--batch-size", "1"]
    ref = ["-r", str(root / "ref.png"), "-m", str(root / "ref_mask.png")]
    return root, inputs, target, common, ref


EXTRA = {"matcher": ["--set", "matcher_centres=4", "--set", "matcher_sample_range=1,2",
                     "--set", "matcher_max_subsets=6"],
         "topk": ["--set", "topk_k=5", "--set", "topk_neg_k=3"]}


@pytest.mark.parametrize("preset", FAMILY)
def test_segment_with_each_preset(pair, preset):
    root, inputs, target, common, ref = pair
    out = root / preset
    code = main(["segment", *ref, "-i", str(inputs), "-o", str(out), "--preset", preset, "--save-prompts",
                 *common, *EXTRA.get(preset, [])])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] == 1 and summary["config"]["method"] == preset
    mask = np.asarray(Image.open(out / f"{target.stem}.png"))
    assert mask.shape == np.asarray(Image.open(target)).shape[:2]
    prompts = json.loads((out / f"{target.stem}.json").read_text())
    cls = prompts["classes"]["1"]
    labels, points = cls["labels"], np.asarray(cls["points"])
    h, w = mask.shape
    assert points.ndim == 2 and ((points >= -1) & (points <= [w, h])).all()
    stages = set(prompts["timings_s"])
    if preset == "protosam":
        assert labels and set(labels) == {1} and len(labels) % 2 == 0 and cls["box"] is not None
        assert {"dinov2", "sam_encoder", "decoder"} <= stages
    elif preset == "topk":
        assert 1 <= labels.count(1) <= 5 and labels.count(0) <= 3 and labels == sorted(labels, reverse=True)
    elif preset == "matcher":
        assert labels and set(labels) == {1} and cls["box"] is None and "matching" in stages
    else:
        assert labels == [1, 0] and "dinov2" not in stages
