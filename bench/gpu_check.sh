#!/usr/bin/env bash
# refseg's GPU check: one command on a lent H100/H200 (no network; only what the image has: torch,
# triton, onnxruntime without a CUDA provider, no TensorRT). About 4-6 minutes on an H100, 7 at most.
#
#   bash bench/gpu_check.sh [--dry-run] [--out DIR] [--no-compile]
#
# Results go to $OUT when it is set, else to --out DIR, else ./gpu_check-<UTC time>; at most 8 files of at most
# 16 MiB, at most 2 folders deep (checked before the script ends):
#   summary.md    the headline table first: DINOv2-B@518 + SAM-B, sat preset, bf16 and fp32, batch 1 and 16,
#                 img/s, batch-1 latency, peak GPU MiB, per-stage ms; the research-style baseline and the
#                 ratio; the kernel rows (match fp16/bf16/fp32, k-means vs their torch references); then, when
#                 >= 90 s are left, SAM-B vs SAM 2.1 tiny / base_plus as the SAM stage (bench/bench_sam2.py)
#   results.json  every row with its numbers (python -m refseg.benchmark.headline)
#   card.txt      the card, CUDA, package versions, which exported backends can run here (and why not)
#   tests.txt     the GPU tests' summary (pytest -q), or why they did not run
#   log.txt       the last lines of every step's log
# Random checkpoints and full logs live in a temporary folder removed at the end. Nothing is installed: the
# checkout is made importable as `refseg` through a folder of links (no pip, no compiler, no network).
# Time on an H100, reasoned from FLOPs in docs/performance.md: setup < 10 s, GPU tests <= 150 s (timeout),
# headline rows ~60-120 s, compiled bf16 rows (inductor + CUDA graphs) only when >= 150 s of the budget remain.
# PYTHON (default python3) runs everything. --dry-run: the same steps on the CPU with tiny models (CI).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY=0
RESULT_DIR=""
COMPILE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) RESULT_DIR="$2"; shift ;;
    --no-compile) COMPILE=0 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
RESULT_DIR="${OUT:-${RESULT_DIR:-$PWD/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)}}"
mkdir -p "$RESULT_DIR"
RESULT_DIR="$(cd "$RESULT_DIR" && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/refseg-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
BUDGET=420   # seconds for the whole script (7 minutes)
STATUS=0
elapsed() { echo $(( $(date +%s) - START )); }
step() { echo "== $* ($(elapsed) s)"; }

step "1/5 setup: refseg importable from $ROOT"
mkdir -p "$WORK/site/refseg"
for entry in "$ROOT"/engine/*; do ln -s "$entry" "$WORK/site/refseg/$(basename "$entry")"; done
ln -sfn "$ROOT/kernels" "$WORK/site/refseg/kernels"
ln -sfn "$ROOT/export" "$WORK/site/refseg/export"
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import refseg, refseg.kernels, refseg.benchmark.headline" || { echo "gpu_check.sh: refseg does not import" >&2; exit 3; }

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  unset TRITON_INTERPRET
  HEADLINE=(--dry-run)
  BUDGET=840  # a shared CI CPU: no 7-minute rule, the tiny rows just have to finish
  TESTS=(tests/test_resample.py)
else
  "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
    echo "gpu_check.sh: no CUDA GPU visible to torch (use --dry-run on a CPU machine)" >&2; exit 3; }
  export TRITON_INTERPRET=0
  HEADLINE=(--device cuda)
  TESTS=(tests/test_kernel_match.py tests/test_kernel_kmeans.py tests/test_kernel_lowprecision.py
         tests/test_resample.py tests/test_postprocess.py tests/test_accelerator_path.py)
fi
if [ "$COMPILE" = 1 ] && [ "$DRY" = 0 ]; then HEADLINE+=(--compile); fi

step "2/5 card"
"$PY" - >"$RESULT_DIR/card.txt" <<'EOF'
import importlib.metadata as md, importlib.util, torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"card: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs), CUDA {torch.version.cuda}")
else:
    print(f"card: none (CPU dry run, {torch.get_num_threads()} threads)")
for pkg in ("torch", "triton", "onnxruntime", "onnxruntime-gpu", "tensorrt", "pytest", "segment-anything"):
    try:
        print(f"{pkg}: {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg}: absent")
# exported backends: decided here, before anything is exported
if importlib.util.find_spec("onnxruntime") is None:
    print("exported rows: onnxruntime skipped (not installed)")
else:
    import onnxruntime
    providers = onnxruntime.get_available_providers()
    ok = "CUDAExecutionProvider" in providers
    print(f"exported rows: onnxruntime {'could run' if ok else 'skipped'} (providers: {', '.join(providers)})")
print("exported rows: tensorrt " + ("could run" if importlib.util.find_spec("tensorrt") else "skipped (not installed)"))
EOF
cat "$RESULT_DIR/card.txt"

step "3/5 GPU tests"
if "$PY" -c "import pytest" 2>/dev/null; then
  (cd "$ROOT" && timeout 150 "$PY" -m pytest "${TESTS[@]}" -q -ra -p no:cacheprovider) >"$WORK/tests.log" 2>&1 || STATUS=1
  tail -n 40 "$WORK/tests.log" >"$RESULT_DIR/tests.txt"
else
  echo "pytest is not installed on this host: the GPU tests did not run" >"$RESULT_DIR/tests.txt"
fi
tail -n 3 "$RESULT_DIR/tests.txt"

step "4/5 headline rows"
LEFT=$(( BUDGET - $(elapsed) - 20 ))
# the module skips the compiled rows unless >= 150 s of this budget remain when it reaches them
timeout "$LEFT" "$PY" -m refseg.benchmark.headline --out "$RESULT_DIR" --budget "$LEFT" "${HEADLINE[@]}" \
  >"$WORK/headline.log" 2>&1 || STATUS=1
tail -n 5 "$WORK/headline.log"

step "4b/5 SAM stage rows: SAM-B, SAM 2.1 tiny and base_plus (bench/bench_sam2.py), if time is left"
LEFT=$(( BUDGET - $(elapsed) - 20 ))
if [ "$DRY" = 1 ]; then
  echo "SAM stage rows: not in the dry run (full-size models)" >"$WORK/sam2.log"
elif [ "$LEFT" -lt 90 ]; then
  echo "SAM stage rows: skipped, ${LEFT} s left" >"$WORK/sam2.log"
else
  # random weights under $WORK (removed by the trap even after a timeout); rows appended to summary.md as
  # they are measured; a failure here is reported, it does not fail the check
  { echo; echo "SAM stage (sat, DINOv2-S/14 @ 448, bf16 auto precision, random weights, 4 synthetic or Kvasir targets):"
    TMPDIR="$WORK" timeout $(( LEFT < 150 ? LEFT : 150 )) "$PY" "$ROOT/bench/bench_sam2.py" --device cuda \
      --images 4 --image-size 448 2>"$WORK/sam2.log" || echo "(SAM stage rows stopped: see log.txt)"
  } >>"$RESULT_DIR/summary.md"
fi
tail -n 3 "$WORK/sam2.log"

step "5/5 summary"
{
  for log in "$WORK"/tests.log "$WORK"/headline.log "$WORK"/sam2.log; do
    [ -f "$log" ] && { echo "---- $(basename "$log") (last 150 lines)"; tail -n 150 "$log"; }
  done
} >"$RESULT_DIR/log.txt"
{
  echo
  echo "GPU check: $( [ "$STATUS" = 0 ] && echo OK || echo FAILED ) in $(elapsed) s on $(head -n 1 "$RESULT_DIR/card.txt")"
  echo "tests: $(tail -n 1 "$RESULT_DIR/tests.txt")"
} >>"$RESULT_DIR/summary.md"
# the result folder's limits: <= 8 files, each <= 16 MiB, <= 2 folders deep
"$PY" - "$RESULT_DIR" <<'EOF' || STATUS=1
import pathlib, sys
root = pathlib.Path(sys.argv[1])
files = [p for p in root.rglob("*") if p.is_file()]
bad = [f"{p} is {p.stat().st_size} bytes" for p in files if p.stat().st_size > 16 * 2**20]
bad += [f"{p} is too deep" for p in files if len(p.relative_to(root).parts) > 3]
if len(files) > 8:
    bad.append(f"{len(files)} files (at most 8)")
print("result folder: " + ("; ".join(bad) if bad else f"{len(files)} files within the limits"))
sys.exit(1 if bad else 0)
EOF
cat "$RESULT_DIR/summary.md"
exit "$STATUS"
