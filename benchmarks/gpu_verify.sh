#!/usr/bin/env bash
# GPU verification in one lease (device machine, run from the repo root):
#   build the extension (CPU + CUDA kernels, sm_90), run the whole test suite on CUDA, then the GPU
#   benchmark selection (copy roofline, large-row op cases, sampling K=8, end-to-end step).
# Every stage has a deadline inside TOTAL_S so that the logs and JSON always come back under $OUT.
# COMMIT (env) records which commit was measured.
set -u
OUT=${OUT:-/tmp/flowfm_gpu}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-450}
T0=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - T0) )); }
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=16
{
  echo "commit ${COMMIT:-unknown}"; date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 timeout 220 python3 -m pip install -v --no-deps --no-build-isolation --no-index -e . \
  > "$OUT/build.log" 2>&1
echo "build rc=$? at $(( $(date +%s) - T0 ))s"; grep -n "WARNING\|error" "$OUT/build.log" | head -20
cp flowfm_fast/_C*.so "$OUT/" 2>/dev/null
python3 -c "import flowfm_fast; print(flowfm_fast.backend_summary())" 2>&1 | tail -3

TEST_S=$(( $(left) - ${BENCH_RESERVE_S:-170} ))
OMP_NUM_THREADS=2 timeout -s INT $TEST_S python3 -m pytest tests -q -n 12 --timeout=240 -p no:cacheprovider -rfE \
  --durations=10 > "$OUT/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 ))s"; grep -E "passed|failed|FAILED|ERROR" "$OUT/tests.log" | tail -40

B="python3 -m pytest -q -p no:cacheprovider --benchmark-max-time=0.2 --benchmark-min-rounds=5"
timeout -s INT $(( $(left) - 90 )) $B benchmarks/bench_copy.py benchmarks/bench_norm_modulate.py benchmarks/bench_fm.py \
  -k "copy or 1024-1024 or 2048 or 65536" --benchmark-json="$OUT/ops.json" > "$OUT/bench.log" 2>&1
echo "ops bench rc=$? at $(( $(date +%s) - T0 ))s"
timeout -s INT $(( $(left) - 40 )) $B benchmarks/bench_sample.py -k "K=8" --benchmark-json="$OUT/sample.json" >> "$OUT/bench.log" 2>&1
echo "sample bench rc=$? at $(( $(date +%s) - T0 ))s"
timeout -s INT $(( $(left) - 5 )) $B benchmarks/bench_e2e.py --benchmark-json="$OUT/e2e.json" >> "$OUT/bench.log" 2>&1
echo "e2e bench rc=$? at $(( $(date +%s) - T0 ))s"
grep -E "passed|failed|Error" "$OUT/bench.log" | tail -10
