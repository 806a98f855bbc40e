"""Launch configurations of the Triton kernels: one small table per kernel, chosen per dtype and shape.

How the table was checked: ``python -m refseg.kernels.compile_check --arch sm_80,sm_90`` compiles every
variant the pipeline can launch (see that module for the grid) with ``triton.compile`` for each architecture,
no GPU needed, and reads registers, spill bytes and shared memory from ``ptxas -v`` and the compiled kernel's
metadata. With these entries every variant compiles with zero spill bytes and shared memory under the
architecture's per-block limit (triton 3.8, the ptxas it ships); ``tests/test_kernel_compile.py`` re-checks
that in CI, so a Triton upgrade that makes an entry spill fails there. The entries are not tuned for speed
on a real card: that is ``bench/gpu_check.sh``'s job.

Why the entries look the way they do (measured with the compile check): with the default 4 warps a
64 x 64 score tile plus the running top-k lists needs more than 255 registers per thread and spills; 8 warps
halve the per-thread share. ``maxnreg=255`` (PTX ``.maxnreg``) lets ptxas use the whole register file: left
to itself it caps some 256-thread variants at 128 registers (two blocks per SM) and spills instead. fp32 inputs use exact ("ieee") products, whose 64 x 64 x 64 operand tiles also
cost 64 KB of shared memory, so fp32 takes 32-wide feature slices and one pipeline stage (with two, the
masked fp32 variants need more than 255 registers). The top-k merge is a loop rather than
unrolled, so k = 64 fits the same tiles (32-row tiles made ptxas cap the kernel at 128 registers and spill).

Under ``TRITON_INTERPRET=1`` (CPU tests) the interpreter ignores warps and stages; 32-wide tiles keep its
numpy loops short.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class MatchLaunch(NamedTuple):
    """Block sizes (tokens x tokens x features) and Triton launch options of the match kernel."""

    block_r: int
    block_t: int
    block_d: int
    num_warps: int
    num_stages: int
    maxnreg: int = 255


class KmeansLaunch(NamedTuple):
    """Rows per assignment step and Triton launch options of the k-means kernel."""

    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int = 255


# (input dtype, largest k) -> launch, first row whose k bound holds. fp16 and bf16 share rows.
MATCH_TABLE: dict[str, tuple[tuple[int, MatchLaunch], ...]] = {
    "fp32": ((64, MatchLaunch(64, 64, 32, 8, 1)),),
    "fp16": ((64, MatchLaunch(64, 64, 64, 8, 2)),),
}
MATCH_INTERPRETER = MatchLaunch(32, 32, 32, 4, 1)

# padded point count NP -> (block_n, num_warps); points are (x, y) so DP is 2 in the pipeline, and the
# row block shrinks as DP grows so that a (BLOCK_N, DP) tile stays <= 4096 values.
KMEANS_WARPS = ((1024, 4), (4096, 8))


def _dtype_row(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "fp16"


def match_launch(dtype: torch.dtype, k: int, on_gpu: bool = True) -> MatchLaunch:
    """The match kernel's launch for inputs of ``dtype`` keeping the ``k`` best matches.

    ``on_gpu=False`` gives the interpreter's configuration.
    """
    if not on_gpu:
        return MATCH_INTERPRETER
    for k_max, launch in MATCH_TABLE[_dtype_row(dtype)]:
        if k <= k_max:
            return launch
    raise ValueError(f"refseg.kernels: no match launch for k={k} (the kernel's limit is 64)")


def kmeans_launch(np_rows: int, dp: int, on_gpu: bool = True) -> KmeansLaunch:
    """The k-means kernel's launch for ``np_rows`` (padded N, a power of two) and padded dim ``dp``."""
    block_n = max(16, min(np_rows, 4096 // dp))
    if not on_gpu:
        return KmeansLaunch(block_n, 4, 1)
    for n_max, warps in KMEANS_WARPS:
        if np_rows <= n_max:
            return KmeansLaunch(block_n, warps, 1)
    raise ValueError(f"refseg.kernels: no k-means launch for N={np_rows} (the kernel's limit is 4096)")
