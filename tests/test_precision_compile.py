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
    kwargs.setdefault("batch_size", 2)
    seg = Segmenter.from_preset("sat", sam_checkpoint=sam, dinov2_checkpoint=dino, device="cpu",
                                image_size=56, **kwargs)
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


def _counting_backend():
    """A torch.compile backend that runs each captured graph eagerly and counts graphs and calls."""
    counts = {"graphs": 0, "calls": 0, "batches": set()}

    def backend(gm, example_inputs):
        counts["graphs"] += 1
        counts["batches"].update(int(x.shape[0]) for x in example_inputs  # (B, 3, S, S) images, not weights
                                 if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == 3
                                 and x.shape[2] == x.shape[3] >= 56)

        def run(*args):
            counts["calls"] += 1
            return gm.forward(*args)

        return run

    return backend, counts


def test_bench_compiled_rows_run_the_compiled_encoders(tiny):
    """apply_to_segmenter must compile what TorchBackend calls (it used to compile references the backend
    never called, so the compiled end-to-end rows measured eager code)."""
    from refseg.benchmark.variants import VARIANTS, apply_to_segmenter

    seg = _segmenter(tiny)
    backend, counts = _counting_backend()
    apply_to_segmenter(seg, VARIANTS["torch-compile-fp32"], compile_backend=backend)
    seg.segment_batch(tiny[4])
    # CPU path: each encoder runs image by image -> at least 2 images x 2 encoders compiled calls
    assert counts["graphs"] >= 2 and counts["calls"] >= 4, counts


def test_compiled_encoders_keep_fixed_batch_shapes(tiny, monkeypatch):
    """On the accelerator path a compiled backend pads encoder calls to a power of two (at most the
    configured batch): an odd-sized last batch reuses the full batch's graphs (CUDA graphs are per shape)."""
    monkeypatch.setenv("REFSEG_ACCELERATOR_PATH", "1")
    seg = _segmenter(tiny, batch_size=4)
    backend, counts = _counting_backend()
    seg.backend.compile(mode=None, backend=backend)
    images = tiny[4] + tiny[4]
    full = seg.segment_batch(images)  # one batch of 4
    graphs = counts["graphs"]
    last = seg.segment_batch(images[:3])  # a batch of 3: padded to 4, no new graph
    assert counts["graphs"] == graphs and counts["batches"] == {4}, counts
    np.testing.assert_array_equal(full[0].mask, last[0].mask)
