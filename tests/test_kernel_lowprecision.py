"""The match kernel's fp16 / bf16 path as it runs on a GPU, and at realistic token counts.

What runs where: the torch backend hands the encoders' fp16 / bf16 tokens to matching unchanged, and the
kernel loads them in that dtype. fp16 runs the interpreter's fp16 ``tl.dot`` exactly as compiled for a GPU.
Triton's interpreter mis-multiplies bfloat16 in ``tl.dot`` (numpy has no bfloat16), so under the
interpreter only, bf16 operands are widened to fp32 inside the kernel after the bf16 loads: bf16 x bf16
products are exact in fp32, which is what the tensor cores compute too (fp32 accumulation), up to the
summation order. The GPU launch of bf16 (compiled by ``refseg.kernels.compile_check``) has no such step;
:func:`test_gpu_launch_keeps_low_precision` checks that.

Realistic sizes run with 512-wide blocks: the interpreter's cost is per block step, and the kernel code is
the same for every block size (partial tiles included: 1369 and 1600 are not multiples of 512).
Tolerance: as tests/test_kernel_match.py (values 1e-5 absolute for cosine, 1e-4 + 1e-5 relative for
Euclidean; indices equal except between candidates whose exact scores lie within 1e-5 relative).
"""

import pytest
import torch

from refseg.kernels import match, match_reference, similarity
from refseg.pipeline.matching import match_candidates

from test_kernel_match import assert_match_close

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-specific checks (CPU only)")


def _tokens(B, Nr, Nt, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Nr, D, generator=g).to(dtype), torch.randn(B, Nt, D, generator=g).to(dtype))


@pytest.fixture
def kernel_spy(monkeypatch):
    """Records the dtype and launch constexprs of every match kernel launch."""
    seen = []
    real = similarity.match_launch_args

    def spy(ref, tgt, *args, **kwargs):
        grid, a, kw, out = real(ref, tgt, *args, **kwargs)
        seen.append((ref.dtype, tgt.dtype, kw["PRECISION"], kw["UPCAST"]))
        return grid, a, kw, out
    monkeypatch.setattr(similarity, "match_launch_args", spy)
    return seen


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_backend_tokens_reach_the_kernel_in_low_precision(precision, dtype, kernel_spy, monkeypatch):
    from refseg.config import SegmenterConfig
    from refseg.models import onednn

    # bf16 on a CPU without oneDNN's bf16 primitive would run fp32 (tests/test_onednn.py); this test is
    # about the tokens' way to the kernel, so it keeps bf16 on every CPU (F.linear computes it there).
    monkeypatch.setattr(onednn, "cpu_bf16_or_fp32", lambda: "bf16")
    from refseg.runtime.torch_backend import TorchBackend
    from refseg.testing.random_checkpoints import random_dinov2_model, random_sam_model

    backend = TorchBackend(random_dinov2_model("vits14", depth=2), random_sam_model("vit_b", depth=1),
                           torch.device("cpu"), precision=precision)
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    tokens = backend.encode_dinov2(images)
    assert tokens.dtype == dtype and tokens.shape == (3, 64, 384)  # no fp32 copy on the way out
    labels = (torch.arange(64) % 3 == 0).long()  # FG / BG reference patches
    cfg = SegmenterConfig(metric="cosine", image_size=112)
    cand = match_candidates(tokens[0], labels, tokens[1:], cfg)
    assert kernel_spy, "the Triton kernel did not run"
    assert kernel_spy[-1][:2] == (dtype, dtype), "tokens were upcast before the kernel"
    # interpreter: fp16 keeps tensor-core precision; bf16 widens only inside the kernel (see module doc)
    assert kernel_spy[-1][2:] == ((None, False) if dtype == torch.float16 else ("ieee", True))
    # the same candidates as the torch reference on the same low-precision tokens
    want = match_reference(tokens[:1].expand(2, -1, -1), tokens[1:], "cosine")
    got = match(tokens[:1].expand(2, -1, -1).contiguous(), tokens[1:].contiguous(), "cosine", backend="triton")
    assert_match_close(got, want, tokens[:1].expand(2, -1, -1), tokens[1:], "cosine")
    assert cand.positives.shape == (2, 1, 64) and bool(cand.positives.any())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_launch_keeps_low_precision(dtype):
    """On a GPU the launch neither widens nor asks for exact fp32 products: tensor cores."""
    ref, tgt = _tokens(1, 8, 8, 64, dtype, 0)
    _grid, args, kwargs, _out = similarity.match_launch_args(ref, tgt, None, None, True, 1, on_gpu=True)
    assert args[0].dtype == dtype and kwargs["PRECISION"] is None and kwargs["UPCAST"] is False
    _grid, _args, kwargs, _out = similarity.match_launch_args(ref.float(), tgt.float(), None, None, True, 1,
                                                              on_gpu=True)
    assert kwargs["PRECISION"] == "ieee"  # fp32 only when the tokens are fp32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_low_precision_masks_topk(dtype, metric):
    B, Nr, Nt, D, k = 2, 45, 39, 96, 5
    ref, tgt = _tokens(B, Nr, Nt, D, dtype, 3)
    g = torch.Generator().manual_seed(4)
    rv, tv = torch.rand(B, Nr, generator=g) > 0.2, torch.rand(B, Nt, generator=g) > 0.2
    got = match(ref, tgt, metric, rv, tv, k=k, backend="triton")
    assert_match_close(got, match_reference(ref, tgt, metric, rv, tv, k=k), ref, tgt, metric)


@pytest.mark.parametrize("n, dim, metric", [(1369, 768, "cosine"), (1600, 1536, "euclidean")],
                         ids=["vitb-518", "vitg-560"])
def test_realistic_size_bf16(n, dim, metric):
    """One pair at the sizes the presets produce: 37 x 37 ViT-B/14 tokens, 40 x 40 ViT-g/14 tokens."""
    ref, tgt = _tokens(1, n, n, dim, torch.bfloat16, n)
    got = similarity.MatchResult(*similarity.launch_match(ref, tgt, None, None, metric == "cosine", 1,
                                                          512, 512, 512))
    assert_match_close(got, match_reference(ref, tgt, metric), ref, tgt, metric)
