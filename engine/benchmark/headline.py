"""The GPU check's measurements: the headline table, the research-style baseline and the kernel rows.

    python -m refseg.benchmark.headline --out DIR [--device cuda] [--compile] [--budget 300]

Headline: DINOv2-B@518 + SAM-B, ``sat`` preset, bf16 and fp32, batch 1 and 16, on random weights
(written once to a temporary folder, never into DIR) and synthetic 768×1024 targets (the work per image
does not depend on the weights; the data need not travel to the GPU host). Per row: images/s of a
stream of targets (reader threads, staging, the whole pipeline), batch-1 latency (one ``segment`` call,
p50 / p95), peak GPU memory, per-stage milliseconds per image (CUDA-event stage timings, batch time /
batch size). The research-style baseline (:mod:`.baseline`, fp32 eager, one target at a time) runs in the
same process for the ratio; kernel rows time the Triton match (fp16 / bf16 / fp32) and k-means against
their torch references, with their agreement. ``--compile`` adds bf16 rows with ``torch.compile`` (CUDA
graphs) when the budget leaves room for the compilation.

``results.json`` and ``summary.md`` in DIR are rewritten after every row, so a run cut short by a
timeout still returns what it measured. ``--dry-run`` runs the same rows on the CPU with tiny models.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STAGES = ("dinov2", "matching", "prompts", "sam_encoder", "decoder", "postprocess")


@dataclasses.dataclass
class Plan:
    """Sizes of one run. The defaults are the GPU check's (reasoned in docs/performance.md)."""

    dinov2: str = "vitb14"
    sam: str = "vit_b"
    image_size: int = 518
    target_hw: tuple[int, int] = (768, 1024)
    precisions: tuple[str, ...] = ("bf16", "fp32")
    batches: tuple[int, ...] = (1, 16)
    stream_images: int = 64     # per throughput pass (batch 16: 4 batches)
    passes: int = 2             # throughput passes (the best is reported)
    latency_images: int = 24    # batch-1 calls timed
    baseline_images: int = 2
    sam_depth: int | None = None  # tiny models for --dry-run
    sam_side: int | None = None
    match_shape: tuple[int, int, int, int] = (16, 1369, 1369, 768)  # pairs, Nr, Nt, D
    kmeans_shape: tuple[int, int, int] = (64, 1600, 16)  # problems, points, K

    @classmethod
    def dry_run(cls) -> "Plan":
        return cls(dinov2="vits14", image_size=112, target_hw=(96, 128), precisions=("fp32",), batches=(1, 2),
                   stream_images=2, passes=1, latency_images=1, baseline_images=1, sam_depth=2, sam_side=256,
                   match_shape=(2, 64, 64, 32), kmeans_shape=(4, 100, 8))


class Report:
    """Rows collected so far, written to ``results.json`` and ``summary.md`` after every row."""

    def __init__(self, out: Path, facts: dict):
        self.out, self.facts = out, facts
        self.rows: list[dict] = []
        self.notes: list[str] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        log.info("%s", json.dumps(row, default=str))
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info("%s", text)
        self.write()

    def write(self) -> None:
        data = {"facts": self.facts, "rows": self.rows, "notes": self.notes}
        for name, text in (("results.json", json.dumps(data, indent=1, default=str)), ("summary.md", summary(data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def _fmt(value, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def summary(data: dict) -> str:
    """Markdown: the headline table first, then the baseline ratio, the kernel rows and the notes."""
    facts, rows = data["facts"], data["rows"]
    pipe = [r for r in rows if r["kind"] == "pipeline"]
    lines = [f"# refseg GPU check — {facts.get('device_name')}", "",
             f"{facts.get('models')}, `sat` preset, {facts.get('target')} targets, random weights; "
             f"torch {facts.get('torch')}, {facts.get('when')}", "",
             "| precision | compiled | batch | img/s | batch-1 latency ms p50 / p95 | peak GPU MiB | "
             + " | ".join(f"{s} ms/img" for s in STAGES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(STAGES)]
    for r in pipe:
        lat = r.get("latency_ms") or {}
        lines.append(f"| {r['precision']} | {r['compiled']} | {r['batch']} | {_fmt(r.get('images_per_s'))} | "
                     f"{_fmt(lat.get('p50'), '.2f')} / {_fmt(lat.get('p95'), '.2f')} | "
                     f"{_fmt(r.get('peak_mib'), '.0f')} | "
                     + " | ".join(_fmt(r['stages_ms'].get(s), ".2f") for s in STAGES) + " |")
    base = next((r for r in rows if r["kind"] == "baseline"), None)
    if base:
        best = max((r.get("images_per_s") or 0.0 for r in pipe), default=0.0)
        ratio = best * base["seconds_per_image"] if base.get("seconds_per_image") else None
        lines += ["", f"Research-style baseline ({base['models']} modules, fp32 eager, one target at a time): "
                  f"{_fmt(base.get('seconds_per_image'), '.3f')} s/img; best refseg row / baseline = "
                  f"{_fmt(ratio, '.1f')}x."]
    kern = [r for r in rows if r["kind"] == "kernel"]
    if kern:
        lines += ["", "| kernel | shape | dtype | kernel ms | reference ms | speed-up | agreement |",
                  "|---|---|---|---|---|---|---|"]
        for r in kern:
            speed = (r["reference_ms"] / r["kernel_ms"]) if r.get("kernel_ms") and r.get("reference_ms") else None
            lines.append(f"| {r['name']} | {r['shape']} | {r['dtype']} | {_fmt(r.get('kernel_ms'), '.3f')} | "
                         f"{_fmt(r.get('reference_ms'), '.3f')} | {_fmt(speed, '.2f')} | "
                         f"{r.get('agreement', r.get('skipped', ''))} |")
    if data["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ data
def synthetic_images(plan: Plan, count: int, seed: int) -> list[np.ndarray]:
    """Smooth random RGB uint8 images (blobs on a gradient), ``plan.target_hw``."""
    rng = np.random.default_rng(seed)
    h, w = plan.target_hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(count):
        img = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1) * rng.uniform(60, 140, 3)
        for _ in range(6):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.25) * min(h, w)
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, 3)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def reference_mask(plan: Plan) -> np.ndarray:
    h, w = plan.target_hw
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:3 * h // 4, w // 5:3 * w // 5] = 1
    return mask


def write_models(plan: Plan, folder: Path) -> tuple[Path, Path]:
    """Random official-format checkpoints in ``folder`` (outside the result folder)."""
    from refseg.models.sam import SAM_SPECS, Sam, init_random_
    from refseg.testing.random_checkpoints import write_random_checkpoints

    (dino,) = write_random_checkpoints(folder, dinov2=[plan.dinov2])
    if plan.sam_depth is None:
        (sam,) = write_random_checkpoints(folder, sam=[plan.sam])
        return sam, dino
    spec = dataclasses.replace(SAM_SPECS[plan.sam].with_depth(plan.sam_depth), img_size=plan.sam_side)
    model = Sam(spec)
    init_random_(model, seed=0)
    sam = folder / "sam_small.pth"
    torch.save(model.state_dict(), sam)
    return sam, dino


# ------------------------------------------------------------------------------------------ rows
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def pipeline_row(seg, images: list[np.ndarray], batch: int, plan: Plan, compiled: bool) -> dict:
    """Throughput of a stream of ``plan.stream_images`` targets in batches of ``batch`` (best of
    ``plan.passes`` after a warm-up batch), batch-1 latency (batch 1 only), peak memory, stage ms per image."""
    from refseg.runtime.stream import StreamItem

    device = seg.device
    items = [StreamItem(f"t{i}", lambda i=i: images[i % len(images)]) for i in range(max(batch, plan.stream_images))]
    list(seg.stream(items[:batch], batch_size=batch))  # warm-up: kernels, allocator, graphs
    _peak_reset(device)
    rates, stages = [], []
    for _ in range(plan.passes):
        _sync(device)
        start = time.perf_counter()
        outs = list(seg.stream(items, batch_size=batch))
        _sync(device)
        rates.append(len(outs) / (time.perf_counter() - start))
        stages += [o.result.timings for o in outs]
    row = {"kind": "pipeline", "precision": seg.config.precision, "compiled": compiled, "batch": batch,
           "images_per_s": max(rates), "images_per_s_passes": rates, "peak_mib": _peak_mib(device),
           "stages_ms": {s: 1e3 * float(np.mean([t.get(s, 0.0) for t in stages])) for s in STAGES}}
    if batch == 1:
        lat = []
        for i in range(plan.latency_images):
            _sync(device)
            start = time.perf_counter()
            seg.segment(images[i % len(images)])
            lat.append(1e3 * (time.perf_counter() - start))
        row["latency_ms"] = {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95))}
    return row


def baseline_row(plan: Plan, sam: Path, dino: Path, images: list[np.ndarray], device: torch.device) -> dict:
    """The research-style flow (:class:`.baseline.ResearchBaseline`) on ``plan.baseline_images`` targets."""
    from refseg.benchmark.baseline import ResearchBaseline
    from refseg.config import SegmenterConfig

    cfg = SegmenterConfig.from_preset("gbmseg", dinov2=plan.dinov2, sam=plan.sam, image_size=plan.image_size)
    base = ResearchBaseline(cfg, sam, dino, device, models="refseg" if plan.sam_depth else "auto")
    ref = images[0]
    base.segment(ref, reference_mask(plan), images[1])  # warm-up
    totals = [base.segment(ref, reference_mask(plan), images[1 + i % (len(images) - 1)]).timings
              for i in range(plan.baseline_images)]
    per = float(np.mean([t["total"] for t in totals]))
    return {"kind": "baseline", "models": base.models, "seconds_per_image": per,
            "stages_s": {k: float(np.mean([t[k] for t in totals])) for k in totals[0]}}


def _time_ms(fn, device: torch.device, repeats: int = 10) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return 1e3 * (time.perf_counter() - start) / repeats


def kernel_rows(plan: Plan, device: torch.device) -> list[dict]:
    """Match (fp16 / bf16 / fp32) and k-means: the Triton kernel against its torch reference."""
    from refseg.kernels import KernelUnavailableError, kmeans, kmeans_reference, match, match_reference

    rows = []
    b, nr, nt, d = plan.match_shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    ref32, tgt32 = torch.randn(b, nr, d, generator=gen), torch.randn(b, nt, d, generator=gen)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        ref, tgt = ref32.to(device, dtype), tgt32.to(device, dtype)
        row = {"kind": "kernel", "name": "match cosine k=1", "shape": f"{b}x{nr}x{nt}x{d}",
               "dtype": str(dtype).replace("torch.", "")}
        try:
            got = match(ref, tgt, backend="triton")
            expected = match_reference(ref, tgt)
            row["agreement"] = f"{float((got.fwd_idx == expected.fwd_idx).float().mean()):.4f} fwd argmax equal"
            row["kernel_ms"] = _time_ms(lambda: match(ref, tgt, backend="triton"), device)
            row["reference_ms"] = _time_ms(lambda: match_reference(ref, tgt), device)
        except KernelUnavailableError as exc:
            row["skipped"] = f"kernel unavailable: {exc}"
        rows.append(row)
    p, n, k = plan.kmeans_shape
    points = (torch.rand(p, n, 2, generator=gen) * 1000).round().to(device)
    counts = torch.full((p,), n, dtype=torch.int64, device=device)
    row = {"kind": "kernel", "name": f"k-means++ K={k}", "shape": f"{p}x{n}x2", "dtype": "float32"}
    try:
        got = kmeans(points, counts, k, backend="triton")
        expected = kmeans_reference(points, counts, k)
        rel = float((got[2] - expected[2]).abs().max() / expected[2].abs().max().clamp(min=1e-9))
        row["agreement"] = f"labels equal {float((got[1] == expected[1]).float().mean()):.4f}, inertia rel {rel:.1e}"
        row["kernel_ms"] = _time_ms(lambda: kmeans(points, counts, k, backend="triton"), device)
        row["reference_ms"] = _time_ms(lambda: kmeans_reference(points, counts, k), device)
    except KernelUnavailableError as exc:
        row["skipped"] = f"kernel unavailable: {exc}"
    rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ main
def facts(plan: Plan, device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    return {"device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "models": f"DINOv2-{plan.dinov2}@{plan.image_size} + SAM-{plan.sam}"
                      + (f" ({plan.sam_depth} blocks @{plan.sam_side})" if plan.sam_depth else ""),
            "target": "x".join(map(str, plan.target_hw[::-1])), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run(plan: Plan, out: Path, device: torch.device, compile_rows: bool, budget_s: float) -> Report:
    """Every row of the check in order of importance; rows whose time is unlikely to fit are skipped."""
    from refseg.segmenter import Segmenter

    start = time.perf_counter()
    report = Report(out, facts(plan, device))
    images = synthetic_images(plan, 8, seed=1)
    with tempfile.TemporaryDirectory(prefix="refseg-gpu-check-") as tmp:  # weights never go to ``out``
        sam, dino = write_models(plan, Path(tmp))
        for precision in plan.precisions:
            seg = Segmenter.from_preset("sat", sam_checkpoint=sam, dinov2_checkpoint=dino, device=str(device),
                                        image_size=plan.image_size, precision=precision, batch_size=max(plan.batches))
            seg.set_reference(images[0], reference_mask(plan))
            for batch in plan.batches:
                report.add(pipeline_row(seg, images, batch, plan, compiled=False))
            del seg
        try:
            report.add(baseline_row(plan, sam, dino, images, device))
        except Exception as exc:  # the headline stands without it; say why
            report.note(f"baseline skipped: {type(exc).__name__}: {exc}")
        for row in kernel_rows(plan, device):
            report.add(row)
        if compile_rows:
            left = budget_s - (time.perf_counter() - start)
            if left < 150:  # inductor + CUDA graphs for two ViTs take ~1-2 min on a 16-core host
                report.note(f"compiled rows skipped: {left:.0f} s of the budget left")
            else:
                seg = Segmenter.from_preset("sat", sam_checkpoint=sam, dinov2_checkpoint=dino, device=str(device),
                                            image_size=plan.image_size, precision="bf16",
                                            batch_size=max(plan.batches), compile=True)
                seg.set_reference(images[0], reference_mask(plan))
                for batch in plan.batches:
                    report.add(pipeline_row(seg, images, batch, plan, compiled=True))
    report.note(f"check took {time.perf_counter() - start:.0f} s")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refseg.benchmark.headline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="result folder (results.json, summary.md)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile (CUDA graphs) bf16 rows")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds this run may take")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan.dry_run() if args.dry_run else Plan()
    device = torch.device("cpu" if args.dry_run else args.device)
    run(plan, out, device, args.compile, args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
