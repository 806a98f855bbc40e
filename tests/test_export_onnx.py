"""ONNX export and the ONNX Runtime backend against the PyTorch models (CPU).

Models carry deterministic random weights (``refseg.testing.random_checkpoints``). Small fixtures: DINOv2-S/14 at
224 (full depth) and SAM-B reduced to 2 encoder blocks (one windowed, one global) on a 256² input
(16² embedding, windows padded 16 -> 28), exported once through ``refseg export`` (fp32) and once
through the backend's export-on-first-use (fp16). Full size once: DINOv2-B/14 at 518 and the SAM-B
image encoder at 1024² reduced to 4 blocks (fp32, batch 1). The graphs hold SAM's attention in its
fused form (the export default), the torch backend runs the CPU's eager default (the bias form), so
the parity checks compare the two forms too.

Tolerances: fp32 graphs vs torch, max abs diff <= 1e-3 (features, embeddings, mask logits, IoU);
fp16 encoders vs the fp32 torch model, max abs diff <= 2 % of the reference's max abs value and
mean cosine similarity per token/pixel >= 0.999; the fp16 export's decoder stays fp32 (<= 1e-3).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'refseg[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'refseg[onnx]')")

from refseg.cli import main as refseg_main  # noqa: E402
from refseg.config import SegmenterConfig  # noqa: E402
from refseg.export.fp16 import FLOAT, HALF, _elem_types, convert_float_to_float16  # noqa: E402
from refseg.export.onnx_export import export_graph, export_models  # noqa: E402
from refseg.export.cache_fill import fill_export_folder  # noqa: E402
from refseg.export.wrappers import Dinov2Export, SamDecoderExport, SamEncoderExport  # noqa: E402
from refseg.models.dinov2 import DINOV2_SPECS  # noqa: E402
from refseg.models.sam import SAM_SPECS  # noqa: E402
from refseg.runtime import io_names as io  # noqa: E402
from refseg.runtime.exported import create_exported_backend  # noqa: E402
from refseg.runtime.io_names import MANIFEST_NAME, pack_prompts  # noqa: E402
from refseg.runtime.manifest_reader import ManifestError, verify_manifest  # noqa: E402
from refseg.runtime.select import create_backend  # noqa: E402
from refseg.runtime.torch_backend import TorchBackend  # noqa: E402
from refseg.testing.random_checkpoints import random_dinov2_model, random_sam_model  # noqa: E402

FP32_ATOL = 1e-3
FP16_REL = 2e-2
FP16_MIN_COS = 0.999
SIZE = 224
SAM_SIZE = 256  # the small SAM's input side; 1024 in the full-size test
CPU = torch.device("cpu")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def assert_fp16_close(out: torch.Tensor, ref: torch.Tensor, dim: int) -> None:
    scale = float(ref.abs().max())
    assert max_diff(out, ref) <= FP16_REL * scale, (max_diff(out, ref), scale)
    cos = torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=dim).mean()
    assert float(cos) >= FP16_MIN_COS


def images(batch: int, side: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    dinov2 = random_dinov2_model(DINOV2_SPECS["vits14"], seed=0)
    spec = dataclasses.replace(SAM_SPECS["vit_b"].with_depth(2), img_size=SAM_SIZE)
    sam = random_sam_model(spec, seed=1)
    return dinov2, sam


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = (folder / "dinov2_vits14_pretrain.pth", folder / "sam_vit_b_depth2.pth")
    torch.save(models[0].state_dict(), paths[0])
    torch.save(models[1].state_dict(), paths[1])
    return paths


@pytest.fixture(scope="module")
def torch_backend(models):
    return TorchBackend(models[0], models[1], CPU)


@pytest.fixture(scope="module")
def fp32_dir(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_fp32")
    code = refseg_main(["export", "--dinov2-checkpoint", str(checkpoints[0]), "--sam-checkpoint",
                        str(checkpoints[1]), "-o", str(out), "--image-size", str(SIZE)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def ort_fp32(fp32_dir, checkpoints):
    config = SegmenterConfig(dinov2="vits14", image_size=SIZE)
    return create_backend("onnxruntime", config, sam_checkpoint=checkpoints[1],
                          dinov2_checkpoint=checkpoints[0], device="cpu", engine_dir=fp32_dir)


@pytest.fixture(scope="module")
def fp16_cache(checkpoints, tmp_path_factory):
    """fp16 backend exported on first use into a private ``$XDG_CACHE_HOME``."""
    cache = tmp_path_factory.mktemp("xdg_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        config = SegmenterConfig(dinov2="vits14", image_size=SIZE, precision="fp16")
        backend = create_exported_backend("onnxruntime", config, CPU, sam_checkpoint=checkpoints[1],
                                          dinov2_checkpoint=checkpoints[0], exporter=fill_export_folder)
        yield backend, cache, config


# ----------------------------------------------------------------------------- graph structure
@pytest.mark.parametrize("graph", ["dinov2", "sam_encoder", "sam_decoder"])
def test_graph_checker_opset_names_and_dynamic_axes(fp32_dir, graph):
    path = fp32_dir / f"{graph}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert max(i.version for i in model.opset_import if i.domain in ("", "ai.onnx")) >= 17
    expected = {"dinov2": ((io.DINOV2_INPUT,), io.DINOV2_OUTPUTS),
                "sam_encoder": ((io.SAM_ENCODER_INPUT,), (io.SAM_ENCODER_OUTPUT,)),
                "sam_decoder": (io.SAM_DECODER_INPUTS, io.SAM_DECODER_OUTPUTS)}[graph]
    assert tuple(i.name for i in model.graph.input) == expected[0]
    assert tuple(o.name for o in model.graph.output) == expected[1]
    dynamic = {v.name: [bool(d.dim_param) for d in v.type.tensor_type.shape.dim]
               for v in list(model.graph.input) + list(model.graph.output)}
    if graph == "sam_decoder":
        assert dynamic[io.SAM_DECODER_COORDS] == [True, True, False]
        assert dynamic[io.SAM_DECODER_EMBEDDINGS] == [False] * 4
        assert dynamic[io.SAM_DECODER_MASKS][0] and not any(dynamic[io.SAM_DECODER_MASKS][1:])
    else:
        for flags in dynamic.values():
            assert flags[0] and not any(flags[1:])
    if graph == "sam_encoder":  # fused attention: plain MatMul -> Softmax, no additive (N, N) bias
        producers = {out: node for node in model.graph.node for out in node.output}
        softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
        assert len(softmaxes) == 2  # one windowed block, one global block
        assert all(producers[n.input[0]].op_type == "MatMul" for n in softmaxes)


# ----------------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("batch", [1, 3])
def test_dinov2_fp32_matches_torch(ort_fp32, models, batch):
    x = images(batch, SIZE, seed=batch)
    with torch.inference_mode():
        ref = models[0].forward_features(x)
    assert ort_fp32.name == "onnxruntime" and ort_fp32.config.dinov2 == "vits14"
    assert max_diff(ort_fp32.encode_dinov2(x), ref["x_norm_patchtokens"]) <= FP32_ATOL
    patch, cls = ort_fp32.sessions["dinov2"].run(None, {io.DINOV2_INPUT: x.numpy()})
    assert max_diff(torch.from_numpy(cls), ref["x_norm_clstoken"]) <= FP32_ATOL


@pytest.mark.parametrize("name, depth", [("vits14_reg", None), ("vitg14", 2)])
def test_dinov2_registers_and_swiglu_export(tmp_path, name, depth):
    """Register tokens (ViT-S/14-reg) and the SwiGLU ViT-g/14 (2 of its 40 blocks), at 112²."""
    spec = DINOV2_SPECS[name] if depth is None else dataclasses.replace(DINOV2_SPECS[name], depth=depth)
    model = random_dinov2_model(spec, seed=3)
    export_graph(Dinov2Export(model, 112), tmp_path / "dinov2.onnx")
    session = ort.InferenceSession(str(tmp_path / "dinov2.onnx"), providers=["CPUExecutionProvider"])
    x = images(2, 112, seed=4)
    patch, cls = session.run(None, {io.DINOV2_INPUT: x.numpy()})
    with torch.inference_mode():
        ref = model.forward_features(x)
    assert patch.shape == (2, 64, spec.embed_dim)
    assert max_diff(torch.from_numpy(patch), ref["x_norm_patchtokens"]) <= FP32_ATOL
    assert max_diff(torch.from_numpy(cls), ref["x_norm_clstoken"]) <= FP32_ATOL


@pytest.mark.parametrize("batch", [1, 3])
def test_sam_encoder_fp32_matches_torch(ort_fp32, torch_backend, batch):
    x = images(batch, SAM_SIZE, seed=10 + batch)
    out = ort_fp32.encode_sam(x)
    assert out.shape == (batch, 256, 16, 16) and out.dtype == torch.float32
    assert max_diff(out, torch_backend.encode_sam(x)) <= FP32_ATOL


def prompts(sets: int, points: int, seed: int, side: int = SAM_SIZE):
    """Random prompts in the small SAM's input frame: coords (x, y), labels, XYXY boxes."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(sets, points, 2, generator=gen) * side
    labels = torch.randint(0, 2, (sets, points), generator=gen)
    labels[0, -1] = -1  # a padded set
    corners = torch.sort(torch.rand(sets, 2, 2, generator=gen) * side, dim=1).values
    return coords, labels, corners.reshape(sets, 4)


@pytest.mark.parametrize("points", [1, 37])
@pytest.mark.parametrize("use_box", [False, True])
@pytest.mark.parametrize("multimask", [False, True])
def test_decoder_fp32_matches_torch(ort_fp32, torch_backend, points, use_box, multimask):
    embedding = torch.randn(256, 16, 16, generator=torch.Generator().manual_seed(points))
    coords, labels, boxes = prompts(5, points, seed=points + 7)
    boxes = boxes if use_box else None
    masks, iou = ort_fp32.decode(embedding, coords, labels, boxes, multimask)
    ref_masks, ref_iou = torch_backend.decode(embedding, coords, labels, boxes, multimask)
    assert masks.shape == ref_masks.shape == (5, 3 if multimask else 1, 64, 64)
    assert max_diff(masks, ref_masks) <= FP32_ATOL
    assert max_diff(iou, ref_iou) <= FP32_ATOL


def test_decoder_mask_input_matches_torch(ort_fp32, models):
    sam = models[1]
    embedding = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(5))
    coords, labels, _ = prompts(3, 4, seed=6)
    mask_input = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(7))
    points, point_labels = coords.float(), labels.float()
    padded = torch.cat([points, torch.zeros(3, 1, 2)], 1), torch.cat([point_labels, -torch.ones(3, 1)], 1)
    feeds = {io.SAM_DECODER_EMBEDDINGS: embedding.numpy(), io.SAM_DECODER_COORDS: padded[0].numpy(),
             io.SAM_DECODER_LABELS: padded[1].numpy(), io.SAM_DECODER_MASK_INPUT: mask_input.numpy(),
             io.SAM_DECODER_HAS_MASK: torch.ones(1).numpy()}
    masks, iou = ort_fp32.sessions["sam_decoder"].run(None, feeds)
    with torch.inference_mode():
        ref_masks, ref_iou = sam.decode(embedding, points, labels, mask_input=mask_input,
                                        multimask_output=True)
    assert max_diff(torch.from_numpy(masks[:, 1:]), ref_masks) <= FP32_ATOL
    assert max_diff(torch.from_numpy(iou[:, 1:]), ref_iou) <= FP32_ATOL


# ----------------------------------------------------------------------------- fp16
def test_fp16_graphs_keep_layernorm_softmax_fp32(fp16_cache):
    backend = fp16_cache[0]
    assert backend.precision == "fp16" and backend.manifest["graphs"]["sam_decoder"]["precision"] == "fp32"
    for graph in ("dinov2", "sam_encoder"):
        model = onnx.load(str(backend.export_dir / f"{graph}.onnx"))
        types = _elem_types(model)
        kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
        assert kept and all(types[n.input[0]] == FLOAT and types[n.output[0]] == FLOAT for n in kept)
        heavy = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv", "Einsum")]
        assert heavy and all(types[n.output[0]] == HALF for n in heavy)
        assert all(types[v.name] == FLOAT for v in list(model.graph.input) + list(model.graph.output))


@pytest.mark.parametrize("batch", [1, 3])
def test_dinov2_fp16_close_to_torch(fp16_cache, models, batch):
    x = images(batch, SIZE, seed=20 + batch)
    with torch.inference_mode():
        ref = models[0].forward_features(x)["x_norm_patchtokens"]
    assert_fp16_close(fp16_cache[0].encode_dinov2(x), ref, dim=-1)


def test_sam_encoder_fp16_close_to_torch(fp16_cache, torch_backend):
    x = images(2, SAM_SIZE, seed=30)
    assert_fp16_close(fp16_cache[0].encode_sam(x), torch_backend.encode_sam(x), dim=1)


def test_fp16_export_decoder_stays_fp32(fp16_cache, torch_backend):
    embedding = torch.randn(256, 16, 16, generator=torch.Generator().manual_seed(31))
    coords, labels, boxes = prompts(4, 37, seed=32)
    masks, iou = fp16_cache[0].decode(embedding, coords, labels, boxes, True)
    ref_masks, ref_iou = torch_backend.decode(embedding, coords, labels, boxes, True)
    assert max_diff(masks, ref_masks) <= FP32_ATOL and max_diff(iou, ref_iou) <= FP32_ATOL


def test_export_on_first_use_is_cached(fp16_cache, checkpoints):
    backend, cache, config = fp16_cache
    assert backend.export_dir.parent == cache / "refseg" / "exports"
    stamp = (backend.export_dir / MANIFEST_NAME).stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        again = create_exported_backend("onnxruntime", config, CPU, sam_checkpoint=checkpoints[1],
                                        dinov2_checkpoint=checkpoints[0], exporter=fill_export_folder)
    assert again.export_dir == backend.export_dir
    assert (again.export_dir / MANIFEST_NAME).stat().st_mtime_ns == stamp  # no second export


def test_cache_miss_without_exporter_names_the_command(checkpoints, tmp_path, monkeypatch):
    # The runtime exports nothing itself: without an exporter a missing cached export is refused with
    # the `refseg export` command that fills the cache folder.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = SegmenterConfig(dinov2="vits14", image_size=SIZE, precision="fp32")  # as create_backend resolves it
    with pytest.raises(ManifestError, match=r"write it with `refseg export --dinov2-checkpoint .*"
                                            r"--image-size 224 --max-batch 16 -o .*refseg/exports/"):
        create_exported_backend("onnxruntime", config, CPU, sam_checkpoint=checkpoints[1],
                                dinov2_checkpoint=checkpoints[0])
    exports = tmp_path / "refseg" / "exports"
    assert not exports.exists() or not any(exports.iterdir())  # nothing written


def test_fp16_converter_refuses_custom_ops():
    node = onnx.helper.make_node("FusedThing", ["x"], ["y"], domain="com.example")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", FLOAT, [2])],
                                   [onnx.helper.make_tensor_value_info("y", FLOAT, [2])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.example", 1)])
    with pytest.raises(ValueError, match="com.example"):
        convert_float_to_float16(model)


# ----------------------------------------------------------------------------- manifest and errors
def test_manifest_records_versions_io_and_checksums(fp32_dir, checkpoints):
    manifest = json.loads((fp32_dir / MANIFEST_NAME).read_text())
    assert manifest["opset"] >= 17 and manifest["precision"] == "fp32"
    assert manifest["image_size"] == SIZE and manifest["models"] == {"dinov2": "vits14", "sam": "custom"}
    assert {"refseg", "torch", "onnx"} <= set(manifest["versions"])
    assert set(manifest["files"]) == {"dinov2.onnx", "sam_encoder.onnx", "sam_decoder.onnx"}
    assert manifest["checkpoints"]["sam"]["path"] == str(checkpoints[1].resolve())
    assert len(manifest["checkpoints"]["dinov2"]["sha256"]) == 64
    assert manifest["graphs"]["dinov2"]["outputs"][io.DINOV2_PATCH_TOKENS]["shape"] == ["batch", 256, 384]
    assert manifest["graphs"]["sam_encoder"]["attention"] == "fused"
    verify_manifest(fp32_dir, precision="fp32", image_size=SIZE, dinov2="vits14",
                    dinov2_checkpoint=checkpoints[0], sam_checkpoint=checkpoints[1])


@pytest.mark.parametrize("request_, message", [
    ({"precision": "fp16"}, "precision: requested 'fp16', exported 'fp32'"),
    ({"image_size": 518}, "image_size: requested 518"),
    ({"dinov2": "vitb14"}, "dinov2 model: requested 'vitb14'"),
])
def test_manifest_refuses_mismatched_request(fp32_dir, request_, message):
    with pytest.raises(ManifestError, match=message):
        verify_manifest(fp32_dir, **request_)


def test_manifest_refuses_other_checkpoint(fp32_dir, checkpoints, tmp_path):
    other = tmp_path / "other.pth"
    state = torch.load(checkpoints[1], weights_only=True)
    state["image_encoder.pos_embed"] = state["image_encoder.pos_embed"] + 1
    torch.save(state, other)
    with pytest.raises(ManifestError, match="sam checkpoint"):
        verify_manifest(fp32_dir, sam_checkpoint=other)


def test_manifest_refuses_modified_file(fp32_dir, tmp_path):
    copy = tmp_path / "export"
    copy.mkdir()
    for path in fp32_dir.iterdir():
        if path.name == "sam_decoder.onnx":
            shutil.copyfile(path, copy / path.name)
        else:
            os.symlink(path, copy / path.name)
    with open(copy / "sam_decoder.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ManifestError, match="sam_decoder.onnx: size .* differs from the manifest"):
        verify_manifest(copy)


def test_missing_manifest_names_the_export_command(tmp_path):
    with pytest.raises(ManifestError, match="refseg export"):
        verify_manifest(tmp_path)


def test_backend_refuses_mismatched_export(fp32_dir, checkpoints):
    config = SegmenterConfig(dinov2="vits14", image_size=SIZE, precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        create_backend("onnxruntime", config, sam_checkpoint=checkpoints[1],
                       dinov2_checkpoint=checkpoints[0], device="cpu", engine_dir=fp32_dir)


@pytest.mark.parametrize("changes, message", [({"precision": "bf16"}, "bf16"),
                                               ({"precision": "fp32", "feature_key": "x_prenorm"}, "x_prenorm")])
def test_backend_refuses_unsupported_requests(fp32_dir, changes, message):
    config = SegmenterConfig(image_size=SIZE, **changes)
    with pytest.raises(ValueError, match=message):
        create_exported_backend("onnxruntime", config, CPU, engine_dir=fp32_dir)


def test_auto_falls_back_to_onnxruntime_without_tensorrt(fp32_dir, checkpoints):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed: auto would pick it")
    config = SegmenterConfig(image_size=SIZE)
    backend = create_backend("auto", config, sam_checkpoint=checkpoints[1],
                             dinov2_checkpoint=checkpoints[0], device="cpu", engine_dir=fp32_dir)
    assert backend.name == "onnxruntime"


def test_cli_export_rejects_unsupported_model(checkpoints, tmp_path):
    code = refseg_main(["export", "--dinov2-checkpoint", str(checkpoints[0]), "--sam", "vit_x",
                        "-o", str(tmp_path / "out")])
    assert code == 2
    assert refseg_main(["export", "--sam", "vit_b", "-o", str(tmp_path / "o"), "--image-size", "225"]) == 2
    with pytest.raises(ValueError, match="unsupported DINOv2 model 'vitz14'"):
        export_models(tmp_path / "x", dinov2="vitz14")


# ----------------------------------------------------------------------------- full-size B models
def test_dinov2_b_full_size_518(tmp_path):
    model = random_dinov2_model(DINOV2_SPECS["vitb14"], seed=40)
    export_graph(Dinov2Export(model, 518), tmp_path / "dinov2.onnx")
    session = ort.InferenceSession(str(tmp_path / "dinov2.onnx"), providers=["CPUExecutionProvider"])
    x = images(1, 518, seed=41)
    patch, _ = session.run(None, {io.DINOV2_INPUT: x.numpy()})
    with torch.inference_mode():
        ref = model.forward_features(x)["x_norm_patchtokens"]
    assert patch.shape == (1, 1369, 768)
    assert max_diff(torch.from_numpy(patch), ref) <= FP32_ATOL


def test_sam_b_full_size_encoder_and_decoder(tmp_path):
    # The 1024 layout (64x64 grid, 14x14 windows padded to 70x70) at depth 4: two windowed and two
    # global blocks; the other eight blocks repeat these (full depth vs official: test_sam_parity.py).
    sam = random_sam_model("vit_b", seed=42, depth=4)
    export_graph(SamEncoderExport(sam), tmp_path / "sam_encoder.onnx")
    export_graph(SamDecoderExport(sam), tmp_path / "sam_decoder.onnx")
    providers = ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(tmp_path / "sam_encoder.onnx"), providers=providers)
    x = images(1, 1024, seed=43)
    (embedding,) = encoder.run(None, {io.SAM_ENCODER_INPUT: x.numpy()})
    with torch.inference_mode():
        ref = sam.image_encoder(x)
    assert embedding.shape == (1, 256, 64, 64)
    assert max_diff(torch.from_numpy(embedding), ref) <= FP32_ATOL

    coords, labels, boxes = prompts(4, 37, seed=44, side=1024)
    points, point_labels = pack_prompts(coords, labels, boxes)
    decoder = ort.InferenceSession(str(tmp_path / "sam_decoder.onnx"), providers=providers)
    masks, iou = decoder.run(None, {
        io.SAM_DECODER_EMBEDDINGS: ref.numpy(), io.SAM_DECODER_COORDS: points.numpy(),
        io.SAM_DECODER_LABELS: point_labels.numpy(),
        io.SAM_DECODER_MASK_INPUT: torch.zeros(1, 1, 256, 256).numpy(),
        io.SAM_DECODER_HAS_MASK: torch.zeros(1).numpy()})
    with torch.inference_mode():
        ref_masks, ref_iou = sam.decode(ref, coords, labels, boxes, multimask_output=False)
    assert masks.shape == (4, 4, 256, 256)
    assert max_diff(torch.from_numpy(masks[:, :1]), ref_masks) <= FP32_ATOL
    assert max_diff(torch.from_numpy(iou[:, :1]), ref_iou) <= FP32_ATOL
