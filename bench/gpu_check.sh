#!/usr/bin/env bash
# One command on a GPU machine: build bitfast with its CUDA kernels, run the tests (CUDA and Triton included) and
# the full benchmark suite, and leave everything under OUTDIR (default $OUT, else ./gpu_out).
#   bash bench/gpu_check.sh OUTDIR
# Uses the python on PATH (GPU machines ship torch, triton, ninja, pybind11, pytest-benchmark; no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python}
status=0
run() { echo "=== $*" | tee -a "$OUTDIR/log.txt"; "$@" 2>&1 | tee -a "$OUTDIR/log.txt"; local rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || status=$rc; return 0; }

nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
run "$PY" -m pip install --no-build-isolation --no-deps -e .
run "$PY" -m bitfast
run "$PY" -m pytest tests -q -x --junitxml="$OUTDIR/tests.xml"
run "$PY" -m pytest bench -q --benchmark-json="$OUTDIR/pytest-benchmark.json"
run "$PY" -m bench.report
cp -r bench/results "$OUTDIR/results" 2>/dev/null
cp bench/REPORT.md bench/*.png "$OUTDIR/" 2>/dev/null
echo "gpu_check exit status: $status" | tee -a "$OUTDIR/log.txt"
exit $status
