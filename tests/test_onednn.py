"""refseg.models.onednn: oneDNN linear layers and SAM rel-pos attention on the CPU, against plain torch.

The oneDNN path is forced on (the per-process measurement is bypassed) so that these tests check its
numbers on every machine, whichever path the machine would pick; the decision itself is tested too.
"""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refseg.models import onednn
from refseg.models import sam_image_encoder as E

pytestmark = pytest.mark.skipif(onednn._onednn_op() is None or not torch.backends.mkldnn.is_available(),
                                reason="this torch build has no oneDNN linear op")


@pytest.fixture
def forced(monkeypatch):
    """oneDNN chosen for fp32 and bf16 without measuring; kill switch unset."""
    monkeypatch.delenv(onednn.KILL_SWITCH, raising=False)
    monkeypatch.setattr(onednn, "_choice", {torch.float32: True, torch.bfloat16: True})


def _layer(n_in=96, n_out=160, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).eval()


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_matches_f_linear_fp32(forced, activation):
    layer = _layer()
    x = torch.randn(2, 5, 7, 96)
    with torch.inference_mode():
        ref = layer(x)
        ref = F.gelu(ref) if activation else ref
        out = onednn.linear(x, layer, activation)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_linear_non_contiguous_input_and_bf16(forced):
    layer = _layer()
    x = torch.randn(3, 96, 11).transpose(1, 2)  # (3, 11, 96), strided
    with torch.inference_mode():
        torch.testing.assert_close(onednn.linear(x, layer), layer(x), rtol=1e-5, atol=1e-5)
        lb = _layer().to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        out = onednn.linear(xb, lb, "gelu")
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), F.gelu(lb(xb)).float(), rtol=2e-2, atol=2e-2)


def test_linear_uses_onednn_only_for_inference(forced, monkeypatch):
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


def test_kill_switch_and_decision(monkeypatch, caplog):
    monkeypatch.setattr(onednn, "_choice", {})
    monkeypatch.setenv(onednn.KILL_SWITCH, "1")
    assert not onednn.use_onednn(torch.float32)
    monkeypatch.delenv(onednn.KILL_SWITCH)
    monkeypatch.setattr(onednn, "measure", lambda dtype: {"onednn_s": 2.0, "default_s": 1.0, "onednn": False})
    with caplog.at_level(logging.INFO, logger="refseg.models.onednn"):
        assert not onednn.use_onednn(torch.float32)
        assert not onednn.use_onednn(torch.float32)  # cached: logged once
    assert sum("CPU linear layers" in r.message for r in caplog.records) == 1
    assert not onednn.use_onednn(torch.float16)  # not a oneDNN dtype here


def test_measure_reports_both_paths():
    m = onednn.measure(torch.float32)
    assert m["onednn_s"] > 0 and m["default_s"] > 0 and isinstance(m["onednn"], bool)


def test_attention_rel_pos_matches_sdpa_with_full_bias(forced, monkeypatch):
    monkeypatch.setattr(onednn, "_SCORE_BLOCK_ELEMENTS", 3 * 9 * 72)  # 3 query rows per block, last one short
    torch.manual_seed(0)
    b, heads, h, w, c = 2, 3, 8, 9, 16
    qkv = torch.randn(b, h * w, 3, heads, c)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as in the encoder
    rel_pos_h, rel_pos_w = torch.randn(2 * h - 1, c) * 0.3, torch.randn(2 * w - 1, c) * 0.3
    with torch.inference_mode():
        bias = E.decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, (h, w), (h, w))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        rel_h, rel_w = E.decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, (h, w), (h, w))
        out = onednn.attention_rel_pos(q, k, v, rel_h, rel_w)
        assert out is not None
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert onednn.attention_rel_pos(q.double(), k.double(), v.double(), rel_h.double(), rel_w.double()) is None


def test_sam_encoder_same_with_and_without_onednn(monkeypatch):
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
