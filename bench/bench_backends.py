"""Benchmarks: torch eager vs ONNX Runtime (vs TensorRT on a GPU) per exported model.

    python -m pytest bench/bench_backends.py --benchmark-only \\
        --benchmark-columns=mean,stddev,rounds --benchmark-group-by=group

One group per (model, device): ``dinov2`` (DINOv2 at 518, batch 1 on the CPU / 16 on a GPU),
``sam_encoder`` (batch 1 / 16) and ``sam_decoder`` (10 prompt sets of 10 points against one
embedding). torch runs first in each group; every other backend records ``speedup_vs_torch``
(torch mean / its mean, same run, same process) in ``extra_info``. Models carry random weights
(speed does not depend on the values) and are exported once per session (fp32 by default).

Environment: ``REFSEG_BENCH_DINOV2`` (default ``vitb14``), ``REFSEG_BENCH_SAM`` (``vit_b``),
``REFSEG_BENCH_SAM_DEPTH`` (encoder blocks; default the model's), ``REFSEG_BENCH_PRECISION``
(``fp32``; ``fp16`` for GPU runs). On this 2-core CPU the full SAM-B encoder takes ~25 s per
forward in torch: ``REFSEG_BENCH_SAM_DEPTH=2`` gives a quick run.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from refseg.config import SegmenterConfig
from refseg.runtime.torch_backend import TorchBackend

CUDA = torch.cuda.is_available()
DEVICES = ("cpu", "cuda") if CUDA else ("cpu",)
MODELS = ("dinov2", "sam_encoder", "sam_decoder")
BACKENDS = ("torch", "onnxruntime", "tensorrt")
DINOV2 = os.environ.get("REFSEG_BENCH_DINOV2", "vitb14")
SAM = os.environ.get("REFSEG_BENCH_SAM", "vit_b")
SAM_DEPTH = int(os.environ.get("REFSEG_BENCH_SAM_DEPTH", "0"))
PRECISION = os.environ.get("REFSEG_BENCH_PRECISION", "fp32")
IMAGE_SIZE = 518
ROUNDS = {"dinov2": 3, "sam_encoder": 2, "sam_decoder": 10}
CASES = [(m, b, d) for d in DEVICES for m in MODELS for b in BACKENDS]  # torch first per group

_means: dict[tuple[str, str], dict[str, float]] = {}
_backends: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, manifest, dinov2 module, sam module) with random weights."""
    pytest.importorskip("onnx", reason="onnx not installed (pip install 'refseg[onnx]')")
    from refseg.export.onnx_export import export_models
    from refseg.testing.random_checkpoints import random_dinov2_model, random_sam_model

    dinov2 = random_dinov2_model(DINOV2)
    sam = random_sam_model(SAM, depth=SAM_DEPTH or None)
    folder = tmp_path_factory.mktemp("bench_export")
    manifest = export_models(folder, precision=PRECISION, image_size=IMAGE_SIZE, max_batch=16,
                             dinov2_model=dinov2, sam_model=sam)
    return folder, manifest, dinov2, sam


def _backend(name: str, device: str, exported):
    key = (name, device)
    if key not in _backends:
        folder, manifest, dinov2, sam = exported
        dev = torch.device(device)
        config = SegmenterConfig(dinov2=DINOV2, sam=SAM, image_size=IMAGE_SIZE, precision=PRECISION)
        if name == "torch":
            _backends[key] = TorchBackend(dinov2, sam, dev, PRECISION if device == "cuda" else "fp32")
        elif name == "onnxruntime":
            ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
            if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
                pytest.skip("onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
            from refseg.runtime.exported import OnnxRuntimeBackend
            _backends[key] = OnnxRuntimeBackend(folder, config, dev, manifest)
        else:
            if device != "cuda" or importlib.util.find_spec("tensorrt") is None:
                pytest.skip("TensorRT needs the tensorrt package and a CUDA GPU")
            from refseg.runtime.exported import TensorRTBackend
            _backends[key] = TensorRTBackend(folder, config, dev, manifest)
    return _backends[key]


def _workload(model: str, backend, device: str):
    gen = torch.Generator().manual_seed(0)
    batch = 16 if device == "cuda" else 1
    if model == "dinov2":
        x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).to(device)
        return lambda: backend.encode_dinov2(x)
    if model == "sam_encoder":
        x = torch.randn(batch, 3, 1024, 1024, generator=gen).to(device)
        return lambda: backend.encode_sam(x)
    embedding = torch.randn(256, 64, 64, generator=gen).to(device)
    coords = (torch.rand(10, 10, 2, generator=gen) * 1024).to(device)
    labels = torch.randint(0, 2, (10, 10), generator=gen).to(device)
    return lambda: backend.decode(embedding, coords, labels, None, True)


@pytest.mark.parametrize("model, backend_name, device", CASES,
                         ids=[f"{m}-{b}-{d}" for m, b, d in CASES])
def test_backend_speed(benchmark, exported, model, backend_name, device):
    backend = _backend(backend_name, device, exported)
    work = _workload(model, backend, device)

    def timed():
        out = work()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{model}-{device}"
    benchmark.extra_info.update(backend=backend_name, precision=PRECISION, dinov2=DINOV2, sam=SAM,
                                sam_depth=SAM_DEPTH or "full", threads=torch.get_num_threads())
    benchmark.pedantic(timed, rounds=ROUNDS[model], warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: each case ran once, nothing to compare
        return
    means = _means.setdefault((model, device), {})
    means[backend_name] = stats.stats.mean
    if backend_name != "torch" and "torch" in means:
        benchmark.extra_info["speedup_vs_torch"] = round(means["torch"] / means[backend_name], 3)
