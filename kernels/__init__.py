"""Fused kernels of the prompt stage: batched token matching and batched small k-means.

Each kernel is a Triton program beside a plain-torch reference with the same signature; the public
functions pick the kernel when it can run and fall back to the reference otherwise (reason logged once):

- :func:`match` / :func:`match_reference` / :func:`match_triton` -> :class:`MatchResult`
- :func:`kmeans` / :func:`kmeans_reference` / :func:`kmeans_triton` -> (centres, labels, inertia)

Both are registered as ``torch.library`` custom ops (``torch.ops.refseg.match``, ``torch.ops.refseg.kmeans``)
with fake implementations, so ``torch.compile`` traces through them. Kill switches: ``REFSEG_DISABLE_MATCH=1``,
``REFSEG_DISABLE_KMEANS=1``. Triton is optional (``pip install 'refseg[gpu]'``); on the CPU the kernels run
only under ``TRITON_INTERPRET=1`` (tests).
"""
from .dispatch import KernelUnavailableError
from .clustering import kmeans, kmeans_draws, kmeans_reference, kmeans_triton
from .similarity import MatchResult, match, match_reference, match_triton

__all__ = ["KernelUnavailableError", "MatchResult", "kmeans", "kmeans_draws", "kmeans_reference",
           "kmeans_triton", "match", "match_reference", "match_triton"]
