"""Writers of a benchmark run: ``results.json``, ``results.md`` (tables) and ``throughput.png``.

The JSON is the results dict of :func:`refseg.benchmark.suite.run_suite` as it is (numpy scalars and
paths converted). The plot needs matplotlib (``pip install 'refseg[bench]'``), imported only here.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

STAGE_ORDER = ("dinov2", "grid", "matching", "prompts", "sam_encoder", "decoder", "postprocess")


def _plain(value):
    """json.dump fallback: numpy scalars / arrays, paths, tuples in sets."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, default=_plain, allow_nan=True) + "\n")


def _f(value, digits: int = 3, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    value = value * scale
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _memory(row: dict) -> str:
    """Peak MiB, with the rise over the row's start in parentheses (CPU RSS includes everything resident)."""
    peak, start = row.get("peak_mib"), row.get("start_mib")
    if peak is None:
        return "–"
    return f"{_f(peak, 4)} (+{_f(peak - start, 4)})" if start is not None else _f(peak, 4)


def _agreement(row: dict) -> tuple[str, str]:
    a = row.get("agreement") or {}
    if "iou_mean" in a:
        return _f(a.get("iou_mean"), 4), _f(a.get("dice_mean"), 4)
    if "cosine" in a:
        return f"cos {_f(a['cosine'], 6)}", f"rel {_f(a['rel_l2'], 2)}"
    return "–", "–"


def markdown(results: dict) -> str:
    """The report as Markdown: machine, ratios, parity, end-to-end, prompt stage, model rows, skips."""
    m, v, rows = results["machine"], results["versions"], results["rows"]
    out = [f"# refseg benchmark ({'quick' if results['quick'] else 'full'})", ""]
    out += [f"- device: `{results['device']}` — CPU {m.get('cpu')} ({m.get('cpu_count')} cores, torch threads "
            f"{m.get('torch_threads')}); GPU {m.get('gpu_name') or 'none'}",
            f"- torch {v.get('torch')}, triton {v.get('triton')}, onnxruntime {v.get('onnxruntime')}, "
            f"tensorrt {v.get('tensorrt')}; git {results['git'].get('commit') or 'unknown'}"
            + (" (dirty)" if results["git"].get("dirty") else ""),
            f"- wall time {_f(results.get('wall_s'), 4)} s; load average at start / end "
            f"{m.get('load_average_start')} / {m.get('load_average_end')}; random weights: {results['random_weights']}",
            f"- command: `{results.get('command', '')}`", ""]
    ratios = results.get("ratios", {})
    if ratios.get("by_pipeline"):
        out += ["## Speed-up over the research-style baseline", ""]
        body = []
        for name, r in ratios["by_pipeline"].items():
            st = r.get("stages_vs_baseline", {})
            body.append([name, _f(r["end_to_end_vs_baseline"]), _f(r.get("end_to_end_cpu_time_vs_baseline")),
                         _f(r["end_to_end_best_vs_baseline"]), _f(r["prompt_stage_vs_baseline"]),
                         _f(st.get("dinov2")), _f(st.get("sam_encoder")), _f(st.get("decoder"))])
        out += _table(["pipeline", "e2e fp32 b1 ×", "same, CPU time ×", "e2e best ×", "prompt stage ×",
                       "dinov2 ×", "sam enc ×", "decoder ×"], body) + [""]
    for name, parity in results.get("parity", {}).items():
        for kind, p in parity.items():
            out.append(f"- parity {name} [{kind}]: prompts equal on {p['prompts_equal']}/{p['compared']} targets"
                       + (f", mask IoU {_f(p['mask_iou_mean'], 4)}" if p.get("mask_iou_mean") is not None else ""))
    out.append("")
    e2e = [r for r in rows if r["section"] in ("end_to_end", "baseline")]
    if e2e:
        out += ["## End to end", ""]
        body = [[r["pipeline"], r["dataset"], r["variant"], str(r["batch"]), _f(r["images_per_s"]),
                 _f(r["p50_s"], 3, 1e3), _f(r["p95_s"], 3, 1e3), _f(r.get("cpu_s_per_image")),
                 _memory(r), *_agreement(r), _f(r.get("tflops")), _f(r.get("fraction_of_peak"))]
                for r in e2e]
        out += _table(["pipeline", "data", "variant", "batch", "img/s", "p50 ms / batch", "p95 ms / batch",
                       "CPU s / img", "peak MiB (rise)", "IoU", "Dice", "TFLOP/s", "of peak"], body) + [""]
        stages = [s for s in STAGE_ORDER if any(s in r.get("stages_s", {}) for r in e2e)]
        body = [[r["label"], *[_f(r.get("stages_s", {}).get(s), 3, 1e3) for s in stages]] for r in e2e]
        out += ["Seconds per image by stage (ms):", ""] + _table(["row", *stages], body) + [""]
    prompt = [r for r in rows if r["section"] == "prompt_stage"]
    if prompt:
        out += ["## Matching + prompt stage (same tokens)", ""]
        body = [[r["dataset"], r["variant"], r.get("settings", ""), str(r["batch"]), _f(r["per_image_s"], 3, 1e3),
                 _f(r["p95_s"], 3, 1e3), r.get("device", "")] for r in prompt]
        out += _table(["data", "variant", "settings", "batch", "ms / image", "p95 ms / call", "device"], body) + [""]
    models = [r for r in rows if r["section"] == "model"]
    if models:
        out += ["## Models", ""]
        body = [[r["stage"], r["model"] + (f"@{r['input']}" if r.get("input") else ""), r["variant"], str(r["batch"]),
                 _f(r["p50_s"], 3, 1e3), _f(r["p95_s"], 3, 1e3),
                 _f(r.get("images_per_s") or r.get("prompt_sets_per_s")), _f(r["gflop_per_call"], 4),
                 _f(r.get("tflops")), _f(r.get("fraction_of_peak")), _memory(r), *_agreement(r)]
                for r in models]
        out += _table(["stage", "model", "variant", "batch", "p50 ms", "p95 ms", "items/s", "GFLOP/call",
                       "TFLOP/s", "of peak", "peak MiB (rise)", "agreement", ""], body) + [""]
    skipped = results.get("config", {}).get("skipped_variants", []) + results.get("skipped_rows", [])
    if skipped:
        out += ["## Skipped", ""] + [f"- {s.get('variant') or s.get('row')}: {s['reason']}" for s in skipped] + [""]
    out += [f"- note: {n}" for n in results.get("notes", [])]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    """Two panels: end-to-end images/s per variant and batch; per-stage seconds per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["section"] in ("end_to_end", "baseline")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    labels = [f"{r['pipeline']}\n{r['variant']} b{r['batch']}" for r in rows]
    values = [r["images_per_s"] for r in rows]
    colors = ["tab:red" if r["section"] == "baseline" else "tab:blue" for r in rows]
    ax1.barh(range(len(rows)), values, color=colors)
    ax1.set_yticks(range(len(rows)), labels, fontsize=7)
    ax1.set_xlabel("images / s (end to end)")
    ax1.set_title(f"Throughput on {results['device']}")
    ax1.invert_yaxis()
    stages = [s for s in STAGE_ORDER if any(s in r.get("stages_s", {}) for r in rows)]
    left = [0.0] * len(rows)
    for stage in stages:
        widths = [r.get("stages_s", {}).get(stage, 0.0) * 1e3 for r in rows]
        ax2.barh(range(len(rows)), widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax2.set_yticks(range(len(rows)), labels, fontsize=7)
    ax2.set_xlabel("ms per image by stage")
    ax2.set_title("Per-stage latency")
    ax2.invert_yaxis()
    if stages:
        ax2.legend(fontsize=7, loc="lower right")
    if not rows:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no end-to-end row ran", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``throughput.png`` into ``out_dir``; returns the paths.

    Raises:
        refseg.optional.MissingDependencyError: matplotlib is not installed (the JSON and Markdown
            files are written first).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "throughput.png"}
    write_json(results, paths["json"])
    paths["markdown"].write_text(markdown(results))
    from refseg.optional import require

    require("matplotlib", "bench", "the benchmark plot (throughput.png)")
    plot(results, paths["plot"])
    return paths
