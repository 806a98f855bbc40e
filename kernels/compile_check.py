"""Compile every launchable Triton kernel variant for real GPUs, without a GPU, and report its resources.

``python -m refseg.kernels.compile_check [--arch sm_80,sm_90] [--json FILE] [--all]``

For each architecture the kernels are compiled with ``triton.compile`` for a ``GPUTarget("cuda", cc, 32)``,
specialised exactly as a launch on that GPU would specialise them: the grid, arguments, constexprs and
launch options come from the kernels' own ``*_launch_args`` functions (with ``on_gpu=True``), and the
argument specialisation (pointer alignment, integer divisibility) from Triton's own JIT binder. The PTX
is then assembled with the ``ptxas`` that ships in the triton wheel, with the flags Triton uses, and
``ptxas -v`` gives registers and spill bytes; shared memory is the compiled kernel's ``metadata.shared``
(Triton allocates it dynamically, so ptxas does not see it).

Variant grid (what the pipeline can launch):

- match: fp32 / fp16 / bf16 inputs x cosine / Euclidean x k in {1, 5, 64} x without / with validity masks
  (``--all`` adds the one-sided masks) x D in {384, 768, 1024, 1536}, at Nr = Nt = 1369 tokens. D is a
  runtime argument and all four values are multiples of 16, so they share one binary: each row lists the
  D values it covers.
- k-means: N in {64, 512, 1600, 4096} x K in {8, 64} (``--all``: every power of two N in 16..4096 and
  K in {2, 4, 8, 16, 32, 64}) x k-means++ / first-points init, on (x, y) points (d = 2). Registers grow
  with the padded N and K, so the default grid holds the largest of each.

``--ci`` keeps a representative subset (CI time, about a minute for two architectures): the variants that
needed the most registers in the full run (fp32 Euclidean and fp16 cosine with masks and k = 64), the
pipeline's default launch (bf16 cosine k = 1 without masks) and the largest k-means (N = 4096, K = 64).
The default grid takes about 12 CPU-minutes for two architectures (compiling fp32 "ieee" products is slow).

Exit status 1 when any variant spills (stores or loads) or needs more shared memory per block than the
architecture allows, 2 when the compiler itself fails. Needs triton (``pip install 'refseg[gpu]'``); runs
on any machine. ``TRITON_INTERPRET`` is forced to 0 for this process (the interpreter does not compile).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch

log = logging.getLogger(__name__)

# Largest dynamic shared memory per block (bytes), from the CUDA programming guide's compute capability table.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
MAX_REGISTERS = 255
MATCH_DIMS = (384, 768, 1024, 1536)
MATCH_TOKENS = 1369  # a 37 x 37 DINOv2 grid (518 px / 14)
KMEANS_N, KMEANS_K = (64, 512, 1600, 4096), (8, 64)
KMEANS_N_ALL, KMEANS_K_ALL = tuple(2 ** i for i in range(4, 13)), (2, 4, 8, 16, 32, 64)


@dataclasses.dataclass
class Row:
    """One compiled variant and what it costs on one architecture."""

    arch: str
    kernel: str
    variant: str
    launch: str
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    shared_limit: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_stores == 0 and self.spill_loads == 0 \
            and self.shared <= self.shared_limit and 0 <= self.registers <= MAX_REGISTERS


def _parse_arch(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"(?:sm_?)?(\d+)a?", item.strip())
        if not m or int(m.group(1)) not in SHARED_LIMIT:
            raise argparse.ArgumentTypeError(f"unknown architecture {item!r}; use sm_XX with XX in "
                                              f"{sorted(SHARED_LIMIT)}")
        out.append(int(m.group(1)))
    return out


CI_MATCH = {("float32", False, 64, True), ("float16", True, 64, True), ("bfloat16", True, 1, False)}
CI_KMEANS = {(4096, 64, "k-means++")}


def match_variants(grid: str):
    """(description, D values, launch-args thunk) for every match variant of ``grid`` (ci / default / all)."""
    from .similarity import match_launch_args
    masks = [(False, False), (True, True)] + ([(True, False), (False, True)] if grid == "all" else [])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for cosine in (True, False):
            for k in (1, 5, 64):
                for rm, tm in masks:
                    if grid == "ci" and (str(dtype)[6:], cosine, k, rm) not in CI_MATCH:
                        continue
                    name = (f"{str(dtype).replace('torch.', '')} {'cosine' if cosine else 'euclidean'} k={k} "
                            f"masks={'ref' if rm else '-'}/{'tgt' if tm else '-'}")

                    def thunk(D, dtype=dtype, cosine=cosine, k=k, rm=rm, tm=tm):
                        ref = torch.empty(1, MATCH_TOKENS, D, dtype=dtype)
                        tgt = torch.empty(1, MATCH_TOKENS, D, dtype=dtype)
                        rv = torch.ones(1, MATCH_TOKENS, dtype=torch.bool) if rm else None
                        tv = torch.ones(1, MATCH_TOKENS, dtype=torch.bool) if tm else None
                        return match_launch_args(ref, tgt, rv, tv, cosine, k, on_gpu=True)
                    yield name, MATCH_DIMS, thunk


def kmeans_variants(grid: str):
    from .clustering import kmeans_launch_args
    for n in (KMEANS_N_ALL if grid == "all" else KMEANS_N):
        for k in (KMEANS_K_ALL if grid == "all" else KMEANS_K):
            for init in ("k-means++", "first"):
                if grid == "ci" and (n, k, init) not in CI_KMEANS:
                    continue
                def thunk(_dim, n=n, k=k, init=init):
                    points = torch.empty(1, n, 2)
                    counts = torch.full((1,), n, dtype=torch.int64)
                    return kmeans_launch_args(points, counts, k, 100, 0, init, on_gpu=True)
                yield f"N={n} K={k} init={init}", (2,), thunk


class _Compiler:
    """Compiles one JIT kernel for one target as a real launch would specialise it."""

    def __init__(self, kernel, capability: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
        if not isinstance(kernel, JITFunction):
            raise RuntimeError(f"{kernel!r} is not a compilable Triton JIT function (TRITON_INTERPRET was 1 "
                               f"when the kernels were first built in this process)")
        self.kernel = kernel
        self.capability = capability
        self.target = GPUTarget("cuda", capability, 32)
        self.backend = make_backend(self.target)
        self.binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)

    def key_and_compile(self, args, kwargs):
        bound, specialization, options = self.binder(*args, **kwargs)
        options, signature, constexprs, attrs = self.kernel._pack_args(self.backend, kwargs, bound,
                                                                        specialization, options)
        key = repr((sorted(signature.items()), sorted(constexprs.items(), key=str), sorted(attrs.items()),
                    sorted(vars(options).items(), key=str)))
        return key, lambda: self._compile(signature, constexprs, attrs, options)

    def _compile(self, signature, constexprs, attrs, options):
        import triton
        from triton.compiler import ASTSource
        src = ASTSource(self.kernel, signature, constexprs, attrs)
        return triton.compile(src, target=self.target, options=vars(options))


def _ptxas_usage(ptx: str, capability: int, fp_fusion: bool) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory(prefix="refseg-ptxas-") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(tmp, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}): {text.strip()[-800:]}")
    return parse_ptxas_log(text)


def parse_ptxas_log(text: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from a ``ptxas -v`` log of one kernel."""
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None:
        raise RuntimeError(f"could not read the register count from ptxas -v: {text.strip()[-400:]}")
    return int(regs.group(1)), int(spills.group(1)) if spills else 0, int(spills.group(2)) if spills else 0


def _launch_text(kwargs: dict) -> str:
    """e.g. ``blocks 64x64x32 w8 s2 r255 KP=2``: block sizes, warps, stages, register cap, padded k."""
    blocks = "x".join(str(kwargs[k]) for k in ("BLOCK_R", "BLOCK_T", "BLOCK_D", "BLOCK_N") if k in kwargs)
    extra = " ".join(f"{k}={kwargs[k]}" for k in ("KP", "NP") if k in kwargs)
    return f"blocks {blocks} w{kwargs['num_warps']} s{kwargs['num_stages']} r{kwargs.get('maxnreg') or '-'} {extra}"


def run_check(capabilities: list[int], grid: str = "default", kernels: tuple[str, ...] = ("match", "kmeans")
              ) -> list[Row]:
    """Compile the variant grid for each capability; one :class:`Row` per (architecture, binary)."""
    os.environ["TRITON_INTERPRET"] = "0"
    from . import clustering, similarity
    builders = {"match": (similarity._build_match_kernel, match_variants),
                "kmeans": (clustering._build_kmeans_kernel, kmeans_variants)}
    rows: list[Row] = []
    for cc in capabilities:
        arch = f"sm_{cc}"
        for name in kernels:
            build, variants = builders[name]
            compiler = _Compiler(build(), cc)
            seen: dict[str, Row] = {}
            for variant, dims, thunk in variants(grid):
                dims_seen = []
                for dim in dims:
                    _grid, args, kwargs, _out = thunk(dim)
                    key, compile_fn = compiler.key_and_compile(args, kwargs)
                    if key in seen:  # an earlier D (or variant) produced this very binary
                        dims_seen.append(dim)
                        continue
                    row = Row(arch, name, variant, _launch_text(kwargs), shared_limit=SHARED_LIMIT[cc])
                    t0 = time.perf_counter()
                    try:
                        compiled = compile_fn()
                        row.shared = int(compiled.metadata.shared)
                        row.registers, row.spill_stores, row.spill_loads = _ptxas_usage(
                            compiled.asm["ptx"], cc, bool(kwargs.get("enable_fp_fusion", True)))
                    except Exception as exc:  # report the failing variant, keep checking the others
                        row.error = f"{type(exc).__name__}: {str(exc).strip()[-600:]}"
                    row.seconds = time.perf_counter() - t0
                    seen[key] = row
                    rows.append(row)
                    dims_seen.append(dim)
                    log.info("%s %s %s: %s", arch, name, variant, "ok" if row.ok else "FAIL")
                if name == "match":
                    rows_for = [r for r in rows if r.arch == arch and r.variant == variant]
                    for r in rows_for:
                        r.variant = f"{variant} D={'/'.join(map(str, dims_seen))}"
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'arch':6} {'kernel':6} {'variant':52} {'launch':36} {'regs':>4} {'spill st/ld':>11} " \
           f"{'shared':>13} {'s':>5}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        status = "ok" if r.ok else ("ERROR " + r.error.splitlines()[0][:80] if r.error else "FAIL")
        lines.append(f"{r.arch:6} {r.kernel:6} {r.variant:52} {r.launch:36} {r.registers:>4} "
                     f"{f'{r.spill_stores}/{r.spill_loads}':>11} {f'{r.shared}/{r.shared_limit}':>13} "
                     f"{r.seconds:5.1f}  {status}")
    bad = sum(not r.ok for r in rows)
    lines.append(f"{len(rows)} binaries, {bad} failing (spills, shared memory over the limit, or errors)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refseg.kernels.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_parse_arch, default=[80, 90],
                        help="comma-separated architectures, e.g. sm_80,sm_90 (default)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="the full grid (one-sided masks, every k-means size)")
    group.add_argument("--ci", action="store_true", help="the representative subset CI runs (see the module doc)")
    parser.add_argument("--kernel", choices=("match", "kmeans"), action="append",
                        help="check only this kernel (repeatable; default both)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .dispatch import triton_reason
    if triton_reason():
        print(triton_reason(), file=sys.stderr)
        return 2
    grid = "all" if args.all else "ci" if args.ci else "default"
    rows = run_check(args.arch, grid, tuple(args.kernel or ("match", "kmeans")))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([dict(dataclasses.asdict(r), ok=r.ok) for r in rows], f, indent=1)
    if any(r.error for r in rows):
        return 2
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
