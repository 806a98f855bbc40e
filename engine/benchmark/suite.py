"""The benchmark suite: every row of ``refseg bench`` in one run, plus machine facts and ratios.

Order (so a time budget drops the least important rows first): per pipeline the torch fp32 path at
batch 1 (the reference of every agreement figure), the research-style baseline with its parity
check, the prompt stage on shared tokens; the same on the GBMSeg example; the other variants end
to end (exported backends first); the other batch sizes; the model rows on every variant.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .context import Budget, CheckpointStore, RunContext, SuitePlan, full_plan, quick_plan
from .data import load_sets, with_mirrors
from .model_rows import ModelRows
from .pipeline_rows import PipelineRows
from .variants import REFERENCE, plan_variants
from ..optional import versions as installed_versions

log = logging.getLogger(__name__)


def git_commit() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the source checkout (None without git)."""
    import refseg

    root = Path(refseg.__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    """Versions of the packages the numbers depend on (None when not installed)."""
    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "numpy": numpy.__version__}
    out.update(installed_versions(("triton", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torchvision",
                         "segment-anything", "dinov2", "refseg")))
    return out


def machine(device) -> dict:
    """CPU / GPU names and counts (from :func:`refseg.runtime.environment.collect`)."""
    import torch

    from refseg.runtime.environment import collect

    info = collect()
    keep = ("cpu", "cpu_count", "torch_threads", "platform", "cuda_available", "gpus", "onnxruntime_providers")
    out = {k: info.get(k) for k in keep}
    out["device"] = str(device)
    out["gpu_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out


def _load_average() -> list[float] | None:
    """1 / 5 / 15-minute load averages (None where the OS does not report them)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def start_run(threads: int | None) -> list[float] | None:
    """Set torch's CPU ``threads`` (None: leave them), warn when the machine is busy; returns the load
    averages at the start (for :func:`run_header`).

    Raises:
        ValueError: ``threads`` < 1.
    """
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}: must be >= 1")
        torch.set_num_threads(threads)
    load_start = _load_average()
    if load_start and load_start[0] > (os.cpu_count() or 1):
        log.warning("this machine is busy (load average %.1f on %d cores): timings will be slow and noisy; "
                    "multi-threaded ops suffer most (try --threads 1)", load_start[0], os.cpu_count() or 1)
    return load_start


def run_header(device, load_start: list[float] | None, final: bool = True) -> dict:
    """The fields every ``results.json`` starts with: schema, time, command, device, machine (with the load
    averages at ``load_start`` and now), package versions and the git commit."""
    return {
        "schema": "refseg-bench/1" if final else "refseg-bench/1-partial",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": str(device),
        "machine": {**machine(device), "load_average_start": load_start, "load_average_end": _load_average()},
        "versions": versions(),
        "git": git_commit(),
    }


def _find(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def compute_ratios(rows: list[dict]) -> dict:
    """Speed-ups over the research-style baseline, per pipeline and (first pipeline) at the top level.

    ``end_to_end_vs_baseline``: torch fp32 batch-1 images/s over the baseline's (same models, device,
    targets); ``end_to_end_best_vs_baseline``: the fastest end-to-end row; ``prompt_stage_vs_baseline``:
    baseline seconds per image (grid scan + matching + prompts, Python loops) over refseg's (matching +
    prompts, batch 1), both on the same tokens; ``stages_vs_baseline``: per stage from the end-to-end rows;
    ``end_to_end_cpu_time_vs_baseline``: the same as the first on process CPU seconds per image (steadier
    than wall time on a machine shared with other work).
    """
    out: dict = {"by_pipeline": {}}
    for base in _find(rows, section="baseline"):
        key = {"pipeline": base["pipeline"], "dataset": base["dataset"]}
        e2e = _find(rows, section="end_to_end", **key)
        ref = next((r for r in _find(e2e, variant=REFERENCE.name, batch=1)
                    if r.get("mode", "per_image") == "per_image"), None)
        best = max(e2e, key=lambda r: r["images_per_s"], default=None)
        prompt_ours = next(iter(_find(rows, section="prompt_stage", variant="refseg", batch=1,
                                      settings="gbmseg", **key)), None)
        prompt_batched = [r for r in _find(rows, section="prompt_stage", variant="refseg", settings="gbmseg", **key)
                          if r["batch"] > 1]
        prompt_base = next(iter(_find(rows, section="prompt_stage", variant="research-baseline", **key)), None)
        entry = {
            "end_to_end_vs_baseline": _ratio(ref and ref["images_per_s"], base["images_per_s"]),
            "end_to_end_best_vs_baseline": _ratio(best and best["images_per_s"], base["images_per_s"]),
            "end_to_end_cpu_time_vs_baseline": _ratio(base.get("cpu_s_per_image"),
                                                      ref and ref.get("cpu_s_per_image")),
            "end_to_end_vs_baseline_range": _range_ratio(ref, base),
            "masks_identical": (base.get("agreement") or {}).get("identical"),
            "masks_compared": (base.get("agreement") or {}).get("compared"),
            "best_end_to_end_row": best and best["label"],
            "prompt_stage_vs_baseline": _ratio(prompt_base and prompt_base["per_image_s"],
                                               prompt_ours and prompt_ours["per_image_s"]),
            "prompt_stage_batched_vs_baseline": _ratio(prompt_base and prompt_base["per_image_s"],
                                                       prompt_batched[0]["per_image_s"] if prompt_batched else None),
        }
        if ref:
            b, o = base["stages_s"], ref["stages_s"]
            entry["stages_vs_baseline"] = {
                "dinov2": _ratio(b.get("dinov2"), o.get("dinov2")),
                "prompt_stage": _ratio(b.get("grid", 0) + b.get("matching", 0) + b.get("prompts", 0),
                                       o.get("matching", 0) + o.get("prompts", 0)),
                "sam_encoder": _ratio(b.get("sam_encoder"), o.get("sam_encoder")),
                "decoder": _ratio(b.get("decoder"), o.get("decoder")),
            }
        out["by_pipeline"][f"{base['pipeline']}/{base['dataset']}"] = entry
    if out["by_pipeline"]:
        first = next(iter(out["by_pipeline"].values()))
        for k in ("end_to_end_vs_baseline", "end_to_end_best_vs_baseline", "end_to_end_cpu_time_vs_baseline",
                  "prompt_stage_vs_baseline", "prompt_stage_batched_vs_baseline"):
            out[k] = first[k]
    out["streaming_vs_per_image"] = streaming_vs_per_image(rows)
    return out


def _range_ratio(ours: dict | None, base: dict) -> list[float] | None:
    """[worst, best] speed-up over the repeats: our slowest over the baseline's fastest, and back."""
    if not ours or not ours.get("images_per_s_min") or not base.get("images_per_s_max"):
        return None
    return [ours["images_per_s_min"] / base["images_per_s_max"], ours["images_per_s_max"] / base["images_per_s_min"]]


def streaming_vs_per_image(rows: list[dict]) -> dict:
    """Per pipeline / dataset / variant: each streaming row's images/s over the per-image row's (batch 1,
    the same run), with both rows' peak memory.

    ``{"<pipeline>/<dataset> <variant>": {"b<batch>": {"ratio", "images_per_s", "per_image_images_per_s",
    "peak_mib", "per_image_peak_mib", "spread"}}}``.
    """
    out: dict = {}
    for ref in _find(rows, section="end_to_end", batch=1):
        if ref.get("mode", "per_image") != "per_image":
            continue
        key = {"pipeline": ref["pipeline"], "dataset": ref["dataset"], "variant": ref["variant"]}
        entry = {}
        for r in sorted(_find(rows, section="end_to_end", mode="stream", **key), key=lambda r: r["batch"]):
            entry[f"b{r['batch']}"] = {
                "ratio": _ratio(r["images_per_s"], ref["images_per_s"]), "images_per_s": r["images_per_s"],
                "per_image_images_per_s": ref["images_per_s"], "peak_mib": r.get("peak_mib"),
                "per_image_peak_mib": ref.get("peak_mib"), "spread": r.get("spread"), "images": r.get("images")}
        if entry:
            out[f"{ref['pipeline']}/{ref['dataset']} {ref['variant']}"] = entry
    return out


def _load_baseline(notes: list[str]):
    from .prompt_stage import load_baseline

    try:
        return load_baseline()
    except ImportError as exc:
        notes.append(f"research baseline unavailable: {exc}")
        return None


def run_suite(out_dir: str | os.PathLike, quick: bool = False, device: str = "auto",
              sam_checkpoint=None, dinov2_checkpoint=None, data_dir=None, backends: list[str] | None = None,
              budget_s: float | None = -1.0, image_size: int | None = None, baseline: bool = True,
              plan: SuitePlan | None = None, threads: int | None = None, images: int | None = None,
              repeats: int | None = None, stream_batches: tuple[int, ...] | None = None) -> dict:
    """Run the suite and return the results dict (what ``results.json`` holds).

    Args:
        out_dir: output folder (random checkpoints go to ``out_dir/checkpoints``).
        quick: the small CPU plan (:func:`quick_plan`) instead of :func:`full_plan`.
        device: ``auto``, ``cpu``, ``cuda``, ...
        sam_checkpoint, dinov2_checkpoint: official-format files; they also decide the pipelines'
            model sizes. Missing models get random weights (speed numbers only).
        data_dir: folder holding ``kvasir_seg5`` / ``gbmseg_example`` (default ``shared/data``).
        backends: restrict to these variant names (the fp32 reference always runs).
        budget_s: stop starting rows after this many seconds; -1 keeps the plan's, None = no limit.
        image_size: DINOv2 input side of the quick pipeline (default 518).
        baseline: run the research-style baseline rows.
        plan: a custom plan (overrides ``quick`` / ``image_size``).
        threads: CPU threads for torch and ONNX Runtime (default: torch's, i.e. all cores). On a
            CPU shared with other work, 1 avoids threads waiting for each other at every op.
        images: images per end-to-end pass and baseline targets (default: the plan's, 8).
        repeats: passes per end-to-end row (default: the plan's, 3); rows report median and spread.
        stream_batches: batch sizes of the streaming rows (default: the plan's, 1 / 4 / 16).
    """
    import torch

    from refseg.runtime.torch_backend import resolve_device

    wall = time.perf_counter()
    load_start = start_run(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    if plan is None:
        plan = quick_plan(image_size or 518) if quick else full_plan(dev)
    if budget_s is None or budget_s >= 0:
        plan.budget_s = budget_s
    for name, value in (("images", images), ("repeats", repeats)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: must be >= 1")
    if images is not None:
        plan.e2e_images = plan.baseline_targets = images
    if repeats is not None:
        plan.e2e_repeats = repeats
    if stream_batches is not None:
        plan.e2e_batches = tuple(stream_batches)
    notes: list[str] = []
    checkpoints = CheckpointStore(out / "checkpoints", sam_checkpoint, dinov2_checkpoint)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    ctx = RunContext(plan, dev, out, checkpoints, Budget(plan.budget_s), gpu_name=gpu)
    variants, skipped_variants = plan_variants(dev, plan.quick, backends)
    baseline_module = _load_baseline(notes) if baseline else None
    wanted = max(plan.e2e_images, plan.baseline_targets)
    sets = load_sets(data_dir, max_targets=wanted if plan.quick else None, include_gbmseg=not plan.quick)
    main = with_mirrors(sets[0], wanted)
    if len(main.targets) < wanted:
        notes.append(f"{main.name}: {len(main.targets)} distinct targets for {wanted} images per pass (cycled)")
    pipelines = [PipelineRows(ctx, spec, main, baseline_module if spec.baseline else None) for spec in plan.pipelines]
    extra = [PipelineRows(ctx, spec, s, baseline_module) for s in sets[1:] for spec in plan.pipelines if spec.baseline]
    if plan.quick and len(sets) == 1 and main.name == "kvasir":
        notes.append("--quick: the GBMSeg example is left out (each extra target costs a SAM encode)")

    model_rows = ModelRows(ctx, baseline_module)

    def collect(final: bool) -> dict:
        rows = [r for p in pipelines + extra for r in p.rows] + model_rows.rows
        ratios = compute_ratios(rows)
        return {
            **run_header(dev, load_start, final),
            "quick": plan.quick,
            "config": {"plan": plan.to_dict(),
                       "pipelines": {p.spec.label: p.config.to_dict() for p in pipelines},
                       "variants": [v.to_dict() for v in variants], "skipped_variants": skipped_variants},
            "checkpoints": checkpoints.sources,
            "random_weights": checkpoints.random_weights,
            "data": [s.describe() for s in sets],
            "rows": rows,
            "skipped_rows": ctx.skipped_rows,
            "parity": {p.name: p.parity for p in pipelines + extra if p.parity},
            "ratios": ratios,
            "streaming_vs_per_image": ratios["streaming_vs_per_image"],
            "notes": notes,
            "wall_s": time.perf_counter() - wall,
        }

    def save_partial() -> None:
        """``results.partial.json`` after every row: a run stopped early keeps what it measured."""
        from .report import write_json

        write_json(collect(final=False), out / "results.partial.json")

    for p in pipelines:                              # 1. per-image reference path, baseline, prompt stage
        p.end_to_end(REFERENCE, 1)
        save_partial()
        if p.spec.baseline:
            p.baseline_row()
            save_partial()
        p.prompt_rows()
        save_partial()
    for p in pipelines:                              # 2. streaming at every batch size, same run
        if p.spec.baseline or not plan.quick:
            for batch in plan.e2e_batches:
                p.end_to_end(REFERENCE, batch, mode="stream")
                save_partial()
    for p in extra:                                  # 3. parity on the GBMSeg example
        p.end_to_end(REFERENCE, 1, num_images=len(p.set.targets))
        save_partial()
        p.baseline_row()
        save_partial()
        p.prompt_rows()
        save_partial()
        p.release(REFERENCE)
    for p in pipelines:
        p.release(REFERENCE)
    # 4. the other variants end to end (exported backends first: on a CPU they are the fast path)
    others = sorted((v for v in variants if not v.is_reference and v.kind != "official"),
                    key=lambda v: (v.kind not in ("onnxruntime", "tensorrt"), v.name))
    for p in pipelines:
        if plan.quick and not p.spec.baseline:
            continue
        for v in others:
            for batch in plan.variant_e2e_batches:
                p.end_to_end(v, batch)
                save_partial()
            p.release(v)
    save_partial()
    model_rows.run_all(variants)                     # 5. per-model rows on every variant

    if checkpoints.random_weights:
        notes.append("random weights (no official checkpoint given or found): speed numbers only; mask "
                     "agreement compares implementations, ground-truth Dice is meaningless")
    results = collect(final=True)
    (out / "results.partial.json").unlink(missing_ok=True)
    return results
