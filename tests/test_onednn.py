"""refseg.models.onednn: oneDNN linear layers on the CPU against plain torch, and the rule that picks them.

Numbers: the oneDNN path is forced on for the dtypes whose primitive really runs on this machine
(:func:`onednn.primitive_runs`) and compared with ``F.linear`` (fp32 1e-5, bf16 2e-2); a dtype whose
primitive does not run here (bf16 on an AVX2-only CPU) is skipped, never forced. The rule is tested on
injected CPU features and probe results, so the AVX2-only and non-x86 branches are covered on every machine.
"""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refseg.models import onednn
from refseg.models.onednn import CpuFeatures

HAS_OP = onednn._onednn_op() is not None and torch.backends.mkldnn.is_available()
AVX512 = CpuFeatures("x86_64", "AVX512")
AVX2 = CpuFeatures("x86_64", "AVX2")


def _needs_primitive(dtype):
    if not onednn.primitive_runs(dtype):
        pytest.skip(f"oneDNN's {dtype} linear primitive does not run on this CPU")


@pytest.fixture
def forced(monkeypatch):
    """oneDNN chosen for every dtype whose primitive runs here; kill switch unset."""
    monkeypatch.delenv(onednn.KILL_SWITCH, raising=False)
    monkeypatch.setattr(onednn, "_choice", {d: onednn.primitive_runs(d) for d in onednn.DTYPES})


@pytest.fixture
def fresh(monkeypatch):
    """Empty decision caches (restored afterwards) and no kill switch."""
    monkeypatch.delenv(onednn.KILL_SWITCH, raising=False)
    monkeypatch.setattr(onednn, "_choice", {})
    onednn.cpu_bf16_or_fp32.cache_clear()
    yield
    onednn.cpu_bf16_or_fp32.cache_clear()


def _layer(n_in=96, n_out=160, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).eval()


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_matches_f_linear_fp32(forced, activation):
    _needs_primitive(torch.float32)
    layer = _layer()
    x = torch.randn(2, 5, 7, 96)
    with torch.inference_mode():
        ref = layer(x)
        ref = F.gelu(ref) if activation else ref
        out = onednn.linear(x, layer, activation)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_linear_non_contiguous_input(forced):
    _needs_primitive(torch.float32)
    layer = _layer()
    x = torch.randn(3, 96, 11).transpose(1, 2)  # (3, 11, 96), strided
    with torch.inference_mode():
        torch.testing.assert_close(onednn.linear(x, layer), layer(x), rtol=1e-5, atol=1e-5)


def test_linear_bf16(forced):
    _needs_primitive(torch.bfloat16)
    lb = _layer().to(torch.bfloat16)
    xb = torch.randn(3, 96, 11).transpose(1, 2).to(torch.bfloat16)
    with torch.inference_mode():
        out = onednn.linear(xb, lb, "gelu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.gelu(lb(xb)).float(), rtol=2e-2, atol=2e-2)


def test_linear_uses_onednn_only_for_inference(forced, monkeypatch):
    _needs_primitive(torch.float32)
    calls = []
    real = onednn._onednn
    monkeypatch.setattr(onednn, "_onednn", lambda *a: calls.append(1) or real(*a))
    layer = _layer()
    x = torch.randn(4, 96)
    out = onednn.linear(x, layer)  # grad mode, weight requires grad: autograd path
    assert out.requires_grad and out.grad_fn is not None and not calls
    out.sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        onednn.linear(x, layer)
    assert calls == [1]


def test_rule_from_features(monkeypatch):
    monkeypatch.setattr(onednn, "primitive_runs", lambda dtype: True)
    assert onednn.decide(torch.float32, AVX512)
    assert not onednn.decide(torch.float32, AVX2)  # not measured there: the torch default
    assert not onednn.decide(torch.float32, CpuFeatures("aarch64", "DEFAULT"))
    assert onednn.decide(torch.bfloat16, AVX2)  # bf16: wherever the primitive runs
    assert not onednn.decide(torch.float16, AVX512)
    monkeypatch.setattr(onednn, "primitive_runs", lambda dtype: False)
    assert not onednn.decide(torch.float32, AVX512) and not onednn.decide(torch.bfloat16, AVX512)


def test_decision_cached_logged_once_and_kill_switch(fresh, monkeypatch, caplog):
    monkeypatch.setattr(onednn, "cpu_features", lambda: AVX512)
    monkeypatch.setattr(onednn, "primitive_runs", lambda dtype: True)
    monkeypatch.setenv(onednn.KILL_SWITCH, "1")
    assert not onednn.use_onednn(torch.float32)
    monkeypatch.delenv(onednn.KILL_SWITCH)
    with caplog.at_level(logging.INFO, logger="refseg.models.onednn"):
        assert onednn.use_onednn(torch.float32)
        monkeypatch.setattr(onednn, "cpu_features", lambda: AVX2)  # decided once per process
        assert onednn.use_onednn(torch.float32)
    assert sum("CPU linear layers" in r.message for r in caplog.records) == 1
    assert not onednn.use_onednn(torch.float16)  # not a oneDNN dtype here


def test_avx2_only_cpu_runs_fp32_linear_layers_and_refuses_bf16(fresh, monkeypatch, caplog):
    """What an AVX2-only CPU sees: no AVX-512 (fp32 -> F.linear) and no bf16 primitive (bf16 -> fp32)."""
    from refseg.runtime.torch_backend import resolve_precision

    monkeypatch.setattr(onednn, "cpu_features", lambda: AVX2)
    monkeypatch.setattr(onednn, "primitive_runs", lambda dtype: dtype == torch.float32)
    calls = []
    monkeypatch.setattr(onednn, "_onednn", lambda *a: calls.append(1))
    layer = _layer()
    x = torch.randn(5, 96)
    with torch.inference_mode():
        torch.testing.assert_close(onednn.linear(x, layer, "gelu"), F.gelu(layer(x)))
        lb = _layer().to(torch.bfloat16)
        out = onednn.linear(x.to(torch.bfloat16), lb)  # an explicit bf16 module still works, on F.linear
    assert out.dtype == torch.bfloat16 and not calls
    assert not onednn.bf16_supported()
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", cpu) == "fp32"
        assert resolve_precision("bf16", cpu) == "fp32"
    assert sum("running fp32 instead" in r.message for r in caplog.records) == 1
    assert resolve_precision("auto", cpu) == "fp32"


def test_probe_is_functional_not_timed(monkeypatch):
    if not HAS_OP:
        pytest.skip("this torch build has no oneDNN linear op")

    def broken(*args):
        raise RuntimeError("could not create a primitive descriptor")

    onednn.primitive_runs.cache_clear()
    try:
        monkeypatch.setattr(onednn, "_onednn", broken)
        assert not onednn.primitive_runs(torch.float32)
        onednn.primitive_runs.cache_clear()
        monkeypatch.setattr(onednn, "_onednn", lambda x, w, b, act: torch.zeros(x.shape[0], w.shape[0]))
        assert not onednn.primitive_runs(torch.float32)  # runs but gives wrong numbers
    finally:
        onednn.primitive_runs.cache_clear()
    monkeypatch.undo()
    if onednn.cpu_features().machine in ("x86_64", "amd64"):
        assert onednn.primitive_runs(torch.float32)  # the real op, on any x86 build with oneDNN


def test_sam_encoder_same_with_and_without_onednn(monkeypatch):
    _needs_primitive(torch.float32)
    from refseg.models.sam import random_sam

    torch.manual_seed(0)
    sam = random_sam("vit_b").eval()
    enc = sam.image_encoder
    enc.blocks = enc.blocks[:3]  # windowed, windowed, global (index 2)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        monkeypatch.setattr(onednn, "_choice", {torch.float32: True})
        fast = enc(x)
        monkeypatch.setattr(onednn, "_choice", {torch.float32: False})
        plain = enc(x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
