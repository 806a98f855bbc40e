#!/usr/bin/env bash
# One prepared GPU check for refseg (target: under 8 minutes on one CUDA GPU).
#
#   bash bench/gpu_check.sh [--dry-run] [--out DIR]
#
# On a machine with a CUDA GPU and torch, triton and onnxruntime installed (no network, no TensorRT needed):
#   1. installs this checkout without network access (pip --no-deps --no-build-isolation --no-index -e .)
#      unless `import refseg` already resolves to it;
#   2. records the card (name, capability, memory, driver, package versions)  -> DIR/card.txt
#   3. runs the GPU tests (kernels vs references, backends)                     -> DIR/tests.xml, tests.log
#   4. kernel benchmarks vs their torch references: match at batches 1/16/32/64 of 1369 x 1369 x 768 fp16
#      pairs, k-means at 1/16/64 problems of 1600 points (bench/bench_kernels.py) -> DIR/kernels.json
#   5. `refseg bench --quick` on the GPU (random weights, time budget)           -> DIR/bench/
#   6. prints the card's name and a one-screen summary                          -> DIR/summary.txt
# --dry-run runs the same steps on the CPU at CPU sizes (the benchmarks pick small sizes without a GPU,
# the test step runs the kernel tests' quick subset, the bench a 112 px pipeline), as CI does.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$ROOT/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
START=$(date +%s)
STATUS=0
step() { echo "== $* ($(( $(date +%s) - START )) s)"; }

step "1/6 install"
if ! "$PY" -c "import refseg, pathlib, sys; sys.exit(pathlib.Path(refseg.__file__).resolve().parent != pathlib.Path('$ROOT/engine').resolve())" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" >"$OUT/install.log" 2>&1
fi

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  unset TRITON_INTERPRET
  DEVICE=cpu
  TESTS=(tests/test_kernel_layout.py tests/test_kernel_match.py -k "bad_inputs or kill_switch or guard or fake_tensor")
  # a small random DINOv2 ViT-S/14 checkpoint (the bench writes random SAM ViT-B weights itself)
  "$PY" - "$OUT/checkpoints" <<'EOF2'
import sys, pathlib, torch
from refseg.models.dinov2 import DINOV2_SPECS, DinoVisionTransformer, init_random_ as init_d
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
d = DinoVisionTransformer(DINOV2_SPECS["vits14"]); init_d(d, seed=0)
torch.save(d.state_dict(), out / "dinov2_vits14_pretrain.pth")
EOF2
  BENCH=(--quick -d cpu --image-size 112 --budget 5 --images 1 --repeats 1 --stream-batches 1 --no-baseline --backends torch-fp32 --threads 1
         --dinov2-checkpoint "$OUT/checkpoints/dinov2_vits14_pretrain.pth")
  export REFSEG_BENCH_SMOKE=1  # bench_kernels.py: batch 1 only
  KBENCH=(-k "torch_reference")
else
  "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
    echo "gpu_check.sh: no CUDA GPU visible to torch (use --dry-run on a CPU machine)" >&2; exit 3; }
  export TRITON_INTERPRET=0
  DEVICE=cuda
  TESTS=(tests/test_kernel_match.py tests/test_kernel_kmeans.py tests/test_kernel_lowprecision.py
         tests/test_backend_parity.py tests/test_tensorrt.py tests/test_matching.py)
  BENCH=(--quick -d cuda --budget 150)
  KBENCH=()
fi

step "2/6 card"
"$PY" - >"$OUT/card.txt" <<'EOF'
import importlib.metadata as md, torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"card: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs), CUDA {torch.version.cuda}")
else:
    print(f"card: none (CPU dry run, {torch.get_num_threads()} threads)")
for pkg in ("torch", "triton", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
    try:
        print(f"{pkg}: {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg}: absent")
EOF
cat "$OUT/card.txt"

step "3/6 tests"
"$PY" -m pytest "${TESTS[@]}" -q -ra -p no:cacheprovider --junitxml "$OUT/tests.xml" >"$OUT/tests.log" 2>&1 || STATUS=1
tail -n 3 "$OUT/tests.log"

step "4/6 kernel benchmarks"
"$PY" -m pytest bench/bench_kernels.py "${KBENCH[@]}" -q -p no:cacheprovider --benchmark-only \
  --benchmark-json "$OUT/kernels.json" >"$OUT/kernels.log" 2>&1 || STATUS=1
tail -n 2 "$OUT/kernels.log"

step "5/6 refseg bench"
"$PY" -m refseg.cli bench "${BENCH[@]}" -o "$OUT/bench" >"$OUT/bench.log" 2>&1 || STATUS=1
tail -n 4 "$OUT/bench.log"

step "6/6 summary"
"$PY" - "$OUT" "$STATUS" "$(( $(date +%s) - START ))" >"$OUT/summary.txt" <<'EOF'
import json, pathlib, re, sys
out, status, wall = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
lines = [(out / "card.txt").read_text().splitlines()[0]]
log = (out / "tests.log").read_text().strip().splitlines()
lines.append("tests: " + (log[-1] if log else "no output"))
kj = out / "kernels.json"
if kj.is_file():
    rows = json.loads(kj.read_text())["benchmarks"]
    lines.append(f"kernel benchmarks ({len(rows)}), mean ms:")
    for b in rows:
        lines.append(f"  {b['name'][:70]:70} {b['stats']['mean'] * 1e3:10.3f}")
else:
    lines.append("kernel benchmarks: no results (see kernels.log)")
bench = (out / "bench.log").read_text().strip().splitlines()
lines += ["refseg bench:"] + ["  " + x for x in bench[-6:]]
lines.append(f"{'OK' if status == 0 else 'FAILED'} in {wall} s; everything is in {out}")
print("\n".join(lines))
EOF
cat "$OUT/summary.txt"
exit "$STATUS"
