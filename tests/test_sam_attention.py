"""SAM's attention forms (refseg.models.sam_attention) against the official ``segment_anything`` Attention.

Both forms (``fused``: rel-pos folded into q/k, plain SDPA; ``bias``: additive SDPA mask) are compared
with the official module carrying the same random weights, on windowed (14x14), non-square and global
(64x64, 4096 tokens) grids: max abs diff <= 1e-4 in fp32 (measured ~2e-7). The fused global block is
also watched op by op (a TorchDispatchMode records every tensor produced): no score or bias tensor of
>= 2 query rows x 4096 keys may appear, SDPA gets no mask, and it runs with only the flash backend
allowed (the math fallback, which would form the scores inside the op, is ruled out).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from refseg.models import sam_attention
from refseg.models.sam_attention import (ATTENTION_ENV, Attention, attention_form, fused_width,
                                         key_position_codes)

sa_encoder = pytest.importorskip("segment_anything.modeling.image_encoder",
                                 reason="official segment_anything 1.0 is the oracle")
TOL = 1e-4


def _pair(dim: int, heads: int, grid: tuple[int, int], seed: int):
    torch.manual_seed(seed)
    official = sa_encoder.Attention(dim, heads, qkv_bias=True, use_rel_pos=True,
                                    rel_pos_zero_init=True, input_size=grid).eval()
    with torch.no_grad():  # trained-like tables, not the zero init
        official.rel_pos_h.normal_(0, 0.5)
        official.rel_pos_w.normal_(0, 0.5)
    ours = Attention(dim, heads, grid).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return ours, official


@pytest.mark.parametrize("form", ["fused", "bias"])
@pytest.mark.parametrize("dim, heads, grid, batch", [(96, 3, (14, 14), 3), (64, 2, (16, 12), 2),
                                                     (128, 2, (64, 64), 1)])
def test_forms_match_official_attention(monkeypatch, form, dim, heads, grid, batch):
    monkeypatch.setenv(ATTENTION_ENV, form)
    ours, official = _pair(dim, heads, grid, seed=grid[0])
    x = torch.randn(batch, *grid, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours(x), official(x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= TOL


def test_key_codes_are_one_hot_rows_and_columns():
    codes = key_position_codes((3, 4), 16, torch.bfloat16, torch.device("cpu"))
    assert codes.shape == (12, 16) and codes.dtype == torch.bfloat16
    for j in range(12):
        y, x = divmod(j, 4)
        expected = torch.zeros(16)
        expected[y] = expected[3 + x] = 1
        assert torch.equal(codes[j].float(), expected)
    assert fused_width(64, (64, 64)) == 192 and fused_width(64, (14, 14)) == 96
    assert fused_width(80, (14, 14)) == 112  # ViT-H windows: 108 rounded up to a multiple of 8


def test_form_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    assert attention_form(cuda) == "fused"
    assert attention_form(cpu) == sam_attention.CPU_FORM == "bias"
    monkeypatch.setattr(sam_attention, "tracing", lambda: True)  # export / compile: plain attention
    assert attention_form(cpu) == "fused"
    monkeypatch.setattr(sam_attention, "tracing", lambda: False)
    for value, expected in (("fused", "fused"), (" Bias ", "bias")):
        monkeypatch.setenv(ATTENTION_ENV, value)
        assert attention_form(cpu) == attention_form(cuda) == expected
    monkeypatch.setenv(ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="REFSEG_SAM_ATTENTION='flash'"):
        attention_form(cpu)


class _Recorder(TorchDispatchMode):
    """Records (op name, output shapes) of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []
        self.sdpa_masks: list[object] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.scaled_dot_product_attention.default:
            self.sdpa_masks.append(args[3] if len(args) > 3 else kwargs.get("attn_mask"))
        out = func(*args, **kwargs)
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]))
        return out


def _score_like(shape: tuple[int, ...], keys: int, key_grid: tuple[int, int]) -> bool:
    """A tensor holding >= 2 query rows against all ``keys`` keys: keys as the last axis, or as the
    last two axes (k_h, k_w) of a >= 5-D bias chunk (or any rank when k_h != k_w, which no rel-pos
    factor has)."""
    rows_flat = math.prod(shape[:-1]) if shape else 0
    if shape and shape[-1] == keys and rows_flat >= 2:
        return True
    if len(shape) >= 3 and tuple(shape[-2:]) == key_grid and math.prod(shape[:-2]) >= 2:
        return len(shape) >= 5 or key_grid[0] != key_grid[1]
    return False


def _record_global_block(monkeypatch, form: str, grid: tuple[int, int],
                         backends: list[SDPBackend]) -> _Recorder:
    monkeypatch.setenv(ATTENTION_ENV, form)
    module = Attention(128, 2, grid).eval()
    x = torch.randn(1, *grid, 128)
    recorder = _Recorder()
    with torch.inference_mode(), sdpa_kernel(backends), recorder:
        module(x)
    return recorder


@pytest.mark.parametrize("grid", [(64, 64), (32, 128)])
def test_fused_global_block_forms_no_score_or_bias_tensor(monkeypatch, grid):
    keys = grid[0] * grid[1]
    assert keys == 4096
    fused = _record_global_block(monkeypatch, "fused", grid, [SDPBackend.FLASH_ATTENTION])
    offending = [(op, s) for op, shapes in fused.ops for s in shapes if _score_like(s, keys, grid)]
    assert not offending, offending
    assert fused.sdpa_masks == [None]
    # The check sees the bias form's (N, N) bias chunks, so it would see a regression of the fused one.
    bias = _record_global_block(monkeypatch, "bias", grid, [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    assert any(_score_like(s, keys, grid) for _, shapes in bias.ops for s in shapes)
