#!/usr/bin/env bash
# The one GPU check, for a bare machine with torch (CUDA), nvcc and triton (an H200 with torch
# 2.11+cu130, nvcc 13.0, triton 3.6 here).  Within about 8 minutes it:
#   1. builds the extension, CUDA half included, for sm_90 only (all cores),
#   2. runs the reduced GPU test matrix (tests marked gpu: Triton kernels through the real compiler,
#      the CUDA kernels, the prologue, LoRA and the fused linear loss),
#   3. prints the knowledge cross-entropy table: vfm[triton] and vfm[cuda] beside torch eager,
#      torch.compile and Liger-Kernel (carried as a wheel in .whl/ when the machine lacks it),
#   4. times the LoRA layer (triton backend, then cuda) against PEFT's, then DoRA, torch.compile on
#      PEFT (not run here: minutes of compiling) and many adapters per batch against their targets
#      (benches/bench_lora_variants.py), and PEFT's mixed-adapter batches (benches/bench_peft_mixed.py),
#   5. times the fused linear loss against eager, torch's linear_cross_entropy, Liger and
#      Cut Cross-Entropy (wheels in .whl/).
# Every stage writes under $OUT as it goes (default ./out), has its own time limit, and a failed
# stage does not stop the next one.  Usage: bash benches/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=9.0 VFM_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
PY=${PYTHON:-python3}
START=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  log "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

log "1/5 build (sm_90, CUDA half included)"
export VFM_BUILD_EXT=1
if ! timeout 260 $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  log "build FAILED"; tail -40 "$OUT/build.log"
fi
grep -i "warning: the native extension" "$OUT/build.log" && tail -60 "$OUT/build.log"
$PY -m vfm.cli doctor 2>&1 | tee "$OUT/doctor.txt"
$PY -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__)" | tee -a "$OUT/gpu_check.log"

log "1b/5 sm_90 compile check of every Triton kernel (triton $($PY -c 'import triton; print(triton.__version__)'))"
timeout 120 $PY -m pytest tests/test_triton_sm90_compile.py -q -x -p no:cacheprovider 2>&1 | tail -15 \
  | tee "$OUT/sm90_compile.txt"
log "2/5 GPU tests"
VFM_TEST_GPU=1 timeout 200 $PY -m pytest -q -p no:cacheprovider -rf -m gpu --maxfail=30 \
  tests/test_gpu_knowledge_ce.py tests/test_gpu_cuda_kce.py tests/test_gpu_cuda_lora.py tests/test_gpu_lora.py \
  tests/test_kce_prologue.py tests/test_fused_linear_ce.py tests/test_fused_linear_ce_extra.py tests/test_flce_filter.py \
  tests/test_peft_mixed.py tests/test_review_backends.py \
  -k "not 128256" 2>&1 | tail -60 | tee "$OUT/gpu_tests.txt"

log "3/5 knowledge CE benchmark (N=8192, V=128256, bf16)"
timeout 150 $PY -m vfm.bench --device cuda --repeat 10 --json "$OUT/bench.json" \
  --providers "vfm[triton],vfm[triton]-inplace,vfm[cuda],vfm[cuda]-inplace,torch eager,torch.compile,liger" 2>&1 | tee "$OUT/bench.txt"

log "4/5 LoRA layer vs PEFT (N=8192, bf16, r=16): triton, then cuda"
timeout 60 $PY -m pytest benches/bench_lora.py -q -p no:cacheprovider --benchmark-columns=median,min \
  --benchmark-sort=name 2>&1 | tail -24 | tee "$OUT/bench_lora.txt"
VFM_BACKEND=cuda timeout 40 $PY -m pytest benches/bench_lora.py -q -p no:cacheprovider -k vfm \
  --benchmark-columns=median,min --benchmark-sort=name 2>&1 | tail -12 | tee "$OUT/bench_lora_cuda.txt"

log "4b/5 LoRA variants: DoRA, two active adapters and K = 4/16/64 adapters per batch (4096x4096, N=8192; torch.compile on PEFT: --cases compile)"
timeout 120 $PY benches/bench_lora_variants.py 5 --cases dora,multi,several 2>&1 | tee "$OUT/bench_lora_variants.txt"

log "4c/5 PEFT mixed-adapter batches (adapter_names=, inference): PEFT's loop vs vfm (4096x4096, bf16, B=64)"
timeout 90 $PY benches/bench_peft_mixed.py 10 2>&1 | tee "$OUT/bench_peft_mixed.txt"

log "5/5 fused linear knowledge CE (N=8192, H=4096, V=128256, bf16)"
timeout 150 $PY benches/bench_fused_linear.py --device cuda --repeat 5 --json "$OUT/bench_fused_linear.json" 2>&1 \
  | tee "$OUT/bench_fused_linear.txt"
log "done"
