// C entry points of the emulated CUDA kernels (see emu.h), loaded by tests/test_cuda_emulation.py
// with ctypes.  Build: g++ -std=c++20 -O1 -shared -fPIC -DVFM_CUDA_EMULATION -I csrc
// -I $CUDA_HOME/include tests/cuda_emulation/harness.cpp -o harness.so
#include "emu.h"

#include "cuda/kce_kernel.cu"
#include "cuda/lora_kernels.cu"

extern "C" {

int emu_kce_forward(const vfm_cuda::KceParams* p, int threads) {
  vfm_emu::forced_block_threads = threads;
  return vfm_cuda::kce_forward_launch(*p, nullptr);
}

long emu_divergent_barriers() { return vfm_emu::divergent_barriers; }

int emu_lora_shrink(const void* src, int64_t src_rs, int src_dtype, const void* mats, int64_t sK, int64_t sR,
                    int64_t sC, int adapter_dtype, const int64_t* ids, int64_t K, const float* scales, double alpha,
                    int64_t N, int64_t R, int64_t C, uint64_t seed, uint32_t threshold, double dscale, void* out) {
  vfm_cuda::DropoutArgs d;
  d.seed = seed;
  d.threshold = threshold;
  d.dscale = dscale;
  return vfm_cuda::lora_shrink_launch(src, src_rs, src_dtype, mats, sK, sR, sC, adapter_dtype, ids, K, scales, alpha,
                                      N, R, C, d, out, nullptr);
}

int emu_lora_expand(void* out, int64_t out_rs, int out_dtype, const void* coef, const void* mats, int64_t sK,
                    int64_t sR, int64_t sC, int adapter_dtype, const int64_t* ids, int64_t K, const float* scales,
                    double alpha, int64_t N, int64_t R, int64_t C, uint64_t seed, uint32_t threshold, double dscale) {
  vfm_cuda::DropoutArgs d;
  d.seed = seed;
  d.threshold = threshold;
  d.dscale = dscale;
  return vfm_cuda::lora_expand_launch(out, out_rs, out_dtype, coef, mats, sK, sR, sC, adapter_dtype, ids, K, scales,
                                      alpha, N, R, C, d, nullptr);
}

int emu_lora_dropout(const void* src, int64_t src_rs, int src_dtype, int adapter_dtype, int64_t N, int64_t C,
                     uint64_t seed, uint32_t threshold, double dscale, void* out) {
  vfm_cuda::DropoutArgs d;
  d.seed = seed;
  d.threshold = threshold;
  d.dscale = dscale;
  return vfm_cuda::lora_dropout_launch(src, src_rs, src_dtype, adapter_dtype, N, C, d, out, nullptr);
}

size_t emu_kce_params_size() { return sizeof(vfm_cuda::KceParams); }
}
