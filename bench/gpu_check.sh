#!/usr/bin/env bash
# bitfast on a GPU machine: build, prove the kernels correct, measure. Three ways to call it:
#   bash bench/gpu_check.sh --oneshot OUTDIR [STAGE ...]  the one prepared call on a lent GPU: the stages in order,
#        each under its time limit (LIMITS below), all inside ONESHOT_S (540 s) so one 10-minute remote call holds it
#   bash bench/gpu_check.sh --dry OUTDIR [STAGE ...]      the same on a CPU machine: what needs a GPU is skipped or
#        shrunk, but every stage still writes its part of summary.json and the report (tests/test_gpu_check.py)
#   bash bench/gpu_check.sh OUTDIR [STAGE ...]            chosen stages (default all), no overall deadline
# STAGE: build test sanitize kernels budget models transfer models-compile report (the default, in that order),
# and scaling (several GPUs; never in the default). OUTDIR gets three files, since the device tool returns at most
# 8: summary.json (per stage: rc, seconds, limit, timed_out, skipped; GPU, driver, torch, triton, CUDA),
# log.txt, and results.tar.gz (everything else: test XML, pytest-benchmark JSON, budget tables, bench/results,
# REPORT.md, the transfer run). Both are rewritten after every stage, so a run that is cut off keeps what it made.
# GPU_CHECK_LIMITS="test=60 kernels=30" overrides limits. Uses the python on PATH (GPU machines ship torch,
# triton, ninja, pybind11, pytest-benchmark; no network).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=stages
case ${1:-} in --oneshot) MODE=oneshot; shift ;; --dry) MODE=dry; shift ;; esac
OUTDIR=${1:-${OUT:-gpu_out}}
shift || true
STAGES=${*:-build test sanitize kernels budget models transfer models-compile report}
ONESHOT_S=${ONESHOT_S:-540}
# Seconds per stage in --oneshot/--dry; total 525 of the 540 (models-compile gets what is left, if >= 30 s).
declare -A LIMITS=([build]=140 [test]=95 [sanitize]=45 [kernels]=75 [budget]=60 [models]=60 [transfer]=35
                   [models-compile]=0 [report]=15 [scaling]=120)
for kv in ${GPU_CHECK_LIMITS:-}; do LIMITS[${kv%%=*}]=${kv#*=}; done

mkdir -p "$OUTDIR/run"
OUTDIR=$(cd "$OUTDIR" && pwd)
RUN=$OUTDIR/run  # what goes into results.tar.gz
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 GPU_CHECK_MODE=$MODE RUN PY
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export BITFAST_BENCH_RESULTS=$RUN/results
mkdir -p "$BITFAST_BENCH_RESULTS"
[ "$MODE" = dry ] && export BITFAST_BENCH_QUICK=1 CUDA_VISIBLE_DEVICES=""  # a dry run never touches a GPU
dry() { [ "$GPU_CHECK_MODE" = dry ]; }
export -f dry

# ------------------------------------------------------------------------------------------------ the stages
# Each runs in its own bash under `timeout`; a non-zero exit marks the stage failed, and the next one still runs.
stage_build() {
  if dry; then echo "dry: not rebuilding (uses the bitfast._C of this checkout)"
  else $PY -m pip install --no-build-isolation --no-deps -e . || return; fi
  $PY -m bitfast
}
TESTS="tests/test_group_norm.py tests/test_weight_standardize.py tests/test_backend.py tests/test_autotune.py
       tests/test_train_decode.py"  # -k below: the CUDA and Triton kernel cases, and nvjpeg against the CPU decode
stage_test() {  # the CUDA and Triton cases (GPU tensors, fp64 criterion, both layouts, fp32/bf16/fp16)
  if dry; then $PY -m pytest $TESTS -q --collect-only -k "cuda or triton or gpu_decode"; return; fi
  $PY -m pytest $TESTS -q -k "cuda or triton or gpu_decode" --junitxml="$RUN/tests.xml" || return
  $PY -m bitfast --tune  # what autotune checks, times and picks on this GPU (the later stages use it)
}
stage_sanitize() {  # what the CPU emulation (csrc/emu, ctest) cannot model
  if dry; then $PY bench/sanitize_kernels.py --device cpu --backend cpu; return; fi
  local rc=0
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 1 "$PY" bench/sanitize_kernels.py || rc=1
  done
  return $rc
}
stage_kernels() {  # GN(+ReLU) and WS against torch eager, torch.compile and BN; GB/s vs a measured copy
  $PY -m pytest bench/test_group_norm.py bench/test_weight_standardize.py -q \
    --benchmark-json="$RUN/pytest-benchmark-kernels.json"
}
stage_budget() {  # measured ms and GB/s beside the designed bytes of the committed (compile-only) budget
  if dry; then $PY -m bench.budget "$RUN/budget-sm90"; return; fi  # the CPU half: ptxas + the traffic model
  cp bench/results/budget-sm90.json "$RUN/" && $PY -m bench.budget --measure "$RUN/budget-sm90"
}
stage_models() { $PY -m pytest bench/test_models.py -q -k "eager or max_batch"; }
stage_models-compile() { $PY -m pytest bench/test_models.py -q -k "compile"; }
stage_scaling() { $PY -m pytest bench/test_scaling.py -q; }
stage_transfer() {  # the CLI end to end on a small ImageFolder made here from the shipped Fashion-MNIST subset
  $PY - "$RUN/folder" <<'EOF' || return
import sys, pathlib
from PIL import Image
from bitfast.datasets import load_fashion_mnist
root = pathlib.Path(sys.argv[1])
for split, per in (("train", 16), ("val", 4)):
    x, y = load_fashion_mnist("train" if split == "train" else "test", source="small")
    for c in range(10):
        (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i, k in enumerate((y == c).nonzero()[0][:per]):
            Image.fromarray(x[k]).convert("RGB").save(root / split / f"c{c}" / f"{i}.png")
EOF
  if dry; then
    set -- --model bit_tiny --steps 3 --batch 8 --resolution 32,28 --device cpu
  else
    set -- --model BiT-M-R50x1 --steps 30 --batch 64 --resolution 160,128 --precision bf16 --channels-last
  fi
  $PY -m bitfast.train.cli transfer --data "$RUN/folder" --out "$RUN/transfer" --eval-every 10 --no-progress "$@"
}
stage_report() {
  shopt -s nullglob
  $PY -m bench.report "$BITFAST_BENCH_RESULTS" "$RUN"/pytest-benchmark-*.json --out "$RUN/REPORT.md" \
    --png "$RUN/report.png"
}
export -f stage_build stage_test stage_sanitize stage_kernels stage_budget stage_models stage_models-compile \
  stage_scaling stage_transfer stage_report
export TESTS

# ------------------------------------------------------------------------------------------------ running them
T0=$(date +%s)
SUMMARY=$OUTDIR/stages.jsonl
: > "$SUMMARY"
log() { echo "$*" | tee -a "$OUTDIR/log.txt"; }

environment() {  # once, at the start: GPU, driver, torch, triton, CUDA -> env.json
  $PY - "$OUTDIR/env.json" "$MODE" <<'EOF'
import json, platform, subprocess, sys
env = {"mode": sys.argv[2], "python": platform.python_version(), "host": platform.node()}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)))
except Exception as e:  # noqa: BLE001 -- the summary must be written whatever is broken
    env["torch_error"] = repr(e)
try:
    import triton
    env["triton"] = triton.__version__
except Exception as e:  # noqa: BLE001
    env["triton_error"] = repr(e)
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    env["driver"] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
EOF
}

pack() {  # summary.json and results.tar.gz (no checkpoints, no images), rewritten after every stage
  $PY -c 'import json, sys; o = sys.argv[1]; st = [json.loads(l) for l in open(o + "/stages.jsonl")]
json.dump({"env": json.load(open(o + "/env.json")), "stages": st,
           "failed": [s["stage"] for s in st if s["rc"] not in (0, None)]}, open(o + "/summary.json", "w"), indent=1)
' "$OUTDIR"
  tar -czf "$OUTDIR/results.tar.gz.tmp" -C "$OUTDIR" --exclude='*.pt' --exclude=folder run env.json stages.jsonl &&
    mv "$OUTDIR/results.tar.gz.tmp" "$OUTDIR/results.tar.gz"
}

run_stage() {  # run_stage NAME LIMIT_S (0: no limit)
  local name=$1 limit=$2 t=$(date +%s) rc timed_out=false
  log "=== [$(( t - T0 ))s] $name (limit ${limit}s)"
  if [ "$limit" -gt 0 ]; then
    timeout -k 10 "$limit" bash -c "stage_$name" >> "$OUTDIR/log.txt" 2>&1
  else
    bash -c "stage_$name" >> "$OUTDIR/log.txt" 2>&1
  fi
  rc=$?
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && timed_out=true
  log "=== $name: rc $rc, $(( $(date +%s) - t ))s$( $timed_out && echo ', TIMED OUT')"
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "limit": %d, "timed_out": %s, "skipped": null}\n' \
    "$name" "$rc" "$(( $(date +%s) - t ))" "$limit" "$timed_out" >> "$SUMMARY"
  [ "$rc" -eq 0 ] || status=1
}

skip_stage() {
  log "=== $1: skipped ($2)"
  printf '{"stage": "%s", "rc": null, "seconds": 0, "limit": 0, "timed_out": false, "skipped": "%s"}\n' \
    "$1" "$2" >> "$SUMMARY"
}

for stage in $STAGES; do
  declare -F "stage_$stage" > /dev/null || { log "unknown stage: $stage"; exit 2; }
done
status=0
nvidia-smi > "$RUN/nvidia-smi.txt" 2>&1
environment
log "gpu_check $MODE: stages $STAGES; results in $OUTDIR"
for stage in $STAGES; do
  if [ "$MODE" = stages ]; then run_stage "$stage" 0; pack; continue; fi
  left=$(( ONESHOT_S - ($(date +%s) - T0) - ${LIMITS[report]} ))  # always keep time for the report
  [ "$stage" = report ] && left=$(( left + ${LIMITS[report]} ))
  limit=${LIMITS[$stage]}
  [ "$stage" = models-compile ] && limit=$left
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$left" -lt 10 ] || { [ "$stage" = models-compile ] && [ "$left" -lt 30 ]; }; then
    skip_stage "$stage" "only ${left}s left of ${ONESHOT_S}s"
  else
    run_stage "$stage" "$limit"
  fi
  pack
done
log "gpu_check exit status: $status, $(( $(date +%s) - T0 ))s"
exit $status
