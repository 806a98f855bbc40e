"""bench/gpu_check.sh --dry-run: the GPU check's steps on the CPU with tiny models, and its result-folder rules
($OUT wins over --out; at most 8 files of at most 16 MiB, at most 2 folders deep; nothing of the weights)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_dry_run(tmp_path):
    out, ignored = tmp_path / "device_out", tmp_path / "not_used"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "TMPDIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(ignored)],
                         capture_output=True, text=True, env=env, timeout=1200, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not ignored.exists()  # $OUT wins over --out
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8 and all(p.stat().st_size <= 16 * 2 ** 20 for p in files)
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert {"summary.md", "results.json", "card.txt", "tests.txt", "log.txt"} <= {p.name for p in files}
    assert not list(tmp_path.glob("refseg-gpu-check.*"))  # the temporary folder (weights, logs) is gone

    summary = (out / "summary.md").read_text().splitlines()
    assert summary[0].startswith("# refseg GPU check") and summary[4].startswith("| precision | compiled | batch |")
    rows = json.loads((out / "results.json").read_text())["rows"]
    pipeline = [r for r in rows if r["kind"] == "pipeline"]
    assert [(r["precision"], r["batch"]) for r in pipeline] == [("fp32", 1), ("fp32", 2)]
    assert all(r["images_per_s"] > 0 and r["stages_ms"]["sam_encoder"] > 0 for r in pipeline)
    assert pipeline[0]["latency_ms"]["p50"] > 0
    baseline = [r for r in rows if r["kind"] == "baseline"]
    assert baseline and baseline[0]["seconds_per_image"] > 0 and baseline[0]["models"] == "refseg"
    kernels = [r for r in rows if r["kind"] == "kernel"]
    assert [r["dtype"] for r in kernels[:3]] == ["float16", "bfloat16", "float32"] and len(kernels) == 4
    assert "passed" in (out / "tests.txt").read_text()
    assert "exported rows: tensorrt" in (out / "card.txt").read_text()
    assert "OK in" in res.stdout and "within the limits" in res.stdout
