"""SAM attention forms side by side: fused (rel-pos folded into q/k) vs bias (SDPA + additive bias).

    python bench/bench_attention.py                      # CPU (or the GPU when there is one), SAM-B shapes
    python bench/bench_attention.py --model vit_h --device cuda --repeats 20
    python bench/bench_attention.py --encoder --linear   # + whole encoder per form, + CPU GEMM paths

Attention rows, one per (block, dtype, form): the attention core of one SAM block on random inputs (q, k, v
from ``randn``, rel-pos tables of scale 0.02 like trained ones), i.e. what differs between the forms; the
qkv and output projections are the same in both and are left out. Blocks: ``global`` (one image, the 64x64
grid, 4096 tokens) and ``windowed`` (the 25 14x14 windows of one image). Forms:

* ``fused``: :func:`refseg.models.sam_attention.fused_rel_pos_attention` (no mask, no (N, N) tensor);
* ``bias``: the rel-pos bias as an SDPA mask (global: built in row chunks).

Columns: best and median wall time over ``--repeats`` interleaved rounds (forms alternate within a round,
so machine load hits them alike), peak memory above the inputs (CPU: growth of the peak RSS over one call,
measured in a fresh process per row, Linux only; CUDA: ``max_memory_allocated``), and the max abs
difference from the fp32 ``bias`` result of the same inputs.

``--encoder`` adds the whole image encoder (random weights, one 1024² image) per form and dtype, with the
max abs difference of its embedding from the fp32 bias form's. ``--linear`` adds the CPU's linear-layer
paths (oneDNN's fused GEMM + bias (+ GELU) vs ``F.linear``) on the ViT-B shapes, the numbers behind
:mod:`refseg.models.onednn`'s rule. Timings on a shared machine are noisy: compare rows of one run.
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

from refseg.models import onednn
from refseg.models.sam import SAM_SPECS, random_sam
from refseg.models.sam_attention import (ATTENTION_ENV, CHUNKED_ATTENTION_MIN_TOKENS, attention_in_row_chunks,
                                         decomposed_rel_pos_bias, decomposed_rel_pos_terms,
                                         fused_rel_pos_attention)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMS = ("fused", "bias")
# (tokens, in, out, activation) of SAM-B's linear layers on one 1024² image (windowed blocks pad to 4900)
LINEAR_SHAPES = ((4900, 768, 2304, "none"), (4096, 768, 3072, "gelu"), (4096, 3072, 768, "none"))


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


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of every function, ``repeats`` rounds, the functions alternating in each round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


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
    """Print the peak RSS growth of one call (run in a fresh process by :func:`peak_mib`; writing 5 to
    /proc/self/clear_refs resets the peak, VmHWM)."""
    block, dtype, form = args.child
    tensors, size = inputs(args.model, block, torch.device("cpu"), DTYPES[dtype])
    with torch.inference_mode():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        run_form(form, *tensors, size)
    print((_status_bytes("VmHWM") - before) / 2 ** 20)


def _row(rows: list, text: str, **row) -> None:
    rows.append(row)
    print(text, flush=True)


def attention_rows(args, device: torch.device, rows: list) -> None:
    blocks = [b for b in args.blocks.split(",") if b]
    if blocks:
        print(f"{'block':9} {'dtype':5} {'form':7} {'best ms':>9} {'median ms':>10} {'peak MiB':>9} {'max err':>9}")
    for block in blocks:
        ref_inputs, size = inputs(args.model, block, device, torch.float32)
        with torch.inference_mode():
            reference = run_form("bias", *ref_inputs, size).float()
        for dtype in args.dtypes.split(","):
            tensors, _ = inputs(args.model, block, device, DTYPES[dtype])
            with torch.inference_mode():  # first calls: warm-up, and each form's error
                errors = {f: float((run_form(f, *tensors, size).float() - reference).abs().max()) for f in FORMS}
                times = interleaved({f: (lambda f=f: run_form(f, *tensors, size)) for f in FORMS},
                                    args.repeats, device)
            for f in FORMS:
                best, median = min(times[f]) * 1e3, statistics.median(times[f]) * 1e3
                peak = peak_mib(args, block, dtype, f)
                _row(rows, f"{block:9} {dtype:5} {f:7} {best:9.1f} {median:10.1f} {peak:9.1f} {errors[f]:9.2e}",
                     kind="attention", block=block, dtype=dtype, form=f, best_ms=best, median_ms=median,
                     peak_mib=peak, max_err=errors[f])


def encoder_rows(args, device: torch.device, rows: list) -> None:
    print(f"\n{'encoder':9} {'dtype':5} {'form':7} {'best s':>9} {'median s':>10} {'max err':>9}")
    encoder = random_sam(args.model).image_encoder.eval().to(device)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)).to(device)

    def run(form: str, model, images):
        os.environ[ATTENTION_ENV] = form
        try:
            return model(images)
        finally:
            del os.environ[ATTENTION_ENV]

    with torch.inference_mode():
        reference = run("bias", encoder, x).float()
        for dtype in args.dtypes.split(","):
            model, images = encoder.to(DTYPES[dtype]), x.to(DTYPES[dtype])
            errors = {f: float((run(f, model, images).float() - reference).abs().max()) for f in FORMS}
            times = interleaved({f: (lambda f=f: run(f, model, images)) for f in FORMS}, args.repeats, device)
            for f in FORMS:
                best, median = min(times[f]), statistics.median(times[f])
                _row(rows, f"{args.model:9} {dtype:5} {f:7} {best:9.2f} {median:10.2f} {errors[f]:9.2e}",
                     kind="encoder", dtype=dtype, form=f, best_s=best, median_s=median, max_err=errors[f])
            encoder = encoder.float()


def linear_rows(args, rows: list) -> None:
    print(f"\n{'linear (tokens x in x out)':30} {'dtype':5} {'oneDNN ms':>10} {'F.linear ms':>12} {'ratio':>6}")
    gen = torch.Generator().manual_seed(0)
    for dtype in args.dtypes.split(","):
        if not onednn.primitive_runs(DTYPES[dtype]):
            print(f"{'':30} {dtype:5} oneDNN's {dtype} primitive does not run on this CPU")
            continue
        for n, k, m, act in LINEAR_SHAPES:
            x, w, b = (t.to(DTYPES[dtype]) for t in (torch.randn(n, k, generator=gen),
                                                    torch.randn(m, k, generator=gen) * k ** -0.5,
                                                    torch.randn(m, generator=gen)))
            fns = {"onednn": lambda: onednn._onednn(x, w, b, act), "torch": lambda: onednn._reference(x, w, b, act)}
            with torch.inference_mode():
                for fn in fns.values():
                    fn()
                times = interleaved(fns, args.repeats, torch.device("cpu"))
            a, r = min(times["onednn"]) * 1e3, min(times["torch"]) * 1e3
            label = f"{n}x{k}x{m}{' +GELU' if act == 'gelu' else ''}"
            _row(rows, f"{label:30} {dtype:5} {a:10.1f} {r:12.1f} {a / r:6.2f}", kind="linear", shape=label,
                 dtype=dtype, onednn_ms=a, torch_ms=r)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_b", choices=sorted(n for n in SAM_SPECS if n != "medsam"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--blocks", default="global,windowed", help="attention rows ('' for none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--encoder", action="store_true", help="also time the whole image encoder per form")
    parser.add_argument("--linear", action="store_true", help="also time the CPU's linear-layer paths")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"# {args.model}, device {device} ({where}), torch {torch.__version__}, {args.repeats} rounds")
    rows: list[dict] = []
    attention_rows(args, device, rows)
    if args.encoder:
        encoder_rows(args, device, rows)
    if args.linear and device.type == "cpu":
        linear_rows(args, rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "device": str(device), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
