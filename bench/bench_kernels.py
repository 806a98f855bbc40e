"""Benchmarks: fused Triton matching / k-means vs the torch chains they replace vs scikit-learn.

    python -m pytest bench/bench_kernels.py --benchmark-only --benchmark-columns=mean,stddev,rounds

On a GPU the sizes are the issue's: pairs of 1,369 x 1,369 tokens of D = 768 (fp16) at batch 1 / 16 / 32 / 64,
and k-means problems of 1,600 2-D points, K = 8, at batch 1 / 16 / 64. On the CPU the sizes are small and the
Triton variants are skipped, except under TRITON_INTERPRET=1 where they run at batch 1 on tiny inputs as a
correctness smoke test (interpreter timings mean nothing). Every timed call synchronises the device; extra_info
records the achieved TFLOP/s (matching: one Nr x Nt x D product per pair, although the kernel computes it twice,
once per direction) or GB/s and problems/s (k-means), and the card's nominal peaks when they are known.
"""
from __future__ import annotations

import os

import pytest
import torch

from refseg.kernels import kmeans, kmeans_reference, match, match_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" and not CUDA

# Nominal dense peaks from NVIDIA's data sheets: (fp16 tensor TFLOP/s, fp32 TFLOP/s, memory GB/s).
_PEAKS = [("H200", (989.0, 67.0, 4800.0)), ("H100 PCIe", (756.0, 51.0, 2000.0)), ("H100", (989.0, 67.0, 3350.0)),
          ("A100", (312.0, 19.5, 2039.0)), ("L40S", (362.0, 91.6, 864.0)), ("RTX 4090", (165.2, 82.6, 1008.0))]

if CUDA:
    MATCH_SIZE, MATCH_DTYPE, MATCH_BATCHES = (1369, 1369, 768), torch.float16, (1, 16, 32, 64)
    KMEANS_SIZE, KMEANS_BATCHES = (1600, 2, 8), (1, 16, 64)
else:
    MATCH_SIZE, MATCH_DTYPE, MATCH_BATCHES = (256, 256, 384), torch.float32, (1, 16, 64)
    KMEANS_SIZE, KMEANS_BATCHES = (400, 2, 8), (1, 16, 64)
    if os.environ.get("REFSEG_BENCH_SMOKE") == "1":  # bench/gpu_check.sh --dry-run: one batch per row
        MATCH_BATCHES, KMEANS_BATCHES = (1,), (1,)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _device_info() -> dict:
    if not CUDA:
        return {"device": "cpu", "threads": torch.get_num_threads(), "interpreter": INTERPRET}
    name = torch.cuda.get_device_name()
    info = {"device": name}
    for key, (fp16, fp32, gbs) in _PEAKS:
        if key in name:
            info.update(peak_fp16_tflops=fp16, peak_fp32_tflops=fp32, peak_gbs=gbs)
            break
    return info


def _run(benchmark, fn, rounds: int):
    def timed():
        out = fn()
        _sync()  # the timing must include the device work, not just the launch
        return out
    timed()  # warm-up outside the measurement: Triton compilation, cuBLAS handles, caches
    return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)


def _mean_seconds(benchmark):
    """Mean time of the measured rounds, or None under --benchmark-disable (each function then runs once)."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.mean if stats is not None else None


def _skip_triton_unless_possible(batch: int):
    if CUDA:
        return
    if not INTERPRET:
        pytest.skip("Triton variant needs CUDA (or TRITON_INTERPRET=1 for a correctness-only run)")
    if batch != 1:
        pytest.skip("under TRITON_INTERPRET=1 only batch 1 runs (interpreter timings are correctness only)")


# ------------------------------------------------------------------------------------------------ matching
def _match_inputs(batch: int, small: bool):
    nr, nt, d = (48, 40, 64) if small else MATCH_SIZE
    g = torch.Generator().manual_seed(batch)
    ref = torch.randn(batch, nr, d, generator=g).to(DEVICE, MATCH_DTYPE)
    tgt = torch.randn(batch, nt, d, generator=g).to(DEVICE, MATCH_DTYPE)
    return ref, tgt


def _bare_chain(ref, tgt, metric):
    """What research code does: full score matrix, then argmin/argmax along each axis."""
    if metric == "cosine":
        a = torch.nn.functional.normalize(ref.float(), dim=-1)
        b = torch.nn.functional.normalize(tgt.float(), dim=-1)
        s = a @ b.transpose(1, 2)
        return s.argmax(-1), s.argmin(-1), s.argmax(1)
    s = torch.cdist(ref.float(), tgt.float())
    return s.argmin(-1), s.argmax(-1), s.argmin(1)


MATCH_IMPLS = {
    "triton": lambda r, t, m: match(r, t, m, backend="triton"),
    "torch_reference": lambda r, t, m: match_reference(r, t, m),
    "torch_bare_chain": _bare_chain,
}


@pytest.mark.parametrize("batch", MATCH_BATCHES)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("impl", list(MATCH_IMPLS))
def test_match(benchmark, impl, metric, batch):
    small = impl == "triton" and INTERPRET
    if impl == "triton":
        _skip_triton_unless_possible(batch)
    ref, tgt = _match_inputs(batch, small)
    fn = MATCH_IMPLS[impl]
    if impl == "triton":  # never time a wrong kernel
        got, want = match(ref[:1], tgt[:1], metric, backend="triton"), match_reference(ref[:1], tgt[:1], metric)
        agree = (got.fwd_idx == want.fwd_idx).float().mean().item()
        assert agree > 0.99, f"kernel disagrees with the reference on {1 - agree:.2%} of the forward matches"
    _run(benchmark, lambda: fn(ref, tgt, metric), rounds=3 if small else 20)
    B, nr, d = ref.shape
    nt = tgt.shape[1]
    seconds = _mean_seconds(benchmark)
    if seconds is None:
        return
    flops = 2.0 * B * nr * nt * d
    io_bytes = (ref.numel() + tgt.numel()) * ref.element_size() + B * (3 * nr + nt) * 12
    benchmark.extra_info.update(_device_info())
    benchmark.extra_info.update(shape=f"{B}x{nr}x{nt}x{d}", dtype=str(ref.dtype), pairs_per_s=B / seconds,
                                tflops=flops / seconds / 1e12, gbs=io_bytes / seconds / 1e9,
                                correctness_only=small)


# ------------------------------------------------------------------------------------------------ k-means
def _kmeans_inputs(batch: int, small: bool):
    n, d, k = (60, 2, 4) if small else KMEANS_SIZE
    g = torch.Generator().manual_seed(batch)
    centres = torch.rand(batch, k, d, generator=g) * 500
    which = torch.randint(0, k, (batch, n), generator=g)
    points = centres.gather(1, which[..., None].expand(batch, n, d)) + torch.randn(batch, n, d, generator=g) * 8
    counts = torch.full((batch,), n)
    return points.to(DEVICE), counts.to(DEVICE), k


def _sklearn_loop(points, counts, k):
    cluster = pytest.importorskip("sklearn.cluster")
    host, n_valid = points.cpu().numpy(), counts.cpu().tolist()
    return [cluster.KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=100, random_state=0)
            .fit(host[p, :n_valid[p]]) for p in range(len(n_valid))]


KMEANS_IMPLS = {
    "triton": lambda p, c, k: kmeans(p, c, k, iters=100, backend="triton"),
    "torch_reference": lambda p, c, k: kmeans_reference(p, c, k, iters=100),
    "sklearn_loop": _sklearn_loop,
}


@pytest.mark.parametrize("batch", KMEANS_BATCHES)
@pytest.mark.parametrize("impl", list(KMEANS_IMPLS))
def test_kmeans(benchmark, impl, batch):
    small = impl == "triton" and INTERPRET
    if impl == "triton":
        _skip_triton_unless_possible(batch)
    points, counts, k = _kmeans_inputs(batch, small)
    fn = KMEANS_IMPLS[impl]
    if impl == "triton":
        got, want = kmeans(points, counts, k, backend="triton"), kmeans_reference(points, counts, k)
        assert torch.allclose(got[2], want[2], rtol=1e-4), "kernel inertia differs from the reference"
    rounds = 3 if small or impl == "sklearn_loop" and batch == 64 else 10
    _run(benchmark, lambda: fn(points, counts, k), rounds=rounds)
    seconds = _mean_seconds(benchmark)
    if seconds is None:
        return
    P, n, d = points.shape
    benchmark.extra_info.update(_device_info())
    benchmark.extra_info.update(shape=f"{P}x{n}x{d} K={k}", problems_per_s=P / seconds,
                                gbs=points.numel() * 4 / seconds / 1e9, correctness_only=small)
