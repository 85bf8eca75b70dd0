#!/usr/bin/env bash
# One GPU session's work, in stages that fit the device tool's 10-minute calls (a fresh
# machine is bare, so every call starts with "build"). Results land in $OUT (device tool) or
# ./gpu-out; at most 8 files come back, so plots travel as one tar.
#
#   bash scripts/gpu_session.sh build test          # ~8 min: the whole suite on the GPU
#   bash scripts/gpu_session.sh build sanitize ncu  # compute-sanitizer + Nsight Compute
#   bash scripts/gpu_session.sh build bench         # python -m benchmarks (GPU default)
#
# The machine's image has torch, triton, transformers, pytest, hypothesis and
# pytest-benchmark and no network: the package installs with --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} SAEP_REQUIRE_EXTENSION=1
LOG="$OUT/session.log"
PY=${PYTHON:-python3}
rc=0
stage() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }

for step in "$@"; do
  case "$step" in
    build)
      stage build
      { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
      } 2>&1 | tee -a "$LOG"
      $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5 | tee -a "$LOG"
      $PY -c "import saep_kernels as s; print('backends', s.available_backends('cuda'))" 2>&1 | tee -a "$LOG" || rc=1
      ;;
    test)
      stage test
      $PY -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log" | tail -30 | tee -a "$LOG"
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      ;;
    sanitize)
      stage sanitize
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/gpu_check.py --small \
          > "$OUT/sanitize_$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $?" | tee -a "$LOG"
        tail -3 "$OUT/sanitize_$tool.log" | tee -a "$LOG"
      done
      ;;
    ncu)
      stage ncu
      ncu --clock-control none -k regex:fused_aggregate -c 8 \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,dram__bytes.sum,launch__registers_per_thread,launch__occupancy_limit_registers \
        $PY scripts/gpu_check.py --profile > "$OUT/ncu.txt" 2>&1
      echo "ncu: exit $?" | tee -a "$LOG"
      grep -E "fused_aggregate|duration|throughput|warps_active|registers" "$OUT/ncu.txt" | head -60 | tee -a "$LOG"
      ;;
    bench)
      stage bench
      $PY -m benchmarks --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | grep -v "benchmarks:" | tail -60
      (cd "$OUT/bench" && tar cf ../plots.tar *.png && mv results_cuda.json results_cuda.csv ..) && rm -rf "$OUT/bench"
      ;;
    *) echo "unknown stage $step (build, test, sanitize, ncu, bench)"; exit 2 ;;
  esac
done
exit $rc
