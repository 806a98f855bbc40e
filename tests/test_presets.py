"""The method-family presets end to end: config validation, `refseg presets`, and `refseg segment
--preset NAME` on a Kvasir pair with the small random checkpoints (vits14 at a small image size)."""
import json
import numpy as np
import pytest
import torch
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



def test_exported_decoder_takes_mask_prompts(tmp_path):
    """PerSAM's mask prompts go through the exported decoder (mask_input / has_mask_input) as in torch."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from refseg.export.onnx_export import export_graph
    from refseg.export.wrappers import SamDecoderExport
    from refseg.models.sam import SAM_SPECS, Sam, init_random_
    from refseg.runtime.exported import ExportedBackend
    from refseg.runtime.torch_backend import TorchBackend

    sam = init_random_(Sam(SAM_SPECS["vit_b"].with_depth(1)), seed=0).eval()
    export_graph(SamDecoderExport(sam), tmp_path / "dec.onnx")
    session = ort.InferenceSession(str(tmp_path / "dec.onnx"), providers=["CPUExecutionProvider"])

    class DecoderOnly(ExportedBackend):  # the shared decode() of the exported backends, decoder graph only
        name, mask_outputs = "onnxruntime", "all"

        def __init__(self):
            pass

        def _run(self, graph, inputs, outputs):
            feeds = {k: v.detach().float().contiguous().numpy() for k, v in inputs.items()}
            return [torch.from_numpy(o) for o in session.run(list(outputs), feeds)]

    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(256, 64, 64, generator=gen)
    coords = torch.tensor([[[300.0, 200.0], [40.0, 900.0]], [[700.0, 650.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    masks = torch.randn(2, 1, 256, 256, generator=gen) * 5
    boxes = torch.tensor([[250.0, 150.0, 400.0, 300.0], [600.0, 600.0, 800.0, 760.0]])
    torch_backend = TorchBackend.__new__(TorchBackend)
    torch_backend.sam, torch_backend.device = sam, torch.device("cpu")
    for box in (None, boxes):
        want = torch_backend.decode(emb, coords, labels, box, True, mask_input=masks)
        got = DecoderOnly().decode(emb, coords, labels, box, True, mask_input=masks)
        plain = DecoderOnly().decode(emb, coords, labels, box, True)
        torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
        assert (plain[0] - got[0]).abs().max() > 1e-2       # the mask prompt changes the output
    with pytest.raises(ValueError, match="mask_input"):
        DecoderOnly().decode(emb, coords, labels, None, True, mask_input=masks[:1, :, :128])
