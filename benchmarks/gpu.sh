#!/usr/bin/env bash
# The first run on a GPU machine, in one command that ends with numbers inside its budget:
# kernel tests compiled on the device (one autotune config per kernel), then the kernel
# benchmarks at the README shapes, then the training step and labelling rows while time
# remains. Each result is written as soon as it is measured. Run from anywhere:
#
#   bash benchmarks/gpu.sh [--budget SECONDS] [--out DIR] [--dry-run]
#
# Default budget 480 s; the whole script runs under `timeout` at the budget + 60 s, so it
# ends even if a phase hangs. Needs python with torch, triton and pytest (+ pytest-benchmark);
# clasp need not be installed (`pip install --no-deps -e .` works too); open_clip only for
# the labelling-throughput rows. PYTHON picks the interpreter. Phases: benchmarks/gpu_run.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
budget=480
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --budget) budget=${args[i + 1]:-480} ;;
    --budget=*) budget=${args[i]#--budget=} ;;
  esac
done
if [[ -z "${CLASP_GPU_SH_TIMED:-}" ]]; then
  limit=$(( ${budget%.*} + 60 ))
  export CLASP_GPU_SH_TIMED=1
  exec timeout --kill-after=15 "$limit" bash "$0" "$@"
fi
exec "$PY" benchmarks/gpu_run.py "$@"
