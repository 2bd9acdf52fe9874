#!/usr/bin/env bash
# Compile every CUDA source of vfm._C for sm_90 without a GPU (CI only; users never need this).
#
# * csrc/cuda/*.cu include no torch header: nvcc compiles each one alone, with the flags setup.py
#   gives nvcc (-O3 -std=c++17 -lineinfo) and those torch's CUDAExtension adds (no implicit
#   half / bfloat16 conversions, relaxed constexpr), for -gencode arch=compute_90,code=sm_90.
# * csrc/cuda/*.cpp (the thin TORCH_CHECK bindings) and csrc/ext.cpp as a CUDA build sees it
#   (-DVFM_WITH_CUDA) are checked with the host compiler's -fsyntax-only against the installed
#   torch's headers (a CPU-only wheel has every header they use).
# Any compile error makes the script exit non-zero.  Environment: CUDA_HOME (default
# /usr/local/cuda, else the nvcc on PATH), PYTHON (default python3, must import torch), CXX
# (default g++), VFM_CHECK_JOBS (parallel compiles, default: number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="$CUDA_HOME/bin/nvcc"
if [ ! -x "$NVCC" ]; then
  NVCC="$(command -v nvcc || true)"
fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "check_cuda_compile: nvcc not found (set CUDA_HOME to a CUDA toolkit)" >&2
  exit 1
fi
PYTHON="${PYTHON:-python3}"
CXX="${CXX:-g++}"
JOBS="${VFM_CHECK_JOBS:-$(nproc 2>/dev/null || echo 2)}"

shopt -s nullglob
CU_FILES=(csrc/cuda/*.cu)
CPP_FILES=(csrc/cuda/*.cpp)
shopt -u nullglob
if [ "${#CU_FILES[@]}" -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files found" >&2
  exit 1
fi

TORCH_INC="$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')" || {
  echo "check_cuda_compile: $PYTHON cannot import torch (needed for the binding headers)" >&2
  exit 1
}
PY_INC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
echo "nvcc: $("$NVCC" --version | tail -n 1)"

# One job per file: "cu FILE" or "cpp FILE"; each writes its log and a status file.
compile_one() {
  local kind="$1" src="$2" name
  name="$(echo "$src" | tr '/.' '__')"
  if [ "$kind" = cu ]; then
    # setup.py's nvcc flags plus the ones torch's CUDAExtension always adds (COMMON_NVCC_FLAGS)
    "$NVCC" -std=c++17 -O3 -lineinfo -gencode arch=compute_90,code=sm_90 -Xcompiler -fPIC \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -DVFM_WITH_CUDA=1 \
      -Icsrc -c "$src" -o "$OUT/$name.o" >"$OUT/$name.log" 2>&1
  else
    # shellcheck disable=SC2086
    "$CXX" -std=c++17 -fsyntax-only -w -DVFM_WITH_CUDA=1 -DVFM_CUDA_ARCHS=sm_90 -Icsrc $TORCH_INC -I"$PY_INC" \
      -I"$CUDA_HOME/include" "$src" >"$OUT/$name.log" 2>&1
  fi
  echo $? >"$OUT/$name.rc"
}
export -f compile_one
export NVCC CXX TORCH_INC PY_INC CUDA_HOME OUT

start=$(date +%s)
{
  for f in "${CU_FILES[@]}"; do printf 'cu\n%s\n' "$f"; done
  for f in "${CPP_FILES[@]}" csrc/ext.cpp; do printf 'cpp\n%s\n' "$f"; done
} | xargs -n 2 -P "$JOBS" bash -c 'compile_one "$0" "$1"' || true

fail=0
for f in "${CU_FILES[@]}" "${CPP_FILES[@]}" csrc/ext.cpp; do
  name="$(echo "$f" | tr '/.' '__')"
  rc="$(cat "$OUT/$name.rc" 2>/dev/null || echo missing)"
  if [ "$rc" = 0 ]; then
    echo "ok    $f"
  else
    echo "FAIL  $f (exit $rc)"
    cat "$OUT/$name.log" 2>/dev/null || true
    fail=1
  fi
done
echo "check_cuda_compile: ${#CU_FILES[@]} .cu (sm_90) + $((${#CPP_FILES[@]} + 1)) .cpp checked in $(( $(date +%s) - start )) s"
exit "$fail"
