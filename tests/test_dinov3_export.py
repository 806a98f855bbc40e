"""DINOv3 in reduced precision (eager) and through ONNX Runtime, against the fp32 eager model (CPU).

Model: ViT-S/16 with deterministic random weights (the checkpoint writer's). Tolerances: the fp32 ONNX
graph vs torch, max abs diff <= 1e-4 on the patch and cls tokens (batch 1 and 3 through the dynamic batch);
fp16 graph and fp16/bf16 eager runs vs fp32: finite, relative Frobenius error and worst per-token cosine
as for DINOv2 (bf16 <= 3 %, >= 0.999; fp16 <= 0.5 %, >= 0.9999; the fp16 graph <= 2 %, mean cosine >= 0.999).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from refseg.models.dinov3 import dinov3_from_state_dict
from refseg.runtime import io_names as io
from refseg.testing.random_checkpoints import random_dinov3_state_dict

ONNX_ATOL = 1e-4
SIZE = (64, 96)
PRECISION_TOLERANCE = {torch.bfloat16: (0.03, 0.999), torch.float16: (0.005, 0.9999)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def model_and_reference():
    model = dinov3_from_state_dict(random_dinov3_state_dict("vits16", seed=2))
    x = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model, x, model.forward_features(x)


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_reduced_precision_eager_is_finite_and_close(model_and_reference, dtype, device):
    model, x, reference = model_and_reference
    half = dinov3_from_state_dict(model.state_dict()).to(device=device, dtype=dtype)
    assert half.rope_embed.periods.dtype == torch.float32  # RoPE stays in float32, as officially
    got = half.forward_features(x.to(device=device, dtype=dtype))
    rel_tol, min_cos = PRECISION_TOLERANCE[dtype]
    for key in ("x_norm_patchtokens", "x_norm_clstoken"):
        assert got[key].dtype == dtype
        value = got[key].float().cpu()
        assert torch.isfinite(value).all(), f"{dtype} {key} has NaN/Inf"
        rel = ((value - reference[key]).norm() / reference[key].norm()).item()
        cos = F.cosine_similarity(value, reference[key], dim=-1).min().item()
        assert rel <= rel_tol and cos >= min_cos, f"{dtype} {device} {key}: rel {rel}, min cos {cos}"


@pytest.fixture(scope="module")
def ort():
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'refseg[onnx]')")
    return pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'refseg[onnx]')")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_export_matches_eager(model_and_reference, ort, tmp_path, precision):
    from refseg.export.dinov3_onnx import export_dinov3

    model, x, reference = model_and_reference
    record = export_dinov3(model, tmp_path / "dinov3.onnx", SIZE, precision=precision)
    assert record["model"] == "vits16" and record["image_size"] == list(SIZE)
    assert record["inputs"][io.DINOV2_INPUT]["shape"] == ["batch", 3, *SIZE]
    assert record["outputs"][io.DINOV2_PATCH_TOKENS]["shape"] == ["batch", (64 // 16) * (96 // 16), 384]
    session = ort.InferenceSession(str(tmp_path / "dinov3.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # the batch is dynamic
        tokens, cls = session.run(list(io.DINOV2_OUTPUTS), {io.DINOV2_INPUT: x[:batch].numpy()})
        expected_tokens = reference["x_norm_patchtokens"][:batch]
        expected_cls = reference["x_norm_clstoken"][:batch]
        if precision == "fp32":
            assert max_diff(tokens, expected_tokens) <= ONNX_ATOL
            assert max_diff(cls, expected_cls) <= ONNX_ATOL
        else:
            tokens = torch.from_numpy(tokens)
            assert torch.isfinite(tokens).all()
            assert max_diff(tokens, expected_tokens) <= 0.02 * float(expected_tokens.abs().max())
            assert float(F.cosine_similarity(tokens, expected_tokens, dim=-1).mean()) >= 0.999


def test_export_size_must_fit_the_patch(model_and_reference):
    from refseg.export.dinov3_onnx import Dinov3Export

    with pytest.raises(ValueError, match="64x100"):
        Dinov3Export(model_and_reference[0], (64, 100))
