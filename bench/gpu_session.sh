#!/usr/bin/env bash
# Everything the GPU run measures, in parts that each fit one 10-minute device call on a fresh
# machine (gsplat's JIT build ~70 s, a cold torch.compile ~150 s); carry .whl. Outputs land in $OUT.
#   bash bench/gpu_session.sh 1    GPU tests; straightforward vs default and no-compile for sctd
#   bash bench/gpu_session.sh 2    straightforward vs default for sctd, sctd+perpneg, ism, sds
#   bash bench/gpu_session.sh 3    straightforward vs default for cds, gcs; the low-VRAM and large-GPU overlays
#   bash bench/gpu_session.sh 4    time to asset (train.py, fresh then warm caches); cost against the Gaussian count
#                                  (mesh export needs PyMCubes, fast-simplification and trimesh among the wheels)
#   bash bench/gpu_session.sh 5    GPU tests of the official rules, gsplat parity, out-of-memory and fast path; the
#                                  default sctd loop's speed; the SOG encode of 1M SH-3 splats on the GPU
#   bash bench/gpu_session.sh 6    the official rules against config/improvements.yaml (ms/it, Gaussian count)
#   bash bench/gpu_session.sh 7    time to asset with the background compilation: 1000 iterations, fresh then warm
#                                  caches (long enough for the switch to the compiled programs on a fresh machine)
#   bash bench/gpu_session.sh 8    one call for everything essential: the SOG encode, the GPU tests of the official rules,
#                                  the background compilation, gsplat parity and out-of-memory, time to asset on fresh
#                                  caches (800 iterations), then a warm one (300 iterations) on the caches it left
#   bash bench/gpu_session.sh 9    the background compilation's GPU test, then its time to asset (LIMIT=400 for the switch)
#   bash bench/gpu_session.sh 10   time to asset with the background compilation, fresh then warm caches (ITERS=1000),
#                                  then the background compilation's GPU test on the caches those runs left
#   bash bench/gpu_session.sh 11   part 6, then the background compilation's time to asset on fresh caches (ITERS=400)
#   bash bench/gpu_session.sh 12   regional compilation: time to asset with it on fresh, warm and portable caches (a new
#                                  machine sharing the home folder), the benchmark regional beside default (ms/it)
#   bash bench/gpu_session.sh 13   regional compilation's GPU parity test; where the GPU's model load and final outputs
#                                  go: bench/model_load.py and bench/final_outputs.py on the GPU (the warm model load
#                                  took 15.8 s on an H100)
#   bash bench/gpu_session.sh 14   right after part 12 on its machine: a 5000-iteration asset, launch to mesh, on the
#                                  caches part 12 left (SETS="--set PipelineParams.compile_regions=true" for regional)
#   bash bench/gpu_session.sh 15   part 12's benchmark alone (after BENCH=0 bash bench/gpu_session.sh 12 on that machine)
#   bash bench/gpu_session.sh 16   after part 4 or 12 on its machine: what cuDNN's autotuning (cudnn_benchmark, on by
#                                  default) costs a warm start and buys per iteration: time to asset on the warm
#                                  caches with it on and off, then the benchmark's default beside no-cudnn-benchmark
#   bash bench/gpu_session.sh 17   where a training step makes the CPU wait for the GPU: bench/step_syncs.py, uncompiled
#                                  and (on part 4's or 12's caches) in the default mode
#   bash bench/gpu_session.sh 18   on a multi-GPU kind (nvidia-h200-x2, -x4): one asset's step on 1, 2 (and 4) GPUs, the
#                                  benchmark's torchrun line (docs/multi_gpu.md); 1 GPU first, so the others start warm
set -uo pipefail
PART=${1:-1}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # no MAX_JOBS or TORCH_CUDA_ARCH_LIST: the build a user gets
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
quiet() { grep -v "^\[transformers\]\|should be kept in float32\|AccumulateGrad\|return Variable._execution\|_warn_once\|warnings.warn"; }
bench() {  # bench TIME_LIMIT_S benchmark-arguments...
  local limit=$1; shift
  timeout "$limit" python3 bench/benchmark.py --steps "${STEPS:-100}" --warmup 5 "$@" 2>&1 | quiet \
    | grep -v "^| \|^- " | tail -8
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
case "$PART" in
  1)
    python3 -m pytest tests/test_gsplat_parity.py tests/test_fast_path.py -m gpu -s -q -p no:cacheprovider 2>&1 \
      | quiet > "$OUT/gpu_tests.txt"
    grep -E "diff|cosine|passed|failed" "$OUT/gpu_tests.txt" | tail -30
    bench 300 --modes straightforward,default,no-compile --losses sctd --out "$OUT/benchmark_1.md" ;;
  2) bench 540 --modes straightforward,default --losses sctd,sctd+perpneg,ism,sds --out "$OUT/benchmark_2.md" ;;
  3)
    bench 300 --modes straightforward,default --losses cds,gcs --out "$OUT/benchmark_3.md"
    bench 200 --modes low-vram,large-gpu --losses sctd --out "$OUT/benchmark_overlays.md" ;;
  4)
    timeout 400 python3 bench/time_to_asset.py --iters 150 --set save_video=false --work /tmp/tta \
      --out "$OUT/time_to_asset.md" 2>&1 | quiet | tail -8
    c=/tmp/tta/caches_0  # the caches the time-to-asset runs filled: the benchmark starts warm
    export TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton TORCH_EXTENSIONS_DIR=$c/torch_extensions
    STEPS=30 bench 170 --modes default --losses sctd --gaussians 128000,400000,800000 --start-step 1086 \
      --out "$OUT/benchmark_gaussians.md" ;;
  5)
    timeout 300 python3 -m pytest tests/test_official_rules.py tests/test_gsplat_parity.py tests/test_out_of_memory.py \
      tests/test_fast_path.py -m gpu -s -q -p no:cacheprovider 2>&1 | quiet > "$OUT/gpu_tests.txt"
    grep -E "diff|cosine|passed|failed|Error" "$OUT/gpu_tests.txt" | tail -40
    STEPS=40 bench 200 --modes default --losses sctd --out "$OUT/benchmark_default.md"
    timeout 90 python3 bench/sog_encode.py --device cuda --splats 1000000 --skip-assets --out "$OUT/sog_gpu.md" 2>&1 \
      | quiet | tail -8 ;;
  6)
    timeout 560 python3 bench/official_rules.py --prior sd-random --steps 500 --out "$OUT/official_rules_gpu.md" 2>&1 \
      | quiet | tail -20 ;;
  7)
    timeout 570 python3 bench/time_to_asset.py --iters ${ITERS:-1000} --set save_video=false --work /tmp/tta \
      --set PipelineParams.compile_in_background=true \
      --out "$OUT/time_to_asset.md" 2>&1 | quiet | tail -12
    cp /tmp/tta/*.log "$OUT/" 2>/dev/null ;;
  8)
    timeout 60 python3 bench/sog_encode.py --device cuda --splats 1000000 --skip-assets --out "$OUT/sog_gpu.md" 2>&1 \
      | quiet | tail -6
    timeout 170 python3 -m pytest tests/test_official_rules.py tests/test_gsplat_parity.py tests/test_out_of_memory.py \
      tests/test_fast_path.py -m gpu -k "not no-compile and not static-batch and not contiguous-vae" -s -q \
      -p no:cacheprovider 2>&1 | quiet > "$OUT/gpu_tests.txt"
    grep -E "passed|failed|Error" "$OUT/gpu_tests.txt" | tail -20
    timeout 300 python3 bench/time_to_asset.py --iters 800 --caches fresh --set save_video=false --work /tmp/tta \
      --set PipelineParams.compile_in_background=true \
      --out "$OUT/time_to_asset_fresh.md" 2>&1 | quiet | tail -6
    cp /tmp/tta/*.log "$OUT/" 2>/dev/null
    c=/tmp/tta/caches_0  # what the fresh run compiled
    export TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton TORCH_EXTENSIONS_DIR=$c/torch_extensions
    timeout 80 python3 bench/time_to_asset.py --iters 300 --caches user --set save_video=false --work /tmp/tta_warm \
      --set PipelineParams.compile_in_background=true \
      --model /tmp/tta/model --out "$OUT/time_to_asset_warm.md" 2>&1 | quiet | tail -5 ;;
  9)  # the background compilation on a GPU: its test, then train.py with the full-size model until $LIMIT s
    timeout 150 python3 -m pytest tests/test_fast_path.py -m gpu -k "background" -s -q -p no:cacheprovider 2>&1 \
      | quiet > "$OUT/gpu_tests_background.txt"
    grep -E "passed|failed|Error" "$OUT/gpu_tests_background.txt" | tail -8
    timeout ${LIMIT:-120} python3 bench/time_to_asset.py --iters 1500 --caches user --set save_video=false \
      --set PipelineParams.compile_in_background=true \
      --work /tmp/tta --out "$OUT/time_to_asset_user.md" > /dev/null 2>&1
    grep -E "timeline|background|compiled|switching|capturing|loop:" /tmp/tta/train_0.log | cut -c1-200 \
      | tee "$OUT/train_0_lines.txt" ;;
  10)
    timeout 440 python3 bench/time_to_asset.py --iters ${ITERS:-1000} --set save_video=false --work /tmp/tta \
      --set PipelineParams.compile_in_background=true --out "$OUT/time_to_asset.md" 2>&1 | quiet | tail -14
    for f in /tmp/tta/*.log; do grep -E "timeline|background|compiled|switching|loop:|Error|error" "$f" | cut -c1-220; done \
      > "$OUT/train_lines.txt"
    c=/tmp/tta/caches_0  # what the fresh run compiled: the test's compilation starts warm
    export TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton TORCH_EXTENSIONS_DIR=$c/torch_extensions
    timeout 120 python3 -m pytest tests/test_fast_path.py -m gpu -k "background" -s -q -p no:cacheprovider 2>&1 \
      | quiet > "$OUT/gpu_tests_background.txt"
    grep -E "passed|failed|Error" "$OUT/gpu_tests_background.txt" | tail -8 ;;
  11)
    timeout 330 python3 bench/official_rules.py --prior sd-random --steps 500 --out "$OUT/official_rules_gpu.md" 2>&1 \
      | quiet | tail -12
    timeout ${LIMIT:-230} python3 bench/time_to_asset.py --iters ${ITERS:-400} --caches fresh --set save_video=false \
      --set PipelineParams.compile_in_background=true --work /tmp/tta --out "$OUT/time_to_asset.md" 2>&1 | quiet | tail -8
    grep -E "timeline|background|compiled|switching|loop:|Error" /tmp/tta/train_0.log | cut -c1-220 > "$OUT/train_lines.txt"
    tr '\r' '\n' < /tmp/tta/train_0.log | grep -E "^ *[0-9]+%" | awk 'NR % 25 == 0' | cut -c1-90 >> "$OUT/train_lines.txt" ;;
  12)
    timeout 300 python3 bench/time_to_asset.py --iters ${ITERS:-100} --caches ${CACHES:-fresh,warm,portable} --set save_video=false \
      --set PipelineParams.compile_regions=true --work /tmp/tta --out "$OUT/time_to_asset_regional.md" 2>&1 \
      | quiet | tail -6
    c=/tmp/tta/caches_0  # gsplat's build and the regional programs from the fresh run: only "default" compiles cold
    find $c/torch_extensions -name .ninja_log -exec cp {} "$OUT/gsplat_ninja_log.txt" \;  # per-unit build times
    grep -h "compile cache\|timeline\|gsplat\|regional" /tmp/tta/train_*.log | cut -c1-200 > "$OUT/train_lines.txt"
    export TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton TORCH_EXTENSIONS_DIR=$c/torch_extensions
    [ "${BENCH:-1}" = 1 ] && STEPS=30 bench 240 --modes regional,default --losses sctd --out "$OUT/benchmark_regional.md" ;;
  13)
    c=/tmp/tta/caches_0  # a warm machine after part 12: the parity test's compilation starts warm
    [ -d $c ] && export TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton TORCH_EXTENSIONS_DIR=$c/torch_extensions
    timeout 100 python3 -m pytest tests/test_fast_path.py -m gpu -k "regional or defaults-warmed" -s -q \
      -p no:cacheprovider 2>&1 | quiet > "$OUT/gpu_tests_regional.txt"
    grep -E "diff|cosine|passed|failed|Error" "$OUT/gpu_tests_regional.txt" | tail -12
    timeout 220 python3 bench/model_load.py --device cuda --repeats 3 --work /tmp/ml --out "$OUT/model_load_gpu.md" 2>&1 \
      | quiet | tail -24
    timeout 220 python3 bench/final_outputs.py --device cuda --out "$OUT/final_outputs_gpu.md" 2>&1 | quiet | tail -12 ;;
  14)  # right after part 12 on the same (warm) machine: a whole asset, launch to mesh, on the caches it left
    c=/tmp/tta/caches_0
    export TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton TORCH_EXTENSIONS_DIR=$c/torch_extensions \
      CUDA_CACHE_PATH=$c/cuda XDG_CACHE_HOME=$c/home_cache
    timeout 590 python3 bench/time_to_asset.py --iters 5000 --caches user --model /tmp/tta/model --set save_video=false ${SETS:-} \
      --work /tmp/tta --out "$OUT/time_to_asset_5000.md" 2>&1 | quiet | tail -6 ;;
  15)  # part 12's benchmark alone, right after BENCH=0 part 12 on its machine
    c=/tmp/tta/caches_0
    export TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton TORCH_EXTENSIONS_DIR=$c/torch_extensions
    STEPS=30 bench 280 --modes regional,default --losses sctd --out "$OUT/benchmark_regional.md" ;;
  16)
    c=/tmp/tta/caches_0
    export TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton TORCH_EXTENSIONS_DIR=$c/torch_extensions \
      CUDA_CACHE_PATH=$c/cuda XDG_CACHE_HOME=$c/home_cache
    for on in true false; do
      timeout 150 python3 bench/time_to_asset.py --iters 100 --caches user --model /tmp/tta/model --set save_video=false \
        --set PipelineParams.cudnn_benchmark=$on --work /tmp/tta_cudnn_$on --out "$OUT/time_to_asset_cudnn_$on.md" 2>&1 \
        | quiet | tail -4
    done
    STEPS=30 bench 240 --modes default,no-cudnn-benchmark --losses sctd --out "$OUT/benchmark_cudnn.md" ;;
  17)
    c=/tmp/tta/caches_0
    [ -d $c ] && export TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton TORCH_EXTENSIONS_DIR=$c/torch_extensions
    for mode in no-compile default; do
      timeout 270 python3 bench/step_syncs.py --mode $mode --out "$OUT/step_syncs_$mode.md" 2>&1 | quiet | tail -16
    done ;;
  18)
    gpus=$(nvidia-smi -L | wc -l)
    for n in 1 2 4; do
      [ "$n" -gt "$gpus" ] && break
      limit=$([ "$n" = 1 ] && echo 300 || echo 140)
      timeout $limit torchrun --standalone --nproc_per_node=$n bench/benchmark.py --steps 30 --warmup 5 \
        --modes default --losses sctd --out "$OUT/benchmark_${n}gpu.md" 2>&1 | quiet | grep -v "^| \|^- " | tail -3
    done ;;
  *) echo "part must be 1 to 18" >&2; exit 2 ;;
esac
