// Row-chunk kernels of the single-adapter backward products (csrc/cpu/lora_backward.cpp runs one
// contiguous row range per thread, each with its own (R, CP) partial sum): x, dx and grad_y are
// streamed row-wise, 4 rows at a time over column blocks that keep their slices in L1.  Always
// inlined into the per-ISA clones of lora_backward.cpp (contract: vfm/ops/lora_reference.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/lora_tiles.h"

namespace vfm_cpu {
namespace lora {

// Fused backward with dropout on the rows [i0, i1) of one adapter, x and dx streamed row-wise:
// dx[i] += D(coef_i A) and acc (R, CP) += sum_i coef_i^T D(x_i), 4 rows at a time over column
// blocks of JB (the block's u, mask, A and acc slices stay in L1), each mask element hashed once.
template <typename T>
VFM_ALWAYS_INLINE void dx_ga_rows(const Drop& d, T* dx, int64_t ldd, const T* coef, const T* ap, int64_t CP,
                                  const T* src, int64_t ld, int64_t C, int64_t R, int64_t i0, int64_t i1, T* acc) {
  using V = typename lora::Vec<T>::type;
  using IV = typename lora::Vec<T>::itype;
  using IT = typename lora::Vec<T>::iscalar;
  constexpr int W = lora::Vec<T>::W, L = lora::Vec<T>::L;
  constexpr int64_t JB = 512 / sizeof(T);
  alignas(32) T ubuf[kRG][JB];
  alignas(32) IT kbuf[kRG][JB];
  std::vector<T> cbuf(kRG * R);
  const T ds = static_cast<T>(d.scale);
  const V dsv = V{} + ds;
  const T* u[kRG] = {ubuf[0], ubuf[1], ubuf[2], ubuf[3]};
  for (int64_t i = i0; i < i1; i += kRG) {
    const int n = static_cast<int>(std::min<int64_t>(kRG, i1 - i));
    for (int m = 0; m < kRG; ++m)
      for (int64_t r = 0; r < R; ++r) cbuf[m * R + r] = m < n ? coef[(i + m) * R + r] : T(0);
    for (int64_t c0 = 0; c0 < C; c0 += JB) {
      const int64_t w = std::min<int64_t>(JB, C - c0), WP = round_up(w, L);
      for (int m = 0; m < kRG; ++m) {
        const int64_t wm = m < n ? w : 0;
        if (m < n)
          lora::mask_row<T>(d, static_cast<uint64_t>(i + m) * static_cast<uint64_t>(C) + c0, src + (i + m) * ld + c0,
                            ds, w, ubuf[m], kbuf[m]);
        std::fill(ubuf[m] + wm, ubuf[m] + WP, T(0));
        std::fill(kbuf[m] + wm, kbuf[m] + WP, IT(0));
      }
      lora::reduce_step<T>(cbuf.data(), R, u, R, WP, acc + c0, CP);
      // dx rows += D(coef A) on this block, L columns at a time (8 accumulator registers).
      const T* a = ap + c0;
      for (int64_t v = 0; v < WP; v += L) {
        V lo[kRG], hi[kRG];
        lora::expand_rows4<T>(cbuf.data(), R, a + v, CP, lo, hi);
        const int64_t nv = std::min<int64_t>(L, w - v);
        auto put = [&](int m, V lo, V hi) {
          T* o = dx + (i + m) * ldd + c0 + v;
          const IT* km = kbuf[m] + v;
          lo *= dsv;
          hi *= dsv;
          if (nv == L) {
            lora::vstore(o, lora::vload<V>(o) + (V)((IV)lo & lora::vload<IV>(km)));
            lora::vstore(o + W, lora::vload<V>(o + W) + (V)((IV)hi & lora::vload<IV>(km + W)));
          } else {
            T tmp[L];
            lora::vstore(tmp, lo);
            lora::vstore(tmp + W, hi);
            for (int64_t j = 0; j < nv; ++j) o[j] += km[j] ? tmp[j] : T(0);
          }
        };
        for (int m = 0; m < n; ++m) put(m, lo[m], hi[m]);
      }
    }
  }
}

// res-partial acc (R, CP) += sum_{i in [i0, i1)} coef_i^T D?(x_i) for one adapter, x streamed
// row-wise (4 rows at a time over column blocks of JB; without dropout full blocks are read in place).
template <typename T>
VFM_ALWAYS_INLINE void reduce_rows(const Drop& d, const T* coef, const T* src, int64_t ld, int64_t C, int64_t R,
                                   int64_t CP, int64_t i0, int64_t i1, T* acc) {
  constexpr int L = lora::Vec<T>::L;
  constexpr int64_t JB = 1024 / sizeof(T);
  alignas(32) T ubuf[kRG][JB];
  std::vector<T> cbuf(kRG * R);
  const T ds = static_cast<T>(d.scale);
  for (int64_t i = i0; i < i1; i += kRG) {
    const int n = static_cast<int>(std::min<int64_t>(kRG, i1 - i));
    for (int m = 0; m < kRG; ++m)
      for (int64_t r = 0; r < R; ++r) cbuf[m * R + r] = m < n ? coef[(i + m) * R + r] : T(0);
    for (int64_t c0 = 0; c0 < C; c0 += JB) {
      const int64_t w = std::min<int64_t>(JB, C - c0), WP = round_up(w, L);
      const T* u[kRG];
      for (int m = 0; m < kRG; ++m) {
        const T* x = src + (i + m) * ld + c0;
        if (m < n && !d.active && w == WP) {
          u[m] = x;
          continue;
        }
        const int64_t wm = m < n ? w : 0;
        if (m < n && d.active)
          lora::drop_row<T>(d, static_cast<uint64_t>(i + m) * static_cast<uint64_t>(C) + c0, x, ds, w, ubuf[m]);
        else if (m < n)
          std::copy(x, x + w, ubuf[m]);
        std::fill(ubuf[m] + wm, ubuf[m] + WP, T(0));
        u[m] = ubuf[m];
      }
      lora::reduce_step<T>(cbuf.data(), R, u, R, WP, acc + c0, CP);
    }
  }
}

// grad_y's two rank-r products in one pass over the rows [i0, i1) of src (N, C): out[i] =
// alpha * src_i M^T (shrink tiles of kMR rows) and acc (R, CP) += coef_i^T src_i (reduce steps on
// the same rows while they are in cache).  mt: M^T packed (C, RP).
template <typename T>
VFM_ALWAYS_INLINE void shrink_reduce_rows(const T* src, int64_t ld, int64_t C, const T* mt, int64_t RP, int64_t R,
                                          const T* coef, int64_t CP, T alpha, int64_t i0, int64_t i1, T* out,
                                          T* acc) {
  constexpr int L = lora::Vec<T>::L;
  constexpr int64_t JB = 1024 / sizeof(T), NB = 3 * kRG;  // NB rows: two shrink tiles, three reduce steps
  static_assert(NB == 2 * kMR, "shrink_reduce_rows: NB must cover whole shrink tiles");
  alignas(32) T ubuf[kRG][JB];
  std::vector<T> cbuf(kRG * R);
  for (int64_t b = i0; b < i1; b += NB) {
    const int64_t nb = std::min<int64_t>(NB, i1 - b);
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
    for (int64_t i = b; i < b + nb; i += kRG) {
      const int n = static_cast<int>(std::min<int64_t>(kRG, b + nb - i));
      for (int m = 0; m < kRG; ++m)
        for (int64_t r = 0; r < R; ++r) cbuf[m * R + r] = m < n ? coef[(i + m) * R + r] : T(0);
      for (int64_t c0 = 0; c0 < C; c0 += JB) {
        const int64_t w = std::min<int64_t>(JB, C - c0), WP = round_up(w, L);
        const T* u[kRG];
        for (int m = 0; m < kRG; ++m) {
          const T* x = src + (i + m) * ld + c0;
          if (m < n && w == WP) {
            u[m] = x;
            continue;
          }
          const int64_t wm = m < n ? w : 0;
          if (m < n) std::copy(x, x + w, ubuf[m]);
          std::fill(ubuf[m] + wm, ubuf[m] + WP, T(0));
          u[m] = ubuf[m];
        }
        lora::reduce_step<T>(cbuf.data(), R, u, R, WP, acc + c0, CP);
      }
    }
  }
}

}  // namespace lora
}  // namespace vfm_cpu
