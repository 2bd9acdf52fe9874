// CPU kernels of vfm_C's low-rank adapter backward products (contract: vfm/ops/lora_reference.py;
// the op list and the dropout convention D? are in csrc/cpu/lora_dropout.cpp's header):
//
// * lora_reduce(coef (N, R), src (N, C), K, ids?, scales?, alpha, seed, threshold, dscale) -> (K, R, C)
//     (or (R, C) without ids): res[k] = alpha * scales[k] * sum_{i: ids[i] = k} coef_i^T D?(src_i)
// * lora_dx_ga_(dx (N, C), coef (N, R), mats, src (N, C), ids?, seed, threshold, dscale) -> (K, R, C):
//     the backward pair with dropout fused (each mask element hashed once): dx[i] += D(coef_i M_k)
//     in place, and returns sum_{i in k} coef_i^T D(src_i).  One adapter (no ids, lora_linear):
//     contiguous row chunks, one per thread, stream x and dx row-wise and keep an (R, C) partial sum
//     each (summed at the end); grouped rows: (adapter, column panel) tasks.
// * lora_shrink_reduce(src (N, C), mats (R, C), coef (N, R), alpha) -> (alpha * src mats^T (N, R),
//     alpha * coef^T src (R, C)): grad_y's two products (gxa and grad_B^T) in one pass over grad_y,
//     one adapter, no dropout (defined here, not in csrc/ext.cpp).
// * lora_expand_reduce(coef (N, R), mats (R, C), src (N, C), seed, threshold, dscale) -> (dx (N, C),
//     res (R, C)): dx = D?(coef mats) (fresh; the base GEMM accumulates grad_y W onto it) and
//     res = coef^T D?(src), one adapter, one pass over src, each mask element hashed once.
// * lora_dropout_ga: the single-adapter form of lora_reduce.
// The row-chunk kernels are in csrc/cpu/lora_rows.h, the register tiles in lora_tiles.h.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast", "no-trapping-math")
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/lora_common.h"
#include "cpu/lora_rows.h"

namespace vfm_cpu {
namespace {

using namespace lora;

// ------------------------------------------------------------------------------ kernels --
// Always inlined into the per-ISA clones below (a plain call would run a default-ISA copy).
// Tasks (k, panel): task q covers adapter q / npanel, columns [(q % npanel) * JP, + JP).
template <typename T>
VFM_ALWAYS_INLINE void reduce_range(const Drop& d, const T* coef, const T* src, int64_t ld, int64_t C, int64_t R, int64_t JP,
                  int64_t npanel, const Groups* g, int64_t q0, int64_t q1, const T* ks, T* res) {
  std::vector<T> acc(R * JP), ubuf(kRG * JP), cbuf(kRG * R);
  const T ds = static_cast<T>(d.scale);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t k = q / npanel, c0 = (q % npanel) * JP;
    const int64_t w = std::min<int64_t>(JP, C - c0), WP = round_up(w, lora::Vec<T>::L);
    std::fill(acc.begin(), acc.begin() + R * WP, T(0));
    const T* u[kRG];
    for (int m = 0; m < kRG; ++m) u[m] = ubuf.data() + m * WP;
    for (int64_t t = g->start[k]; t < g->start[k + 1]; t += kRG) {
      const int64_t n = std::min<int64_t>(kRG, g->start[k + 1] - t);
      for (int m = 0; m < kRG; ++m) {
        T* um = ubuf.data() + m * WP;
        if (m < n) {
          const int64_t i = g->row(t + m);
          const T* x = src + i * ld + c0;
          if (d.active) {
            lora::drop_row<T>(d, static_cast<uint64_t>(i) * static_cast<uint64_t>(C) + c0, x, ds, w, um);
          } else {
            std::copy(x, x + w, um);
          }
          std::fill(um + w, um + WP, T(0));
          std::copy(coef + i * R, coef + i * R + R, cbuf.data() + m * R);
        } else {
          std::fill(um, um + WP, T(0));
          std::fill(cbuf.data() + m * R, cbuf.data() + m * R + R, T(0));
        }
      }
      lora::reduce_step<T>(cbuf.data(), R, u, R, WP, acc.data(), WP);
    }
    const T s = ks[k];
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < w; ++j) res[(k * R + r) * C + c0 + j] = s * acc[r * WP + j];
  }
}

// Fused backward with dropout (tasks as reduce_range): dx[i] += D(coef_i A_k) and
// res[k] = sum_{i in k} coef_i^T D(x_i), hashing each mask element once.  ap: A packed per
// adapter (K, R, CP), CP = round_up(C, L), zero padded.
template <typename T>
VFM_ALWAYS_INLINE void dx_ga_range(const Drop& d, T* dx, int64_t ldd, const T* coef, const T* ap, int64_t CP,
                                   const T* src, int64_t ld, int64_t C, int64_t R, int64_t JP, int64_t npanel,
                                   const Groups* g, int64_t q0, int64_t q1, T* res) {
  using V = typename lora::Vec<T>::type;
  constexpr int W = lora::Vec<T>::W, L = lora::Vec<T>::L;
  std::vector<T> acc(R * JP), ubuf(kRG * JP), kbuf(kRG * JP), cbuf(kRG * R);
  const T ds = static_cast<T>(d.scale);
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t k = q / npanel, c0 = (q % npanel) * JP;
    const int64_t w = std::min<int64_t>(JP, C - c0), WP = round_up(w, L);
    const T* a = ap + k * R * CP + c0;
    std::fill(acc.begin(), acc.begin() + R * WP, T(0));
    const T* u[kRG];
    int64_t rows[kRG];
    for (int m = 0; m < kRG; ++m) u[m] = ubuf.data() + m * WP;
    for (int64_t t = g->start[k]; t < g->start[k + 1]; t += kRG) {
      const int64_t n = std::min<int64_t>(kRG, g->start[k + 1] - t);
      for (int m = 0; m < kRG; ++m) {
        T* um = ubuf.data() + m * WP;
        T* km = kbuf.data() + m * WP;
        if (m < n) {
          const int64_t i = g->row(t + m);
          rows[m] = i;
          const T* x = src + i * ld + c0;
          const uint64_t base = static_cast<uint64_t>(i) * static_cast<uint64_t>(C) + c0;
          const uint64_t end = base + static_cast<uint64_t>(w);
          if (!d.active) {  // no dropout: every element kept, nothing to hash
            std::copy(x, x + w, um);
            std::fill(km, km + w, T(1));
          } else if ((base >> 32) == ((end - 1) >> 32)) {
            const uint32_t hi_mix = d.k1 ^ (static_cast<uint32_t>(base >> 32) * 0x9E3779B9u);
            const uint32_t lo0 = static_cast<uint32_t>(base), k0 = d.k0, thr = d.thr;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
              const uint32_t h = lora::fmix32(lora::fmix32((lo0 + static_cast<uint32_t>(j)) ^ k0) ^ hi_mix);
              const T v = x[j] * ds;
              um[j] = h >= thr ? v : T(0);
              km[j] = h >= thr ? T(1) : T(0);
            }
          } else {
            for (int64_t j = 0; j < w; ++j) {
              const bool keep = lora::hash_at(d, base + static_cast<uint64_t>(j)) >= d.thr;
              um[j] = keep ? x[j] * ds : T(0);
              km[j] = keep ? T(1) : T(0);
            }
          }
          std::fill(um + w, um + WP, T(0));
          std::fill(km + w, km + WP, T(0));
          std::copy(coef + i * R, coef + i * R + R, cbuf.data() + m * R);
        } else {
          rows[m] = -1;
          std::fill(um, um + WP, T(0));
          std::fill(km, km + WP, T(0));
          std::fill(cbuf.data() + m * R, cbuf.data() + m * R + R, T(0));
        }
      }
      lora::reduce_step<T>(cbuf.data(), R, u, R, WP, acc.data(), WP);
      // dx rows += D(coef A) on this panel, L columns at a time (8 accumulator registers).
      for (int64_t v = 0; v < WP; v += L) {
        V lo[kRG], hi[kRG];
        lora::expand_rows<T, kRG>(cbuf.data(), R, R, a + v, CP, lo, hi);
        T tmp[kRG][L];
        for (int m = 0; m < kRG; ++m) {
          lora::vstore(tmp[m], lo[m]);
          lora::vstore(tmp[m] + W, hi[m]);
        }
        const int64_t nv = std::min<int64_t>(L, w - v);
        for (int m = 0; m < n; ++m) {
          T* o = dx + rows[m] * ldd + c0 + v;
          const T* km = kbuf.data() + m * WP + v;
#pragma omp simd
          for (int64_t j = 0; j < nv; ++j) {
            const T add = tmp[m][j] * ds;
            o[j] += km[j] != T(0) ? add : T(0);
          }
        }
      }
    }
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < w; ++j) res[(k * R + r) * C + c0 + j] = acc[r * WP + j];
  }
}

#define VFM_LORA_INSTANTIATE(T, SFX)                                                                               \
  VFM_LORA_CLONES void reduce_##SFX(const Drop& d, const T* coef, const T* src, int64_t ld, int64_t C, int64_t R,  \
                                    int64_t JP, int64_t npanel, const Groups* g, int64_t q0, int64_t q1,          \
                                    const T* ks, T* res) {                                                         \
    reduce_range<T>(d, coef, src, ld, C, R, JP, npanel, g, q0, q1, ks, res);                                       \
  }                                                                                                                \
  VFM_LORA_CLONES void dx_ga_##SFX(const Drop& d, T* dx, int64_t ldd, const T* coef, const T* ap, int64_t CP,     \
                                   const T* src, int64_t ld, int64_t C, int64_t R, int64_t JP, int64_t npanel,    \
                                   const Groups* g, int64_t q0, int64_t q1, T* res) {                            \
    dx_ga_range<T>(d, dx, ldd, coef, ap, CP, src, ld, C, R, JP, npanel, g, q0, q1, res);                          \
  }                                                                                                                \
  VFM_LORA_CLONES void dx_ga_rows_##SFX(const Drop& d, T* dx, int64_t ldd, const T* coef, const T* ap, int64_t CP, \
                                        const T* src, int64_t ld, int64_t C, int64_t R, int64_t i0, int64_t i1,   \
                                        T* acc) {                                                                  \
    dx_ga_rows<T, false>(d, dx, ldd, coef, ap, CP, src, ld, C, R, i0, i1, acc);                                   \
  }                                                                                                                \
  VFM_LORA_CLONES void expand_reduce_rows_##SFX(const Drop& d, T* dx, int64_t ldd, const T* coef, const T* ap,     \
                                                int64_t CP, const T* src, int64_t ld, int64_t C, int64_t R,       \
                                                int64_t i0, int64_t i1, T* acc) {                                 \
    dx_ga_rows<T, true>(d, dx, ldd, coef, ap, CP, src, ld, C, R, i0, i1, acc);                                    \
  }                                                                                                                \
  VFM_LORA_CLONES void reduce_rows_##SFX(const Drop& d, const T* coef, const T* src, int64_t ld, int64_t C,        \
                                         int64_t R, int64_t CP, int64_t i0, int64_t i1, T* acc) {                 \
    reduce_rows<T>(d, coef, src, ld, C, R, CP, i0, i1, acc);                                                       \
  }                                                                                                                \
  VFM_LORA_CLONES void shrink_reduce_##SFX(const T* src, int64_t ld, int64_t C, const T* mt, int64_t RP,           \
                                           int64_t R, const T* coef, int64_t CP, T alpha, int64_t i0, int64_t i1, \
                                           T* out, T* acc) {                                                       \
    shrink_reduce_rows<T>(src, ld, C, mt, RP, R, coef, CP, alpha, i0, i1, out, acc);                               \
  }                                                                                                                \
  inline void reduce_k(const Drop& d, const T* c, const T* s, int64_t ld, int64_t C, int64_t R, int64_t JP,        \
                       int64_t np, const Groups* g, int64_t q0, int64_t q1, const T* ks, T* res) {                  \
    reduce_##SFX(d, c, s, ld, C, R, JP, np, g, q0, q1, ks, res);                                                    \
  }                                                                                                                 \
  inline void dx_ga_k(const Drop& d, T* dx, int64_t ldd, const T* c, const T* ap, int64_t CP, const T* s,          \
                      int64_t ld, int64_t C, int64_t R, int64_t JP, int64_t np, const Groups* g, int64_t q0,       \
                      int64_t q1, T* res) {                                                                         \
    dx_ga_##SFX(d, dx, ldd, c, ap, CP, s, ld, C, R, JP, np, g, q0, q1, res);                                        \
  }                                                                                                                 \
  inline void dx_ga_rows_k(const Drop& d, T* dx, int64_t ldd, const T* c, const T* ap, int64_t CP, const T* s,     \
                           int64_t ld, int64_t C, int64_t R, int64_t i0, int64_t i1, T* acc) {                      \
    dx_ga_rows_##SFX(d, dx, ldd, c, ap, CP, s, ld, C, R, i0, i1, acc);                                              \
  }                                                                                                                 \
  inline void expand_reduce_rows_k(const Drop& d, T* dx, int64_t ldd, const T* c, const T* ap, int64_t CP,         \
                                   const T* s, int64_t ld, int64_t C, int64_t R, int64_t i0, int64_t i1, T* acc) {  \
    expand_reduce_rows_##SFX(d, dx, ldd, c, ap, CP, s, ld, C, R, i0, i1, acc);                                      \
  }                                                                                                                 \
  inline void reduce_rows_k(const Drop& d, const T* c, const T* s, int64_t ld, int64_t C, int64_t R, int64_t CP,   \
                            int64_t i0, int64_t i1, T* acc) {                                                       \
    reduce_rows_##SFX(d, c, s, ld, C, R, CP, i0, i1, acc);                                                          \
  }                                                                                                                 \
  inline void shrink_reduce_k(const T* s, int64_t ld, int64_t C, const T* mt, int64_t RP, int64_t R, const T* c,   \
                              int64_t CP, T alpha, int64_t i0, int64_t i1, T* out, T* acc) {                        \
    shrink_reduce_##SFX(s, ld, C, mt, RP, R, c, CP, alpha, i0, i1, out, acc);                                       \
  }

VFM_LORA_INSTANTIATE(float, f32)
VFM_LORA_INSTANTIATE(double, f64)

}  // namespace

// One adapter: row chunk c of nchunk (one per thread, at least ~64K multiply-adds each) covers
// rows [N c / nchunk, N (c + 1) / nchunk) and sums into its own (R, CP) partial; returns
// scale * sum_c partial[c][:, :C] (R, C), summed and scaled in one loop here (no extra parallel
// region or dispatcher call for 2 x R x C adds).  body(i0, i1, acc) runs one chunk.
namespace {
template <typename T, typename F>
at::Tensor sum_row_chunks(int64_t N, int64_t C, int64_t R, int64_t CP, int64_t work_per_row, T scale,
                          const at::TensorOptions& opt, const F& body) {
  const int64_t min_rows = std::max<int64_t>(kRG, grain_rows(work_per_row));
  const int64_t nchunk = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / min_rows));
  at::Tensor part = at::zeros({nchunk, R, CP}, opt);
  T* qp = part.data_ptr<T>();
  at::parallel_for(0, nchunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(N * c / nchunk, N * (c + 1) / nchunk, qp + c * R * CP);
  });
  at::Tensor res = at::empty({R, C}, opt);
  T* rp = res.data_ptr<T>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < C; ++j) {
      T s = qp[r * CP + j];
      for (int64_t c = 1; c < nchunk; ++c) s += qp[(c * R + r) * CP + j];
      rp[r * C + j] = s * scale;
    }
  return res;
}

}  // namespace

at::Tensor lora_reduce_cpu(const at::Tensor& coef_in, const at::Tensor& src_in, int64_t n_adapters,
                           const c10::optional<at::Tensor>& ids, const c10::optional<at::Tensor>& scales, double alpha,
                           int64_t seed, int64_t threshold, double dscale) {
  check_2d(coef_in, "lora_reduce", "coef");
  check_2d(src_in, "lora_reduce", "src");
  TORCH_CHECK(coef_in.scalar_type() == src_in.scalar_type(), "lora_reduce: coef and src dtypes differ");
  TORCH_CHECK(coef_in.size(0) == src_in.size(0), "lora_reduce: coef is ", coef_in.sizes(), " but src is ",
              src_in.sizes());
  TORCH_CHECK(n_adapters >= 1, "lora_reduce: n_adapters must be >= 1, got ", n_adapters);
  const at::Tensor src = unit_col(src_in);
  const at::Tensor coef = coef_in.contiguous();
  const int64_t N = src.size(0), C = src.size(1), R = coef.size(1), K = n_adapters;
  if (!ids.has_value() && N > 0 && C > 0 && R > 0) {  // one adapter: row chunks (BLAS splits N poorly)
    TORCH_CHECK(K == 1, "lora_reduce: without adapter ids there must be one adapter, got K = ", K);
    const Drop d = make_drop(seed, threshold, dscale);
    at::Tensor res;
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lora_reduce", [&] {
      const int64_t CP = round_up(C, lora::Vec<scalar_t>::L);
      const scalar_t* cp = coef.data_ptr<scalar_t>();
      const scalar_t* sp = src.data_ptr<scalar_t>();
      const int64_t ld = row_stride(src);
      const scalar_t s = adapter_scales<scalar_t>(scales, 1, alpha)[0];
      res = sum_row_chunks<scalar_t>(N, C, R, CP, C * R, s, src.options(), [&](int64_t i0, int64_t i1, scalar_t* acc) {
        reduce_rows_k(d, cp, sp, ld, C, R, CP, i0, i1, acc);
      });
    });
    return res;
  }
  at::Tensor res = at::zeros({K, R, C}, src.options());
  if (N > 0 && C > 0 && R > 0) {
    const Groups g = group_rows(ids, N, K);
    const Drop d = make_drop(seed, threshold, dscale);
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lora_reduce", [&] {
      const int64_t jp = panel_width<scalar_t>(C, R, K);
      const int64_t npanel = (C + jp - 1) / jp;
      const std::vector<scalar_t> ks = adapter_scales<scalar_t>(scales, K, alpha);
      const scalar_t* cp = coef.data_ptr<scalar_t>();
      const scalar_t* sp = src.data_ptr<scalar_t>();
      scalar_t* rp = res.data_ptr<scalar_t>();
      const int64_t ld = row_stride(src);
      at::parallel_for(0, K * npanel, grain_rows((N + K - 1) / K * jp * R), [&](int64_t q0, int64_t q1) {
        reduce_k(d, cp, sp, ld, C, R, jp, npanel, &g, q0, q1, ks.data(), rp);
      });
    });
  }
  return ids.has_value() ? res : res.squeeze(0);
}

at::Tensor lora_dx_ga_cpu(at::Tensor dx, const at::Tensor& coef_in, const at::Tensor& mats_in, const at::Tensor& src_in,
                          const c10::optional<at::Tensor>& ids, int64_t seed, int64_t threshold, double dscale) {
  check_2d(dx, "lora_dx_ga_", "dx");
  check_2d(coef_in, "lora_dx_ga_", "coef");
  check_2d(src_in, "lora_dx_ga_", "src");
  const at::Tensor m = as_stack(mats_in, "lora_dx_ga_");
  TORCH_CHECK(dx.scalar_type() == coef_in.scalar_type() && dx.scalar_type() == m.scalar_type() &&
                  dx.scalar_type() == src_in.scalar_type(),
              "lora_dx_ga_: dx, coef, mats and src dtypes differ");
  TORCH_CHECK(dx.size(1) <= 1 || dx.stride(1) == 1, "lora_dx_ga_: dx must have unit column stride");
  const int64_t N = dx.size(0), C = dx.size(1), K = m.size(0), R = m.size(1);
  TORCH_CHECK(m.size(2) == C && coef_in.size(0) == N && coef_in.size(1) == R && src_in.size(0) == N &&
                  src_in.size(1) == C,
              "lora_dx_ga_: shapes dx ", dx.sizes(), ", coef ", coef_in.sizes(), ", mats ", mats_in.sizes(), ", src ",
              src_in.sizes(), " do not match");
  const Drop d = make_drop(seed, threshold, dscale);  // threshold 0: no dropout (one pass all the same)
  if (!ids.has_value() && N > 0 && C > 0 && R > 0) {  // one adapter: row chunks, one partial sum each
    TORCH_CHECK(K == 1, "lora_dx_ga_: without adapter ids there must be one adapter, got K = ", K);
    const at::Tensor src = unit_col(src_in);
    const at::Tensor coef = coef_in.contiguous();
    at::Tensor res;
    AT_DISPATCH_FLOATING_TYPES(dx.scalar_type(), "lora_dx_ga_", [&] {
      const int64_t CP = round_up(C, lora::Vec<scalar_t>::L);
      const at::Tensor ap = pack_padded<scalar_t>(m.select(0, 0), CP);
      scalar_t* dp = dx.data_ptr<scalar_t>();
      const scalar_t* cp = coef.data_ptr<scalar_t>();
      const scalar_t* pp = ap.data_ptr<scalar_t>();
      const scalar_t* sp = src.data_ptr<scalar_t>();
      const int64_t ldd = row_stride(dx), ld = row_stride(src);
      res = sum_row_chunks<scalar_t>(N, C, R, CP, 2 * C * R, scalar_t(1), dx.options(), [&](int64_t i0, int64_t i1, scalar_t* acc) {
        dx_ga_rows_k(d, dp, ldd, cp, pp, CP, sp, ld, C, R, i0, i1, acc);
      });
    });
    return res;
  }
  at::Tensor res = at::zeros({K, R, C}, dx.options());
  if (N > 0 && C > 0 && R > 0) {
    const Groups g = group_rows(ids, N, K);
    const at::Tensor src = unit_col(src_in);
    const at::Tensor coef = coef_in.contiguous();
    AT_DISPATCH_FLOATING_TYPES(dx.scalar_type(), "lora_dx_ga_", [&] {
      const int64_t CP = round_up(C, lora::Vec<scalar_t>::L);
      const at::Tensor ap = pack_padded<scalar_t>(m, CP);
      const int64_t jp = panel_width<scalar_t>(C, R, K);
      const int64_t npanel = (C + jp - 1) / jp;
      scalar_t* dp = dx.data_ptr<scalar_t>();
      const scalar_t* cp = coef.data_ptr<scalar_t>();
      const scalar_t* pp = ap.data_ptr<scalar_t>();
      const scalar_t* sp = src.data_ptr<scalar_t>();
      scalar_t* rp = res.data_ptr<scalar_t>();
      const int64_t ldd = row_stride(dx), ld = row_stride(src);
      at::parallel_for(0, K * npanel, grain_rows(2 * ((N + K - 1) / K) * jp * R), [&](int64_t q0, int64_t q1) {
        dx_ga_k(d, dp, ldd, cp, pp, CP, sp, ld, C, R, jp, npanel, &g, q0, q1, rp);
      });
    });
  }
  return ids.has_value() ? res : res.squeeze(0);
}


// lora_linear's dx / grad_A pair for one adapter without a prior grad_x: dx = D?(coef M) (a fresh
// (N, C) tensor the base GEMM then accumulates grad_y W onto) and res = coef^T D?(src) (R, C), one
// pass over src, each mask element hashed once; no dropout when threshold == 0.
std::tuple<at::Tensor, at::Tensor> lora_expand_reduce_cpu(const at::Tensor& coef_in, const at::Tensor& mats,
                                                          const at::Tensor& src_in, int64_t seed, int64_t threshold,
                                                          double dscale) {
  check_2d_same("lora_expand_reduce", coef_in, "coef", mats, "mats", src_in, "src");
  const int64_t N = src_in.size(0), C = src_in.size(1), R = mats.size(0);
  TORCH_CHECK(mats.size(1) == C && coef_in.size(0) == N && coef_in.size(1) == R, "lora_expand_reduce: shapes coef ",
              coef_in.sizes(), ", mats ", mats.sizes(), ", src ", src_in.sizes(), " do not match");
  const Drop d = make_drop(seed, threshold, dscale);
  const at::Tensor src = unit_col(src_in);
  const at::Tensor coef = coef_in.contiguous();
  at::Tensor dx = at::empty({N, C}, src.options()), res;
  if (N == 0 || C == 0 || R == 0) return {dx.zero_(), at::zeros({R, C}, src.options())};
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lora_expand_reduce", [&] {
    const int64_t CP = round_up(C, lora::Vec<scalar_t>::L);
    const at::Tensor ap = pack_padded<scalar_t>(mats, CP);
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const scalar_t* cp = coef.data_ptr<scalar_t>();
    const scalar_t* pp = ap.data_ptr<scalar_t>();
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const int64_t ld = row_stride(src);
    res = sum_row_chunks<scalar_t>(N, C, R, CP, 2 * C * R, scalar_t(1), src.options(), [&](int64_t i0, int64_t i1, scalar_t* acc) {
      expand_reduce_rows_k(d, dp, C, cp, pp, CP, sp, ld, C, R, i0, i1, acc);
    });
  });
  return {dx, res};
}

std::tuple<at::Tensor, at::Tensor> lora_shrink_reduce_cpu(const at::Tensor& src_in, const at::Tensor& mats,
                                                          const at::Tensor& coef_in, double alpha) {
  check_2d_same("lora_shrink_reduce", src_in, "src", mats, "mats", coef_in, "coef");
  const int64_t N = src_in.size(0), C = src_in.size(1), R = mats.size(0);
  TORCH_CHECK(mats.size(1) == C && coef_in.size(0) == N && coef_in.size(1) == R, "lora_shrink_reduce: shapes src ",
              src_in.sizes(), ", mats ", mats.sizes(), ", coef ", coef_in.sizes(), " do not match");
  const at::Tensor src = unit_col(src_in);
  const at::Tensor coef = coef_in.contiguous();
  if (N == 0 || C == 0 || R == 0) return {at::zeros({N, R}, src.options()), at::zeros({R, C}, src.options())};
  at::Tensor out = at::empty({N, R}, src.options()), res;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lora_shrink_reduce", [&] {
    const int64_t RP = round_up(R, lora::Vec<scalar_t>::L), CP = round_up(C, lora::Vec<scalar_t>::L);
    const at::Tensor mt = pack_padded<scalar_t>(mats.t(), RP);
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const scalar_t* mp = mt.data_ptr<scalar_t>();
    const scalar_t* cp = coef.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t a = static_cast<scalar_t>(alpha);
    const int64_t ld = row_stride(src);
    res = sum_row_chunks<scalar_t>(N, C, R, CP, 2 * C * R, a, src.options(), [&](int64_t i0, int64_t i1, scalar_t* acc) {
      shrink_reduce_k(sp, ld, C, mp, RP, R, cp, CP, a, i0, i1, op, acc);
    });
  });
  return {out, res};
}

at::Tensor lora_dropout_ga_cpu(const at::Tensor& gh, const at::Tensor& x, int64_t seed, int64_t threshold,
                               double scale) {
  return lora_reduce_cpu(gh, x, 1, c10::nullopt, c10::nullopt, 1.0, seed, threshold, scale);
}

}  // namespace vfm_cpu

TORCH_LIBRARY_FRAGMENT(vfm_C, m) {
  m.def("lora_shrink_reduce(Tensor src, Tensor mats, Tensor coef, float alpha) -> (Tensor, Tensor)");
  m.def("lora_expand_reduce(Tensor coef, Tensor mats, Tensor src, int seed, int threshold, float dscale) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vfm_C, CPU, m) {
  m.impl("lora_shrink_reduce", &vfm_cpu::lora_shrink_reduce_cpu);
  m.impl("lora_expand_reduce", &vfm_cpu::lora_expand_reduce_cpu);
  m.impl("lora_dropout_ga", &vfm_cpu::lora_dropout_ga_cpu);
  m.impl("lora_reduce", &vfm_cpu::lora_reduce_cpu);
  m.impl("lora_dx_ga_", &vfm_cpu::lora_dx_ga_cpu);
}
