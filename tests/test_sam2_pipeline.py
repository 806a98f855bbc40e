"""SAM 2.1 as the pipeline's SAM stage, against the official ``sam2`` 1.1.0 ``SAM2ImagePredictor``.

A tiny random SAM 2.1 checkpoint in the official format (Hiera tiny at a 256 input, ``sam_image_size``;
``refseg.testing.random_checkpoints``' builder), DINOv2-S/14 at 112, a Kvasir pair. The official predictor
loads the SAME file (``build_sam2(config, file)`` at ``image_size=256``) and is given the prompts the
Segmenter chose; refseg's masks must be the official logits > 0 (a pixel may differ only where the official
logit is within 1e-3 of 0: float rounding decides those), its scores the official IoU (<= 1e-4), its
low-resolution logits the official ones (<= 1e-3; the official are clamped to +-32, ours compared clamped):

* ``sat`` (multimask, argmax IoU) and ``gbmseg`` (single mask; the official default post-processing,
  dynamic multimask via stability) end to end;
* the one decode path every method shares (:func:`refseg.pipeline.decode.decode_sets`): sets of different
  widths on two targets of different sizes, with and without boxes, on the CPU path (image by image) and
  the accelerator path (one padded, masked call);
* PerSAM's cascade (points; + mask prompt; + mask prompt and box) against the same three official calls;
* the object score: a checkpoint whose object-score head says "absent" gives empty masks (``drop_absent``)
  and the official masks with ``drop_absent=False``;
* every preset runs with SAM 2.1 (masks not empty); names and checkpoint families are checked before load.

The object-score head's last bias is set to +20 ("present") or -20 ("absent") in the two checkpoints, so the
comparison with the official predictor (which ignores the score) is about the masks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from refseg.config import SAM2_MODELS, SegmenterConfig
from refseg.models.build import build_sam_family, check_model_names
from refseg.models.checkpoints import CheckpointError
from refseg.models.sam2 import SAM2_SPECS, Sam2Embedding
from refseg.models.sam2_state_dict import random_sam2_state_dict
from refseg.pipeline import persam
from refseg.pipeline.accelerator import ACCELERATOR_ENV
from refseg.pipeline.decode import decode_sets
from refseg.pipeline.inputs import sam_inputs
from refseg.pipeline.prompt_sets import PromptSets
from refseg.segmenter import Segmenter

sam2_pkg = pytest.importorskip("sam2", reason="the official sam2 1.1.0 package is the oracle (test extra)")
from sam2.build_sam import build_sam2  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

SIZE = 256  # SAM 2 input side of the tests (the official model takes image_size; 1024 costs 16x)
BAND, LOGIT_TOL, IOU_TOL = 1e-3, 1e-3, 1e-4
OBJECT_BIAS = "sam_mask_decoder.pred_obj_score_head.layers.2.bias"


def write_sam2(path: Path, object_bias: float, seed: int = 3) -> Path:
    """An official-format SAM 2.1 tiny file ({"model": state}) whose object score is ``object_bias`` + noise."""
    state = random_sam2_state_dict("sam2.1_hiera_t", seed)
    state[OBJECT_BIAS] = torch.full_like(state[OBJECT_BIAS], object_bias)
    torch.save({"model": state}, path)
    return path


def official_predictor(checkpoint: Path, postprocessing: bool) -> SAM2ImagePredictor:
    """sam2 1.1.0's predictor on the same file at a SIZE input (``postprocessing``: the official default,
    dynamic multimask via stability)."""
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(checkpoint), device="cpu",
                       apply_postprocessing=postprocessing, hydra_overrides_extra=[f"++model.image_size={SIZE}"])
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(SIZE // 4 >> k, SIZE // 4 >> k) for k in range(3)]  # 1.1.0 hard-codes 1024's
    return predictor


def assert_mask(ours: np.ndarray, logits: np.ndarray) -> None:
    """refseg's boolean mask against the official logits: equal wherever |logit| > BAND."""
    assert ours.shape == logits.shape
    differ = ours != (logits > 0)
    assert not (differ & (np.abs(logits) > BAND)).any(), int(differ.sum())


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_checkpoints):
    folder = tmp_path_factory.mktemp("sam2_pipeline")
    return {"present": write_sam2(folder / "sam2.1_hiera_tiny.pt", 20.0),
            "absent": write_sam2(folder / "sam2.1_absent.pt", -20.0), "dinov2": small_checkpoints[1]}


@pytest.fixture(scope="module")
def pair(kvasir_dir):
    from refseg.io.raster import list_images, read_image, read_mask

    images = list_images(kvasir_dir / "images")
    return {"reference": read_image(images[0]), "mask": read_mask(kvasir_dir / "masks" / images[0].name),
            "target": read_image(images[2]), "large": read_image(images[1])}


def segmenter(preset: str, files: dict, sam: str = "present", **overrides) -> Segmenter:
    """A Segmenter of ``preset`` on the tiny models; masks are the raw logits > 0 (no component filter)."""
    return Segmenter.from_preset(preset, sam_checkpoint=files[sam], dinov2_checkpoint=files["dinov2"], device="cpu",
                                 image_size=112, sam_image_size=SIZE, min_component_fraction=0.0, **overrides)


@pytest.fixture(scope="module")
def sat(files, pair):
    return segmenter("sat", files).set_reference(pair["reference"], pair["mask"])


@pytest.fixture(scope="module")
def official(files, pair):
    predictor = official_predictor(files["present"], postprocessing=False)
    predictor.set_image(pair["target"])
    return predictor


def test_sat_masks_are_the_official_predictors(sat, official, pair):
    """sat: multimask output, the mask of highest predicted IoU (what ``sat`` does with SAM)."""
    assert sat.config.sam == "sam2.1_hiera_t" and sat.sam_size == SIZE  # the file's family, not the preset's vit_b
    [res] = sat.segment_batch([pair["target"]])
    points, labels = res.points[1], res.point_labels[1]
    assert (labels == 1).any()
    logits, iou, _ = official.predict(point_coords=points, point_labels=labels, multimask_output=True,
                                      return_logits=True)
    best = int(iou.argmax())
    assert res.scores[1] == pytest.approx(float(iou[best]), abs=IOU_TOL)
    assert_mask(res.mask == 1, logits[best])
    assert 0.0 < (res.mask == 1).mean() < 1.0


def test_gbmseg_single_mask_with_dynamic_multimask(files, pair):
    """gbmseg: single-mask output; SAM 2's official default falls back to the best multimask output when
    the single mask is unstable, and the official predictor built with it gives the same masks."""
    seg = segmenter("gbmseg", files, neg_radius=40.0, exclusion_radius=80.0, hard_radius=40.0)
    assert not seg.config.drop_absent  # the preset keeps the decoder's mask, as the image predictor does
    seg.set_reference(pair["reference"], pair["mask"])
    [res] = seg.segment_batch([pair["target"]])
    predictor = official_predictor(files["present"], postprocessing=True)
    predictor.set_image(pair["target"])
    logits, iou, _ = predictor.predict(point_coords=res.points[1], point_labels=res.point_labels[1],
                                       multimask_output=False, return_logits=True)
    assert res.scores[1] == pytest.approx(float(iou[0]), abs=IOU_TOL)
    assert_mask(res.mask == 1, logits[0])


def test_object_score_absent_gives_no_mask(files, pair):
    """A checkpoint whose object score says "absent": sat (drop_absent) returns empty masks and IoU 0;
    drop_absent=False returns the official predictor's masks for the same prompts (not empty)."""
    dropped = segmenter("sat", files, sam="absent").set_reference(pair["reference"], pair["mask"])
    kept = segmenter("sat", files, sam="absent", drop_absent=False).set_reference(pair["reference"], pair["mask"])
    [a] = dropped.segment_batch([pair["target"]])
    [b] = kept.segment_batch([pair["target"]])
    np.testing.assert_array_equal(a.points[1], b.points[1])  # the same prompts: only the decode differs
    assert not a.mask.any() and a.scores[1] == 0.0
    predictor = official_predictor(files["absent"], postprocessing=False)
    predictor.set_image(pair["target"])
    logits, iou, _ = predictor.predict(point_coords=b.points[1], point_labels=b.point_labels[1],
                                       multimask_output=True, return_logits=True)
    assert_mask(b.mask == 1, logits[int(iou.argmax())])
    assert b.mask.any()


def _padded(points: list[np.ndarray], labels: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sets padded with label -1 to ``width`` columns (what one decoder call per target gives each set)."""
    coords = np.zeros((len(points), width, 2), np.float32)
    labs = np.full((len(points), width), -1, np.int64)
    for i, (p, lab) in enumerate(zip(points, labels)):
        coords[i, :len(p)], labs[i, :len(p)] = p, lab
    return coords, labs


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu_path", "accelerator_path"])
def test_decode_sets_of_two_targets_equal_official_calls(sat, files, pair, monkeypatch, accelerator):
    """decode_sets (every method's decoder call): three sets on two targets of different sizes, widths 3, 1
    and 2, without and with boxes; each set equals the official predictor given that set padded to its
    target's widest set."""
    if accelerator:
        monkeypatch.setenv(ACCELERATOR_ENV, "1")
    else:
        monkeypatch.delenv(ACCELERATOR_ENV, raising=False)
    images = [pair["target"], pair["large"]]
    prepared = [sat.prepare_target(im) for im in images]
    embeddings = sat.backend.encode_sam(sam_inputs(prepared, sat.backend, sat.config))
    assert isinstance(embeddings, Sam2Embedding) and embeddings.image_embed.shape == (2, 256, 16, 16)
    sets = [(0, np.array([[300.0, 200.0], [120.0, 400.0], [500.0, 90.0]]), np.array([1, 1, 0])),
            (0, np.array([[250.0, 260.0]]), np.array([1])),
            (1, np.array([[700.0, 500.0], [100.0, 900.0]]), np.array([1, 0]))]
    owner = np.array([t for t, _, _ in sets])
    widths = {t: max(len(p) for u, p, _ in sets if u == t) for t in (0, 1)}
    coords, labels = _padded([p for _, p, _ in sets], [lab for _, _, lab in sets], 3)
    boxes = np.array([[100.0, 80.0, 420.0, 380.0], [200.0, 150.0, 330.0, 400.0], [300.0, 200.0, 1100.0, 900.0]],
                     np.float32)
    predictors = []
    for im in images:
        predictors.append(official_predictor(files["present"], postprocessing=False))
        predictors[-1].set_image(im)
    for use_box in (False, True):
        decoded = decode_sets(sat.backend, embeddings, torch.as_tensor(owner), torch.as_tensor(coords),
                              torch.as_tensor(labels), [t.sam_input_size for t in prepared], [t.size for t in prepared],
                              True, torch.as_tensor(boxes) if use_box else None,
                              torch.as_tensor([widths[t] for t in owner]))
        for p, (t, _, _) in enumerate(sets):
            w = widths[t]
            _, iou, low = predictors[t].predict(point_coords=coords[p, :w], point_labels=labels[p, :w],
                                                box=boxes[p] if use_box else None, multimask_output=True)
            best = int(iou.argmax())
            assert float(decoded.iou[p]) == pytest.approx(float(iou[best]), abs=IOU_TOL)
            ours = decoded.low_res[p].clamp(-32, 32).numpy()
            assert np.abs(ours - low[best]).max() <= LOGIT_TOL, (use_box, p)


def test_persam_cascade_equals_three_official_calls(sat, files, pair):
    """PerSAM's cascade on SAM 2 for two prompt sets: (a) points, single mask (dynamic multimask);
    (b) + (a)'s low-res logits as mask prompt, multimask, best IoU; (c) + (b)'s logits and the box around
    (b)'s mask. The official predictor, given the low-res logits it returned, does the same three calls."""
    cfg = sat.config.replace(method="persam")
    target = sat.prepare_target(pair["target"])
    embedding = sat.backend.encode_sam(sam_inputs([target], sat.backend, cfg))[0]
    points = torch.tensor([[[300.0, 200.0], [40.0, 500.0]], [[150.0, 300.0], [600.0, 60.0]]])
    sets = PromptSets(points, torch.tensor([[1, 0], [1, 0]]), torch.arange(2))
    res = persam.cascade(sat.backend, embedding, sets, target.sam_input_size, target.size, 2, cfg)
    assert res.steps == ["points", "mask", "mask+box"]
    predictor = official_predictor(files["present"], postprocessing=True)
    predictor.set_image(pair["target"])
    for j in range(2):
        pts, lab = points[j].numpy(), np.array([1, 0])
        _, _, low_a = predictor.predict(point_coords=pts, point_labels=lab, multimask_output=False)
        logits_b, iou_b, low_b = predictor.predict(point_coords=pts, point_labels=lab, mask_input=low_a,
                                                   multimask_output=True, return_logits=True)
        b = int(iou_b.argmax())
        ys, xs = np.nonzero(logits_b[b] > 0)
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
        np.testing.assert_array_equal(res.boxes[j].numpy(), box)
        _, iou_c, low_c = predictor.predict(point_coords=pts, point_labels=lab, box=box, mask_input=low_b[b:b + 1],
                                            multimask_output=True)
        c = int(iou_c.argmax())
        assert float(res.iou[j]) == pytest.approx(float(iou_c[c]), abs=IOU_TOL)
        assert np.abs(res.low_res[j].clamp(-32, 32).numpy() - low_c[c]).max() <= LOGIT_TOL


@pytest.mark.parametrize("preset", ["protosam", "topk", "matcher", "persam"])
def test_every_preset_runs_with_sam2(files, pair, preset):
    """The method family on SAM 2.1 (drop_absent off: random weights say nothing about presence): a label
    map in the target's geometry with a non-empty class and its prompts."""
    seg = segmenter(preset, files, drop_absent=False, batch_size=2)
    seg.set_reference(pair["reference"], pair["mask"])
    results = seg.segment_batch([pair["target"], pair["large"]])
    for res, image in zip(results, (pair["target"], pair["large"])):
        assert res.mask.shape == image.shape[:2] and res.mask.any()
        assert (res.point_labels[1] == 1).any() and 0.0 < res.scores[1] <= 1.0


def test_model_names_and_families_are_checked(files, small_checkpoints):
    assert set(SAM2_MODELS) == set(SAM2_SPECS)
    SegmenterConfig(sam="sam2.1_hiera_b+", sam_image_size=512)
    with pytest.raises(ValueError, match="multiple of 32"):
        SegmenterConfig(sam="sam2.1_hiera_t", sam_image_size=100)
    sam2_file, sam_file = files["present"], small_checkpoints[0]
    check_model_names(None, "sam2.1_hiera_t", files["dinov2"], sam2_file)
    check_model_names(None, "medsam2", files["dinov2"], sam2_file)  # MedSAM2 is a SAM 2.1 tiny fine-tune
    for name, path, message in (("vit_b", sam2_file, "is a SAM 2 checkpoint, not SAM 'vit_b'"),
                                ("sam2.1_hiera_b+", sam2_file, "contradicts"),
                                ("sam2_hiera_t", sam2_file, "contradicts"),  # SAM 2 vs 2.1 memory keys
                                ("sam2.1_hiera_t", sam_file, "is a SAM checkpoint, not SAM 2")):
        with pytest.raises(CheckpointError, match=message):
            check_model_names(None, name, files["dinov2"], path)
    assert build_sam_family(None, sam2_file, image_size=SIZE).spec.image_size == SIZE
    with pytest.raises(CheckpointError, match="not SAM 'vit_l'"):
        build_sam_family("vit_l", sam2_file)
    with pytest.raises(ValueError, match="SAM 2 models only"):
        build_sam_family(None, sam_file, image_size=SIZE)


def test_batched_targets_equal_the_official_predictor_per_image(files, pair):
    """Two targets of different sizes in one batch (batched Hiera encoder, one decoder call): each target's
    masks and scores are the official predictor's on that image alone, and the prompts are those the
    one-by-one run chose."""
    images = [pair["target"], pair["large"]]
    seg = segmenter("sat", files, batch_size=2).set_reference(pair["reference"], pair["mask"])
    batched = seg.segment_batch(images)
    for res, image in zip(batched, images):
        [alone] = seg.segment_batch([image])
        np.testing.assert_allclose(res.points[1], alone.points[1])
        predictor = official_predictor(files["present"], postprocessing=False)
        predictor.set_image(image)
        logits, iou, _ = predictor.predict(point_coords=res.points[1], point_labels=res.point_labels[1],
                                           multimask_output=True, return_logits=True)
        best = int(iou.argmax())
        assert res.scores[1] == pytest.approx(float(iou[best]), abs=IOU_TOL)
        assert res.mask.shape == image.shape[:2]
        assert_mask(res.mask == 1, logits[best])


@pytest.fixture(scope="module")
def cli_run(files, pair, kvasir_dir, tmp_path_factory):
    """``refseg segment --sam sam2.1_hiera_t`` on a folder of two Kvasir images of different sizes."""
    from refseg.cli import main
    from refseg.io.raster import list_images

    root = tmp_path_factory.mktemp("sam2_cli")
    images = list_images(kvasir_dir / "images")
    inputs = root / "in"
    inputs.mkdir()
    for src in images[1:3]:
        (inputs / src.name).write_bytes(src.read_bytes())
    out = root / "out"
    code = main(["segment", "-r", str(images[0]), "-m", str(kvasir_dir / "masks" / images[0].name),
                 "-i", str(inputs), "-o", str(out), "--sam", "sam2.1_hiera_t", "--sam-checkpoint",
                 str(files["present"]), "--dinov2-checkpoint", str(files["dinov2"]), "--device", "cpu",
                 "--batch-size", "2", "--save-prompts", "--set", "image_size=112", "--set", f"sam_image_size={SIZE}",
                 "--set", "min_component_fraction=0.0"])
    return code, inputs, out


def test_cli_segments_a_folder_with_sam2(cli_run, files):
    """The folder job end to end with SAM 2.1: one 0/255 PNG per input in the input's geometry, equal to the
    official predictor's mask for the prompts written in ``<stem>.json``."""
    import json

    from PIL import Image

    from refseg.io.raster import read_image

    code, inputs, out = cli_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] == 2
    for src in sorted(inputs.iterdir()):
        image = read_image(src)
        mask = np.asarray(Image.open(out / f"{src.stem}.png"))
        assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
        prompts = json.loads((out / f"{src.stem}.json").read_text())["classes"]["1"]
        predictor = official_predictor(files["present"], postprocessing=False)
        predictor.set_image(image)
        logits, iou, _ = predictor.predict(point_coords=np.array(prompts["points"], np.float32),
                                           point_labels=np.array(prompts["labels"]), multimask_output=True,
                                           return_logits=True)
        best = int(iou.argmax())
        assert prompts["predicted_iou"] == pytest.approx(float(iou[best]), abs=IOU_TOL)
        assert_mask(mask == 255, logits[best])
        assert mask.any()


def test_onnx_export_and_onnxruntime_backend(files, pair, official, tmp_path):
    """``refseg export`` of a SAM 2.1 checkpoint writes SAM 2's encoder and decoder graphs; the ONNX Runtime
    backend reading them gives the official predictor's masks and IoU for the prompts it chose."""
    pytest.importorskip("onnxruntime", reason="the onnx extra")
    from refseg.cli import main
    from refseg.runtime.exported import OnnxRuntimeBackend

    out = tmp_path / "export"
    assert main(["export", "--sam-checkpoint", str(files["present"]), "--dinov2-checkpoint", str(files["dinov2"]),
                 "-o", str(out), "--image-size", "112", "--sam-image-size", str(SIZE)]) == 0
    seg = segmenter("sat", files, backend="onnxruntime", engine_dir=out)
    assert isinstance(seg.backend, OnnxRuntimeBackend)
    seg.set_reference(pair["reference"], pair["mask"])
    [res] = seg.segment_batch([pair["target"]])
    logits, iou, _ = official.predict(point_coords=res.points[1], point_labels=res.point_labels[1],
                                      multimask_output=True, return_logits=True)
    best = int(iou.argmax())
    assert res.scores[1] == pytest.approx(float(iou[best]), abs=IOU_TOL)
    assert_mask(res.mask == 1, logits[best])


def test_presets_and_info_list_the_sam2_names(capsys):
    from refseg.cli import main

    for command in ("presets", "info"):
        capsys.readouterr()
        assert main([command]) == 0
        text = capsys.readouterr().out
        for name in SAM2_MODELS:
            assert name in text, (command, name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_masks_close_to_fp32(files, pair, sat, precision):
    """The Hiera encoder in bf16 / fp16 (the decoder side stays fp32): same prompts, a mask whose IoU with
    the fp32 mask is >= 0.9 (fp32 itself equals the official predictor: test_sat...)."""
    low = segmenter("sat", files, precision=precision).set_reference(pair["reference"], pair["mask"])
    if low.backend.precision == "fp32":
        pytest.skip(f"{precision} runs fp32 on this CPU (no oneDNN primitive)")
    [a] = sat.segment_batch([pair["target"]])
    [b] = low.segment_batch([pair["target"]])
    ma, mb = a.mask == 1, b.mask == 1
    assert 0.02 < ma.mean() < 0.98  # a non-trivial mask
    assert (ma & mb).sum() / (ma | mb).sum() >= 0.9
    assert b.scores[1] == pytest.approx(a.scores[1], abs=0.05)
