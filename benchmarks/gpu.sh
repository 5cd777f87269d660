#!/usr/bin/env bash
# The whole GPU suite in one command: kernel tests compiled on the device, every benchmark,
# then a short table. Run from the repository root on a machine with a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import clasp.kernels" 2>/dev/null || $PY -m pip install --quiet --no-deps --no-build-isolation -e .
$PY -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA device'"
$PY -m pytest tests/kernels -q -p no:cacheprovider
$PY -m pytest benchmarks -q -p no:xdist -o python_files='bench_*.py' --benchmark-disable-gc "$@"
$PY benchmarks/report.py
