"""Triton batched k-means vs the plain-torch reference, a brute-force check and scikit-learn.

Runs under TRITON_INTERPRET=1 on CPU-only machines (conftest.py). Tolerances: on well-separated blobs
labels are identical except at distance near-ties (1e-5 relative) and centres agree to 1e-5 relative +
1e-3 absolute (pixel-like coordinates of a few hundred: a mean of 90 fp32 points summed in another order,
as a GPU's blocks or cuBLAS sum them, moves by ~1e-4; a single moved label moves it by > 0.1); k-means++
initial centres (iters=0) are bit-identical (distances summed coordinate by coordinate without FMA on
both sides, integer weights); inertia agrees to 1e-5 relative; labels are the nearest returned centre up
to 1e-5 relative distance ties. TF32 is pinned off: the reference's centre sums are a matmul.
"""
import sys

import pytest
import torch

from refseg.kernels import KernelUnavailableError, kmeans, kmeans_draws, kmeans_reference, kmeans_triton
from refseg.kernels import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_log_once():
    dispatch._logged.clear()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    dispatch._logged.clear()


def blobs(P, N, d, n_blobs, seed=0, spread=1.0, sep=40.0):
    """(P, N, d) points around n_blobs centres at least ``sep`` apart (pixel-like coordinates)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n_blobs, dtype=torch.float32)[:, None] * sep + 100.0  # on a diagonal line
    base = base.expand(n_blobs, d).clone()
    base[:, 0] = base[:, 0] + torch.rand(n_blobs, generator=g) * 5
    which = torch.randint(0, n_blobs, (P, N), generator=g)
    return base[which] + torch.randn(P, N, d, generator=g) * spread


def _nan_equal(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _brute_force_check(points, counts, centres, labels, inertia):
    P, N, _ = points.shape
    for p in range(P):
        n = int(counts[p])
        assert bool((labels[p, n:] == -1).all())
        if n == 0:
            assert bool(centres[p].isnan().all()) and float(inertia[p]) == 0.0
            continue
        live = ~centres[p].isnan().any(-1)
        assert int(live.sum()) == min(n, centres.shape[1])
        d2 = ((points[p, :n, None].double() - centres[p][None].double()) ** 2).sum(-1)
        d2[:, ~live] = float("inf")
        best = d2.min(-1).values
        chosen = d2.gather(1, labels[p, :n, None]).squeeze(1)
        assert bool((chosen <= best * (1 + 1e-5) + 1e-6).all()), "a label is not the nearest centre"
        torch.testing.assert_close(inertia[p].double(), best.sum(), rtol=1e-5, atol=1e-4)


def _labels_agree(points, centres, labels_a, labels_b):
    """Labels equal, except for points whose (float64) distances to the two centres differ < 1e-5 relative."""
    differ = labels_a != labels_b
    if not bool(differ.any()):
        return
    p, n = differ.nonzero(as_tuple=True)
    x = points[p, n].double()
    d_a = ((x - centres[p, labels_a[p, n]].double()) ** 2).sum(-1)
    d_b = ((x - centres[p, labels_b[p, n]].double()) ** 2).sum(-1)
    gap = (d_a - d_b).abs() / torch.maximum(d_a, d_b).clamp_min(1e-12)
    assert bool((gap <= 1e-5).all()), f"{int(differ.sum())} labels differ beyond distance near-ties"


INITS = ["k-means++", "first"]


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("d,k", [(2, 4), (5, 3), (3, 8)])
def test_kernel_matches_reference_on_blobs(init, d, k):
    P, N = 6, 90
    points = blobs(P, N, d, n_blobs=k, seed=d + k).to(DEVICE)
    counts = torch.tensor([90, 0, 1, k - 1, 37, 64], device=DEVICE)  # empty, single, K > count, irregular
    got = kmeans(points, counts, k, iters=50, seed=5, init=init, backend="triton")
    want = kmeans_reference(points, counts, k, iters=50, seed=5, init=init)
    assert got[0].shape == (P, k, d) and got[1].shape == (P, N) and got[2].shape == (P,)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64 and got[2].dtype == torch.float32
    _labels_agree(points, want[0], got[1], want[1])
    assert torch.equal(got[0].isnan(), want[0].isnan())
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-3)
    for out in (got, want):
        _brute_force_check(points.cpu(), counts.cpu(), *(t.cpu() for t in out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kmeanspp_init_is_bit_identical(dtype):
    points = (torch.rand(4, 75, 3, generator=torch.Generator().manual_seed(1)) * 500).to(DEVICE, dtype)
    counts = torch.tensor([75, 60, 5, 2], device=DEVICE)
    got = kmeans_triton(points, counts, 6, iters=0, seed=123)
    want = kmeans_reference(points, counts, 6, iters=0, seed=123)
    assert _nan_equal(got[0], want[0]), "k-means++ draws differ between kernel and reference"
    assert torch.equal(got[1], want[1])
    # every initial centre is one of the problem's valid points, and they are distinct here
    for p in range(4):
        n = int(counts[p])
        live = got[0][p][~got[0][p].isnan().any(-1)]
        hits = (live[:, None, :] == points[p, :n].float()[None]).all(-1).any(-1)
        assert bool(hits.all()) and live.unique(dim=0).shape[0] == live.shape[0]


def test_random_data_brute_force():
    """Overlapping data: labels may differ on near-ties between implementations, the invariants may not."""
    g = torch.Generator().manual_seed(2)
    points = torch.randn(5, 70, 3, generator=g).to(DEVICE)
    counts = torch.tensor([70, 33, 3, 1, 50], device=DEVICE)
    for fn in (kmeans_triton, kmeans_reference):
        out = fn(points, counts, 5, iters=30, seed=9)
        _brute_force_check(points.cpu(), counts.cpu(), *(t.cpu() for t in out))


def test_empty_cluster_keeps_its_centre():
    # init "first" with two identical first points: centre 1 duplicates centre 0 and loses every tie, so the
    # first update moves centre 0 to the mean of all points and leaves centre 1 where it was
    points = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [11.0, 0.0], [0.5, 0.0]]], device=DEVICE)
    counts = torch.tensor([5], device=DEVICE)
    for fn in (kmeans_triton, kmeans_reference):
        centres, labels, _ = fn(points, counts, 2, iters=1, init="first")
        assert centres[0, 1].tolist() == [0.0, 0.0]
        torch.testing.assert_close(centres[0, 0], points[0].mean(0))
        assert labels[0].tolist() == [1, 1, 0, 0, 1]  # final labels: nearest of the returned centres


def test_inertia_close_to_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    P, N, d, k = 6, 120, 2, 5
    points = blobs(P, N, d, n_blobs=k, seed=4, spread=3.0, sep=30.0).to(DEVICE)
    counts = torch.full((P,), N, device=DEVICE)
    _, _, inertia = kmeans(points, counts, k, iters=100, seed=0)
    for p in range(P):
        sk = sklearn_cluster.KMeans(n_clusters=k, n_init="auto", random_state=p).fit(points[p].cpu().numpy())
        assert float(inertia[p]) <= sk.inertia_ * 1.05, f"problem {p}: {float(inertia[p])} vs sklearn {sk.inertia_}"


def test_draws_are_counter_based():
    a = kmeans_draws(7, 5, 4)
    assert a.shape == (5, 4) and a.dtype == torch.int64
    assert bool(((a >= 0) & (a < 2**24)).all())
    assert torch.equal(a, kmeans_draws(7, 5, 4)) and torch.equal(a[:3, :2], kmeans_draws(7, 3, 2))
    assert not torch.equal(a, kmeans_draws(8, 5, 4))
    assert a[0].unique().numel() == a.shape[1] and bool((a == a[0]).all())  # same draws for every problem


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_result_does_not_depend_on_position_in_batch(backend):
    gen = torch.Generator().manual_seed(3)
    points = (torch.rand(3, 40, 2, generator=gen) * 100).to(DEVICE)
    counts = torch.tensor([40, 25, 33], device=DEVICE)
    centres, labels, inertia = kmeans(points, counts, 5, seed=1, backend=backend)
    for p in range(3):
        c1, l1, i1 = kmeans(points[p:p + 1], counts[p:p + 1], 5, seed=1, backend=backend)
        torch.testing.assert_close(c1[0], centres[p], equal_nan=True)
        assert torch.equal(l1[0], labels[p])


def test_bad_inputs_raise():
    pts = torch.zeros(2, 4, 2)
    with pytest.raises(ValueError, match="counts"):
        kmeans(pts, torch.tensor([5, 1]), 2)
    with pytest.raises(ValueError, match="counts"):
        kmeans(pts, torch.tensor([1.0, 1.0]), 2)
    with pytest.raises(ValueError, match="init"):
        kmeans(pts, torch.tensor([4, 1]), 2, init="random")
    with pytest.raises(ValueError, match="points"):
        kmeans(torch.zeros(4, 2), torch.tensor([4]), 2)


def _forbid_kernel(monkeypatch):
    module = sys.modules["refseg.kernels.clustering"]

    def boom(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run here")
    monkeypatch.setattr(module, "launch_kmeans", boom)


def test_kill_switch_and_guard(monkeypatch, caplog):
    points = blobs(2, 20, 2, 2).to(DEVICE)
    counts = torch.tensor([20, 11], device=DEVICE)
    want = kmeans_reference(points, counts, 2)
    _forbid_kernel(monkeypatch)
    with caplog.at_level("DEBUG", logger="refseg.kernels.dispatch"):
        monkeypatch.setenv("REFSEG_DISABLE_KMEANS", "1")
        got = kmeans(points, counts, 2)
        monkeypatch.delenv("REFSEG_DISABLE_KMEANS")
        kmeans(points.double(), counts, 2)       # dtype outside the kernel's support
        kmeans(points, counts, 65)               # K above the kernel's limit
    assert "REFSEG_DISABLE_KMEANS" in caplog.text and "float64" in caplog.text and "k=65" in caplog.text
    assert all(_nan_equal(a.float(), b.float()) for a, b in zip(got, want))
    monkeypatch.setenv("REFSEG_DISABLE_KMEANS", "1")
    with pytest.raises(KernelUnavailableError, match="REFSEG_DISABLE_KMEANS"):
        kmeans_triton(points, counts, 2)


def test_fake_tensor_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = torch.ops.refseg.kmeans(torch.empty(3, 40, 2), torch.empty(3, dtype=torch.int64), 8, 10, 0,
                                      "k-means++", "auto")
    assert [tuple(t.shape) for t in out] == [(3, 8, 2), (3, 40), (3,)]
    points = blobs(2, 12, 2, 2).to(DEVICE)
    counts = torch.tensor([12, 12], device=DEVICE)
    for backend in ("auto", "torch"):
        torch.library.opcheck(torch.ops.refseg.kmeans.default, (points, counts, 2, 20, 0, "k-means++", backend))
