"""SAM attention forms side by side: fused (rel-pos folded into q/k) vs bias (SDPA + additive bias).

    python bench/bench_attention.py                      # CPU (or the GPU when there is one), SAM-B shapes
    python bench/bench_attention.py --model vit_h --device cuda --repeats 20

One row per (block, dtype, form): the attention core of one SAM block on random inputs (q, k, v from
``randn``, rel-pos tables of scale 0.02 like trained ones, x0.5 per step), i.e. what differs between the
forms; the qkv and output projections are the same in all and are left out. Blocks: ``global`` (one image,
the 64x64 grid, 4096 tokens) and ``windowed`` (the 25 14x14 windows of one image). Forms:

* ``fused``: :func:`refseg.models.sam_attention.fused_rel_pos_attention` (no mask, no (N, N) tensor);
* ``bias``: the rel-pos bias as an SDPA mask (global: built in row chunks).

Columns: best and median wall time over ``--repeats`` interleaved rounds (forms alternate within a round,
so machine load hits them alike), peak memory above the inputs (CPU: growth of the peak RSS over one call,
measured in a fresh process per row; CUDA: ``max_memory_allocated``), and the max abs difference from the
fp32 ``bias`` result of the same inputs. Timings on a shared machine are noisy: compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from refseg.models.sam import SAM_SPECS
from refseg.models.sam_attention import (CHUNKED_ATTENTION_MIN_TOKENS, attention_in_row_chunks,
                                         decomposed_rel_pos_bias, decomposed_rel_pos_terms,
                                         fused_rel_pos_attention)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMS = ("fused", "bias")


def inputs(model: str, block: str, device: torch.device, dtype: torch.dtype):
    """q, k, v (B, heads, N, C), tables and the grid of one block of ``model`` at 1024²."""
    spec = SAM_SPECS[model]
    heads, head_dim = spec.num_heads, spec.embed_dim // spec.num_heads
    side, batch = (64, 1) if block == "global" else (14, 25)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, side * side, head_dim, generator=gen) for _ in range(3))
    tables = [torch.randn(2 * side - 1, head_dim, generator=gen) * 0.02 for _ in range(2)]
    return [t.to(device, dtype) for t in (q, k, v, *tables)], (side, side)


def run_form(form: str, q, k, v, rel_pos_h, rel_pos_w, size) -> torch.Tensor:
    """One attention core in ``form`` (what ``Attention.forward`` runs between its projections)."""
    if form == "fused":
        return fused_rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, size, size)
    if size[0] * size[1] > CHUNKED_ATTENTION_MIN_TOKENS:  # global: the bias in row chunks
        rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, size, size)
        return attention_in_row_chunks(q, k, v, rel_h, rel_w)
    bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, size, size)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_mib(args, block: str, dtype: str, form: str) -> float:
    """Peak memory of one call above its inputs, in MiB (CPU: in a fresh child process)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        tensors, size = inputs(args.model, block, device, DTYPES[dtype])
        run_form(form, *tensors, size)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_form(form, *tensors, size)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    cmd = [sys.executable, __file__, "--model", args.model, "--device", "cpu", "--child", block, dtype, form]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def child(args) -> None:
    """Print the peak RSS growth of one call (run in a fresh process by :func:`peak_mib`; Linux only:
    writing 5 to /proc/self/clear_refs resets the peak, VmHWM)."""
    block, dtype, form = args.child
    tensors, size = inputs(args.model, block, torch.device("cpu"), DTYPES[dtype])
    with torch.inference_mode():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        run_form(form, *tensors, size)
    print((_status_bytes("VmHWM") - before) / 2 ** 20)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_b", choices=sorted(n for n in SAM_SPECS if n != "medsam"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--blocks", default="global,windowed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    device = torch.device(args.device)
    print(f"# {args.model} attention core, device {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, {args.repeats} rounds")
    print(f"{'block':9} {'dtype':5} {'form':7} {'best ms':>9} {'median ms':>10} {'peak MiB':>9} {'max err':>9}")
    rows = []
    for block in args.blocks.split(","):
        ref_inputs, size = inputs(args.model, block, device, torch.float32)
        with torch.inference_mode():
            reference = run_form("bias", *ref_inputs, size).float()
        for dtype in args.dtypes.split(","):
            tensors, _ = inputs(args.model, block, device, DTYPES[dtype])
            forms = list(FORMS)
            times: dict[str, list[float]] = {f: [] for f in forms}
            errors = {}
            with torch.inference_mode():
                for f in forms:  # warm-up, and the error of each form
                    errors[f] = float((run_form(f, *tensors, size).float() - reference).abs().max())
                for _ in range(args.repeats):
                    for f in forms:
                        _sync(device)
                        start = time.perf_counter()
                        run_form(f, *tensors, size)
                        _sync(device)
                        times[f].append(time.perf_counter() - start)
            for f in forms:
                row = dict(block=block, dtype=dtype, form=f, best_ms=min(times[f]) * 1e3,
                           median_ms=statistics.median(times[f]) * 1e3,
                           peak_mib=peak_mib(args, block, dtype, f), max_err=errors[f])
                rows.append(row)
                print(f"{block:9} {dtype:5} {f:7} {row['best_ms']:9.1f} {row['median_ms']:10.1f} "
                      f"{row['peak_mib']:9.1f} {row['max_err']:9.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "device": str(device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
