"""ONNX export of the SAM 2 encoder and decoder, run by ONNX Runtime against the eager torch model
(itself held to the official ``sam2`` package by tests/test_sam2_parity.py).

SAM 2.1 tiny with random weights at a 256 input (the graphs are the same at 1024, only larger).
Encoder: a batch of 2 (the traced batch is 1: the batch axis must be dynamic); outputs <= 1e-4 relative
to their largest value. Decoder: 3 prompt sets of points, a box and points, and a mask prompt, packed
by ``Sam2.pack_prompts``; ORT's four mask outputs, IoU and object score against ``Sam2.decode`` (the
multimask and single outputs picked from the four): logits <= 1e-3, IoU and object score <= 1e-4.
``torch.export`` of both wrappers (what the AOTInductor path compiles) gives the same outputs.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from refseg.export.sam2_onnx import Sam2DecoderExport, Sam2EncoderExport, export_sam2
from refseg.models.sam2 import SAM2_SPECS
from refseg.models.sam2_state_dict import random_sam2
from refseg.runtime.io_names import SAM2_GRAPH_FILES

ort = pytest.importorskip("onnxruntime", reason="the onnx extra")
SIZE = 256


@pytest.fixture(scope="module")
def model():
    return random_sam2(dataclasses.replace(SAM2_SPECS["sam2.1_hiera_t"], image_size=SIZE), seed=7)


@pytest.fixture(scope="module")
def sessions(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sam2_onnx")
    records = export_sam2(folder, model=model)
    assert records["sam_decoder"]["outputs"]["low_res_masks"]["shape"] == ["prompt_sets", 4, 64, 64]
    options = ort.SessionOptions()
    return tuple(ort.InferenceSession(str(folder / SAM2_GRAPH_FILES[name]), options, providers=["CPUExecutionProvider"])
                 for name in ("sam_encoder", "sam_decoder"))


@pytest.fixture(scope="module")
def embedding(model):
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return images, model.encode_image(images)


def test_encoder(sessions, embedding):
    images, reference = embedding
    outputs = sessions[0].run(None, {"images": images.numpy()})
    assert len(outputs) == 3
    for out, ref in zip(outputs, reference.parts()):
        assert out.shape == tuple(ref.shape)
        assert np.abs(out - ref.numpy()).max() <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_decoder(model, sessions, embedding):
    _, reference = embedding
    image = reference.select(1)
    coords = torch.tensor([[[60.0, 40.0], [200.0, 100.0]], [[30.0, 220.0], [120.0, 128.0]],
                           [[10.0, 10.0], [250.0, 5.0]]])
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    boxes = torch.tensor([[20.0, 20.0, 150.0, 120.0]] * 3)
    gen = torch.Generator().manual_seed(2)
    mask = torch.randn(3, 1, 64, 64, generator=gen) * 4
    cases = [(coords, labels, None, None), (coords[:, :1], labels[:, :1], boxes, None), (coords, labels, None, mask)]
    for point_coords, point_labels, box, mask_input in cases:
        packed_coords, packed_labels = model.pack_prompts(point_coords, point_labels, box)
        feed = dict(zip(("image_embed", "high_res_feats_0", "high_res_feats_1"), (t.numpy() for t in image.parts())))
        feed.update(point_coords=packed_coords.numpy(), point_labels=packed_labels.numpy(),
                    mask_input=(mask_input if mask_input is not None else torch.zeros(1, 1, 64, 64)).numpy(),
                    has_mask_input=np.array([0.0 if mask_input is None else 1.0], np.float32))
        masks, iou, score = sessions[1].run(None, feed)
        assert masks.shape == (3, 4, 64, 64) and iou.shape == (3, 4) and score.shape == (3, 1)
        for multimask, picked in ((True, slice(1, 4)), (False, slice(0, 1))):
            with torch.no_grad():
                ref_masks, ref_iou, ref_score = model.decode(image, point_coords, point_labels, box, mask_input,
                                                             multimask_output=multimask)
            assert np.abs(masks[:, picked] - ref_masks.numpy()).max() <= 1e-3
            assert np.abs(iou[:, picked] - ref_iou.numpy()).max() <= 1e-4
            assert np.abs(score - ref_score.numpy()).max() <= 1e-4


def test_torch_export(model, embedding):
    """``torch.export`` (the AOTInductor path's front end) of both graphs gives the eager outputs."""
    for wrapper in (Sam2EncoderExport(model).eval(), Sam2DecoderExport(model).eval()):
        args = wrapper.example_inputs()
        with torch.no_grad():
            program = torch.export.export(wrapper, args)
            for out, ref in zip(program.module()(*args), wrapper(*args)):
                # eager linear layers may run on oneDNN, the exported graph's on F.linear: rounding only
                assert float((out - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_exporter_uses_only_public_model_methods():
    """The wrappers call the model's methods; they touch none of its insides (no re-written forward)."""
    internals = {"trunk", "neck", "blocks", "patch_embed", "sam_mask_decoder", "mask_decoder", "image_encoder",
                 "point_embeddings", "no_mask_embed", "not_a_point_embed", "embed_points", "embed_masks",
                 "mask_downscaling", "predict_masks", "predict_all", "pe_layer", "conv_s0", "conv_s1"}
    source = Path(__file__).resolve().parents[1] / "export" / "sam2_onnx.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    assert sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & internals) == []
