"""bench/gpu_check.sh --dry-run: the GPU check's steps, on the CPU at CPU sizes, write one results folder."""
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
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "card: none (CPU dry run" in res.stdout and "OK in" in res.stdout
    for name in ("card.txt", "tests.xml", "kernels.json", "summary.txt", "bench/results.json"):
        assert (out / name).is_file(), name
    benchmarks = json.loads((out / "kernels.json").read_text())["benchmarks"]
    assert {b["name"].split("[")[0] for b in benchmarks} == {"test_match", "test_kmeans"}
    assert json.loads((out / "bench" / "results.json").read_text())["rows"]
    summary = (out / "summary.txt").read_text()
    assert "tests: " in summary and "passed" in summary and "test_kmeans[torch_reference-1]" in summary
