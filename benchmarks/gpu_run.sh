#!/usr/bin/env bash
# The GPU checks and benchmarks in one go, as run on a lent GPU machine (see benchmarks/RESULTS.md):
#   bash benchmarks/gpu_run.sh OUTDIR
# Installs carried wheels from .whl/ first when the machine lacks diffusers (no registry there).
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
if ! python3 -c "import diffusers, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout "${CHECK_TIMEOUT:-150}" python3 benchmarks/gpu_check.py --json "$out/check.json" 2>&1 | tee "$out/check.log" \
  | grep -v -i "warn\|kept in float32"
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/gpu_bench.py --steps 3 --warmup 1 --budget-s "${COMPILE_AFTER_S:-250}" \
  --json "$out/bench.json" 2>&1 | tee "$out/bench.log" | grep -v -i "warn\|kept in float32"
