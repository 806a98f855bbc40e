"""Pipeline rows: end to end per variant and batch size, the research-style baseline, the prompt stage.

One :class:`PipelineRows` serves one pipeline (preset + models) on one :class:`BenchSet`. The torch
fp32 path at batch 1 runs first: its masks and prompts are the reference every other row is compared
with (mask IoU / Dice in the row), and the baseline's prompts and masks are checked against it.
"""
from __future__ import annotations

import gc
import logging
import time

import numpy as np
import torch

from . import flops as F
from .context import PipelineSpec, RunContext
from .data import BenchSet
from .measure import mean_agreement, peak_memory, percentile, synchronize, time_calls
from .prompt_stage import compare_prompts, reference_labels, refseg_prompt_stage
from .variants import REFERENCE, Variant, apply_to_segmenter, exported_backend

log = logging.getLogger(__name__)

STAGES = ("dinov2", "matching", "prompts", "sam_encoder", "decoder", "postprocess")
BASELINE_STAGES = ("dinov2", "grid", "matching", "prompts", "sam_encoder", "decoder")


def _spread(rates: list[float]) -> dict:
    """Median images/s of the repeats with their min, max and spread ((max − min) / median)."""
    med = float(np.median(rates))
    return {"images_per_s": med, "images_per_s_min": float(min(rates)), "images_per_s_max": float(max(rates)),
            "spread": (max(rates) - min(rates)) / med if med else None}


def _mean_stages(timings: list[dict], names) -> dict[str, float]:
    return {k: float(np.mean([t.get(k, 0.0) for t in timings])) for k in names} if timings else {}


class PipelineRows:
    """End-to-end, baseline and prompt-stage rows of one pipeline on one image set."""

    def __init__(self, ctx: RunContext, spec: PipelineSpec, bench_set: BenchSet, baseline_module=None):
        self.ctx, self.spec, self.set = ctx, spec, bench_set
        self.baseline = baseline_module
        self.config = spec.config(**ctx.checkpoints.explicit_names)  # explicit checkpoints decide sizes
        self.rows: list[dict] = []
        self.parity: dict = {}
        self.reference_masks: dict[int, np.ndarray] = {}
        self.reference_prompts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._segmenters: dict[str, object] = {}
        self._export_s: dict[str, float] = {}

    @property
    def name(self) -> str:
        return f"{self.spec.label}/{self.set.name}"

    def _paths(self) -> dict:
        ck = self.ctx.checkpoints
        return {"sam_checkpoint": ck.path("sam", self.config.sam),
                "dinov2_checkpoint": ck.path("dinov2", self.config.dinov2)}

    def segmenter(self, variant: Variant):
        """The Segmenter of ``variant`` with the set's reference (built once per variant)."""
        if variant.name not in self._segmenters:
            from refseg.segmenter import Segmenter

            cfg = self.config.replace(precision=variant.precision, batch_size=1)
            seg = Segmenter(cfg, device=str(self.ctx.device), backend="torch", **self._paths())
            if variant.kind in ("onnxruntime", "tensorrt"):
                # Segmenter takes no export folder: swap in the backend on the suite's export
                seg.backend, export_s = exported_backend(self.ctx, variant, cfg.dinov2, cfg.image_size, cfg.sam)
                self._export_s[variant.name] = export_s
            apply_to_segmenter(seg, variant)
            seg.set_reference(self.set.reference, self.set.reference_mask, source=f"{self.set.name} reference")
            self._segmenters[variant.name] = seg
        return self._segmenters[variant.name]

    def release(self, variant: Variant) -> None:
        """Free the Segmenter of ``variant``."""
        self._segmenters.pop(variant.name, None)
        gc.collect()
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------- end to end
    def _run_images(self, seg, order: list[int], batch: int, mode: str) -> tuple[list, list[float]]:
        """One pass over ``order``: [(target index, result)] and the seconds per batch.

        ``per_image`` calls ``segment_batch`` on consecutive chunks of ``batch`` targets (batch 1 = one
        image per call, the plain per-image path); ``stream`` feeds the same targets as
        :class:`refseg.runtime.stream.StreamItem` through :func:`refseg.runtime.stream.stream_segment`.
        """
        targets, device = self.set.targets, self.ctx.device
        outputs, latencies = [], []
        if mode == "per_image":
            for start in range(0, len(order), batch):
                chunk = order[start:start + batch]
                synchronize(device)
                t = time.perf_counter()
                results = seg.segment_batch([targets[i] for i in chunk])
                synchronize(device)
                latencies.append(time.perf_counter() - t)
                outputs.extend(zip(chunk, results))
            return outputs, latencies
        from refseg.runtime.stream import StreamItem, stream_segment

        items = [StreamItem(key=f"{self.set.name}[{k}]:{self.set.target_names[i]}", load=lambda i=i: targets[i],
                            meta=i) for k, i in enumerate(order)]
        t = time.perf_counter()
        for k, out in enumerate(stream_segment(seg, items, batch_size=batch)):
            if out.error is not None:
                raise RuntimeError(f"{out.item.key}: {out.error}") from out.error
            outputs.append((out.item.meta, out.result))
            if (k + 1) % batch == 0 or k + 1 == len(items):
                synchronize(device)
                now = time.perf_counter()
                latencies.append(now - t)
                t = now
        return outputs, latencies

    def end_to_end(self, variant: Variant, batch: int, num_images: int | None = None,
                   mode: str = "per_image") -> dict | None:
        """Images/s (median of the plan's repeats, with min / max), batch latency p50/p95, per-stage
        seconds per image, peak memory, mask agreement with the fp32 per-image reference.

        Every repeat segments the same ``num_images`` targets (default ``plan.e2e_images``, at least
        ``batch``; the set's targets are cycled when it has fewer). ``mode``: ``per_image`` or ``stream``.
        """
        ctx, targets = self.ctx, self.set.targets
        label = f"e2e:{self.name} {variant.name} b{batch}" + (" stream" if mode == "stream" else "")
        if not ctx.can_start(label):
            return None
        n = max(batch, num_images or ctx.plan.e2e_images)
        order = self.set.cycled(n)
        repeats = max(1, ctx.plan.e2e_repeats)
        try:
            seg = self.segmenter(variant)
            seg.config = seg.config.replace(batch_size=batch)
            t0 = time.perf_counter()
            for _ in range(ctx.plan.e2e_warmup):
                seg.segment_batch([targets[i] for i in order[:batch]])
            warmup_s = time.perf_counter() - t0
            repeat_s, latencies, outputs = [], [], []
            cpu0 = time.process_time()
            with peak_memory(ctx.device) as mem:
                for rep in range(repeats):
                    out, lat = self._run_images(seg, order, batch, mode)
                    repeat_s.append(sum(lat))
                    latencies += lat
                    if rep == 0:
                        outputs = out
            cpu_s = time.process_time() - cpu0
        except Exception as exc:
            log.exception("row %s failed", label)
            ctx.skip(label, f"failed: {type(exc).__name__}: {exc}")
            return None
        rates = [n / t for t in repeat_s]
        points = [sum(len(p) for p in r.points.values()) for _, r in outputs]
        sets = max(1, len(seg.classes))
        flops = F.pipeline_flops(self.config.dinov2, self.config.image_size, self.config.sam, sets,
                                 max(1, round(float(np.mean(points)) / sets)))
        median_s = float(np.median(repeat_s))
        row = {"section": "end_to_end", "pipeline": self.spec.label, "dataset": self.set.name,
               "variant": variant.name, "precision": variant.precision, "batch": batch, "mode": mode,
               "images": n, "distinct_images": len(set(order)), "repeats": repeats, "label": label,
               **_spread(rates), "repeat_s": repeat_s, "p50_s": percentile(latencies, 50),
               "p95_s": percentile(latencies, 95), "warmup": ctx.plan.e2e_warmup, "warmup_s": warmup_s,
               "per_image_s": median_s / n, "cpu_s_per_image": cpu_s / (n * repeats),
               "stages_s": _mean_stages([r.timings for _, r in outputs], STAGES),
               "points_mean": float(np.mean(points)), "gflop_per_image": flops["total"] / 1e9,
               **mem.to_dict()}
        peak = F.gpu_peak_tflops(ctx.gpu_name, ctx.peak_precision(variant.precision))
        row.update(F.achieved(flops["total"], median_s / n, peak))
        if variant.name in self._export_s:
            row["export_s"] = self._export_s.pop(variant.name)
        if variant.is_reference and batch == 1 and mode == "per_image":
            for i, r in outputs:
                self.reference_masks.setdefault(i, r.mask != 0)
                c = next(iter(r.points), None)
                if c is not None:
                    self.reference_prompts.setdefault(i, (r.points[c], r.point_labels[c]))
        pairs = [(r.mask != 0, self.reference_masks[i]) for i, r in outputs if i in self.reference_masks]
        row["agreement"] = {**mean_agreement(pairs), "vs": f"{REFERENCE.name} b1", "compared": len(pairs),
                            "identical": sum(bool(np.array_equal(a, b)) for a, b in pairs)}
        gt = [(r.mask != 0, self.set.target_masks[i]) for i, r in outputs if self.set.target_masks[i] is not None]
        row["vs_ground_truth"] = mean_agreement(gt) if gt else None
        self.rows.append(row)
        log.info("%s: %.3f images/s (%d repeats, %.3f-%.3f)", label, row["images_per_s"], repeats,
                 row["images_per_s_min"], row["images_per_s_max"])
        return row

    # --------------------------------------------------------------------------- baseline
    def baseline_row(self) -> dict | None:
        """The research-style baseline on ``baseline_targets`` targets (cycled), median of the plan's
        repeats, with the parity check against the fp32 per-image reference."""
        ctx = self.ctx
        label = f"baseline:{self.name}"
        if self.baseline is None:
            ctx.skip(label, "research baseline unavailable")
            return None
        if not ctx.can_start(label):
            return None
        order = self.set.cycled(max(1, ctx.plan.baseline_targets))
        n, repeats = len(order), max(1, ctx.plan.e2e_repeats)
        runner = None
        try:
            runner = self.baseline.ResearchBaseline(self.config.replace(batch_size=1), device=ctx.device,
                                                    **self._paths())
            ref, ref_mask = self.set.reference, self.set.reference_mask
            for _ in range(ctx.plan.e2e_warmup):
                runner.segment(ref, ref_mask, self.set.targets[order[0]])
            cpu0 = time.process_time()
            passes = []
            with peak_memory(ctx.device) as mem:
                for _ in range(repeats):
                    passes.append([runner.segment(ref, ref_mask, self.set.targets[i]) for i in order])
            cpu_s = time.process_time() - cpu0
        except Exception as exc:
            log.exception("row %s failed", label)
            ctx.skip(label, f"failed: {type(exc).__name__}: {exc}")
            return None
        finally:
            runner = None
            gc.collect()
        results = passes[0]
        repeat_s = [sum(r.timings["total"] for r in p) for p in passes]
        totals = [r.timings["total"] for p in passes for r in p]
        median_s = float(np.median(repeat_s))
        flops = F.pipeline_flops(self.config.dinov2, self.config.image_size, self.config.sam, 1,
                                 max(1, round(float(np.mean([len(r.points) for r in results])))), dinov2_passes=4)
        row = {"section": "baseline", "pipeline": self.spec.label, "dataset": self.set.name,
               "variant": "research-baseline", "precision": "fp32", "batch": 1, "mode": "per_image", "images": n,
               "distinct_images": len(set(order)), "repeats": repeats, "label": label,
               **_spread([n / t for t in repeat_s]), "repeat_s": repeat_s,
               "p50_s": percentile(totals, 50), "p95_s": percentile(totals, 95),
               "per_image_s": median_s / n, "cpu_s_per_image": cpu_s / (n * repeats),
               "stages_s": _mean_stages([r.timings for p in passes for r in p], BASELINE_STAGES),
               "points_mean": float(np.mean([len(r.points) for r in results])),
               "gflop_per_image": flops["total"] / 1e9, **mem.to_dict(),
               "description": "official dinov2 + segment_anything, fp32 eager, one target at a time, "
                              "reference re-encoded per label set, Python-loop matching and prompts"}
        row.update(F.achieved(flops["total"], median_s / n,
                              F.gpu_peak_tflops(ctx.gpu_name, ctx.peak_precision("fp32"))))
        pairs = [(r.mask, self.reference_masks[i]) for i, r in zip(order, results) if i in self.reference_masks]
        row["agreement"] = {**mean_agreement(pairs), "vs": f"{REFERENCE.name} b1", "compared": len(pairs),
                            "identical": sum(bool(np.array_equal(a, b)) for a, b in pairs)}
        per_target = []
        for i, r in zip(order, results):
            entry = {"target": self.set.target_names[i]}
            if i in self.reference_prompts:
                entry["prompts"] = compare_prompts(self.reference_prompts[i], (r.points, r.labels))
            if i in self.reference_masks:
                entry.update(mean_agreement([(r.mask, self.reference_masks[i])]))
                entry["mask_identical"] = bool(np.array_equal(r.mask, self.reference_masks[i]))
            per_target.append(entry)
        compared = [e for e in per_target if "prompts" in e]
        self.parity["end_to_end"] = {
            "targets": per_target, "prompts_equal": sum(e["prompts"]["equal"] for e in compared),
            "compared": len(compared), "mask_iou_mean": row["agreement"]["iou_mean"],
            "masks_identical": row["agreement"]["identical"],
            "note": "baseline features come from the official DINOv2 and refseg's from its own (equal within "
                    "~1e-4); a near-tie in a nearest-neighbour search can move one candidate patch"}
        self.rows.append(row)
        return row

    # ----------------------------------------------------------------------- prompt stage
    def prompt_rows(self) -> list[dict]:
        """Matching + prompt stage on the SAME tokens: refseg (batch 1, batched) vs the baseline."""
        ctx = self.ctx
        label = f"prompt_stage:{self.name}"
        if not ctx.can_start(label):
            return []
        cfg = self.config
        n = min(max(ctx.plan.baseline_targets, 1), len(self.set.targets))
        from refseg.pipeline.features import dinov2_batch

        seg = self.segmenter(REFERENCE)
        with torch.inference_mode():
            ref_tokens = seg.backend.encode_dinov2(dinov2_batch([self.set.reference], cfg.image_size))[0]
            tgt_tokens = seg.backend.encode_dinov2(dinov2_batch(self.set.targets[:n], cfg.image_size))
        sizes = [tuple(t.shape[:2]) for t in self.set.targets[:n]]
        rows = []
        variants = [(cfg.name, cfg)]
        if cfg.name != "sat":  # the default preset's prompt settings on the same tokens
            variants.append(("sat-settings", cfg.replace(**_sat_prompt_settings())))
        for settings, variant_cfg in variants:
            rows += self._refseg_prompt_rows(settings, variant_cfg, ref_tokens, tgt_tokens, sizes)
        if self.spec.baseline and self.baseline is not None:
            rows += self._baseline_prompt_rows(cfg, ref_tokens, tgt_tokens, sizes)
        self.rows.extend(rows)
        return rows

    def _refseg_prompt_rows(self, settings: str, cfg, ref_tokens, tgt_tokens, sizes) -> list[dict]:
        ctx, reps = self.ctx, self.ctx.plan.prompt_repeats
        _, labels = reference_labels(self.set.reference_mask, cfg)
        labels = labels.to(ref_tokens.device)
        single = [time_calls(lambda i=i: refseg_prompt_stage(ref_tokens, labels, tgt_tokens[i:i + 1],
                                                             [sizes[i]], cfg), reps, 1, ctx.device)
                  for i in range(len(sizes))]
        samples = [s for t in single for s in t.samples]
        batched = time_calls(lambda: refseg_prompt_stage(ref_tokens, labels, tgt_tokens, sizes, cfg),
                             reps, 1, ctx.device)
        base = {"section": "prompt_stage", "pipeline": self.spec.label, "dataset": self.set.name,
                "variant": "refseg", "settings": settings, "metric": cfg.metric, "kmeans_k": cfg.kmeans_k,
                "device": str(ctx.device), "matching_gflop_per_image":
                    F.matching_flops(ref_tokens.shape[0], tgt_tokens.shape[1], ref_tokens.shape[1]) / 1e9}
        return [{**base, "batch": 1, "label": f"prompt_stage:{self.name} refseg[{settings}] b1",
                 "per_image_s": float(np.median(samples)), "p50_s": percentile(samples, 50),
                 "p95_s": percentile(samples, 95), "repeats": len(samples)},
                {**base, "batch": len(sizes), "label": f"prompt_stage:{self.name} refseg[{settings}] b{len(sizes)}",
                 "per_image_s": batched.p50 / len(sizes), "p50_s": batched.p50, "p95_s": batched.p95,
                 "repeats": len(batched.samples)}]

    def _baseline_prompt_rows(self, cfg, ref_tokens, tgt_tokens, sizes) -> list[dict]:
        bl, reps = self.baseline, self.ctx.plan.prompt_repeats
        grid_t, stage_t, parity = [], [], []
        _, labels = reference_labels(self.set.reference_mask, cfg)
        labels = labels.to(ref_tokens.device)
        for i, hw in enumerate(sizes):
            for _ in range(reps):
                t = time.perf_counter()
                fg, bg = bl.patch_lists(self.set.reference_mask, cfg.image_size, cfg.gbmseg_skip_last)
                t1 = time.perf_counter()
                points, point_labels, _ = bl.prompt_stage(ref_tokens, tgt_tokens[i], fg, bg, hw, cfg)
                synchronize(self.ctx.device)
                grid_t.append(t1 - t)
                stage_t.append(time.perf_counter() - t)
            ours = refseg_prompt_stage(ref_tokens, labels, tgt_tokens[i:i + 1], [hw], cfg).prompt(0)
            parity.append({"target": self.set.target_names[i], **compare_prompts(ours, (points, point_labels))})
        self.parity["same_features"] = {"targets": parity, "prompts_equal": sum(p["equal"] for p in parity),
                                        "compared": len(parity), "settings": "gbmseg"}
        return [{"section": "prompt_stage", "pipeline": self.spec.label, "dataset": self.set.name,
                 "variant": "research-baseline", "settings": "gbmseg", "metric": "euclidean", "batch": 1,
                 "label": f"prompt_stage:{self.name} research-baseline b1", "device": str(self.ctx.device),
                 "per_image_s": percentile(stage_t, 50), "p50_s": percentile(stage_t, 50),
                 "p95_s": percentile(stage_t, 95), "grid_scan_s": percentile(grid_t, 50),
                 "repeats": len(stage_t)}]


def _sat_prompt_settings() -> dict:
    """The sat preset's prompt-stage fields (cosine, k-means thinning, side-relative radii)."""
    from refseg.config import SegmenterConfig

    sat = SegmenterConfig.from_preset("sat")
    keys = ("grid_rule", "gbmseg_skip_last", "metric", "hard_negatives", "radius_unit", "pos_radius",
            "neg_radius", "exclusion_radius", "hard_radius", "kmeans_k", "fallback", "use_box")
    return {k: getattr(sat, k) for k in keys}
