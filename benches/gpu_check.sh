#!/usr/bin/env bash
# The one GPU check, for a bare machine with torch (CUDA), nvcc and triton (an H200 with torch
# 2.11+cu130, nvcc 13.0, triton 3.6 here).  Within about 8 minutes it:
#   1. builds the extension for sm_90 only (all cores),
#   2. runs the reduced GPU test matrix (tests marked gpu, real Triton compiler),
#   3. prints the benchmark table: vfm's backends against torch eager, torch.compile and
#      Liger-Kernel (carried as a wheel in .whl/ when the machine lacks it),
#   4. times the LoRA layer against PEFT's.
# Every stage writes under $OUT as it goes (default ./out), and a failed stage does not stop the
# next one.  Usage: bash benches/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=9.0 VFM_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
PY=${PYTHON:-python3}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  log "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

log "1/4 build (sm_90)"
# The GPU needs only the CUDA half of the extension: without CUDA sources, skip native code.
if ls csrc/cuda/*.cu >/dev/null 2>&1; then export VFM_BUILD_EXT=1; else export VFM_BUILD_EXT=0; fi
if ! timeout 200 $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  log "build FAILED"; tail -40 "$OUT/build.log"
fi
grep -i "warning: the native extension" "$OUT/build.log" && tail -40 "$OUT/build.log"
$PY -m vfm.cli doctor 2>&1 | tee "$OUT/doctor.txt"
$PY -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__)" | tee -a "$OUT/gpu_check.log"

log "2/4 GPU tests"
VFM_TEST_GPU=1 timeout 150 $PY -m pytest tests/test_gpu_knowledge_ce.py -q -p no:cacheprovider -rf 2>&1 \
  | tail -40 | tee "$OUT/gpu_tests.txt"

log "3/4 benchmark (N=8192, V=128256, bf16)"
timeout 280 $PY -m vfm.bench --device cuda --repeat 10 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"

log "4/4 LoRA layer vs PEFT (N=8192, bf16, r=16)"
timeout 100 $PY -m pytest benches/bench_lora.py -q -p no:cacheprovider --benchmark-columns=median,min \
  --benchmark-sort=name 2>&1 | tail -20 | tee "$OUT/bench_lora.txt"
log "done"
