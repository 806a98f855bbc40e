"""The Triton kernels compile for sm_80 and sm_90 without spills and within shared memory (no GPU needed).

Runs ``python -m refseg.kernels.compile_check --ci`` (the representative subset; the full grid is the
default of the command and takes minutes) in a subprocess: the interpreter that conftest.py enables
does not compile.
"""
import json
import os
import subprocess
import sys

import pytest

from refseg.kernels import compile_check

pytest.importorskip("triton")

LOG = """ptxas info    : Compiling entry function '_tl_match_kernel' for 'sm_90a'
ptxas info    : Function properties for _tl_match_kernel
    472 bytes stack frame, 472 bytes spill stores, 468 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 472 bytes cumulative stack size
"""


def test_ptxas_log_is_read():
    assert compile_check.parse_ptxas_log(LOG) == (255, 472, 468)
    assert compile_check.parse_ptxas_log(LOG.replace("472 bytes spill stores, 468 bytes spill loads",
                                                     "0 bytes spill stores, 0 bytes spill loads")) == (255, 0, 0)


def test_row_fails_on_spills_and_shared_memory():
    ok = compile_check.Row("sm_80", "match", "v", "l", registers=128, shared=1000, shared_limit=166912)
    assert ok.ok
    assert not compile_check.Row("sm_80", "match", "v", "l", registers=128, spill_loads=4,
                                 shared_limit=166912).ok
    assert not compile_check.Row("sm_80", "match", "v", "l", registers=128, shared=200000,
                                 shared_limit=166912).ok


def test_every_ci_variant_compiles_without_spills(tmp_path):
    out = tmp_path / "compile.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "refseg.kernels.compile_check", "--arch", "sm_80,sm_90", "--ci",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"} and {r["kernel"] for r in rows} == {"match", "kmeans"}
    assert len(rows) == 2 * (len(compile_check.CI_MATCH) + len(compile_check.CI_KMEANS))
    for r in rows:
        assert r["ok"] and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255 and r["shared"] <= r["shared_limit"], r
    assert "0 failing" in res.stdout
