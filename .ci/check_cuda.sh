#!/usr/bin/env bash
# Compile-checks every CUDA source for sm_90 on a machine without a GPU:
#   1. each csrc/include/apparate/*.cuh alone and without torch: a generated .cu includes it and
#      instantiates its launchers for every dtype; warnings, register spills and local-memory use
#      in the kernels are errors (they would cost bandwidth on the GPU);
#   2. each csrc/include/apparate/*.h alone with the host compiler and no CUDA include path: the
#      C++ CPU kernels include these, and they are built where there is no CUDA;
#   3. each torch-facing translation unit (csrc/ops/*.cu, csrc/torch_bindings_cuda.cpp) against the
#      headers of the torch that $PYTHON imports, with the nvcc flags torch extensions build with.
# A CPU-only torch lacks c10/cuda/impl/cuda_cmake_macros.h; an empty one in a temporary include
# directory stands in for it here only.
#
# Usage: .ci/check_cuda.sh   env: PYTHON (default python), NVCC or CUDA_HOME, CXX, JOBS (default 2)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
NVCC=${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}
CXX=${CXX:-g++}
JOBS=${JOBS:-2}
ARCH=sm_90
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

WARN=(-Xcompiler -Wall,-Wextra --Werror all-warnings)
NVCC_BASE=(-std=c++20 -O3 -arch="$ARCH" "${WARN[@]}")

# Launcher instantiations of each header: every launcher template for every dtype it accepts, and
# the address of every other host entry point (so that it and the kernels it launches are built).
instantiate() {
  case "$1" in
    ramp_exit.cuh)
      local types=(float __half __nv_bfloat16) th tw
      for th in "${types[@]}"; do
        for tw in "${types[@]}"; do
          echo "template cudaError_t apparate::launch_ramp_exit<$th, $tw>(" \
               "const apparate::RampExitArgs<$th, $tw>&, const apparate::RampExitPlan&, void*," \
               "cudaStream_t);"
        done
      done
      echo "auto* check_plan = &apparate::plan_ramp_exit;"
      ;;
    compact_rows.cuh)
      echo "auto* check_compact = &apparate::launch_compact_rows;"
      ;;
    common.cuh)
      local bytes
      for bytes in 16 8 4 2 1; do
        echo "static_assert(sizeof(apparate::detail::Word<$bytes>::type) == $bytes);"
      done
      echo "auto* check_attribute = &apparate::detail::current_device_attribute;"
      ;;
  esac
}

pids=()
names=()
run() {  # run NAME CMD...: in the background, at most $JOBS at a time, output to $WORK/NAME.log
  local name=$1
  shift
  while (($(jobs -rp | wc -l) >= JOBS)); do wait -n || true; done
  (
    start=$SECONDS
    if "$@" >"$WORK/$name.log" 2>&1; then
      echo "ok   $name ($((SECONDS - start)) s)"
    else
      echo "FAIL $name ($((SECONDS - start)) s)"
      exit 1
    fi
  ) &
  pids+=($!)
  names+=("$name")
}

start_all=$SECONDS
"$NVCC" --version | tail -n 1

for header in "$ROOT"/csrc/include/apparate/*.cuh; do
  base=$(basename "$header")
  unit="$WORK/standalone_${base%.cuh}.cu"
  {
    echo "#include \"apparate/$base\""
    instantiate "$base"
  } >"$unit"
  run "$base" "$NVCC" "${NVCC_BASE[@]}" -Xptxas -warn-spills,-warn-lmem-usage \
    -I"$ROOT/csrc/include" -c "$unit" -o "$WORK/standalone_${base%.cuh}.o"
done

for header in "$ROOT"/csrc/include/apparate/*.h; do
  base=$(basename "$header")
  unit="$WORK/standalone_${base%.h}.cpp"
  echo "#include \"apparate/$base\"" >"$unit"
  run "$base" "$CXX" -std=c++20 -O2 -Wall -Wextra -Werror -I"$ROOT/csrc/include" \
    -c "$unit" -o "$WORK/standalone_${base%.h}.o"
done

TORCH_INCLUDE=$("$PYTHON" -c \
  "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PYTHON_INCLUDE=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
mapfile -t TORCH_NVCC_FLAGS < <("$PYTHON" -c \
  "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print('\n'.join(f))")
mkdir -p "$WORK/shim/c10/cuda/impl"
: >"$WORK/shim/c10/cuda/impl/cuda_cmake_macros.h"
INCLUDES=(-I"$ROOT/csrc" -I"$ROOT/csrc/include" -I"$WORK/shim" -isystem "$TORCH_INCLUDE"
          -isystem "$TORCH_INCLUDE/torch/csrc/api/include" -isystem "$PYTHON_INCLUDE")

for source in "$ROOT"/csrc/ops/*.cu; do
  name=$(basename "$source")
  run "$name" "$NVCC" "${NVCC_BASE[@]}" "${TORCH_NVCC_FLAGS[@]}" "${INCLUDES[@]}" \
    -c "$source" -o "$WORK/${name%.cu}.o"
done
run torch_bindings_cuda.cpp "$CXX" -std=c++20 -O2 -Wall -Wextra -Werror "${INCLUDES[@]}" \
  -c "$ROOT/csrc/torch_bindings_cuda.cpp" -o "$WORK/torch_bindings_cuda.o"

failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    failed=1
    echo "---- ${names[$i]}"
    cat "$WORK/${names[$i]}.log"
  fi
done
echo "check_cuda: $([ "$failed" = 0 ] && echo passed || echo FAILED) in $((SECONDS - start_all)) s"
exit "$failed"
