"""Fast checks of the benchmark suite (no model is run here).

- FLOP formulas against the figures of docs/performance.md (within 2 %).
- The research-style baseline's matching + prompt stage (bench/baseline.py, Python loops) gives the
  same prompt sets as refseg's on the same tokens, for the gbmseg preset (compared as sets of
  (x, y, label); the walk order is the same by construction, the output order may differ).
- The report writer produces results.json / results.md / throughput.png from a tiny fake result set.
- ``refseg bench --quick`` argument parsing; the streaming-vs-per-image ratios and the README table.
- ``refseg bench`` from a non-editable copy of the package outside the source tree (the baseline is
  part of the package, nothing is loaded from bench/ by path).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refseg.benchmark import flops as F
from refseg.benchmark.measure import mean_agreement, percentile, tensor_agreement, time_calls
from refseg.benchmark.prompt_stage import compare_prompts, load_baseline, reference_labels, refseg_prompt_stage
from refseg.benchmark.suite import compute_ratios
from refseg.config import SegmenterConfig

REL = 0.02  # performance.md gives 2-3 significant digits


@pytest.mark.parametrize("name, tflop", [("vit_b", 0.97), ("vit_l", 2.99), ("vit_h", 5.96)])
def test_sam_encoder_flops_match_performance_md(name, tflop):
    assert F.sam_encoder_flops(name) / 1e12 == pytest.approx(tflop, rel=REL)


@pytest.mark.parametrize("name, size, tflop", [("vits14", 518, 0.093), ("vitb14", 518, 0.303),
                                               ("vitl14", 518, 1.01), ("vitg14", 518, 3.57),
                                               ("vitg14", 560, 4.26)])
def test_dinov2_flops_match_performance_md(name, size, tflop):
    assert F.dinov2_flops(name, size) / 1e12 == pytest.approx(tflop, rel=REL)


def test_decoder_matching_and_pipeline_flops_match_performance_md():
    assert F.sam_decoder_flops(1) / 1e9 == pytest.approx(3.6, rel=REL)
    assert F.sam_decoder_flops(10) / 1e9 == pytest.approx(3.8, rel=REL)
    assert F.sam_decoder_flops(1, prompt_sets=64) == pytest.approx(64 * F.sam_decoder_flops(1))
    assert F.matching_flops(1369, 1369, 384) / 1e9 == pytest.approx(1.4, rel=0.03)
    assert F.matching_flops(1369, 1369, 1536) / 1e9 == pytest.approx(5.8, rel=REL)
    bb = F.pipeline_flops("vitb14", 518, "vit_b", prompt_sets=10)
    assert bb["total"] / 1e12 == pytest.approx(1.31, rel=REL)  # "B+B + 10 prompt sets: 1.31 TFLOP"
    gl = F.pipeline_flops("vitg14", 560, "vit_l", prompt_sets=1, points_per_set=60)
    assert gl["total"] / 1e12 == pytest.approx(7.26, rel=REL)  # "GBMSeg-like: 7.26 TFLOP"
    assert F.dinov2_flops("vitb14", 518, batch=16) == pytest.approx(16 * F.dinov2_flops("vitb14", 518))


def test_gpu_peaks_by_name():
    assert F.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert F.gpu_peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.0
    assert F.gpu_peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert F.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert F.gpu_peak_tflops("NVIDIA GeForce RTX 3090", "fp16") is None
    assert F.gpu_peak_tflops(None, "fp32") is None
    got = F.achieved(2e12, 0.5, 100.0)
    assert got["tflops"] == pytest.approx(4.0) and got["fraction_of_peak"] == pytest.approx(0.04)


def test_measure_helpers():
    calls = []
    timing = time_calls(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and timing.warmup == 2 and len(timing.samples) == 4
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0 and percentile([], 50) is None
    a = np.zeros((8, 8), bool)
    a[:4] = True
    b = np.zeros((8, 8), bool)
    b[:2] = True
    got = mean_agreement([(a, b), (a, a)])
    assert got["iou_min"] == pytest.approx(0.5) and got["iou_mean"] == pytest.approx(0.75)
    assert got["dice_min"] == pytest.approx(2 * 16 / 48)
    x = torch.randn(3, 5, 7)
    same = tensor_agreement(x, x)
    assert same["max_abs"] == 0.0 and same["cosine"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        tensor_agreement(x, x[0])


# ------------------------------------------------------------------------------- baseline parity
@pytest.fixture(scope="module")
def baseline():
    return load_baseline()


def _tokens(grid: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference tokens and target tokens = the reference grid shifted by (2, 1) cells plus noise,
    so that many matches pass the cycle check."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(grid, grid, dim, generator=gen)
    tgt = torch.roll(ref, shifts=(2, 1), dims=(0, 1)) + 0.35 * torch.randn(grid, grid, dim, generator=gen)
    return ref.reshape(-1, dim), tgt.reshape(-1, dim)


@pytest.mark.parametrize("image_size, target_hw, seed", [(224, (500, 600), 0), (280, (512, 512), 1),
                                                         (224, (333, 250), 2)])
def test_baseline_prompt_stage_equals_refseg_on_same_tokens(baseline, image_size, target_hw, seed):
    cfg = SegmenterConfig.from_preset("gbmseg", dinov2="vits14", sam="vit_b", image_size=image_size)
    rng = np.random.default_rng(seed)
    mask = np.zeros((300, 340), np.uint8)
    y0, x0 = rng.integers(30, 90, size=2)
    mask[y0:y0 + 150, x0:x0 + 170] = 1
    g = cfg.grid_size
    ref, tgt = _tokens(g, 32, seed)
    _, labels = reference_labels(mask, cfg)
    fg, bg = baseline.patch_lists(mask, image_size, cfg.gbmseg_skip_last)
    # the Python cell scan gives the same FG / BG patches as refseg's vectorised grid
    assert sorted(fg) == torch.nonzero(labels[0] == 1).flatten().tolist()
    assert sorted(bg) == torch.nonzero(labels[0] == 0).flatten().tolist()
    ours = refseg_prompt_stage(ref, labels, tgt[None], [target_hw], cfg).prompt(0)
    points, point_labels, times = baseline.prompt_stage(ref, tgt, fg, bg, target_hw, cfg)
    cmp = compare_prompts(ours, (points, point_labels))
    assert cmp["equal"], cmp
    assert (point_labels == 1).sum() >= 5 and (point_labels == 0).sum() >= 3  # a non-trivial case
    assert set(times) == {"matching", "prompts"}
    h, w = target_hw
    assert ((points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)).all()


def test_baseline_physical_stage_reproduces_release_example(baseline):
    """The Python-loop prompt engineering on the release's own lists (algorithm.md §1 golden example)."""
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gbmseg_example"
    if not data.is_dir():
        pytest.skip(f"golden data folder {data} is absent")

    def load(name):
        _, pos, neg = (data / name).read_text().strip().split(";")
        return ast.literal_eval(pos), ast.literal_eval(neg)

    pos, neg = load("prompt_initial.txt")
    _, hard = load("prompt_hard.txt")
    final_pos, final_neg = load("prompt_final.txt")
    radii = {"pos": 0.0, "neg": 64.0, "exclusion": 128.0, "hard": 64.0}
    got_pos, got_neg = baseline.engineer_prompts(pos, neg, hard, radii)
    assert got_pos == final_pos and got_neg == final_neg


def test_baseline_rejects_non_release_settings(baseline):
    with pytest.raises(ValueError, match="metric='cosine'"):
        baseline.check_config(SegmenterConfig.from_preset("sat"))
    baseline.check_config(SegmenterConfig.from_preset("gbmseg", dinov2="vits14", sam="vit_b"))


# ---------------------------------------------------------------------------------------- report
def _fake_results() -> dict:
    e2e = {"section": "end_to_end", "pipeline": "p", "dataset": "kvasir", "variant": "torch-fp32", "batch": 1,
           "label": "e2e:p/kvasir torch-fp32 b1", "images_per_s": 0.05, "p50_s": 20.0, "p95_s": 21.0,
           "peak_mib": 2000.0, "stages_s": {"dinov2": 2.0, "matching": 0.01, "prompts": 0.01,
                                             "sam_encoder": 17.0, "decoder": 0.2, "postprocess": 0.01},
           "agreement": {"iou_mean": 1.0, "dice_mean": 1.0}, "tflops": 0.05, "fraction_of_peak": None}
    base = {**e2e, "section": "baseline", "variant": "research-baseline", "label": "baseline:p/kvasir",
            "images_per_s": 0.04, "stages_s": {"dinov2": 6.0, "grid": 0.05, "matching": 0.05, "prompts": 0.2,
                                               "sam_encoder": 18.0, "decoder": 0.2},
            "agreement": {"iou_mean": 0.999, "dice_mean": 0.9995}}
    prompt = [{"section": "prompt_stage", "pipeline": "p", "dataset": "kvasir", "variant": v, "settings": "gbmseg",
               "batch": 1, "per_image_s": t, "p50_s": t, "p95_s": t, "device": "cpu", "label": v}
              for v, t in (("refseg", 0.004), ("research-baseline", 0.3))]
    model = {"section": "model", "stage": "sam_encoder", "model": "vit_b", "input": None, "variant": "torch-fp32",
             "batch": 1, "p50_s": 17.0, "p95_s": 17.5, "images_per_s": 1 / 17, "gflop_per_call": 972.0,
             "tflops": 0.057, "fraction_of_peak": None, "peak_mib": 1500.0,
             "agreement": {"cosine": 1.0, "rel_l2": 0.0, "max_abs": 0.0}}
    e2e.update(mode="per_image", repeats=3, images_per_s_min=0.045, images_per_s_max=0.055)
    base.update(repeats=3, images_per_s_min=0.038, images_per_s_max=0.041,
                agreement={"iou_mean": 0.999, "dice_mean": 0.9995, "identical": 7, "compared": 8})
    stream = [{**e2e, "mode": "stream", "batch": b, "label": f"e2e:p/kvasir torch-fp32 b{b} stream",
               "images_per_s": 0.05 * f, "images_per_s_min": 0.045 * f, "images_per_s_max": 0.055 * f,
               "peak_mib": 2000.0 + 100 * b} for b, f in ((1, 1.0), (4, 1.1), (16, 1.2))]
    rows = [e2e, base, *prompt, model, *stream]
    return {"quick": True, "device": "cpu", "wall_s": 123.0, "random_weights": True, "command": "refseg bench",
            "machine": {"cpu": "test CPU", "cpu_count": 2, "torch_threads": 2, "gpu_name": None},
            "versions": {"torch": torch.__version__, "triton": None, "onnxruntime": None, "tensorrt": None},
            "git": {"commit": None, "dirty": None}, "rows": rows,
            "skipped_rows": [{"row": "x", "reason": "time budget"}],
            "parity": {"p/kvasir": {"same_features": {"prompts_equal": 2, "compared": 2}}},
            "ratios": compute_ratios(rows), "notes": ["random weights"], "schema": "refseg-bench/1",
            "config": {"skipped_variants": [{"variant": "tensorrt", "reason": "no GPU"}],
                       "plan": {"e2e_images": 8, "e2e_repeats": 3}}}


def test_ratios_from_rows():
    ratios = _fake_results()["ratios"]
    assert ratios["end_to_end_vs_baseline"] == pytest.approx(0.05 / 0.04)
    assert ratios["prompt_stage_vs_baseline"] == pytest.approx(0.3 / 0.004)
    stages = ratios["by_pipeline"]["p/kvasir"]["stages_vs_baseline"]
    assert stages["dinov2"] == pytest.approx(3.0) and stages["prompt_stage"] == pytest.approx(0.3 / 0.02)


def test_streaming_ratios_and_spread_from_rows():
    ratios = _fake_results()["ratios"]
    stream = ratios["streaming_vs_per_image"]["p/kvasir torch-fp32"]
    assert list(stream) == ["b1", "b4", "b16"]
    assert stream["b4"]["ratio"] == pytest.approx(1.1) and stream["b16"]["ratio"] == pytest.approx(1.2)
    assert stream["b16"]["peak_mib"] == 3600.0 and stream["b16"]["per_image_peak_mib"] == 2000.0
    entry = ratios["by_pipeline"]["p/kvasir"]
    # the streaming rows at batch 1 must not replace the per-image reference row
    assert entry["end_to_end_vs_baseline"] == pytest.approx(0.05 / 0.04)
    assert entry["end_to_end_vs_baseline_range"] == pytest.approx([0.045 / 0.041, 0.055 / 0.038])
    assert (entry["masks_identical"], entry["masks_compared"]) == (7, 8)


def test_readme_section_regenerated_from_results(tmp_path):
    from refseg.benchmark.report import README_BEGIN, README_END, read_results, update_readme, write_json

    results = _fake_results()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{README_BEGIN}\nold table\n{README_END}\n\n## Next\n")
    write_json(results, tmp_path / "results.json")
    update_readme(read_results(tmp_path / "results.json"), readme)
    text = readme.read_text()
    assert "old table" not in text and text.endswith(f"{README_END}\n\n## Next\n")
    section = text[text.index(README_BEGIN):text.index(README_END)]
    assert "median of 3 passes" in section and "8 images per pass" in section
    assert "| torch-fp32 stream b16 | 0.06 (0.054–0.066) | 1.5 | 1.2 |" in section
    assert "**1.25×** the baseline" in section and "masks identical 7/8" in section
    assert "target ≥ 2×: not met" in section and "prompt stage **75×**" in section
    assert "b16 1.2× (peak 3,600 MiB)" in section
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="README.md: no"):
        update_readme(results, readme)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json: not a refseg bench"):
        read_results(tmp_path / "bad.json")


def test_with_mirrors_makes_distinct_targets():
    from refseg.benchmark.data import synthetic_set, with_mirrors

    s = with_mirrors(synthetic_set(num_targets=3, size=(40, 50)), 8)
    assert len(s.targets) == 8 and len(s.target_masks) == 8 and s.target_names[3] == "synthetic_0:fliplr"
    assert np.array_equal(s.targets[3], s.targets[0][:, ::-1]) and np.array_equal(s.target_masks[3],
                                                                                  s.target_masks[0][:, ::-1])
    assert len({t.tobytes() for t in s.targets}) == 8
    assert len(with_mirrors(synthetic_set(num_targets=1, size=(40, 50)), 8).targets) == 4  # mirrors run out


def test_report_writes_three_files(tmp_path):
    pytest.importorskip("matplotlib")
    from refseg.benchmark.report import write_report

    results = _fake_results()
    results["rows"][0]["np_value"] = np.float32(1.5)  # numpy scalars must serialise
    paths = write_report(results, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "results.md", "throughput.png"}
    loaded = json.loads(paths["json"].read_text())
    assert loaded["ratios"]["end_to_end_vs_baseline"] == pytest.approx(1.25)
    assert loaded["rows"][0]["np_value"] == 1.5
    md = paths["markdown"].read_text()
    assert "research-baseline" in md and "| vit_b |" in md and "time budget" in md
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- CLI
def test_bench_cli_parsing():
    from refseg.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "-o", "/tmp/x"])
    assert args.quick and args.output == "/tmp/x" and args.device == "auto" and callable(args.func)
    assert args.sam_checkpoint is None and args.dinov2_checkpoint is None and args.budget == -1.0
    args = build_parser().parse_args(["bench", "-o", "d", "--device", "cpu", "--sam-checkpoint", "s.pth",
                                      "--dinov2-checkpoint", "d.pth", "--backends", "torch-bf16,onnxruntime"])
    assert not args.quick and args.device == "cpu" and args.sam_checkpoint == "s.pth" and args.threads is None
    assert build_parser().parse_args(["bench", "--quick", "-o", "d", "--threads", "1"]).threads == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--quick"])  # -o is required


def test_bench_cli_rejects_bad_arguments(tmp_path, capsys):
    from refseg.cli import main

    assert main(["bench", "--quick", "-o", str(tmp_path), "--image-size", "500"]) == 2
    assert main(["bench", "--quick", "-o", str(tmp_path), "--sam-checkpoint", str(tmp_path / "no.pth")]) == 2
    assert main(["bench", "--quick", "-o", str(tmp_path), "--backends", "nonsense", "--budget", "0"]) == 2
    assert main(["bench", "--quick", "-o", str(tmp_path), "--threads", "0"]) == 2
    assert main(["bench", "--quick", "-o", str(tmp_path), "--stream-batches", "4,x"]) == 2
    assert main(["bench", "--quick", "-o", str(tmp_path), "--repeats", "0"]) == 2
    assert main(["bench", "-o", str(tmp_path), "--from-results", str(tmp_path / "missing.json")]) == 2


# ------------------------------------------------------------------------- installed (non-editable) copy
_INSTALLED_SCRIPT = r"""
import sys, torch
from pathlib import Path
lib = Path(sys.argv[1]).resolve()
import refseg
assert Path(refseg.__file__).resolve().is_relative_to(lib), refseg.__file__
from refseg.benchmark.context import SuitePlan
from refseg.benchmark.prompt_stage import load_baseline, reference_labels, refseg_prompt_stage, compare_prompts
from refseg.benchmark import run_suite, write_report
from refseg.config import SegmenterConfig
bl = load_baseline()
assert Path(bl.__file__).resolve().is_relative_to(lib), bl.__file__
cfg = SegmenterConfig.from_preset("gbmseg", dinov2="vits14", sam="vit_b", image_size=112)
gen = torch.Generator().manual_seed(0)
ref = torch.randn(64, 16, generator=gen)
tgt = ref[torch.randperm(64, generator=gen)] + 0.1 * torch.randn(64, 16, generator=gen)
mask = torch.zeros(100, 100, dtype=torch.uint8)
mask[20:70, 30:80] = 1
_, labels = reference_labels(mask.numpy(), cfg)
fg, bg = bl.patch_lists(mask.numpy(), 112, cfg.gbmseg_skip_last)
ours = refseg_prompt_stage(ref, labels, tgt[None], [(100, 100)], cfg).prompt(0)
points, point_labels, _ = bl.prompt_stage(ref, tgt, fg, bg, (100, 100), cfg)
assert compare_prompts(ours, (points, point_labels))["equal"]
plan = SuitePlan(quick=True, dinov2_models=[("vits14", 112)], sam_models=[], pipelines=[], decoder_sets=(),
                 model_warmup=0, model_repeats=1)
results = run_suite(sys.argv[2], device="cpu", plan=plan, backends=["torch-fp32"], data_dir=sys.argv[3])
assert "research baseline unavailable" not in " ".join(results["notes"]), results["notes"]
assert [r["stage"] for r in results["rows"]] == ["dinov2"], results["rows"]
write_report(results, sys.argv[2])
print("installed copy ok")
"""


def test_bench_runs_from_a_non_editable_copy_outside_the_source_tree(tmp_path):
    """``setup.py build_py`` lays the package out as a wheel would (engine/ -> refseg/ ...); the suite's
    import path, the baseline and a one-row run work from there with bench/ and tests/ out of reach."""
    root = Path(__file__).resolve().parents[1]
    lib = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=root,
                   check=True, capture_output=True)
    assert (lib / "refseg" / "benchmark" / "baseline.py").is_file() and not (lib / "bench").exists()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(lib), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run([sys.executable, "-c", _INSTALLED_SCRIPT, str(lib), str(work / "out"),
                             str(work / "no_data")], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installed copy ok" in result.stdout
    assert json.loads((work / "out" / "results.json").read_text())["rows"][0]["model"] == "vits14"


# ------------------------------------------------------------------ end-to-end rows: repeats, streaming
def test_per_image_and_streaming_rows_agree_and_report_spread(tmp_path, small_checkpoints):
    """Two passes over 2 small synthetic images, per image and through stream_segment at batch 2, with the
    2-block SAM: masks identical between the two paths, median and range of the passes, and the ratio."""
    from refseg.benchmark.context import Budget, CheckpointStore, PipelineSpec, RunContext, SuitePlan
    from refseg.benchmark.data import synthetic_set
    from refseg.benchmark.pipeline_rows import PipelineRows
    from refseg.benchmark.suite import compute_ratios
    from refseg.benchmark.variants import REFERENCE

    sam_path, dino_path = small_checkpoints
    plan = SuitePlan(quick=True, dinov2_models=[], sam_models=[], pipelines=[], e2e_images=2, e2e_repeats=2,
                     e2e_warmup=0)
    ctx = RunContext(plan, torch.device("cpu"), tmp_path, CheckpointStore(tmp_path), Budget(None))
    rows = PipelineRows(ctx, PipelineSpec("sat-small", "sat", {"dinov2": "vits14", "image_size": 112}),
                        synthetic_set(num_targets=2, size=(64, 80)))
    rows._paths = lambda: {"sam_checkpoint": sam_path, "dinov2_checkpoint": dino_path}
    per_image = rows.end_to_end(REFERENCE, 1)
    stream = rows.end_to_end(REFERENCE, 2, mode="stream")
    assert not ctx.skipped_rows, ctx.skipped_rows
    for row in (per_image, stream):
        assert row["images"] == 2 and row["repeats"] == 2 and len(row["repeat_s"]) == 2
        assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
        assert row["agreement"]["compared"] == 2
    assert per_image["mode"] == "per_image" and stream["mode"] == "stream"
    assert stream["agreement"]["identical"] == 2  # streaming gives the per-image masks exactly
    entry = compute_ratios(rows.rows)["streaming_vs_per_image"]["sat-small/synthetic torch-fp32"]
    assert entry["b2"]["ratio"] == pytest.approx(stream["images_per_s"] / per_image["images_per_s"])


def test_exported_rows_are_skipped_before_export_without_their_provider(monkeypatch):
    """On a GPU host whose ONNX Runtime has no CUDA provider (and no TensorRT), the exported variants are
    refused with the reason by the plan itself, before any export could start."""
    ort = pytest.importorskip("onnxruntime")
    from refseg.benchmark import variants

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    reason = variants.exported_unavailable("onnxruntime", torch.device("cuda"))
    assert reason and "CUDAExecutionProvider" in reason
    run, skipped = variants.plan_variants(torch.device("cuda"), quick=False)
    reasons = {s["variant"]: s["reason"] for s in skipped}
    assert "CUDAExecutionProvider" in reasons["onnxruntime"] and "onnxruntime" not in {v.name for v in run}
    assert variants.exported_unavailable("onnxruntime", torch.device("cpu")) is None  # the CPU provider is fine there
