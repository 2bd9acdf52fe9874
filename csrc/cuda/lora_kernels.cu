// CUDA kernels of the low-rank adapter ops (contract: vfm/ops/lora_reference.py; Python side:
// vfm/ops/lora_cuda.py; launcher interface: csrc/cuda/lora_cuda.h).  Free of torch headers:
// compiled by nvcc alone.
//
// * shrink (multi-adapter "segmented GEMV", one block per row): out_i = alpha * s_k *
//   D(src_i) M_k^T.  The row's (dropped, cast) inputs are staged in shared memory a tile of 2048
//   at a time; each warp owns ranks r = warp, warp + 8, ... and sums over the tile with its 32
//   lanes (coalesced reads of M_k when its column stride is 1), fp32 (fp64) accumulation, one
//   warp reduction per rank at the end.  The dropout mask is regenerated from (seed, i * C + j)
//   while staging: never stored.
// * expand (in place): out_i += D(alpha * s_k * coef_i M_k), one thread per output element,
//   the row's coefficients in shared memory.  With dropout this is the backward's
//   grad_x += D(gxa A) for the input gradient; without, the forward's y += s_k xa_i B_k^T.
// * dropout: D(src) cast to the adapter dtype, a new contiguous tensor (for grad_A = gxa^T D(x),
//   which then runs on the tensor cores).
// Rows whose adapter id is -1 get a zero row (shrink) or are left unchanged (expand).  Rounding
// follows the reference: the input is cast to the adapter dtype, the dropout scale is applied in
// the op-math type and rounded, products accumulate in fp32 (fp64) and are rounded to the adapter
// dtype before a scale and before being added (in float) to an output of another dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/lora_cuda.h"

namespace vfm_cuda {
namespace {

enum : int { kLoraF32 = 0, kLoraF64 = 1, kLoraF16 = 2, kLoraBF16 = 3 };

template <typename S>
struct Ty;
template <>
struct Ty<float> {
  using O = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Ty<double> {
  using O = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Ty<__half> {
  using O = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Ty<__nv_bfloat16> {
  using O = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// v rounded to W and back to W's op-math type.
template <typename W>
__device__ __forceinline__ typename Ty<W>::O round_to(typename Ty<W>::O v) {
  return Ty<W>::load(Ty<W>::store(v));
}

// D applied to one value already in the adapter dtype (as its op-math type).
template <typename W>
__device__ __forceinline__ typename Ty<W>::O drop_value(typename Ty<W>::O v, const DropoutArgs& d,
                                                        uint64_t offset) {
  using O = typename Ty<W>::O;
  if (d.threshold == 0u) return v;
  const bool keep = dropout_hash(d.seed, offset) >= d.threshold;
  return keep ? round_to<W>(v * static_cast<O>(d.dscale)) : O(0);
}

constexpr int kShrinkThreads = 256;
constexpr int kShrinkWarps = kShrinkThreads / 32;
constexpr int kShrinkQ = static_cast<int>(kLoraMaxRank / kShrinkWarps);  // ranks per warp
constexpr int kTile = 2048;

template <typename X, typename W>
__global__ void __launch_bounds__(kShrinkThreads)
    shrink_kernel(const X* __restrict__ src, int64_t src_rs, const W* __restrict__ mats, int64_t sK, int64_t sR,
                  int64_t sC, const int64_t* __restrict__ ids, int64_t K, const float* __restrict__ scales,
                  double alpha, int64_t R, int64_t C, DropoutArgs drop, W* __restrict__ out) {
  using O = typename Ty<W>::O;
  __shared__ O u[kTile];
  const int64_t i = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t k = ids != nullptr ? ids[i] : 0;
  W* orow = out + i * R;
  if (k < 0 || k >= K) {  // -1: no adapter, a zero row; an invalid id: a NaN row (never clipped)
    const O fill = k == -1 ? O(0) : static_cast<O>(NAN);
    for (int64_t r = tid; r < R; r += kShrinkThreads) orow[r] = Ty<W>::store(fill);
    return;
  }
  const X* x = src + i * src_rs;
  const W* m = mats + k * sK;
  O acc[kShrinkQ];
#pragma unroll
  for (int q = 0; q < kShrinkQ; ++q) acc[q] = O(0);
  for (int64_t j0 = 0; j0 < C; j0 += kTile) {
    const int n = static_cast<int>(C - j0 < kTile ? C - j0 : kTile);
    __syncthreads();
    for (int j = tid; j < n; j += kShrinkThreads) {
      const O v = round_to<W>(static_cast<O>(Ty<X>::load(x[j0 + j])));
      u[j] = drop_value<W>(v, drop, static_cast<uint64_t>(i * C + j0 + j));
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kShrinkQ; ++q) {
      const int64_t r = warp + static_cast<int64_t>(q) * kShrinkWarps;
      if (r < R) {
        const W* mr = m + r * sR + j0 * sC;
        O a = acc[q];
        for (int j = lane; j < n; j += 32) a += u[j] * Ty<W>::load(mr[j * sC]);
        acc[q] = a;
      }
    }
  }
  const O fs = static_cast<O>(alpha * (scales != nullptr ? static_cast<double>(scales[k]) : 1.0));
#pragma unroll
  for (int q = 0; q < kShrinkQ; ++q) {
    const int64_t r = warp + static_cast<int64_t>(q) * kShrinkWarps;
    if (r < R) {  // warp-uniform
      O a = acc[q];
      for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
      if (lane == 0) {
        O v = round_to<W>(a);
        if (fs != O(1)) v = round_to<W>(v * round_to<W>(fs));
        orow[r] = Ty<W>::store(v);
      }
    }
  }
}

constexpr int kExpandThreads = 256;

template <typename Y, typename W>
__global__ void __launch_bounds__(kExpandThreads)
    expand_kernel(Y* __restrict__ out, int64_t out_rs, const W* __restrict__ coef, const W* __restrict__ mats,
                  int64_t sK, int64_t sR, int64_t sC, const int64_t* __restrict__ ids, int64_t K,
                  const float* __restrict__ scales, double alpha, int64_t R, int64_t C, DropoutArgs drop) {
  using O = typename Ty<W>::O;
  __shared__ O cf[kLoraMaxRank];
  const int64_t i = blockIdx.x;
  const int64_t k = ids != nullptr ? ids[i] : 0;
  if (k == -1) return;  // no adapter: the row is left as it is
  if (k < -1 || k >= K) {  // an invalid id (the Python layer validates them): a NaN row, never clipped
    const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
    if (o < C) out[i * out_rs + o] = Ty<Y>::store(static_cast<typename Ty<Y>::O>(NAN));
    return;
  }
  for (int64_t r = threadIdx.x; r < R; r += kExpandThreads) cf[r] = Ty<W>::load(coef[i * R + r]);
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (o >= C) return;
  const W* m = mats + k * sK + o * sC;
  O acc = O(0);
  for (int64_t r = 0; r < R; ++r) acc += cf[r] * Ty<W>::load(m[r * sR]);
  O v = round_to<W>(acc);
  const O fs = static_cast<O>(alpha * (scales != nullptr ? static_cast<double>(scales[k]) : 1.0));
  if (fs != O(1)) v = round_to<W>(v * round_to<W>(fs));
  v = drop_value<W>(v, drop, static_cast<uint64_t>(i * C + o));
  Y* po = out + i * out_rs + o;
  using OY = typename Ty<Y>::O;
  *po = Ty<Y>::store(static_cast<OY>(static_cast<O>(Ty<Y>::load(*po)) + v));
}

template <typename X, typename W>
__global__ void dropout_kernel(const X* __restrict__ src, int64_t src_rs, int64_t N, int64_t C, DropoutArgs drop,
                               W* __restrict__ out) {
  using O = typename Ty<W>::O;
  const int64_t total = N * C;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / C, j = e - i * C;
    const O v = round_to<W>(static_cast<O>(Ty<X>::load(src[i * src_rs + j])));
    out[e] = Ty<W>::store(drop_value<W>(v, drop, static_cast<uint64_t>(e)));
  }
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<X>, Tag<W>) for a supported (src / out, adapter) dtype pair.
template <typename F>
int dispatch_pair(int xd, int wd, F&& f) {
  if (xd == wd) {
    switch (wd) {
      case kLoraF32: return f(Tag<float>{}, Tag<float>{});
      case kLoraF64: return f(Tag<double>{}, Tag<double>{});
      case kLoraF16: return f(Tag<__half>{}, Tag<__half>{});
      case kLoraBF16: return f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      default: break;
    }
  } else if (wd == kLoraF32 && xd == kLoraF16) {
    return f(Tag<__half>{}, Tag<float>{});
  } else if (wd == kLoraF32 && xd == kLoraBF16) {
    return f(Tag<__nv_bfloat16>{}, Tag<float>{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

bool lora_pair_supported(int xd, int wd) {
  if (xd == wd) return xd >= kLoraF32 && xd <= kLoraBF16;
  return wd == kLoraF32 && (xd == kLoraF16 || xd == kLoraBF16);
}

int lora_shrink_launch(const void* src, int64_t src_rs, int src_dtype, const void* mats, int64_t sK, int64_t sR,
                       int64_t sC, int adapter_dtype, const int64_t* ids, int64_t K, const float* scales, double alpha,
                       int64_t N, int64_t R, int64_t C, DropoutArgs drop, void* out, void* stream) {
  if (N == 0 || R == 0) return 0;
  if (R > kLoraMaxRank) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_pair(src_dtype, adapter_dtype, [&](auto xt, auto wt) {
    using X = typename decltype(xt)::type;
    using W = typename decltype(wt)::type;
#if defined(VFM_CUDA_EMULATION)
    return vfm_emu::launch(N, 1, kShrinkThreads, 0, [&] {
      shrink_kernel<X, W>(static_cast<const X*>(src), src_rs, static_cast<const W*>(mats), sK, sR, sC, ids, K,
                          scales, alpha, R, C, drop, static_cast<W*>(out));
    });
#else
    shrink_kernel<X, W><<<static_cast<unsigned>(N), kShrinkThreads, 0, s>>>(
        static_cast<const X*>(src), src_rs, static_cast<const W*>(mats), sK, sR, sC, ids, K, scales, alpha, R, C,
        drop, static_cast<W*>(out));
    return static_cast<int>(cudaGetLastError());
#endif
  });
}

int lora_expand_launch(void* out, int64_t out_rs, int out_dtype, const void* coef, const void* mats, int64_t sK,
                       int64_t sR, int64_t sC, int adapter_dtype, const int64_t* ids, int64_t K, const float* scales,
                       double alpha, int64_t N, int64_t R, int64_t C, DropoutArgs drop, void* stream) {
  if (N == 0 || C == 0) return 0;
  if (R > kLoraMaxRank) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t col_blocks = (C + kExpandThreads - 1) / kExpandThreads;
  if (col_blocks > 65535) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(col_blocks));
  return dispatch_pair(out_dtype, adapter_dtype, [&](auto yt, auto wt) {
    using Y = typename decltype(yt)::type;
    using W = typename decltype(wt)::type;
#if defined(VFM_CUDA_EMULATION)
    return vfm_emu::launch(N, col_blocks, kExpandThreads, 0, [&] {
      expand_kernel<Y, W>(static_cast<Y*>(out), out_rs, static_cast<const W*>(coef), static_cast<const W*>(mats), sK,
                          sR, sC, ids, K, scales, alpha, R, C, drop);
    });
#else
    expand_kernel<Y, W><<<grid, kExpandThreads, 0, s>>>(static_cast<Y*>(out), out_rs, static_cast<const W*>(coef),
                                                        static_cast<const W*>(mats), sK, sR, sC, ids, K, scales,
                                                        alpha, R, C, drop);
    return static_cast<int>(cudaGetLastError());
#endif
  });
}

int lora_dropout_launch(const void* src, int64_t src_rs, int src_dtype, int adapter_dtype, int64_t N, int64_t C,
                        DropoutArgs drop, void* out, void* stream) {
  const int64_t total = N * C;
  if (total == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 65536 * 16 ? want : 65536 * 16);
  return dispatch_pair(src_dtype, adapter_dtype, [&](auto xt, auto wt) {
    using X = typename decltype(xt)::type;
    using W = typename decltype(wt)::type;
#if defined(VFM_CUDA_EMULATION)
    return vfm_emu::launch(blocks < 4 ? blocks : 4, 1, threads, 0, [&] {
      dropout_kernel<X, W>(static_cast<const X*>(src), src_rs, N, C, drop, static_cast<W*>(out));
    });
#else
    dropout_kernel<X, W><<<blocks, threads, 0, s>>>(static_cast<const X*>(src), src_rs, N, C, drop,
                                                    static_cast<W*>(out));
    return static_cast<int>(cudaGetLastError());
#endif
  });
}

const char* lora_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace vfm_cuda
