// CPU kernels of the dropout side of vfm_C's lora_linear backend (contract:
// vfm/ops/lora_reference.py).  The keep-mask D is never materialised: each kernel regenerates it
// from (seed, element offset) with the contract's hash while it streams over x.
//
// * lora_dropout_xa(x, a, seed, threshold, scale) -> xa (N, r) = D(x) A^T
// * lora_dropout_dx_(dx, gh, a, seed, threshold, scale): dx (N, in) += D(gh A)
// * lora_dropout_ga(gh, x, seed, threshold, scale) -> (r, in) = gh^T D(x)
//
// x: (N, in) with unit column stride (any row stride); a: (r, in) contiguous; gh: (N, r)
// contiguous; x, a, gh, dx all of one dtype, float32 or float64 (the Python adapter sends the
// other cases to the reference).  Accumulation in the input dtype.  The offset of element (i, j)
// is i * in + j (x seen as a contiguous matrix), as in the reference.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast", "no-trapping-math")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// The row loops are compiled per ISA (as in knowledge_ce.cpp): the hash needs 32-bit vector
// multiplies (SSE4.1 / AVX2) to vectorise.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VFM_LORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VFM_LORA_CLONES
#endif

namespace vfm_cpu {
namespace {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

struct Drop {
  uint32_t k0, k1;
  uint32_t thr_lo;  // threshold when it fits in 32 bits
  bool all_dropped;  // threshold == 2^32 (cannot happen for p < 1, kept for safety)
};

inline Drop make_drop(int64_t seed, int64_t threshold) {
  const uint64_t s = static_cast<uint64_t>(seed);
  Drop d;
  d.k0 = static_cast<uint32_t>(s & 0xFFFFFFFFull);
  d.k1 = static_cast<uint32_t>((s >> 32) & 0xFFFFFFFFull);
  d.all_dropped = threshold > 0xFFFFFFFFll;
  d.thr_lo = static_cast<uint32_t>(std::min<int64_t>(std::max<int64_t>(threshold, 0), 0xFFFFFFFFll));
  return d;
}

// u[j] = keep(base + j) ? v[j] * scale : 0 for j in [0, n), where base + j < 2^64.
template <typename T>
inline void dropped_row(const Drop& d, uint64_t base, const T* v, T scale, int64_t n, T* u) {
  if (d.all_dropped) {
    for (int64_t j = 0; j < n; ++j) u[j] = T(0);
    return;
  }
  const uint64_t end = base + static_cast<uint64_t>(n);
  if ((base >> 32) == ((end - 1) >> 32) || n == 0) {
    // One high word for the whole span: a vectorisable loop on 32-bit lanes.
    const uint32_t hi_mix = d.k1 ^ (static_cast<uint32_t>(base >> 32) * 0x9E3779B9u);
    const uint32_t lo0 = static_cast<uint32_t>(base);
    const uint32_t k0 = d.k0, thr = d.thr_lo;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t h = fmix32(fmix32((lo0 + static_cast<uint32_t>(j)) ^ k0) ^ hi_mix);
      u[j] = h >= thr ? v[j] * scale : T(0);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const uint64_t off = base + static_cast<uint64_t>(j);
      const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(off) ^ d.k0) ^ d.k1 ^
                                (static_cast<uint32_t>(off >> 32) * 0x9E3779B9u));
      u[j] = h >= d.thr_lo ? v[j] * scale : T(0);
    }
  }
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

template <typename T>
inline void axpy(T alpha, const T* x, int64_t n, T* y) {  // y += alpha * x
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

template <typename T>
inline void scale_row(T alpha, const T* x, int64_t n, T* y) {  // y = alpha * x
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = alpha * x[j];
}

template <typename T>
inline void xa_range(const Drop& d, const T* xp, int64_t ldx, const T* ap, T* op, int64_t K, int64_t R, T s,
                     int64_t i0, int64_t i1, T* u) {
  for (int64_t i = i0; i < i1; ++i) {
    dropped_row<T>(d, static_cast<uint64_t>(i) * static_cast<uint64_t>(K), xp + i * ldx, s, K, u);
    for (int64_t k = 0; k < R; ++k) op[i * R + k] = dot(u, ap + k * K, K);
  }
}

template <typename T>
inline void dx_range(const Drop& d, T* dp, const T* gp, const T* ap, int64_t K, int64_t R, T s, int64_t i0,
                     int64_t i1, T* t, T* u) {
  for (int64_t i = i0; i < i1; ++i) {
    const T* g = gp + i * R;
    scale_row(g[0], ap, K, t);
    for (int64_t k = 1; k < R; ++k) axpy(g[k], ap + k * K, K, t);
    dropped_row<T>(d, static_cast<uint64_t>(i) * static_cast<uint64_t>(K), t, s, K, u);
    axpy(T(1), u, K, dp + i * K);
  }
}

constexpr int64_t kGaBlock = 64;

// Columns [j0, j0 + w) of gh^T D(x), all rows, into op (r, K); acc: R * kGaBlock scratch.
template <typename T>
inline void ga_block(const Drop& d, const T* xp, int64_t ldx, const T* gp, T* op, int64_t N, int64_t K, int64_t R,
                     T s, int64_t j0, int64_t w, T* acc) {
  T u[kGaBlock];
  for (int64_t q = 0; q < R * kGaBlock; ++q) acc[q] = T(0);
  for (int64_t i = 0; i < N; ++i) {
    dropped_row<T>(d, static_cast<uint64_t>(i) * static_cast<uint64_t>(K) + j0, xp + i * ldx + j0, s, w, u);
    const T* g = gp + i * R;
    for (int64_t k = 0; k < R; ++k) axpy(g[k], u, w, acc + k * kGaBlock);
  }
  for (int64_t k = 0; k < R; ++k)
    for (int64_t j = 0; j < w; ++j) op[k * K + j0 + j] = acc[k * kGaBlock + j];
}

#define VFM_LORA_INSTANTIATE(T, SFX)                                                                            \
  VFM_LORA_CLONES void xa_range_##SFX(const Drop& d, const T* xp, int64_t ldx, const T* ap, T* op, int64_t K,   \
                                      int64_t R, T s, int64_t i0, int64_t i1, T* u) {                           \
    xa_range<T>(d, xp, ldx, ap, op, K, R, s, i0, i1, u);                                                         \
  }                                                                                                             \
  VFM_LORA_CLONES void dx_range_##SFX(const Drop& d, T* dp, const T* gp, const T* ap, int64_t K, int64_t R, T s, \
                                      int64_t i0, int64_t i1, T* t, T* u) {                                     \
    dx_range<T>(d, dp, gp, ap, K, R, s, i0, i1, t, u);                                                           \
  }                                                                                                             \
  VFM_LORA_CLONES void ga_block_##SFX(const Drop& d, const T* xp, int64_t ldx, const T* gp, T* op, int64_t N,   \
                                      int64_t K, int64_t R, T s, int64_t j0, int64_t w, T* acc) {               \
    ga_block<T>(d, xp, ldx, gp, op, N, K, R, s, j0, w, acc);                                                     \
  }

VFM_LORA_INSTANTIATE(float, f32)
VFM_LORA_INSTANTIATE(double, f64)

inline void xa_rows(const Drop& d, const float* xp, int64_t ldx, const float* ap, float* op, int64_t K, int64_t R,
                    float s, int64_t i0, int64_t i1, float* u) { xa_range_f32(d, xp, ldx, ap, op, K, R, s, i0, i1, u); }
inline void xa_rows(const Drop& d, const double* xp, int64_t ldx, const double* ap, double* op, int64_t K, int64_t R,
                    double s, int64_t i0, int64_t i1, double* u) { xa_range_f64(d, xp, ldx, ap, op, K, R, s, i0, i1, u); }
inline void dx_rows(const Drop& d, float* dp, const float* gp, const float* ap, int64_t K, int64_t R, float s,
                    int64_t i0, int64_t i1, float* t, float* u) { dx_range_f32(d, dp, gp, ap, K, R, s, i0, i1, t, u); }
inline void dx_rows(const Drop& d, double* dp, const double* gp, const double* ap, int64_t K, int64_t R, double s,
                    int64_t i0, int64_t i1, double* t, double* u) { dx_range_f64(d, dp, gp, ap, K, R, s, i0, i1, t, u); }
inline void ga_cols(const Drop& d, const float* xp, int64_t ldx, const float* gp, float* op, int64_t N, int64_t K,
                    int64_t R, float s, int64_t j0, int64_t w, float* acc) { ga_block_f32(d, xp, ldx, gp, op, N, K, R, s, j0, w, acc); }
inline void ga_cols(const Drop& d, const double* xp, int64_t ldx, const double* gp, double* op, int64_t N, int64_t K,
                    int64_t R, double s, int64_t j0, int64_t w, double* acc) { ga_block_f64(d, xp, ldx, gp, op, N, K, R, s, j0, w, acc); }

void check_common(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "lora_dropout: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "lora_dropout: ", name, " must be 2-D, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "lora_dropout: ", name, " must be float32 or float64, got ", x.scalar_type());
}

at::Tensor unit_col(const at::Tensor& x) { return x.stride(1) == 1 || x.size(1) <= 1 ? x : x.contiguous(); }

}  // namespace

at::Tensor lora_dropout_xa_cpu(const at::Tensor& x_in, const at::Tensor& a_in, int64_t seed, int64_t threshold,
                               double scale) {
  check_common(x_in, "x");
  check_common(a_in, "a");
  TORCH_CHECK(x_in.scalar_type() == a_in.scalar_type(), "lora_dropout_xa: x and a dtypes differ");
  TORCH_CHECK(x_in.size(1) == a_in.size(1), "lora_dropout_xa: x is ", x_in.sizes(), " but a is ", a_in.sizes());
  const at::Tensor x = unit_col(x_in);
  const at::Tensor a = a_in.contiguous();
  const int64_t N = x.size(0), K = x.size(1), R = a.size(0);
  at::Tensor out = at::empty({N, R}, x.options());
  if (N == 0 || R == 0) return out;
  if (K == 0) return out.zero_();
  const Drop d = make_drop(seed, threshold);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_dropout_xa", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t ldx = x.size(0) > 1 ? x.stride(0) : K;
    const scalar_t s = static_cast<scalar_t>(scale);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * R, 1));
    at::parallel_for(0, N, grain, [&](int64_t i0, int64_t i1) {
      std::vector<scalar_t> u(K);
      xa_rows(d, xp, ldx, ap, op, K, R, s, i0, i1, u.data());
    });
  });
  return out;
}

void lora_dropout_dx_cpu(at::Tensor dx, const at::Tensor& gh_in, const at::Tensor& a_in, int64_t seed,
                         int64_t threshold, double scale) {
  check_common(dx, "dx");
  check_common(gh_in, "gh");
  check_common(a_in, "a");
  TORCH_CHECK(dx.scalar_type() == gh_in.scalar_type() && dx.scalar_type() == a_in.scalar_type(),
              "lora_dropout_dx_: dx, gh and a dtypes differ");
  TORCH_CHECK(dx.is_contiguous(), "lora_dropout_dx_: dx must be contiguous");
  const int64_t N = dx.size(0), K = dx.size(1), R = a_in.size(0);
  TORCH_CHECK(a_in.size(1) == K && gh_in.size(0) == N && gh_in.size(1) == R, "lora_dropout_dx_: shapes dx ",
              dx.sizes(), ", gh ", gh_in.sizes(), ", a ", a_in.sizes(), " do not match");
  if (N == 0 || K == 0 || R == 0) return;
  const at::Tensor gh = gh_in.contiguous();
  const at::Tensor a = a_in.contiguous();
  const Drop d = make_drop(seed, threshold);
  AT_DISPATCH_FLOATING_TYPES(dx.scalar_type(), "lora_dropout_dx_", [&] {
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const scalar_t* gp = gh.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(scale);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K * R, 1));
    at::parallel_for(0, N, grain, [&](int64_t i0, int64_t i1) {
      std::vector<scalar_t> t(K), u(K);
      dx_rows(d, dp, gp, ap, K, R, s, i0, i1, t.data(), u.data());
    });
  });
}

at::Tensor lora_dropout_ga_cpu(const at::Tensor& gh_in, const at::Tensor& x_in, int64_t seed, int64_t threshold,
                               double scale) {
  check_common(gh_in, "gh");
  check_common(x_in, "x");
  TORCH_CHECK(gh_in.scalar_type() == x_in.scalar_type(), "lora_dropout_ga: gh and x dtypes differ");
  TORCH_CHECK(gh_in.size(0) == x_in.size(0), "lora_dropout_ga: gh is ", gh_in.sizes(), " but x is ", x_in.sizes());
  const at::Tensor x = unit_col(x_in);
  const at::Tensor gh = gh_in.contiguous();
  const int64_t N = x.size(0), K = x.size(1), R = gh.size(1);
  at::Tensor out = at::zeros({R, K}, x.options());
  if (N == 0 || K == 0 || R == 0) return out;
  const Drop d = make_drop(seed, threshold);
  constexpr int64_t JB = kGaBlock;
  const int64_t nblocks = (K + JB - 1) / JB;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_dropout_ga", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gh.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t ldx = x.size(0) > 1 ? x.stride(0) : K;
    const scalar_t s = static_cast<scalar_t>(scale);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> acc(R * JB);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j0 = b * JB;
        ga_cols(d, xp, ldx, gp, op, N, K, R, s, j0, std::min(JB, K - j0), acc.data());
      }
    });
  });
  return out;
}

}  // namespace vfm_cpu

TORCH_LIBRARY_IMPL(vfm_C, CPU, m) {
  m.impl("lora_dropout_xa", &vfm_cpu::lora_dropout_xa_cpu);
  m.impl("lora_dropout_dx_", &vfm_cpu::lora_dropout_dx_cpu);
  m.impl("lora_dropout_ga", &vfm_cpu::lora_dropout_ga_cpu);
}
