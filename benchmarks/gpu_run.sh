#!/usr/bin/env bash
# The GPU checks, profile and benchmarks, as run on a lent GPU machine (see benchmarks/RESULTS.md):
#   bash benchmarks/gpu_run.sh OUTDIR [PART ...]   PART: check profile train generate memory decode cache (default:
#   first 5; memory: the training step per TrainConfig.memory mode, the 24 GiB goal)
# Each part runs under its own time limit (CHECK_, PROFILE_, TRAIN_, GENERATE_, MEMORY_, DECODE_, CACHE_TIMEOUT in s),
# so a part that overruns loses only itself; the benchmark writes its JSON after every measurement. Extra arguments
# go to each script through CHECK_ARGS, PROFILE_ARGS and BENCH_ARGS. Installs carried wheels from .whl/ first when
# the machine lacks diffusers (no registry there).
set -uo pipefail
out=${1:-gpu-results}
shift || true
parts=${*:-check profile train generate memory}  # cache: two more full compilations, ~6 minutes
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

run_part() {  # name, time limit, script and its arguments
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout "$limit" python3 "$@" 2>&1 | tee "$out/$name.log" | grep -v -i "warn\|kept in float32"
}

# The *_ARGS variables are parsed as shell words, so quoted variant names with spaces survive.
eval "check_args=(${CHECK_ARGS:-})" "profile_args=(${PROFILE_ARGS:-})" "bench_args=(${BENCH_ARGS:-})"
for part in $parts; do
  case $part in
    check) run_part check "${CHECK_TIMEOUT:-150}" benchmarks/gpu_check.py "${check_args[@]}" --json "$out/check.json" ;;
    profile) run_part profile "${PROFILE_TIMEOUT:-150}" benchmarks/gpu_profile.py "${profile_args[@]}" \
      --json "$out/profile.json" ;;
    train) run_part train "${TRAIN_TIMEOUT:-300}" benchmarks/gpu_bench.py --parts train --steps 3 --warmup 1 \
      --flops-cache /tmp/exvideo-flops.json "${bench_args[@]}" --json "$out/train.json" ;;
    generate) run_part generate "${GENERATE_TIMEOUT:-300}" benchmarks/gpu_bench.py --parts generate --steps 3 \
      --warmup 1 --flops-cache /tmp/exvideo-flops.json "${bench_args[@]}" --json "$out/generate.json" ;;
    memory) run_part memory "${MEMORY_TIMEOUT:-240}" benchmarks/gpu_bench.py --parts memory --steps 3 --warmup 1 \
      --flops-cache /tmp/exvideo-flops.json "${bench_args[@]}" --json "$out/memory.json" ;;
    decode) run_part decode "${DECODE_TIMEOUT:-200}" benchmarks/gpu_bench.py --parts decode --steps 2 --warmup 1 \
      --flops-cache /tmp/exvideo-flops.json "${bench_args[@]}" --json "$out/decode.json" ;;
    cache) run_part compile_cache "${CACHE_TIMEOUT:-450}" benchmarks/compile_cache.py --part train ;;
    *) echo "unknown part $part (check profile train generate memory decode cache)"; exit 2 ;;
  esac
done
