"""pytest-benchmark rows of the pipeline: each model, the matching + prompt stage, end to end.

    python -m pytest bench/bench_pipeline.py --benchmark-only [--benchmark-json out.json]

Sizes follow the device (``REFSEG_BENCH_DEVICE``, default ``auto``): on the CPU the small set
(DINOv2-S at 224, SAM-B, two end-to-end targets), on a GPU every DINOv2 / SAM size at batch 1 and 16
and both torch precisions. Weights are random (speed only). Every timed function synchronises the GPU
before it returns, and each row has warm-up rounds. GFLOP per call go to ``extra_info``; the full
report with the research baseline is ``refseg bench``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from refseg.benchmark import flops as F
from refseg.benchmark.data import load_sets
from refseg.benchmark.measure import synchronize
from refseg.benchmark.model_rows import decoder_inputs
from refseg.benchmark.prompt_stage import reference_labels, refseg_prompt_stage
from refseg.benchmark.variants import VARIANTS, decoder_runner, dinov2_runner, sam_encoder_runner
from refseg.config import SegmenterConfig
from refseg.models import dinov2 as dinov2_mod
from refseg.runtime.torch_backend import resolve_device
from refseg.testing.random_checkpoints import random_dinov2_model, random_sam_model

pytest.importorskip("pytest_benchmark")

DEVICE = resolve_device(os.environ.get("REFSEG_BENCH_DEVICE", "auto"))
GPU = DEVICE.type == "cuda"
DINOV2 = ([(n, 518) for n in ("vits14", "vitb14", "vitl14", "vitg14")] + [("vitg14", 560)]) if GPU \
    else [("vits14", 224)]
SAMS = ["vit_b", "vit_l", "vit_h"] if GPU else ["vit_b"]
BATCHES = (1, 16) if GPU else (1,)
PRECISIONS = ["torch-fp32", "torch-bf16"] if GPU else ["torch-fp32"]
ROUNDS, WARMUP = (20, 3) if GPU else (2, 1)
SAM_ROUNDS, SAM_WARMUP = (10, 3) if GPU else (1, 1)


def run(benchmark, fn, rounds: int = ROUNDS, warmup: int = WARMUP):
    """Time ``fn`` with a GPU synchronisation inside the timed call."""
    def timed():
        out = fn()
        synchronize(DEVICE)
        return out

    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)


def _seeded(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sam_modules():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache.clear()  # one SAM at a time
            cache[name] = random_sam_model(name)
        return cache[name]

    return get


@pytest.mark.parametrize("variant", PRECISIONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name, size", DINOV2)
def test_dinov2(benchmark, name, size, batch, variant):
    model = random_dinov2_model(name)
    fn = dinov2_runner(model, VARIANTS[variant], DEVICE)
    images = _seeded(batch, 3, size, size)
    benchmark.extra_info.update(gflop=F.dinov2_flops(name, size, batch) / 1e9, images=batch)
    out = run(benchmark, lambda: fn(images))
    assert out.shape == (batch, (size // 14) ** 2, dinov2_mod.DINOV2_SPECS[name].embed_dim)


@pytest.mark.parametrize("variant", PRECISIONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", SAMS)
def test_sam_encoder(benchmark, sam_modules, name, batch, variant):
    fn = sam_encoder_runner(sam_modules(name).image_encoder, VARIANTS[variant], DEVICE)
    images = _seeded(batch, 3, 1024, 1024)
    benchmark.extra_info.update(gflop=F.sam_encoder_flops(name, batch) / 1e9, images=batch)
    out = run(benchmark, lambda: fn(images), SAM_ROUNDS, SAM_WARMUP)
    assert out.shape == (batch, 256, 64, 64)


@pytest.mark.parametrize("sets", (1, 10, 64))
def test_decoder(benchmark, sam_modules, sets):
    fn = decoder_runner(sam_modules("vit_b"), VARIANTS["torch-fp32"], DEVICE)
    embedding, coords, labels = decoder_inputs(sets, 10)
    benchmark.extra_info.update(gflop=F.sam_decoder_flops(10, sets) / 1e9, prompt_sets=sets)
    masks, iou = run(benchmark, lambda: fn(embedding, coords, labels))
    assert masks.shape == (sets, 1, 256, 256) and iou.shape == (sets, 1)


@pytest.fixture(scope="module")
def bench_set():
    return load_sets(max_targets=2, include_gbmseg=False)[0]


@pytest.mark.parametrize("preset", ("gbmseg", "sat"))
def test_prompt_stage(benchmark, bench_set, preset):
    """Matching + prompts for one target on 37×37 tokens of width 384 (DINOv2-S at 518)."""
    cfg = SegmenterConfig.from_preset(preset, dinov2="vits14", image_size=518)
    g, dim = cfg.grid_size, 384
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(g, g, dim, generator=gen)
    tgt = torch.roll(ref, shifts=(2, 1), dims=(0, 1)) + 0.35 * torch.randn(g, g, dim, generator=gen)
    ref, tgt = ref.reshape(-1, dim).to(DEVICE), tgt.reshape(1, -1, dim).to(DEVICE)
    _, labels = reference_labels(bench_set.reference_mask, cfg)
    labels = labels.to(DEVICE)
    size = [tuple(bench_set.targets[0].shape[:2])]
    benchmark.extra_info.update(gflop=F.matching_flops(g * g, g * g, dim) / 1e9)
    prompts = run(benchmark, lambda: refseg_prompt_stage(ref, labels, tgt, size, cfg), 20, 3)
    assert int(prompts.num_points[0]) > 0


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory):
    from refseg.testing.random_checkpoints import write_random_checkpoints

    folder = tmp_path_factory.mktemp("bench_checkpoints")
    sam, dino = ("vit_b", "vitb14") if GPU else ("vit_b", "vits14")
    paths = write_random_checkpoints(folder, sam=[sam], dinov2=[dino])
    return {"sam_checkpoint": paths[0], "dinov2_checkpoint": paths[1]}


@pytest.mark.parametrize("batch", (1, 4, 16) if GPU else (1, 2))
def test_end_to_end(benchmark, bench_set, checkpoint_files, batch):
    """The sat preset (random weights) on ``batch`` targets per call, reference cached."""
    from refseg.segmenter import Segmenter

    seg = Segmenter.from_preset("sat", device=str(DEVICE), batch_size=batch,
                                image_size=518 if GPU else 224, **checkpoint_files)
    seg.set_reference(bench_set.reference, bench_set.reference_mask)
    images = [bench_set.targets[i] for i in bench_set.cycled(batch)]
    benchmark.extra_info.update(images=batch)
    results = run(benchmark, lambda: seg.segment_batch(images), ROUNDS if GPU else 1, WARMUP)
    assert len(results) == batch and all(r.mask.shape == im.shape[:2] for r, im in zip(results, images))
    assert all(np.isfinite(list(r.timings.values())).all() for r in results)
