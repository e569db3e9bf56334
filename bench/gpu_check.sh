#!/usr/bin/env bash
# On a GPU machine: build bitfast with its CUDA kernels, run the tests (CUDA and Triton included) and the
# benchmarks, and leave everything under OUTDIR (default $OUT, else ./gpu_out).
#   bash bench/gpu_check.sh OUTDIR [STAGE ...]
# STAGE: build, test, sanitize (compute-sanitizer memcheck + racecheck on every CUDA kernel), kernels (GN + WS
# benches), budget (bench/budget.py: measured ms and GB/s beside the predicted bytes), models-eager,
# models-compile, scaling, report; default: all, in
# that order. Each stage fits a 10-minute remote call, so they can be run one call at a time (build first; the
# editable build persists in the working tree). Uses the python on PATH (GPU machines ship torch, triton, ninja,
# pybind11, pytest-benchmark; no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu_out}}
shift || true
STAGES=${*:-build test sanitize kernels budget models-eager models-compile scaling report}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export BITFAST_BENCH_RESULTS=${BITFAST_BENCH_RESULTS:-bench/results}
status=0
run() {
  echo "=== $*" | tee -a "$OUTDIR/log.txt"
  "$@" 2>&1 | tee -a "$OUTDIR/log.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=$rc
}

nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
for stage in $STAGES; do
  case $stage in
    build) run "$PY" -m pip install --no-build-isolation --no-deps -e . && run "$PY" -m bitfast ;;
    test) run "$PY" -m pytest tests -q --junitxml="$OUTDIR/tests.xml"
          run "$PY" -m bitfast --tune ;;  # what autotune checks, times and picks on this GPU (the later stages use it)
    sanitize) for tool in memcheck racecheck; do  # what the CPU emulation (ctest) cannot model
                run compute-sanitizer --tool $tool --error-exitcode 1 "$PY" bench/sanitize_kernels.py
              done ;;
    kernels) run "$PY" -m pytest bench/test_group_norm.py bench/test_weight_standardize.py -q \
               --benchmark-json="$OUTDIR/pytest-benchmark-kernels.json" ;;
    budget) run "$PY" -m bench.budget "$OUTDIR/budget-sm90"  # predicted (compile-only); else the committed one
            [ -f "$OUTDIR/budget-sm90.json" ] || cp bench/results/budget-sm90.json "$OUTDIR/"
            run "$PY" -m bench.budget --measure "$OUTDIR/budget-sm90" ;;  # measured ms, GB/s beside designed bytes
    models-eager) run "$PY" -m pytest bench/test_models.py -q -k "eager or max_batch" ;;
    models-compile) run "$PY" -m pytest bench/test_models.py -q -k "compile" ;;
    scaling) run "$PY" -m pytest bench/test_scaling.py -q ;;
    report) run "$PY" -m bench.report "$BITFAST_BENCH_RESULTS" "$OUTDIR"/pytest-benchmark-*.json
            cp bench/REPORT.md bench/*.png "$OUTDIR/" 2>/dev/null ;;
    *) echo "unknown stage: $stage"; exit 2 ;;
  esac
done
cp -r "$BITFAST_BENCH_RESULTS" "$OUTDIR/results" 2>/dev/null
echo "gpu_check exit status: $status" | tee -a "$OUTDIR/log.txt"
exit $status
