"""Per-model rows: DINOv2, the SAM image encoder and the SAM decoder on every variant.

Each row times one call of one model on one variant at one batch size (warm-up calls untimed),
records peak memory, FLOPs per call and achieved TFLOP/s (fraction of the card's peak on a GPU),
and how close the output is to the torch fp32 output on the same input (token / embedding cosine
and error; decoder: IoU of the thresholded low-resolution masks).
"""
from __future__ import annotations

import gc
import logging

import torch

from . import flops as F
from .context import RunContext
from .measure import peak_memory, tensor_agreement, time_calls
from .variants import (REFERENCE, Variant, decoder_runner, dinov2_runner, exported_backend,
                       sam_encoder_runner)

log = logging.getLogger(__name__)


def _seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def decoder_inputs(prompt_sets: int, points: int, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embedding (256, 64, 64), coords (P, N, 2) in the 1024 frame, labels (P, N) half 1 / half 0."""
    gen = torch.Generator().manual_seed(seed)
    embedding = torch.randn(256, 64, 64, generator=gen)
    coords = torch.rand(prompt_sets, points, 2, generator=gen) * 1023
    labels = (torch.arange(points) < (points + 1) // 2).to(torch.int64).expand(prompt_sets, points).clone()
    return embedding, coords, labels


class ModelRows:
    """Builds and measures the model rows of one run; keeps fp32 outputs to compare the others with."""

    def __init__(self, ctx: RunContext, baseline_module=None):
        self.ctx = ctx
        self.baseline = baseline_module
        self.rows: list[dict] = []
        self._reference_out: dict[str, torch.Tensor] = {}
        self._modules: dict[tuple[str, str, str], torch.nn.Module] = {}
        self._exported: dict[tuple, object] = {}
        self._export_s: float | None = None

    # ------------------------------------------------------------------ modules / backends
    def _module(self, kind: str, name: str, official: bool) -> torch.nn.Module:
        key = (kind, name, "official" if official else "refseg")
        if key not in self._modules:
            path = self.ctx.checkpoints.path(kind, name)
            if official:
                load = self.baseline.load_official_dinov2 if kind == "dinov2" else self.baseline.load_official_sam
                self._modules[key] = load(name, path, "cpu")
            else:
                from refseg.models import build_dinov2, build_sam

                build = build_dinov2 if kind == "dinov2" else build_sam
                self._modules[key] = build(name, path, download=False)
        return self._modules[key]

    def release(self, kind: str, name: str) -> None:
        """Drop the CPU copies of model ``name`` (all flavours) and its exported sessions."""
        for key in [k for k in self._modules if k[:2] == (kind, name)]:
            del self._modules[key]
        pos = 1 if kind == "dinov2" else 3
        for key in [k for k in self._exported if k[pos] == name]:
            del self._exported[key]
        gc.collect()

    def _exported_backend(self, variant: Variant, dinov2: str, size: int, sam: str):
        key = (variant.name, dinov2, size, sam)
        if key not in self._exported:
            try:
                self._exported[key] = exported_backend(self.ctx, variant, dinov2, size, sam)
            except Exception as exc:  # recorded as the skip reason of every row that needs it
                log.warning("%s backend for %s@%d + %s: %s", variant.name, dinov2, size, sam, exc)
                self._exported[key] = exc
        return self._exported[key]

    def _runner(self, stage: str, variant: Variant, name: str, size: int | None):
        """(fn, error): the callable for this stage/variant, or the reason it cannot run."""
        device = self.ctx.device
        plan = self.ctx.plan
        if variant.kind in ("onnxruntime", "tensorrt"):
            partner = (plan.exported_dinov2 or plan.dinov2_models)[0]  # the DINOv2 exported with SAM
            dinov2, dsize = (name, size) if stage == "dinov2" else partner
            sam = name if stage != "dinov2" else (plan.sam_models or ["vit_b"])[0]
            allowed = plan.exported_dinov2
            if stage == "dinov2" and allowed is not None and (name, size) not in allowed:
                return None, (f"exported graphs are built for {', '.join(f'{n}@{s}' for n, s in allowed)} "
                              "only (one export per DINOv2 input size)")
            got = self._exported_backend(variant, dinov2, dsize, sam)
            if isinstance(got, Exception):
                return None, f"{variant.name} backend could not be built: {type(got).__name__}: {got}"
            backend, export_s = got
            self._export_s = export_s
            self._exported[(variant.name, dinov2, dsize, sam)] = (backend, 0.0)  # exported once
            if stage == "dinov2":
                return backend.encode_dinov2, None
            if stage == "sam_encoder":
                return backend.encode_sam, None
            return (lambda e, c, lab: backend.decode(e, c, lab, None, False)), None
        official = variant.kind == "official"
        if official and self.baseline is None:
            return None, "official modules need the research baseline (--no-baseline given)"
        if stage == "dinov2":
            return dinov2_runner(self._module("dinov2", name, official), variant, device), None
        sam = self._module("sam", name, official)
        if stage == "sam_encoder":
            return sam_encoder_runner(sam.image_encoder, variant, device), None
        return decoder_runner(sam, variant, device, official=official), None

    # ------------------------------------------------------------------------------ rows
    def _measure(self, row: dict, fn, inputs: tuple, warmup: int, repeats: int, flops: float,
                 precision: str) -> None:
        ctx = self.ctx
        out = [None]

        def call():
            out[0] = fn(*inputs)

        warm = time_calls(call, repeats=warmup, warmup=0, device=ctx.device) if warmup else None
        with peak_memory(ctx.device) as mem:
            timing = time_calls(call, repeats=repeats, warmup=0, device=ctx.device)
        timing.warmup, timing.warmup_s = warmup, warm.total if warm else 0.0
        peak = F.gpu_peak_tflops(ctx.gpu_name, ctx.peak_precision(precision))
        row.update(timing.to_dict())
        row.update(mem.to_dict())
        row["gflop_per_call"] = flops / 1e9
        encoder = row["stage"] in ("dinov2", "sam_encoder")
        row["images_per_s"] = row["batch"] / timing.p50 if encoder else None
        row["prompt_sets_per_s"] = None if encoder else row["batch"] / timing.p50
        row.update(F.achieved(flops, timing.p50, peak))
        row["output"] = out[0]

    def _agree(self, row: dict, key: str, variant: Variant) -> None:
        out = row.pop("output")
        if isinstance(out, tuple):  # decoder: compare thresholded masks
            masks = out[0].float().cpu()
            if variant.is_reference:
                self._reference_out[key] = masks
            ref = self._reference_out.get(key)
            if ref is not None and ref.shape == masks.shape:
                from .measure import mean_agreement

                pairs = [((masks[i, 0] > 0).numpy(), (ref[i, 0] > 0).numpy()) for i in range(len(masks))]
                row["agreement"] = {**mean_agreement(pairs), "vs": REFERENCE.name}
            return
        out = out.float().cpu()
        if variant.is_reference:
            self._reference_out[key] = out
        ref = self._reference_out.get(key)
        if ref is not None:
            row["agreement"] = {**tensor_agreement(out, ref), "vs": REFERENCE.name}

    def run_one(self, stage: str, variant: Variant, name: str, size: int | None, batch: int) -> None:
        """Measure one (stage, model, variant, batch) row, or record why it was skipped."""
        ctx, plan = self.ctx, self.ctx.plan
        label = f"{stage}:{name}" + (f"@{size}" if size else "") + f" {variant.name} b{batch}"
        if not ctx.can_start(label):
            return
        row = {"section": "model", "stage": stage, "model": name, "input": size, "variant": variant.name,
               "precision": variant.precision, "batch": batch, "label": label}
        if stage == "decoder" and variant.kind == "torch" and not variant.compile_mode and not variant.is_reference:
            ctx.skip(label, f"the torch decoder runs fp32 in {variant.name} too: same as {REFERENCE.name}")
            return
        try:
            self._export_s = None
            fn, reason = self._runner(stage, variant, name, size)
            if fn is None:
                ctx.skip(label, reason)
                return
            if self._export_s is not None:
                row["export_s"] = self._export_s  # seconds spent exporting for this row (0: reused)
            if stage == "dinov2":
                inputs = (_seeded(batch, 3, size, size),)
                flops = F.dinov2_flops(name, size, batch)
                warmup, repeats = plan.model_warmup, plan.model_repeats
            elif stage == "sam_encoder":
                inputs = (_seeded(batch, 3, 1024, 1024),)
                flops = F.sam_encoder_flops(name, batch)
                warmup, repeats = plan.sam_warmup, plan.sam_repeats
            else:
                inputs = decoder_inputs(batch, plan.decoder_points)
                flops = F.sam_decoder_flops(plan.decoder_points, batch)
                warmup, repeats = plan.model_warmup, plan.model_repeats
                row["points_per_set"] = plan.decoder_points
            self._measure(row, fn, inputs, warmup, repeats, flops, variant.precision)
            self._agree(row, f"{stage}:{name}:{size}:{batch}", variant)
        except Exception as exc:  # one failing row must not end the suite
            log.exception("row %s failed", label)
            ctx.skip(label, f"failed: {type(exc).__name__}: {exc}")
            return
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        log.info("%s: p50 %.4f s", label, row["p50_s"])
        self.rows.append(row)

    def run_all(self, variants: list[Variant]) -> list[dict]:
        """Every model row of the plan: DINOv2 sizes, decoder prompt sets, SAM encoders."""
        plan = self.ctx.plan
        for name, size in plan.dinov2_models:
            for batch in plan.model_batches:
                for variant in variants:
                    self.run_one("dinov2", variant, name, size, batch)
            if name not in [n for n, _ in plan.dinov2_models[plan.dinov2_models.index((name, size)) + 1:]]:
                self.release("dinov2", name)
        for sets in plan.decoder_sets if plan.sam_models else ():
            for variant in variants:
                self.run_one("decoder", variant, plan.sam_models[0], None, sets)
        for name in plan.sam_models:
            for batch in plan.model_batches:
                for variant in variants:
                    self.run_one("sam_encoder", variant, name, None, batch)
            self.release("sam", name)
        return self.rows

