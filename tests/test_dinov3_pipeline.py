"""DINOv3 as the matching encoder, end to end: `refseg segment --dinov3-checkpoint <HF folder>`, the
reference tokens the Segmenter matches with, and `refseg export` + the ONNX Runtime backend (CPU).

The checkpoint is a Hugging Face folder written by `transformers` itself (`DINOv3ViTModel(config)
.save_pretrained`, random ViT-S/16 weights), as users download it. References: `transformers`'
`DINOv3ViTModel` for the encoder and numpy (SVD, projection) for INSID3's positional projection, written
here from the paper, not through `refseg.pipeline.feature_norm`. Tolerances: 1e-4 (fp32 tokens, and the
projected, L2-normalised tokens). Image side 128 (an 8x8 grid of 16-px patches), SAM ViT-B cut to 2 blocks
at 256 px.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from refseg.cli import main
from refseg.config import SegmenterConfig
from refseg.pipeline.features import IMAGENET_MEAN, IMAGENET_STD, dinov2_batch

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'refseg[test]')")

SIZE = 128
TOL = 1e-4
RANK = 20
REGISTERS = 4


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(folder, model): ViT-S/16 random weights saved by transformers as a hub folder."""
    config = transformers.DINOv3ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                          intermediate_size=1536, patch_size=16,
                                          num_register_tokens=REGISTERS)
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(config).eval()
    with torch.no_grad():  # layer scales away from their init value 1.0, so a missed layer scale shows
        for name, param in model.named_parameters():
            if "lambda1" in name:
                param.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("hf") / "dinov3-vits16-pretrain-lvd1689m"
    model.save_pretrained(folder)
    return folder, model


def hf_patch_tokens(model, images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) normalised -> (B, N, D) float64 patch tokens (no cls, no registers) of transformers."""
    with torch.no_grad():
        hidden = model(pixel_values=images).last_hidden_state
    return hidden[:, 1 + REGISTERS:].double().numpy()


def insid3_projection(tokens: np.ndarray, blank_tokens: np.ndarray, rank: int) -> np.ndarray:
    """INSID3 in numpy: L2-normalise the blank image's tokens, centre them over the positions, keep the top
    ``rank`` left singular vectors U (D, rank); tokens -> normalise, x - (x U) Uᵀ, normalise."""
    blank = blank_tokens / np.linalg.norm(blank_tokens, axis=-1, keepdims=True)
    left = np.linalg.svd((blank - blank.mean(axis=0)).T, full_matrices=False)[0][:, :rank]
    x = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    x = x - (x @ left) @ left.T
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def pair(kvasir_dir, tmp_path_factory):
    """(reference image, reference mask, input folder of two images of other sizes)."""
    images = sorted((kvasir_dir / "images").iterdir())
    inputs = tmp_path_factory.mktemp("dinov3_inputs")
    for src in images[1:3]:
        shutil.copy(src, inputs / src.name)
    return images[0], kvasir_dir / "masks" / images[0].name, inputs


def segment(pair, folder, sam, out, *extra: str) -> int:
    """`refseg segment` of the pair's input folder into ``out`` with the DINOv3 hub folder; the exit code."""
    reference, mask, inputs = pair
    return main(["segment", "-r", str(reference), "-m", str(mask), "-i", str(inputs), "-o", str(out),
                 "--sam-checkpoint", str(sam), "--dinov3-checkpoint", str(folder), "--device", "cpu", *extra])


def test_segment_folder_with_a_hub_folder(hf_model, pair, tiny_checkpoints, tmp_path):
    folder, _ = hf_model
    inputs = pair[2]
    out = tmp_path / "out"
    code = segment(pair, folder, tiny_checkpoints[0], out, "--image-size", str(SIZE), "--batch-size", "2",
                   "--save-prompts")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] == 2 and not summary["failed"]
    for src in sorted(inputs.iterdir()):
        written = np.asarray(Image.open(out / f"{src.stem}.png"))
        assert written.shape == np.asarray(Image.open(src)).shape[:2]  # the input's geometry
        assert set(np.unique(written)) <= {0, 255}
        points = json.loads((out / f"{src.stem}.json").read_text())["classes"]["1"]["points"]
        assert points
    settings = json.loads((out / "run_config.json").read_text())["settings"]
    assert settings["config"]["encoder"] == "dinov3" and settings["checkpoints"]["dinov3"].startswith(folder.name)


def test_image_size_not_a_multiple_of_16_is_refused_before_loading(hf_model, pair, tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    assert segment(pair, hf_model[0], tiny_checkpoints[0], out, "--image-size", "126") == 2
    assert not out.exists()


def test_reference_tokens_are_transformers_tokens_with_the_positional_subspace_projected_out(
        hf_model, pair, tiny_checkpoints):
    from refseg.segmenter import Segmenter

    folder, model = hf_model
    reference, mask, _ = pair
    rgb = np.asarray(Image.open(reference).convert("RGB"))
    binary = (np.asarray(Image.open(mask).convert("L")) > 127).astype(np.uint8)
    segmenter = Segmenter(SegmenterConfig(encoder="dinov3", image_size=SIZE), sam_checkpoint=tiny_checkpoints[0],
                          dinov3_checkpoint=folder, device="cpu")
    assert segmenter.config.encoder == "dinov3" and segmenter.config.patch_size == 16
    assert segmenter.config.debias == "project" and segmenter.config.debias_rank == RANK
    segmenter.set_reference(rgb, binary)
    got = segmenter.reference_state()["tokens"][0].double().numpy()  # (N, D)

    blank = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    blank_tokens = hf_patch_tokens(model, blank.expand(1, 3, SIZE, SIZE).contiguous())[0]
    raw = hf_patch_tokens(model, dinov2_batch([rgb], SIZE))[0]
    expected = insid3_projection(raw, blank_tokens, RANK)
    assert got.shape == ((SIZE // 16) ** 2, 384)
    assert np.abs(got - expected).max() <= TOL
    # the projection matters: the raw tokens, L2-normalised, are far from what the matcher uses
    assert np.abs(got - raw / np.linalg.norm(raw, axis=-1, keepdims=True)).max() > 100 * TOL


@pytest.fixture(scope="module")
def exported(hf_model, tiny_checkpoints, tmp_path_factory):
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'refseg[onnx]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'refseg[onnx]')")
    out = tmp_path_factory.mktemp("dinov3_export")
    code = main(["export", "--dinov3-checkpoint", str(hf_model[0]), "--sam-checkpoint", str(tiny_checkpoints[0]),
                 "-o", str(out), "--image-size", str(SIZE), "--max-batch", "2"])
    assert code == 0
    return out


def test_exported_encoder_through_onnxruntime_matches_transformers(exported, hf_model, tiny_checkpoints):
    from refseg.runtime.manifest_reader import MANIFEST_NAME
    from refseg.runtime.select import create_backend

    folder, model = hf_model
    manifest = json.loads((exported / MANIFEST_NAME).read_text())
    assert manifest["encoder"] == "dinov3" and manifest["patch_size"] == 16 and manifest["image_size"] == SIZE
    backend = create_backend("onnxruntime", SegmenterConfig(encoder="dinov3", image_size=SIZE, precision="fp32"),
                             sam_checkpoint=tiny_checkpoints[0], dinov3_checkpoint=folder, device="cpu",
                             engine_dir=exported)
    assert backend.config.encoder == "dinov3"
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    got = backend.encode_dinov2(x).double().numpy()
    assert np.abs(got - hf_patch_tokens(model, x)).max() <= TOL
    # the positional basis stored for the C++ pipeline: projecting with it is INSID3's projection of
    # transformers' tokens with transformers' blank-image tokens (numpy)
    from refseg.export.debias_basis import read_basis

    record = manifest["feature_debias"]
    assert record["mode"] == "project" and record["rank"] == RANK and record["file"] in manifest["files"]
    basis = read_basis(exported, record).double().numpy()
    blank = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    blank_tokens = hf_patch_tokens(model, blank.expand(1, 3, SIZE, SIZE).contiguous())[0]
    tokens = hf_patch_tokens(model, x)
    unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    projected = unit - (unit @ basis) @ basis.T
    projected /= np.linalg.norm(projected, axis=-1, keepdims=True)
    assert np.abs(projected - insid3_projection(tokens, blank_tokens, RANK)).max() <= TOL


def test_segment_folder_through_the_exported_backend(exported, hf_model, pair, tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    code = segment(pair, hf_model[0], tiny_checkpoints[0], out, "--image-size", str(SIZE), "--backend",
                   "onnxruntime", "--engine-dir", str(exported), "--precision", "fp32")
    assert code == 0
    for src in sorted(pair[2].iterdir()):
        written = np.asarray(Image.open(out / f"{src.stem}.png"))
        assert written.shape == np.asarray(Image.open(src)).shape[:2]
