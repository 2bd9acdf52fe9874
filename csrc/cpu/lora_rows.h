// Row-chunk kernels of the single-adapter backward products (csrc/cpu/lora_backward.cpp runs one
// contiguous row range per thread, each with its own (R, CP) partial sum), and of the forward's
// rank-r part (csrc/cpu/lora_dropout.cpp): x, dx and grad_y are streamed row-wise, blocks of kSB
// rows over column blocks that keep their slices in L1.  Always inlined into the per-ISA clones
// (contract: vfm/ops/lora_reference.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/lora_tiles.h"

namespace vfm_cpu {
namespace lora {

constexpr int kSB = 2 * kMR;  // rows per reduce block: two shrink / expand tiles of kMR rows

// Fused backward on the rows [i0, i1) of one adapter, x and dx streamed row-wise:
// dx[i] += D?(coef_i A) (kSet: dx[i] = D?(coef_i A), dx need not be initialised) and acc (R, CP)
// += sum_i coef_i^T D?(x_i), blocks of kSB rows over column blocks of JB (the block's u, mask, A
// and acc slices stay in L1; reduce_block keeps acc tiles in registers over the kSB rows, the
// expand runs two kMR-row register tiles), each mask element hashed once.  D? is the identity
// when d.active is false.
template <typename T, bool kSet>
VFM_ALWAYS_INLINE void dx_ga_rows(const Drop& d, T* dx, int64_t ldd, const T* coef, const T* ap, int64_t CP,
                                  const T* src, int64_t ld, int64_t C, int64_t R, int64_t i0, int64_t i1, T* acc) {
  using V = typename lora::Vec<T>::type;
  using IV = typename lora::Vec<T>::itype;
  using IT = typename lora::Vec<T>::iscalar;
  constexpr int W = lora::Vec<T>::W, L = lora::Vec<T>::L;
  constexpr int64_t JB = 512 / sizeof(T);
  alignas(32) T ubuf[kSB][JB];
  alignas(32) IT kbuf[kSB][JB];
  std::vector<T> cbuf(kSB * R);
  const bool drop = d.active;
  const T ds = static_cast<T>(d.scale);
  const V dsv = V{} + ds;
  for (int64_t sb = i0; sb < i1; sb += kSB) {
    const int nsb = static_cast<int>(std::min<int64_t>(kSB, i1 - sb));
    for (int m = 0; m < kSB; ++m)
      for (int64_t r = 0; r < R; ++r) cbuf[m * R + r] = m < nsb ? coef[(sb + m) * R + r] : T(0);
    for (int64_t c0 = 0; c0 < C; c0 += JB) {
      const int64_t w = std::min<int64_t>(JB, C - c0), WP = round_up(w, L);
      // the block's rows of D?(x)
      const T* u[kSB];
      for (int m = 0; m < kSB; ++m) {
        const T* x = src + (sb + m) * ld + c0;
        u[m] = ubuf[m];  // copied even without dropout (see block_rows)
        const int64_t wm = m < nsb ? w : 0;
        if (m < nsb && drop)
          lora::mask_row<T>(d, static_cast<uint64_t>(sb + m) * static_cast<uint64_t>(C) + c0, x, ds, w, ubuf[m],
                            kbuf[m]);
        else if (m < nsb)
          std::copy(x, x + w, ubuf[m]);
        std::fill(ubuf[m] + wm, ubuf[m] + WP, T(0));
        if (drop) std::fill(kbuf[m] + wm, kbuf[m] + WP, IT(0));
      }
      lora::reduce_block<T>(cbuf.data(), R, u, nsb, R, WP, acc + c0, CP);
      // dx rows (+)= D?(coef A) on this block, kMR rows x L columns at a time (12 accumulators).
      const T* a = ap + c0;
      for (int t = 0; t < nsb; t += kMR) {
        const int n = std::min(kMR, nsb - t);
        for (int64_t v = 0; v < WP; v += L) {
          V lo[kMR], hi[kMR];
          lora::expand_rows<T, kMR>(cbuf.data() + t * R, R, R, a + v, CP, lo, hi);
          const int64_t nv = std::min<int64_t>(L, w - v);
          for (int m = 0; m < n; ++m) {
            T* o = dx + (sb + t + m) * ldd + c0 + v;
            const IT* km = kbuf[t + m] + v;
            V l = lo[m], h = hi[m];
            if (drop) {
              l = (V)((IV)(l * dsv) & lora::vload<IV>(km));
              h = (V)((IV)(h * dsv) & lora::vload<IV>(km + W));
            }
            if (nv == L) {
              lora::vstore(o, kSet ? l : lora::vload<V>(o) + l);
              lora::vstore(o + W, kSet ? h : lora::vload<V>(o + W) + h);
            } else {
              T tmp[L];
              lora::vstore(tmp, l);
              lora::vstore(tmp + W, h);
              for (int64_t j = 0; j < nv; ++j) o[j] = kSet ? tmp[j] : o[j] + tmp[j];
            }
          }
        }
      }
    }
  }
}

// The forward of one adapter on the rows [i0, i1): xa[i] = D?(x_i) A^T (shrink tiles of kMR
// rows; mt: A^T packed (C, RP)) and y[i] = bias + alpha * xa_i B^T stored from the registers while
// the tile's xa rows are in L1 (bp: B^T packed (R, OP)), so that the base GEMM can accumulate onto
// y afterwards; ubuf: kMR * C scratch for the dropped rows.
// One tile of up to kMR rows (indices rows[0..kMR), the last real row repeated past n):
// xa rows = D?(src) A^T, then y rows = bias + alpha * xa B^T stored from registers while the
// tile's xa rows are in L1.  brows: kMR pointers to the bias (or nullptr); ubuf: kMR * C scratch
// for D(src) rows; cbuf: kMR * R scratch.
template <typename T>
VFM_ALWAYS_INLINE void shrink_expand_tile(const Drop& d, const T* src, int64_t ld, int64_t C, const T* mt,
                                          int64_t RP, int64_t R, const T* bp, int64_t O, int64_t OP,
                                          const T* const* brows, T alpha, const int64_t* rows, int n, T* xa, T* y,
                                          int64_t ldy, T* ubuf, T* cbuf) {
  const T ds = static_cast<T>(d.scale);
  const T* u[kMR];
  T* o[kMR];
  T* yo[kMR];
  for (int m = 0; m < kMR; ++m) {
    const int64_t i = rows[m];
    if (d.active && m < n) {
      lora::drop_row<T>(d, static_cast<uint64_t>(i) * static_cast<uint64_t>(C), src + i * ld, ds, C, ubuf + m * C);
      u[m] = ubuf + m * C;
    } else {
      u[m] = d.active ? u[0] : src + i * ld;
    }
    o[m] = xa + i * R;
    yo[m] = y + i * ldy;
  }
  lora::shrink_tile<T>(u, n, mt, C, RP, R, T(1), o);
  for (int m = 0; m < kMR; ++m) std::copy(o[m], o[m] + R, cbuf + m * R);
  lora::expand_store_tile<T>(cbuf, R, n, bp, R, O, OP, alpha, brows, yo);
}

// Rows [i0, i1) of lora_linear's forward rank-r part (one adapter): shrink_expand_tile over tiles
// of kMR consecutive rows.
template <typename T>
VFM_ALWAYS_INLINE void shrink_expand_rows(const Drop& d, const T* src, int64_t ld, int64_t C, const T* mt,
                                          int64_t RP, int64_t R, const T* bp, int64_t O, int64_t OP, const T* bias,
                                          T alpha, int64_t i0, int64_t i1, T* xa, T* y, int64_t ldy, T* ubuf) {
  std::vector<T> cbuf(kMR * R);
  const T* brows[kMR] = {bias, bias, bias, bias, bias, bias};
  int64_t rows[kMR];
  for (int64_t t = i0; t < i1; t += kMR) {
    const int n = static_cast<int>(std::min<int64_t>(kMR, i1 - t));
    for (int m = 0; m < kMR; ++m) rows[m] = t + std::min(m, n - 1);
    shrink_expand_tile<T>(d, src, ld, C, mt, RP, R, bp, O, OP, bias != nullptr ? brows : nullptr, alpha, rows, n, xa,
                          y, ldy, ubuf, cbuf.data());
  }
}

// Rows [i0, i1) of W + alpha * B A: out[i] = w[i] + alpha * b_i A (kMR rows per tile; ap: A
// packed (R, CP); b (O, R) rows; w and out (O, C) with row strides ldw and ldo).
template <typename T>
VFM_ALWAYS_INLINE void merge_rows(const T* w, int64_t ldw, const T* b, const T* ap, int64_t R, int64_t C, int64_t CP,
                                  T alpha, int64_t i0, int64_t i1, T* out, int64_t ldo) {
  std::vector<T> cbuf(kMR * R);
  for (int64_t t = i0; t < i1; t += kMR) {
    const int n = static_cast<int>(std::min<int64_t>(kMR, i1 - t));
    const T* add[kMR];
    T* o[kMR];
    for (int m = 0; m < kMR; ++m) {
      const int64_t i = t + std::min(m, n - 1);
      std::copy(b + i * R, b + i * R + R, cbuf.data() + m * R);
      add[m] = w + i * ldw;
      o[m] = out + i * ldo;
    }
    lora::expand_store_tile<T>(cbuf.data(), R, n, ap, R, C, CP, alpha, add, o);
  }
}

// Rows [i, i + n) of D?(src) on the columns [c0, c0 + w) for a reduce block of up to kSB rows:
// u[m] points to ubuf[m] (D? applied, zero padded to WP = round_up(w, L)); rows m >= n are not set (reduce_block reads n rows).
template <typename T, int64_t JB>
VFM_ALWAYS_INLINE void block_rows(const Drop& d, const T* src, int64_t ld, int64_t C, int64_t i, int n, int64_t c0,
                                  int64_t w, int64_t WP, T (*ubuf)[JB], const T** u) {
  const T ds = static_cast<T>(d.scale);
  for (int m = 0; m < n; ++m) {
    const T* x = src + (i + m) * ld + c0;
    // copied even without dropout: rows of src a power-of-two stride apart map to one L1 set, and
    // the reduce block reads kSB of them at once (more than the cache's ways)
    if (d.active)
      lora::drop_row<T>(d, static_cast<uint64_t>(i + m) * static_cast<uint64_t>(C) + c0, x, ds, w, ubuf[m]);
    else
      std::copy(x, x + w, ubuf[m]);
    std::fill(ubuf[m] + w, ubuf[m] + WP, T(0));
    u[m] = ubuf[m];
  }
}

// res-partial acc (R, CP) += sum_{i in [i0, i1)} coef_i^T D?(x_i) for one adapter, x streamed
// row-wise (blocks of kSB rows over column blocks of JB).
template <typename T>
VFM_ALWAYS_INLINE void reduce_rows(const Drop& d, const T* coef, const T* src, int64_t ld, int64_t C, int64_t R,
                                   int64_t CP, int64_t i0, int64_t i1, T* acc) {
  constexpr int L = lora::Vec<T>::L;
  constexpr int64_t JB = 1024 / sizeof(T);
  alignas(32) T ubuf[kSB][JB];
  for (int64_t i = i0; i < i1; i += kSB) {
    const int n = static_cast<int>(std::min<int64_t>(kSB, i1 - i));
    for (int64_t c0 = 0; c0 < C; c0 += JB) {
      const int64_t w = std::min<int64_t>(JB, C - c0), WP = round_up(w, L);
      const T* u[kSB];
      block_rows<T, JB>(d, src, ld, C, i, n, c0, w, WP, ubuf, u);
      lora::reduce_block<T>(coef + i * R, R, u, n, R, WP, acc + c0, CP);
    }
  }
}

// grad_y's two rank-r products in one pass over the rows [i0, i1) of src (N, C): out[i] =
// alpha * src_i M^T (shrink tiles of kMR rows) and acc (R, CP) += coef_i^T src_i (a reduce block
// on the same kSB rows while they are in cache).  mt: M^T packed (C, RP).
template <typename T>
VFM_ALWAYS_INLINE void shrink_reduce_rows(const T* src, int64_t ld, int64_t C, const T* mt, int64_t RP, int64_t R,
                                          const T* coef, int64_t CP, T alpha, int64_t i0, int64_t i1, T* out,
                                          T* acc) {
  constexpr int L = lora::Vec<T>::L;
  constexpr int64_t JB = 1024 / sizeof(T);
  alignas(32) T ubuf[kSB][JB];
  const Drop none;
  for (int64_t b = i0; b < i1; b += kSB) {
    const int nb = static_cast<int>(std::min<int64_t>(kSB, i1 - b));
    for (int64_t t = b; t < b + nb; t += kMR) {
      const int n = static_cast<int>(std::min<int64_t>(kMR, b + nb - t));
      const T* u[kMR];
      T* o[kMR];
      for (int m = 0; m < kMR; ++m) {
        u[m] = src + (t + std::min(m, n - 1)) * ld;
        o[m] = out + (t + std::min(m, n - 1)) * R;
      }
      lora::shrink_tile<T>(u, n, mt, C, RP, R, alpha, o);
    }
    for (int64_t c0 = 0; c0 < C; c0 += JB) {
      const int64_t w = std::min<int64_t>(JB, C - c0), WP = round_up(w, L);
      const T* u[kSB];
      block_rows<T, JB>(none, src, ld, C, b, nb, c0, w, WP, ubuf, u);
      lora::reduce_block<T>(coef + b * R, R, u, nb, R, WP, acc + c0, CP);
    }
  }
}

}  // namespace lora
}  // namespace vfm_cpu
