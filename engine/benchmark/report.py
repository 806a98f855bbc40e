"""Writers of a benchmark run: ``results.json``, ``results.md`` (tables) and ``throughput.png``.

The JSON is the results dict of :func:`refseg.benchmark.suite.run_suite` (or of
:func:`refseg.benchmark.volume_rows.run_volume_rows`) as it is (numpy scalars and paths converted). The
plot needs matplotlib (``pip install 'refseg[bench]'``), imported only here.
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


def read_results(path: str | os.PathLike) -> dict:
    """A ``results.json`` written by :func:`write_report`.

    Raises:
        ValueError: the file is not JSON or not a refseg-bench results file (names the file).
    """
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read benchmark results ({exc})") from exc
    if not isinstance(results, dict) or not str(results.get("schema", "")).startswith("refseg-bench/"):
        raise ValueError(f"{path}: not a refseg bench results.json (no refseg-bench schema)")
    return results


def _rate(row: dict) -> str:
    """Median images/s with the repeats' range."""
    lo, hi = row.get("images_per_s_min"), row.get("images_per_s_max")
    rng = f" ({_f(lo)}–{_f(hi)})" if lo is not None and hi is not None and row.get("repeats", 1) > 1 else ""
    return _f(row["images_per_s"]) + rng


def _streaming(results: dict) -> dict:
    return results.get("streaming_vs_per_image") or results.get("ratios", {}).get("streaming_vs_per_image") or {}


def results_table(results: dict) -> str:
    """The README's results section body, generated from ``results``: end-to-end rows against the
    research baseline and the per-image path, the prompt stage, and the two CPU targets."""
    rows, ratios = results["rows"], results.get("ratios", {})
    m, v = results["machine"], results["versions"]
    e2e = [r for r in rows if r["section"] in ("baseline", "end_to_end")]
    base = {(r["pipeline"], r["dataset"]): r for r in rows if r["section"] == "baseline"}
    per_image = {(r["pipeline"], r["dataset"], r["variant"]): r for r in e2e
                 if r["section"] == "end_to_end" and r["batch"] == 1 and r.get("mode", "per_image") == "per_image"}
    plan = results.get("config", {}).get("plan", {})
    out = [f"Generated from `results.json` of `{results.get('command') or 'refseg bench'}` "
           f"({results.get('created_utc', '')}; {m.get('cpu')}, {m.get('cpu_count')} cores, torch threads "
           f"{m.get('torch_threads')}, GPU {m.get('gpu_name') or 'none'}; torch {v.get('torch')}, onnxruntime "
           f"{v.get('onnxruntime')}; load average {m.get('load_average_start')} → {m.get('load_average_end')}; "
           f"random weights: {results.get('random_weights')}). Every end-to-end row: "
           f"{plan.get('e2e_images', '?')} images per pass, median of {plan.get('e2e_repeats', '?')} passes "
           "(range in parentheses); ratios are within this one run."
           + (" **Partial run** (`results.partial.json`, stopped before the suite ended): only the rows "
              "that finished are listed." if str(results.get("schema", "")).endswith("partial") else ""), ""]
    body = []
    for r in e2e:
        b = base.get((r["pipeline"], r["dataset"]))
        ref = per_image.get((r["pipeline"], r["dataset"], r["variant"]))
        mode = "research baseline" if r["section"] == "baseline" else \
            f"{r['variant']} {'stream' if r.get('mode') == 'stream' else 'per-image'} b{r['batch']}"
        a = r.get("agreement") or {}
        same = f"{a['identical']}/{a['compared']}" if a.get("compared") and "identical" in a else "–"
        st = r.get("stages_s", {})
        stages = " / ".join(_f(st.get(k, 0.0) + (st.get("grid", 0.0) if k == "matching" else 0.0), 3)
                            for k in ("dinov2", "matching", "prompts", "sam_encoder", "decoder"))
        body.append([f"{r['pipeline']}/{r['dataset']}", mode, _rate(r),
                     _f(b and r["images_per_s"] / b["images_per_s"]) if b else "–",
                     _f(r["images_per_s"] / ref["images_per_s"]) if ref and r is not ref and r["section"] != "baseline"
                     else "–", same, _memory(r), stages])
    out += _table(["pipeline", "row", "img/s", "× baseline", "× per-image", "masks identical to fp32 b1",
                   "peak MiB (rise)", "s/img: DINOv2 / match / prompts / SAM enc / decoder"], body) + [""]
    prompt = {(r["pipeline"], r["variant"], r.get("settings"), r["batch"]): r for r in rows
              if r["section"] == "prompt_stage"}
    for name, entry in ratios.get("by_pipeline", {}).items():
        pipeline = name.split("/")[0]
        ours = prompt.get((pipeline, "refseg", "gbmseg", 1))
        theirs = prompt.get((pipeline, "research-baseline", "gbmseg", 1))
        e2e_x, p_x = entry.get("end_to_end_vs_baseline"), entry.get("prompt_stage_vs_baseline")
        out.append(f"- {name}: end to end **{_f(e2e_x)}×** the baseline (range over repeats "
                   f"{' – '.join(_f(x) for x in entry.get('end_to_end_vs_baseline_range') or []) or '–'}; "
                   f"masks identical {entry.get('masks_identical')}/{entry.get('masks_compared')}; target ≥ 2×: "
                   f"{'met' if e2e_x and e2e_x >= 2.0 else 'not met'}); prompt stage **{_f(p_x)}×** "
                   f"({_f(ours and ours['per_image_s'], 3, 1e3)} ms vs {_f(theirs and theirs['per_image_s'], 3, 1e3)}"
                   f" ms per image on the same tokens; target ≥ 100×: {'met' if p_x and p_x >= 100 else 'not met'})")
    for name, entry in _streaming(results).items():
        out.append(f"- streaming vs per-image, {name}: " + ", ".join(
            f"{b} {_f(e['ratio'])}× (peak {_f(e.get('peak_mib'), 4)} MiB)" for b, e in entry.items()))
    return "\n".join(out) + "\n"


README_BEGIN = "<!-- refseg-bench results: begin (generated by refseg bench --readme; do not edit) -->"
README_END = "<!-- refseg-bench results: end -->"


def update_readme(results: dict, readme: str | os.PathLike) -> Path:
    """Replace the text between :data:`README_BEGIN` and :data:`README_END` in ``readme`` with
    :func:`results_table` (atomic write).

    Raises:
        ValueError: the file lacks the two markers, in this order (names the file).
    """
    from refseg.io.writers import atomic_write_bytes

    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no '{README_BEGIN}' ... '{README_END}' markers to fill")
    new = text[:start + len(README_BEGIN)] + "\n" + results_table(results) + text[end:]
    atomic_write_bytes(path, new.encode("utf-8"))
    return path


def _volume(results: dict) -> list[str]:
    """The volume rows (``refseg bench --volume``): the random-weights warning, the settings, one line per mode
    with its speed, memory and the Dice of every structure."""
    from .volume_rows import RANDOM_NOTE, SECTION, TITLE

    rows = [r for r in results["rows"] if r["section"] == SECTION]
    if not rows:
        return []
    config = results.get("config", {})
    labels = config.get("labels") or sorted({int(c) for r in rows for c in r["dice"]})
    names = config.get("structures") or {}
    out = [f"## {TITLE}", ""]
    if results.get("random_weights"):
        out += [RANDOM_NOTE + " The timings are of one run.", ""]
    if config.get("settings"):
        out += [config["settings"], ""]
    body = [[r["mode"], str(r["slices"]), _f(r["seconds"]), _f(r["slices_per_second"]), _f(r.get("wall_s")),
             _memory(r), *[_f(r["dice"].get(str(c)), 3) for c in labels]] for r in rows]
    return out + _table(["mode", "slices", "s", "slices/s", "wall s (with model loading)", "peak MiB (rise)",
                         *[f"Dice {names.get(str(c)) or c} ({c})" for c in labels]], body) + [""]


def markdown(results: dict) -> str:
    """The report as Markdown: machine, ratios, parity, end-to-end, prompt stage, model rows, skips."""
    m, v, rows = results["machine"], results["versions"], results["rows"]
    kind = "volume" if results.get("volume") else "quick" if results["quick"] else "full"
    out = [f"# refseg benchmark ({kind})", ""]
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
    for name, entry in _streaming(results).items():
        out.append(f"- streaming vs per-image {name}: " + ", ".join(
            f"{b} {_f(e['ratio'])}× (peak {_f(e.get('peak_mib'), 4)} MiB vs {_f(e.get('per_image_peak_mib'), 4)})"
            for b, e in entry.items()))
    for name, parity in results.get("parity", {}).items():
        for kind, p in parity.items():
            out.append(f"- parity {name} [{kind}]: prompts equal on {p['prompts_equal']}/{p['compared']} targets"
                       + (f", mask IoU {_f(p['mask_iou_mean'], 4)}" if p.get("mask_iou_mean") is not None else ""))
    out.append("")
    e2e = [r for r in rows if r["section"] in ("end_to_end", "baseline")]
    if e2e:
        out += ["## End to end", ""]
        body = [[r["pipeline"], r["dataset"], r["variant"] + (" stream" if r.get("mode") == "stream" else ""),
                 str(r["batch"]), _rate(r),
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
    out += _volume(results)
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
    """Write ``results.json``, ``results.md`` and ``throughput.png`` (not for ``--volume`` results, which have
    no image rows) into ``out_dir``; returns the paths.

    Raises:
        refseg.optional.MissingDependencyError: matplotlib is not installed (the JSON and Markdown
            files are written first).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "throughput.png"}
    write_json(results, paths["json"])
    paths["markdown"].write_text(markdown(results))
    if results.get("volume"):  # no image rows to plot
        del paths["plot"]
        return paths
    from refseg.optional import require

    require("matplotlib", "bench", "the benchmark plot (throughput.png)")
    plot(results, paths["plot"])
    return paths
