// Launcher interface of the CUDA low-rank adapter kernels (csrc/cuda/lora_kernels.cu) and the
// dropout hash they share with the contract (vfm/ops/lora_reference.py).
//
// Free of torch and CUDA headers: lora_kernels.cu is compiled by nvcc alone, lora_binding.cpp
// (host compiler, torch) checks the tensors and calls the launchers on the current stream.
// Element types: 0 float32, 1 float64, 2 float16, 3 bfloat16.  Supported (src or out, adapter)
// dtype pairs: equal dtypes, and float16 / bfloat16 with float32 adapters (lora_pair_supported).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VFM_LORA_HD __host__ __device__ __forceinline__
#else
#define VFM_LORA_HD inline
#endif

namespace vfm_cuda {

// MurmurHash3's 32-bit finaliser.
VFM_LORA_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The contract's 32-bit dropout hash of element `offset` (row-major (N, C) offset) for `seed`.
VFM_LORA_HD uint32_t dropout_hash(uint64_t seed, uint64_t offset) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t lo = static_cast<uint32_t>(offset), hi = static_cast<uint32_t>(offset >> 32);
  return fmix32(fmix32(lo ^ k0) ^ k1 ^ (hi * 0x9E3779B9u));
}

// Dropout of one call: keep iff hash >= threshold; kept values times dscale.  threshold == 0 means
// no dropout (every hash is >= 0).
struct DropoutArgs {
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double dscale = 1.0;
};

// Largest rank the shrink kernel takes.
constexpr int64_t kLoraMaxRank = 128;

bool lora_pair_supported(int src_dtype, int adapter_dtype);

// out (N, R) [adapter dtype, contiguous] = alpha * scales[k] * D(src_i cast to the adapter dtype)
// M_k^T with k = ids[i] (ids null: k = 0; id -1: a zero row).  M_k[r, c] = mats[k * sK + r * sR +
// c * sC]; scales null: 1.  An id outside [-1, K) gives a NaN row (the Python layer validates ids).  src (N, C) with row stride src_rs, unit column stride.
int lora_shrink_launch(const void* src, int64_t src_rs, int src_dtype, const void* mats, int64_t sK, int64_t sR,
                       int64_t sC, int adapter_dtype, const int64_t* ids, int64_t K, const float* scales, double alpha,
                       int64_t N, int64_t R, int64_t C, DropoutArgs drop, void* out, void* stream);

// out (N, C) [row stride out_rs, unit column stride, out dtype] += D(alpha * scales[k] * coef_i M_k)
// with coef (N, R) contiguous and M_k[r, c] = mats[k * sK + r * sR + c * sC] in the adapter dtype;
// the low-rank term is rounded to the adapter dtype (after the product, the scale and the dropout
// scale), then added in float and rounded to out's dtype.  id -1: row unchanged.
int lora_expand_launch(void* out, int64_t out_rs, int out_dtype, const void* coef, const void* mats, int64_t sK,
                       int64_t sR, int64_t sC, int adapter_dtype, const int64_t* ids, int64_t K, const float* scales,
                       double alpha, int64_t N, int64_t R, int64_t C, DropoutArgs drop, void* stream);

// out (N, C) contiguous [adapter dtype] = D(src cast to the adapter dtype).
int lora_dropout_launch(const void* src, int64_t src_rs, int src_dtype, int adapter_dtype, int64_t N, int64_t C,
                        DropoutArgs drop, void* out, void* stream);

const char* lora_cuda_error_string(int code);

}  // namespace vfm_cuda
