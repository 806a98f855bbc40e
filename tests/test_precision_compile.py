"""Precision choice per device, bf16 on the CPU, and torch.compile of both encoders."""
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refseg.models import onednn
from refseg.runtime import torch_backend
from refseg.runtime.torch_backend import compile_module, resolve_precision
from refseg.segmenter import Segmenter

sys.path.insert(0, str(Path(__file__).parent))
from test_stream import _image, write_tiny_sam  # noqa: E402


def test_auto_precision_follows_the_hardware(monkeypatch, caplog):
    cpu = torch.device("cpu")
    for native in (True, False):  # CPUs keep fp32 by default, even with native bf16 (docs/attention.md)
        monkeypatch.setattr(torch_backend, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(onednn, "cpu_bf16_or_fp32", lambda: "bf16")  # oneDNN's bf16 primitive runs
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16", cpu) == "bf16"  # explicit wins, with a warning
    assert "emulated" in caplog.text
    for bf16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert resolve_precision("auto", torch.device("cuda")) == expected
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", cpu)


def test_cuda_graphs_only_on_cuda(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.append(kw) or module)
    monkeypatch.delenv("REFSEG_COMPILE_BACKEND", raising=False)
    compile_module(torch.nn.Linear(2, 2), torch.device("cuda"))
    compile_module(torch.nn.Linear(2, 2), torch.device("cpu"))
    assert [kw["mode"] for kw in seen] == ["reduce-overhead", None]
    assert all(kw["backend"] == "inductor" and kw["dynamic"] is False for kw in seen)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_checkpoints):
    sam = write_tiny_sam(tmp_path_factory.mktemp("tiny_pc") / "sam_tiny.pth")
    rng = np.random.default_rng(0)
    ref = _image(rng, 96, 128)
    mask = np.zeros((96, 128), np.uint8)
    mask[16:80, 20:90] = 1
    return sam, small_checkpoints[1], ref, mask, [_image(rng, 80, 96), _image(rng, 64, 64)]


def _segmenter(tiny, **kwargs):
    sam, dino, ref, mask, _ = tiny
    seg = Segmenter.from_preset("sat", sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu",
                                image_size=56, batch_size=2, **kwargs)
    return seg.set_reference(ref, mask)


def test_compiled_encoders_give_the_same_masks(tiny, monkeypatch):
    monkeypatch.setenv("REFSEG_COMPILE_BACKEND", "eager")  # dynamo tracing without a C++ build
    eager = _segmenter(tiny).segment_batch(tiny[4])
    seg = _segmenter(tiny, compile=True)
    assert seg.backend.compiled and seg.backend._sam_encoder is not seg.backend.sam.image_encoder
    compiled = seg.segment_batch(tiny[4])
    for a, b in zip(eager, compiled):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.points[1], b.points[1])


@pytest.mark.skipif(not onednn.bf16_supported(), reason="no oneDNN bf16 primitive on this CPU: bf16 runs fp32 "
                    "(tests/test_onednn.py covers that branch)")
def test_bf16_encoders_on_the_cpu(tiny):
    seg = _segmenter(tiny, precision="bf16")
    assert seg.backend.dtype == torch.bfloat16 and seg.config.precision == "bf16"
    results = seg.segment_batch(tiny[4])
    assert [r.mask.shape for r in results] == [t.shape[:2] for t in tiny[4]]
    assert all(np.isfinite(r.scores[1]) for r in results)
