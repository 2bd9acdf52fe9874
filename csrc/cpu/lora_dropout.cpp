// CPU kernels of vfm_C's low-rank adapter backends (contract: vfm/ops/lora_reference.py; Python
// side: vfm/ops/lora_cpp.py and vfm/ops/lora_cpp_variants.py).  Three grouped kernels cover
// lora_linear, adalora_linear, dora_linear and lora_linear_multi (rows grouped by adapter with a
// counting sort, register-tiled loops of csrc/cpu/lora_tiles.h, OpenMP through at::parallel_for):
//
// * lora_shrink(src (N, C), mats (K, R, C) or (R, C), ids?, scales?, alpha, seed, threshold, dscale)
//     -> out (N, R): out[i] = alpha * scales[k] * D?(src_i) M_k^T, k = ids[i] (0 rows for id -1)
// * lora_expand_(out (N, C), coef (N, R), mats (K, R, C) or (R, C), ids?, scales?, alpha, ...)
//     out[i] += D?(alpha * scales[k] * coef_i M_k)                              (in place)
// * lora_reduce(coef (N, R), src (N, C), K, ids?, scales?, alpha, ...) -> (K, R, C) (or (R, C)
//     without ids): res[k] = alpha * scales[k] * sum_{i: ids[i] = k} coef_i^T D?(src_i)
// * lora_dx_ga_(dx (N, C), coef (N, R), mats, src (N, C), ids?, seed, threshold, dscale) -> (K, R, C):
//     the backward pair fused (each mask element hashed once; threshold 0: no dropout):
//     dx[i] += D(coef_i M_k) in place, and returns sum_{i in k} coef_i^T D(src_i)
// * lora_dropout_apply(x, seed, threshold, dscale) -> D(x) (a new contiguous tensor)
// * lora_shrink_expand(src (N, C), a (R, C), bt (R, O), bias?, alpha, seed, threshold, dscale)
//     -> (y (N, O), xa (N, R)): lora_linear's whole rank-r forward for one adapter in one pass over
//     src: xa = D?(src) a^T, y = bias + alpha * xa bt (fresh; the base GEMM accumulates onto it)
// * lora_merge(weight (O, C), b (O, R), a (R, C), alpha) -> weight + alpha * b a (one pass over W)
// * lora_shrink_expand_grouped(src (N, C), a (K, R, C), bt (K, R, O), ids (N,), scales?, bias?, alpha, seed,
//     threshold, dscale) -> (y, xa): lora_linear_multi's rank-r forward in one pass over src (rows of
//     id -1: xa = 0, y = bias or 0)
//
// D? is the contract's dropout when threshold > 0 (keep iff hash(seed, i * C + j) >= threshold,
// kept values times dscale), the identity when threshold == 0; it applies to src (shrink,
// reduce) or to the added term (expand), always with x's (N, C) offsets.  All tensors of one call
// share a dtype, float32 or float64; scales is float32 (K,).  The older names lora_dropout_xa,
// lora_dropout_dx_ and lora_dropout_ga are the single-adapter forms.  This file: shrink, expand_,
// dropout_apply, shrink_expand, merge; csrc/cpu/lora_backward.cpp: reduce, dx_ga_, shrink_reduce and
// expand_reduce; csrc/cpu/lora_common.h: helpers.
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
template <typename T>
VFM_ALWAYS_INLINE void shrink_range(const Drop& d, const T* src, int64_t ld, int64_t C, const T* mt, int64_t RP, int64_t R,
                  const Groups* g, const Tile* tiles, int64_t t0, int64_t t1, const T* ks, T* out) {
  std::vector<T> ubuf(d.active ? kMR * C : 0);
  const T ds = static_cast<T>(d.scale);
  for (int64_t t = t0; t < t1; ++t) {
    const Tile& tile = tiles[t];
    const T* u[kMR];
    T* o[kMR];
    for (int m = 0; m < tile.n; ++m) {
      const int64_t i = g->row(tile.t0 + m);
      if (d.active) {
        lora::drop_row<T>(d, static_cast<uint64_t>(i) * static_cast<uint64_t>(C), src + i * ld, ds, C,
                          ubuf.data() + m * C);
        u[m] = ubuf.data() + m * C;
      } else {
        u[m] = src + i * ld;
      }
      o[m] = out + i * R;
    }
    for (int m = tile.n; m < kMR; ++m) u[m] = u[0];
    lora::shrink_tile<T>(u, static_cast<int>(tile.n), mt + tile.k * C * RP, C, RP, R, ks[tile.k], o);
  }
}

template <typename T>
VFM_ALWAYS_INLINE void expand_range(const Drop& d, T* out, int64_t ldo, const T* coef, int64_t C, const T* mp, int64_t CP, int64_t R,
                  const Groups* g, const Tile* tiles, int64_t t0, int64_t t1, const T* ks) {
  std::vector<T> cbuf(kMR * R);
  for (int64_t t = t0; t < t1; ++t) {
    const Tile& tile = tiles[t];
    uint64_t base[kMR];
    T* o[kMR];
    const T s = ks[tile.k];
    for (int m = 0; m < kMR; ++m) {
      const int64_t i = g->row(tile.t0 + std::min<int64_t>(m, tile.n - 1));
      for (int64_t r = 0; r < R; ++r) cbuf[m * R + r] = s * coef[i * R + r];
      base[m] = static_cast<uint64_t>(i) * static_cast<uint64_t>(C);
      o[m] = out + i * ldo;
    }
    lora::expand_tile<T>(cbuf.data(), R, static_cast<int>(tile.n), mp + tile.k * R * CP, R, C, CP, d, base, o);
  }
}

// Grouped rows (tiles of one adapter each): xa[i] = D?(src_i) A_k^T and y[i] = bias + alpha_k xa[i] B_k^T
// stored from registers (lora_linear_multi's forward rank-r part; the base GEMM then accumulates).
// mt: A_k^T packed (K, C, RP); bp: B_k^T packed (K, R, OP); ubuf: kMR * C scratch for D(src) rows.
template <typename T>
VFM_ALWAYS_INLINE void shrink_expand_range(const Drop& d, const T* src, int64_t ld, int64_t C, const T* mt,
                                           int64_t RP, int64_t R, const T* bp, int64_t O, int64_t OP,
                                           const T* bias, const Groups* g, const Tile* tiles, int64_t t0,
                                           int64_t t1, const T* ks, T* xa, T* y, int64_t ldy, T* ubuf) {
  std::vector<T> cbuf(kMR * R);
  const T* brows[kMR] = {bias, bias, bias, bias, bias, bias};
  int64_t rows[kMR];
  for (int64_t t = t0; t < t1; ++t) {
    const Tile& tile = tiles[t];
    const int n = static_cast<int>(tile.n);
    for (int m = 0; m < kMR; ++m) rows[m] = g->row(tile.t0 + std::min(m, n - 1));
    lora::shrink_expand_tile<T>(d, src, ld, C, mt + tile.k * C * RP, RP, R, bp + tile.k * R * OP, O, OP,
                                bias != nullptr ? brows : nullptr, ks[tile.k], rows, n, xa, y, ldy, ubuf, cbuf.data());
  }
}

#define VFM_LORA_INSTANTIATE(T, SFX)                                                                               \
  VFM_LORA_CLONES void shrink_##SFX(const Drop& d, const T* src, int64_t ld, int64_t C, const T* mt, int64_t RP,   \
                                    int64_t R, const Groups* g, const Tile* tiles, int64_t t0, int64_t t1,        \
                                    const T* ks, T* out) {                                                         \
    shrink_range<T>(d, src, ld, C, mt, RP, R, g, tiles, t0, t1, ks, out);                                          \
  }                                                                                                                \
  VFM_LORA_CLONES void expand_##SFX(const Drop& d, T* out, int64_t ldo, const T* coef, int64_t C, const T* mp,     \
                                    int64_t CP, int64_t R, const Groups* g, const Tile* tiles, int64_t t0,        \
                                    int64_t t1, const T* ks) {                                                     \
    expand_range<T>(d, out, ldo, coef, C, mp, CP, R, g, tiles, t0, t1, ks);                                        \
  }                                                                                                                \
  VFM_LORA_CLONES void apply_##SFX(const Drop& d, const T* x, int64_t ld, int64_t C, int64_t i0, int64_t i1,       \
                                   T* u) {                                                                         \
    for (int64_t i = i0; i < i1; ++i)                                                                              \
      lora::drop_row<T>(d, static_cast<uint64_t>(i) * static_cast<uint64_t>(C), x + i * ld,                       \
                        static_cast<T>(d.scale), C, u + i * C);                                                   \
  }                                                                                                                \
  VFM_LORA_CLONES void shrink_expand_##SFX(const Drop& d, const T* src, int64_t ld, int64_t C, const T* mt,        \
                                           int64_t RP, int64_t R, const T* bp, int64_t O, int64_t OP,             \
                                           const T* bias, T alpha, int64_t i0, int64_t i1, T* xa, T* y,           \
                                           int64_t ldy, T* ubuf) {                                                \
    lora::shrink_expand_rows<T>(d, src, ld, C, mt, RP, R, bp, O, OP, bias, alpha, i0, i1, xa, y, ldy, ubuf);       \
  }                                                                                                                \
  VFM_LORA_CLONES void shrink_expand_grouped_##SFX(const Drop& d, const T* src, int64_t ld, int64_t C, const T* mt,\
                                                   int64_t RP, int64_t R, const T* bp, int64_t O, int64_t OP,     \
                                                   const T* bias, const Groups* g, const Tile* tiles, int64_t t0, \
                                                   int64_t t1, const T* ks, T* xa, T* y, int64_t ldy, T* ubuf) {  \
    shrink_expand_range<T>(d, src, ld, C, mt, RP, R, bp, O, OP, bias, g, tiles, t0, t1, ks, xa, y, ldy, ubuf);     \
  }                                                                                                                \
  inline void shrink_expand_grouped_k(const Drop& d, const T* src, int64_t ld, int64_t C, const T* mt, int64_t RP, \
                                      int64_t R, const T* bp, int64_t O, int64_t OP, const T* bias,                \
                                      const Groups* g, const Tile* tiles, int64_t t0, int64_t t1, const T* ks,     \
                                      T* xa, T* y, int64_t ldy, T* ubuf) {                                         \
    shrink_expand_grouped_##SFX(d, src, ld, C, mt, RP, R, bp, O, OP, bias, g, tiles, t0, t1, ks, xa, y, ldy, ubuf); \
  }                                                                                                                \
  VFM_LORA_CLONES void merge_##SFX(const T* w, int64_t ldw, const T* b, const T* ap, int64_t R, int64_t C,         \
                                   int64_t CP, T alpha, int64_t i0, int64_t i1, T* out, int64_t ldo) {            \
    lora::merge_rows<T>(w, ldw, b, ap, R, C, CP, alpha, i0, i1, out, ldo);                                         \
  }                                                                                                                \
  inline void merge_k(const T* w, int64_t ldw, const T* b, const T* ap, int64_t R, int64_t C, int64_t CP, T alpha, \
                      int64_t i0, int64_t i1, T* out, int64_t ldo) {                                               \
    merge_##SFX(w, ldw, b, ap, R, C, CP, alpha, i0, i1, out, ldo);                                                  \
  }                                                                                                                 \
  inline void shrink_expand_k(const Drop& d, const T* src, int64_t ld, int64_t C, const T* mt, int64_t RP,         \
                              int64_t R, const T* bp, int64_t O, int64_t OP, const T* bias, T alpha, int64_t i0,   \
                              int64_t i1, T* xa, T* y, int64_t ldy, T* ubuf) {                                     \
    shrink_expand_##SFX(d, src, ld, C, mt, RP, R, bp, O, OP, bias, alpha, i0, i1, xa, y, ldy, ubuf);                \
  }                                                                                                                 \
  inline void shrink_k(const Drop& d, const T* a, int64_t b, int64_t c, const T* e, int64_t f, int64_t h,          \
                       const Groups* g, const Tile* t, int64_t t0, int64_t t1, const T* ks, T* o) {                 \
    shrink_##SFX(d, a, b, c, e, f, h, g, t, t0, t1, ks, o);                                                         \
  }                                                                                                                 \
  inline void expand_k(const Drop& d, T* o, int64_t lo, const T* c, int64_t C, const T* mp, int64_t CP, int64_t R, \
                       const Groups* g, const Tile* t, int64_t t0, int64_t t1, const T* ks) {                       \
    expand_##SFX(d, o, lo, c, C, mp, CP, R, g, t, t0, t1, ks);                                                      \
  }                                                                                                                 \
  inline void apply_k(const Drop& d, const T* x, int64_t ld, int64_t C, int64_t i0, int64_t i1, T* u) {            \
    apply_##SFX(d, x, ld, C, i0, i1, u);                                                                            \
  }

VFM_LORA_INSTANTIATE(float, f32)
VFM_LORA_INSTANTIATE(double, f64)

}  // namespace

at::Tensor lora_shrink_cpu(const at::Tensor& src_in, const at::Tensor& mats_in, const c10::optional<at::Tensor>& ids,
                           const c10::optional<at::Tensor>& scales, double alpha, int64_t seed, int64_t threshold,
                           double dscale) {
  check_2d(src_in, "lora_shrink", "src");
  const at::Tensor m = as_stack(mats_in, "lora_shrink");
  TORCH_CHECK(m.scalar_type() == src_in.scalar_type(), "lora_shrink: src and mats dtypes differ");
  const int64_t N = src_in.size(0), C = src_in.size(1), K = m.size(0), R = m.size(1);
  TORCH_CHECK(m.size(2) == C, "lora_shrink: src is ", src_in.sizes(), " but mats is ", mats_in.sizes());
  const at::Tensor src = unit_col(src_in);
  at::Tensor out = ids.has_value() ? at::zeros({N, R}, src.options()) : at::empty({N, R}, src.options());
  if (N == 0 || R == 0) return out;
  if (C == 0) return out.zero_();
  const Groups g = group_rows(ids, N, K);
  const std::vector<Tile> tiles = row_tiles(g);
  const Drop d = make_drop(seed, threshold, dscale);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lora_shrink", [&] {
    const int64_t RP = round_up(R, lora::Vec<scalar_t>::L);
    // M^T packed per adapter: mt[k][j][r] = mats[k][r][j], zero padded to RP ranks.
    const at::Tensor mt = pack_padded<scalar_t>(m.transpose(1, 2), RP);
    const std::vector<scalar_t> ks = adapter_scales<scalar_t>(scales, K, alpha);
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const scalar_t* mp = mt.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t ld = row_stride(src);
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), grain_rows(kMR * C * RP / 8), [&](int64_t t0, int64_t t1) {
      shrink_k(d, sp, ld, C, mp, RP, R, &g, tiles.data(), t0, t1, ks.data(), op);
    });
  });
  return out;
}

void lora_expand_cpu(at::Tensor out, const at::Tensor& coef_in, const at::Tensor& mats_in,
                     const c10::optional<at::Tensor>& ids, const c10::optional<at::Tensor>& scales, double alpha,
                     int64_t seed, int64_t threshold, double dscale) {
  check_2d(out, "lora_expand_", "out");
  check_2d(coef_in, "lora_expand_", "coef");
  const at::Tensor m = as_stack(mats_in, "lora_expand_");
  TORCH_CHECK(out.scalar_type() == coef_in.scalar_type() && out.scalar_type() == m.scalar_type(),
              "lora_expand_: out, coef and mats dtypes differ");
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, "lora_expand_: out must have unit column stride");
  const int64_t N = out.size(0), C = out.size(1), K = m.size(0), R = m.size(1);
  TORCH_CHECK(m.size(2) == C && coef_in.size(0) == N && coef_in.size(1) == R, "lora_expand_: shapes out ",
              out.sizes(), ", coef ", coef_in.sizes(), ", mats ", mats_in.sizes(), " do not match");
  if (N == 0 || C == 0 || R == 0) return;
  const Groups g = group_rows(ids, N, K);
  const std::vector<Tile> tiles = row_tiles(g);
  const Drop d = make_drop(seed, threshold, dscale);
  const at::Tensor coef = coef_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lora_expand_", [&] {
    const int64_t CP = round_up(C, lora::Vec<scalar_t>::L);
    const at::Tensor mp = pack_padded<scalar_t>(m, CP);
    const std::vector<scalar_t> ks = adapter_scales<scalar_t>(scales, K, alpha);
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* cp = coef.data_ptr<scalar_t>();
    const scalar_t* pp = mp.data_ptr<scalar_t>();
    const int64_t ldo = row_stride(out);
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), grain_rows(kMR * CP * R / 8), [&](int64_t t0, int64_t t1) {
      expand_k(d, op, ldo, cp, C, pp, CP, R, &g, tiles.data(), t0, t1, ks.data());
    });
  });
}

// The whole rank-r part of lora_linear's forward for one adapter, one pass over x: xa = D?(x) A^T
// and y = bias + alpha * xa B^T (a fresh (N, O) tensor the base GEMM then accumulates onto).
std::tuple<at::Tensor, at::Tensor> lora_shrink_expand_cpu(const at::Tensor& src_in, const at::Tensor& a,
                                                          const at::Tensor& bt, const c10::optional<at::Tensor>& bias,
                                                          double alpha, int64_t seed, int64_t threshold,
                                                          double dscale) {
  check_2d_same("lora_shrink_expand", src_in, "src", a, "a", bt, "bt");
  const int64_t N = src_in.size(0), C = src_in.size(1), R = a.size(0), O = bt.size(1);
  TORCH_CHECK(a.size(1) == C && bt.size(0) == R, "lora_shrink_expand: shapes src ", src_in.sizes(), ", a ", a.sizes(),
              ", bt ", bt.sizes(), " do not match");
  const at::Tensor b = checked_bias(bias, O, src_in, "lora_shrink_expand");
  const at::Tensor src = unit_col(src_in);
  at::Tensor xa = at::empty({N, R}, src.options()), y = at::empty({N, O}, src.options());
  if (N == 0) return {y, xa};
  if (O == 0) return {y, lora_shrink_cpu(src, a, c10::nullopt, c10::nullopt, 1.0, seed, threshold, dscale)};
  if (R == 0 || C == 0) {
    xa.zero_();
    if (b.defined()) y.copy_(b.expand({N, O})); else y.zero_();
    return {y, xa};
  }
  const Drop d = make_drop(seed, threshold, dscale);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lora_shrink_expand", [&] {
    constexpr int64_t L = lora::Vec<scalar_t>::L;
    const int64_t RP = round_up(R, L), OP = round_up(O, L);
    const at::Tensor mt = pack_padded<scalar_t>(a.t(), RP);  // A^T packed, zero padded to RP ranks
    const at::Tensor bp = pack_padded<scalar_t>(bt, OP);    // B^T packed, zero padded to OP columns
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const scalar_t* mp = mt.data_ptr<scalar_t>();
    const scalar_t* pp = bp.data_ptr<scalar_t>();
    const scalar_t* bb = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* xp = xa.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t al = static_cast<scalar_t>(alpha);
    const int64_t ld = row_stride(src), ntiles = (N + kMR - 1) / kMR;
    at::parallel_for(0, ntiles, grain_rows(kMR * (C * RP + R * OP) / 8), [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> ubuf(d.active ? kMR * C : 0);
      shrink_expand_k(d, sp, ld, C, mp, RP, R, pp, O, OP, bb, al, t0 * kMR, std::min(N, t1 * kMR), xp, yp, O,
                      ubuf.data());
    });
  });
  return {y, xa};
}

// lora_linear_multi's forward rank-r part, one pass over x: rows grouped by adapter id (-1: none),
// xa[i] = D?(x_i) A_k^T and y[i] = bias + alpha * scales[k] * xa[i] B_k^T (a fresh (N, O) tensor the
// base GEMM then accumulates onto); rows with id -1 get xa = 0 and y = bias (or 0).
std::tuple<at::Tensor, at::Tensor> lora_shrink_expand_grouped_cpu(const at::Tensor& src_in, const at::Tensor& a,
                                                                  const at::Tensor& bt, const at::Tensor& ids,
                                                                  const c10::optional<at::Tensor>& scales,
                                                                  const c10::optional<at::Tensor>& bias, double alpha,
                                                                  int64_t seed, int64_t threshold, double dscale) {
  check_2d(src_in, "lora_shrink_expand_grouped", "src");
  TORCH_CHECK(a.device().is_cpu() && bt.device().is_cpu() && a.dim() == 3 && bt.dim() == 3,
              "lora_shrink_expand_grouped: a and bt must be (K, R, C) and (K, R, O) CPU tensors, got ", a.sizes(),
              " and ", bt.sizes());
  TORCH_CHECK(a.scalar_type() == src_in.scalar_type() && bt.scalar_type() == src_in.scalar_type(),
              "lora_shrink_expand_grouped: src, a and bt dtypes differ");
  const int64_t N = src_in.size(0), C = src_in.size(1), K = a.size(0), R = a.size(1), O = bt.size(2);
  TORCH_CHECK(a.size(2) == C && bt.size(0) == K && bt.size(1) == R, "lora_shrink_expand_grouped: shapes src ",
              src_in.sizes(), ", a ", a.sizes(), ", bt ", bt.sizes(), " do not match");
  const at::Tensor b = checked_bias(bias, O, src_in, "lora_shrink_expand_grouped");
  const at::Tensor src = unit_col(src_in);
  const Groups g = group_rows(ids, N, K);  // checks ids: shape (N,), values in [-1, K)
  at::Tensor xa = at::empty({N, R}, src.options()), y = at::empty({N, O}, src.options());
  if (N == 0) return {y, xa};
  const int64_t covered = g.start[K];
  if (covered < N || R == 0 || C == 0 || O == 0) {  // rows of no adapter (or nothing to add): bias / 0 first
    xa.zero_();
    if (b.defined()) y.copy_(b.expand({N, O})); else y.zero_();
  }
  if (covered == 0 || R == 0 || C == 0 || O == 0) return {y, xa};
  const std::vector<Tile> tiles = row_tiles(g);
  const Drop d = make_drop(seed, threshold, dscale);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "lora_shrink_expand_grouped", [&] {
    constexpr int64_t L = lora::Vec<scalar_t>::L;
    const int64_t RP = round_up(R, L), OP = round_up(O, L);
    const at::Tensor mt = pack_padded<scalar_t>(a.transpose(1, 2), RP);  // A_k^T packed, zero padded
    const at::Tensor bp = pack_padded<scalar_t>(bt, OP);                 // B_k^T packed, zero padded
    const std::vector<scalar_t> ks = adapter_scales<scalar_t>(scales, K, alpha);
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const scalar_t* bb = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* xp = xa.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t ld = row_stride(src);
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), grain_rows(kMR * (C * RP + R * OP) / 8),
                     [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> ubuf(d.active ? kMR * C : 0);
      shrink_expand_grouped_k(d, sp, ld, C, mt.data_ptr<scalar_t>(), RP, R, bp.data_ptr<scalar_t>(), O, OP, bb, &g,
                              tiles.data(), t0, t1, ks.data(), xp, yp, O, ubuf.data());
    });
  });
  return {y, xa};
}

// W + alpha * B A (out, in): the merged weight of a call without dropout, in one pass over W.
at::Tensor lora_merge_cpu(const at::Tensor& weight, const at::Tensor& b_in, const at::Tensor& a, double alpha) {
  check_2d_same("lora_merge", weight, "weight", b_in, "b", a, "a");
  const int64_t O = weight.size(0), C = weight.size(1), R = a.size(0);
  TORCH_CHECK(b_in.size(0) == O && b_in.size(1) == R && a.size(1) == C, "lora_merge: shapes weight ", weight.sizes(),
              ", b ", b_in.sizes(), ", a ", a.sizes(), " do not match");
  if (O == 0 || C == 0 || R == 0) return weight.clone(at::MemoryFormat::Contiguous);
  const at::Tensor w = unit_col(weight);
  const at::Tensor b = b_in.contiguous();
  at::Tensor out = at::empty({O, C}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lora_merge", [&] {
    const int64_t CP = round_up(C, lora::Vec<scalar_t>::L);
    const at::Tensor ap = pack_padded<scalar_t>(a, CP);  // A packed, zero padded to CP columns
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const scalar_t* pp = ap.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t al = static_cast<scalar_t>(alpha);
    const int64_t ldw = row_stride(w), ntiles = (O + kMR - 1) / kMR;
    at::parallel_for(0, ntiles, grain_rows(kMR * R * CP / 8), [&](int64_t t0, int64_t t1) {
      merge_k(wp, ldw, bp, pp, R, C, CP, al, t0 * kMR, std::min(O, t1 * kMR), op, C);
    });
  });
  return out;
}

at::Tensor lora_dropout_apply_cpu(const at::Tensor& x_in, int64_t seed, int64_t threshold, double dscale) {
  check_2d(x_in, "lora_dropout_apply", "x");
  const at::Tensor x = unit_col(x_in);
  const int64_t N = x.size(0), C = x.size(1);
  const Drop d = make_drop(seed, threshold, dscale);
  if (!d.active) return x.contiguous().clone();
  at::Tensor u = at::empty({N, C}, x.options());
  if (N == 0 || C == 0) return u;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_dropout_apply", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    const int64_t ld = row_stride(x);
    at::parallel_for(0, N, grain_rows(C), [&](int64_t i0, int64_t i1) { apply_k(d, xp, ld, C, i0, i1, up); });
  });
  return u;
}

// Single-adapter forms (the first cpp backend's names).
at::Tensor lora_dropout_xa_cpu(const at::Tensor& x, const at::Tensor& a, int64_t seed, int64_t threshold,
                               double scale) {
  return lora_shrink_cpu(x, a, c10::nullopt, c10::nullopt, 1.0, seed, threshold, scale);
}

void lora_dropout_dx_cpu(at::Tensor dx, const at::Tensor& gh, const at::Tensor& a, int64_t seed, int64_t threshold,
                         double scale) {
  lora_expand_cpu(dx, gh, a, c10::nullopt, c10::nullopt, 1.0, seed, threshold, scale);
}

}  // namespace vfm_cpu

TORCH_LIBRARY_FRAGMENT(vfm_C, m) {
  m.def("lora_shrink_expand(Tensor src, Tensor a, Tensor bt, Tensor? bias, float alpha, int seed, int threshold, "
        "float dscale) -> (Tensor, Tensor)");
  m.def("lora_merge(Tensor weight, Tensor b, Tensor a, float alpha) -> Tensor");
  m.def("lora_shrink_expand_grouped(Tensor src, Tensor a, Tensor bt, Tensor ids, Tensor? scales, Tensor? bias, "
        "float alpha, int seed, int threshold, float dscale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vfm_C, CPU, m) {
  m.impl("lora_shrink_expand", &vfm_cpu::lora_shrink_expand_cpu);
  m.impl("lora_merge", &vfm_cpu::lora_merge_cpu);
  m.impl("lora_shrink_expand_grouped", &vfm_cpu::lora_shrink_expand_grouped_cpu);
  m.impl("lora_dropout_xa", &vfm_cpu::lora_dropout_xa_cpu);
  m.impl("lora_dropout_dx_", &vfm_cpu::lora_dropout_dx_cpu);
  m.impl("lora_shrink", &vfm_cpu::lora_shrink_cpu);
  m.impl("lora_expand_", &vfm_cpu::lora_expand_cpu);
  m.impl("lora_dropout_apply", &vfm_cpu::lora_dropout_apply_cpu);
}
