"""Triton matching kernel vs the plain-torch reference (refseg.kernels.match).

On a machine without a GPU the kernel runs under TRITON_INTERPRET=1 (set in conftest.py), so sizes stay
small. Tolerances: values agree to 1e-5 (cosine, absolute) / 1e-5 relative + 1e-4 absolute (Euclidean);
indices agree exactly except where the two candidates' exact (float64) scores lie within 1e-5 relative of
each other. Exact ties (integer-valued features) must agree exactly, lowest index first. These bounds hold
for any accumulation order (a GPU's tiles, cuBLAS's split-K): fp32 rounding of a D <= 1536 dot product is
~1e-6 relative, ten times below them. The reference is an exact-fp32 oracle, so TF32 is pinned off here.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from refseg.kernels import KernelUnavailableError, MatchResult, match, match_reference, match_triton
from refseg.kernels import dispatch, similarity
from refseg.kernels.similarity import launch_match

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TIE_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_log_once():
    dispatch._logged.clear()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be exact fp32 products
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    dispatch._logged.clear()


def _exact_scores(ref, tgt, metric):
    a, b = ref.double(), tgt.double()
    if metric == "cosine":
        return F.normalize(a, dim=-1, eps=1e-12) @ F.normalize(b, dim=-1, eps=1e-12).transpose(1, 2)
    return torch.cdist(a, b)


def _check_choice(name, idx_k, idx_r, val_k, val_r, scores, metric):
    """idx (..., m) from kernel and reference; scores (..., n) exact scores of the candidates per row."""
    assert idx_k.shape == idx_r.shape and idx_k.dtype == torch.int64, name
    assert torch.equal(idx_k == -1, idx_r == -1), f"{name}: -1 (no candidate) positions differ"
    assert val_k.dtype == torch.float32
    assert torch.equal(val_k.isnan(), val_r.isnan()), f"{name}: NaN positions differ"
    if metric == "cosine":
        torch.testing.assert_close(val_k, val_r, atol=1e-5, rtol=0, equal_nan=True, msg=name)
    else:
        torch.testing.assert_close(val_k, val_r, atol=1e-4, rtol=1e-5, equal_nan=True, msg=name)
    differ = (idx_k != idx_r) & (idx_r >= 0)
    if differ.any():
        s_k = scores.gather(-1, idx_k.clamp_min(0))[differ]
        s_r = scores.gather(-1, idx_r.clamp_min(0))[differ]
        gap = (s_k - s_r).abs() / s_r.abs().clamp_min(1.0)
        assert bool((gap <= TIE_RTOL).all()), f"{name}: {int(differ.sum())} index mismatches beyond near-ties"


def assert_match_close(res_k: MatchResult, res_r: MatchResult, ref, tgt, metric):
    s = _exact_scores(ref.cpu(), tgt.cpu(), metric)
    res_k = MatchResult(*(t.cpu() for t in res_k))
    res_r = MatchResult(*(t.cpu() for t in res_r))
    _check_choice("fwd", res_k.fwd_idx, res_r.fwd_idx, res_k.fwd_val, res_r.fwd_val, s, metric)
    _check_choice("far", res_k.far_idx[..., None], res_r.far_idx[..., None], res_k.far_val, res_r.far_val, s, metric)
    st = s.transpose(1, 2)
    _check_choice("bwd", res_k.bwd_idx[..., None], res_r.bwd_idx[..., None], res_k.bwd_val, res_r.bwd_val, st, metric)


def _inputs(B, Nr, Nt, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(B, Nr, D, generator=g).to(DEVICE, dtype)
    tgt = torch.randn(B, Nt, D, generator=g).to(DEVICE, dtype)
    return ref, tgt


# (B, Nr, Nt, D, block): odd sizes not multiples of the block, one token, exact multiples, default blocks
SHAPES = [(2, 37, 45, 40, 16), (1, 1, 1, 16, 16), (3, 33, 17, 70, None), (2, 32, 64, 32, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_kernel_matches_reference(dtype, metric, shape):
    B, Nr, Nt, D, block = shape
    ref, tgt = _inputs(B, Nr, Nt, D, dtype, seed=Nr + Nt)
    got = MatchResult(*launch_match(ref, tgt, None, None, metric == "cosine", 1, block, block, block))
    assert got.fwd_idx.shape == (B, Nr, 1) and got.bwd_idx.shape == (B, Nt) and got.far_val.shape == (B, Nr)
    assert_match_close(got, match_reference(ref, tgt, metric), ref, tgt, metric)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_masks_and_topk(dtype, metric):
    B, Nr, Nt, D, k = 3, 29, 23, 24, 5
    ref, tgt = _inputs(B, Nr, Nt, D, dtype, seed=7)
    g = torch.Generator().manual_seed(3)
    rv = (torch.rand(B, Nr, generator=g) > 0.3).to(DEVICE)
    tv = (torch.rand(B, Nt, generator=g) > 0.3).to(DEVICE)
    tv[1] = False          # a pair with no valid target: every forward output is -1 / NaN
    tv[2, :3] = True       # exactly three valid targets but k = 5: slots 3 and 4 empty
    tv[2, 3:] = False
    rv[2, :] = False
    rv[2, 4] = True        # a single valid reference token
    got = match(ref, tgt, metric, rv, tv, k=k, backend="triton")
    want = match_reference(ref, tgt, metric, rv, tv, k=k)
    assert_match_close(got, want, ref, tgt, metric)
    assert bool((got.fwd_idx[1] == -1).all()) and bool(got.far_val[1].isnan().all())
    assert bool((got.fwd_idx[2, 4, 3:] == -1).all()) and bool((got.fwd_idx[2, 4, :3] >= 0).all())
    assert bool((got.bwd_idx[~tv] == -1).all()) and bool((got.fwd_idx[~rv] == -1).all())
    assert bool((got.bwd_idx[2][tv[2]] == 4).all())  # the only valid reference token
    # chosen targets are valid ones, best first
    chosen = got.fwd_idx[got.fwd_idx >= 0]
    assert bool(tv.gather(1, got.fwd_idx.clamp_min(0).flatten(1)).flatten()[got.fwd_idx.flatten() >= 0].all())
    assert chosen.numel() > 0
    v = got.fwd_val.nan_to_num(float("nan"))
    steps = v[..., 1:] - v[..., :-1]
    ok = steps.isnan() | ((steps <= 1e-6) if metric == "cosine" else (steps >= -1e-5))
    assert bool(ok.all()), "top-k values must be sorted best first"


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_ties_lowest_index(metric):
    g = torch.Generator().manual_seed(11)
    B, Nr, Nt, D = 2, 20, 37, 19
    tgt = torch.randint(-3, 4, (B, Nt, D), generator=g).float()
    ref = torch.randint(-3, 4, (B, Nr, D), generator=g).float()
    for j in (9, 21, 33):          # three identical copies of target 5 ...
        tgt[:, j] = tgt[:, 5]
    ref[:, 2] = tgt[:, 5]          # ... and a reference token equal to them: best is a 4-way tie
    ref[:, 7] = ref[:, 3]          # duplicated reference tokens: backward ties
    ref[:, 15] = ref[:, 3]
    ref, tgt = ref.to(DEVICE), tgt.to(DEVICE)
    got = match(ref, tgt, metric, k=4, backend="triton")
    want = match_reference(ref, tgt, metric, k=4)
    for a, b, name in zip(got, want, MatchResult._fields):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6, equal_nan=True, msg=name)
    assert got.fwd_idx[:, 2].tolist() == [[5, 9, 21, 33]] * B
    assert bool((got.bwd_idx != 7).all()) and bool((got.bwd_idx != 15).all())
    # the reference itself follows torch.argmax / argmin first-occurrence semantics
    s = _exact_scores(ref, tgt, metric).float()
    first = s.argmax(-1) if metric == "cosine" else s.argmin(-1)
    assert torch.equal(want.fwd_idx[..., 0], first)


def test_reference_matches_cdist_chain():
    """The Euclidean reference is exactly the GBMSeg-style cdist + argmin / argmax chain."""
    ref, tgt = _inputs(2, 40, 50, 64, torch.float32, seed=5)
    d = torch.cdist(ref, tgt)
    got = match_reference(ref, tgt, "euclidean")
    assert torch.equal(got.fwd_idx[..., 0], d.argmin(-1)) and torch.equal(got.far_idx, d.argmax(-1))
    assert torch.equal(got.bwd_idx, d.argmin(1))
    assert torch.equal(got.fwd_val[..., 0], d.amin(-1))


def test_bad_inputs_raise():
    ref, tgt = _inputs(1, 4, 5, 8, torch.float32)
    with pytest.raises(ValueError, match="metric"):
        match(ref, tgt, metric="dot")
    with pytest.raises(ValueError, match="share B and D"):
        match(ref, tgt[..., :4])
    with pytest.raises(ValueError, match="k must be"):
        match(ref, tgt, k=0)
    with pytest.raises(ValueError, match="tgt_valid"):
        match(ref, tgt, tgt_valid=torch.ones(1, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="backend"):
        match(ref, tgt, backend="cuda")


def _forbid_kernel(monkeypatch):
    match_module = sys.modules["refseg.kernels.similarity"]

    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run here")
    monkeypatch.setattr(match_module, "launch_match", boom)


def test_kill_switch(monkeypatch, caplog):
    ref, tgt = _inputs(1, 6, 7, 16, torch.float32)
    monkeypatch.setenv("REFSEG_DISABLE_MATCH", "1")
    _forbid_kernel(monkeypatch)
    with caplog.at_level("DEBUG", logger="refseg.kernels.dispatch"):
        got = match(ref, tgt)
        match(ref, tgt)
    assert sum("REFSEG_DISABLE_MATCH" in r.getMessage() for r in caplog.records) == 1  # logged once
    for a, b in zip(got, match_reference(ref, tgt)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    with pytest.raises(KernelUnavailableError, match="REFSEG_DISABLE_MATCH"):
        match_triton(ref, tgt)


def test_guard_falls_back(monkeypatch, caplog):
    ref, tgt = _inputs(1, 6, 7, 16, torch.float32)
    _forbid_kernel(monkeypatch)
    with caplog.at_level("DEBUG", logger="refseg.kernels.dispatch"):
        got = match(ref.double(), tgt.double())          # unsupported dtype
        match(ref, tgt, k=65)                             # k above the kernel's limit
    text = caplog.text
    assert "float64" in text and "k=65" in text
    assert torch.equal(got.fwd_idx, match_reference(ref.double(), tgt.double()).fwd_idx)
    with pytest.raises(KernelUnavailableError, match="float64"):
        match(ref.double(), tgt.double(), backend="triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with caplog.at_level("DEBUG", logger="refseg.kernels.dispatch"):
            match(ref, tgt)
        assert "TRITON_INTERPRET" in caplog.text


def _run_python(code: str, **env):
    full_env = {**os.environ, **env}
    full_env.pop("REFSEG_DISABLE_MATCH", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_auto_rule_fp32_on_gpu_takes_the_reference():
    assert similarity.reference_preferred("cuda", torch.float32) is not None
    for dtype in (torch.float16, torch.bfloat16):
        assert similarity.reference_preferred("cuda", dtype) is None  # tensor cores: the kernel
    assert similarity.reference_preferred("cpu", torch.float32) is None  # interpreter tests run the kernel


def test_auto_follows_the_rule(monkeypatch, caplog):
    ref, tgt = _inputs(1, 6, 7, 16, torch.float32)
    if DEVICE == "cpu":  # pretend this device is one where the rule prefers the reference
        monkeypatch.setattr(similarity, "reference_preferred", lambda device_type, dtype: "a reason")
    explicit = match(ref, tgt, backend="triton")  # an explicit request still runs the kernel
    _forbid_kernel(monkeypatch)
    with caplog.at_level("DEBUG", logger="refseg.kernels.dispatch"):
        got = match(ref, tgt)
    assert "using the torch reference" in caplog.text
    for a, b, c in zip(got, match_reference(ref, tgt), explicit):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_import_without_triton():
    """refseg.kernels imports without triton (and without touching it); calls fall back to the reference
    and the log names the refseg[gpu] extra."""
    code = """
        import importlib.abc, logging, sys
        attempts = []
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "triton" or name.startswith("triton."):
                    attempts.append(name)
                    raise ModuleNotFoundError("triton blocked by the test")
        sys.meta_path.insert(0, Block())
        logging.basicConfig(level=logging.INFO)
        import torch
        attempts.clear()
        import refseg.kernels as K
        assert not attempts, f"import refseg.kernels looked for triton: {attempts}"
        r = K.match(torch.randn(1, 3, 8), torch.randn(1, 4, 8))
        c, l, i = K.kmeans(torch.randn(2, 5, 2), torch.tensor([5, 3]), 2)
        assert r.fwd_idx.shape == (1, 3, 1) and l.shape == (2, 5)
        print("OK")
    """
    out = _run_python(code, TRITON_INTERPRET="1")
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout and "refseg[gpu]" in out.stderr


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        ref = torch.empty(4, 10, 32, dtype=torch.float16)
        tgt = torch.empty(4, 12, 32, dtype=torch.float16)
        out = torch.ops.refseg.match(ref, tgt, None, None, "cosine", 3, "auto")
    assert [tuple(t.shape) for t in out] == [(4, 10, 3), (4, 10, 3), (4, 10), (4, 10), (4, 12), (4, 12)]
    assert [t.dtype for t in out] == [torch.int64, torch.float32] * 3


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_opcheck(backend):
    ref, tgt = _inputs(1, 5, 6, 16, torch.float32)
    op = torch.ops.refseg.match.default
    torch.library.opcheck(op, (ref, tgt, None, None, "euclidean", 2, backend))
    # with masks the outputs hold NaN, which opcheck's AOT comparison treats as a mismatch: skip that one
    tv = torch.tensor([[True, True, False, True, True, True]], device=DEVICE)
    torch.library.opcheck(op, (ref, tgt, None, tv, "cosine", 2, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiles_without_graph_break():
    ref, tgt = _inputs(2, 5, 6, 16, torch.float32)

    def prompt_stage(r, t):
        res = match(r, t, "cosine", k=2)
        return res.fwd_idx, res.bwd_idx.gather(1, res.fwd_idx[..., 0])

    compiled = torch.compile(prompt_stage, backend="eager", fullgraph=True)
    for a, b in zip(compiled(ref, tgt), prompt_stage(ref, tgt)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_reference_fast_path_equals_masked_path(metric):
    # Unmasked top-1 takes a shortcut in match_reference; all-True masks take the general path.
    gen = torch.Generator().manual_seed(11)
    ref = torch.randint(-2, 3, (2, 37, 8), generator=gen).float()  # small integers: many exact ties
    tgt = torch.randint(-2, 3, (2, 41, 8), generator=gen).float()
    fast = match_reference(ref, tgt, metric)
    slow = match_reference(ref, tgt, metric, ref_valid=torch.ones(2, 37, dtype=torch.bool),
                           tgt_valid=torch.ones(2, 41, dtype=torch.bool))
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and torch.equal(a, b)
