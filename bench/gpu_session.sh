#!/usr/bin/env bash
# Everything the GPU run measures, in one command (device tool; carry .whl). Outputs land in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "^\[transformers\]\|should be kept in float32\|AccumulateGrad\|return Variable._execution"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest tests/test_gsplat_parity.py tests/test_fast_path.py -m gpu -s -q -p no:cacheprovider 2>&1 \
  | quiet > "$OUT/gpu_tests.txt"; grep -E "diff|cosine|passed|failed" "$OUT/gpu_tests.txt"
timeout ${BENCH_TIMEOUT:-330} python3 bench/benchmark.py --modes straightforward,fast --steps ${STEPS:-100} --warmup 10 \
  --out "$OUT/benchmark.md" 2>&1 | quiet | grep -v "^| \|^- " | tail -20
timeout 90 python3 bench/benchmark.py --losses sctd --modes low-vram --steps 60 --warmup 5 \
  --out "$OUT/benchmark_lowvram.md" 2>&1 | quiet | tail -3
