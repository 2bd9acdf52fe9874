// Register-tiled CPU kernels of the low-rank adapter ops (contract: vfm/ops/lora_reference.py),
// shared by csrc/cpu/lora_dropout.cpp.  Every kernel works on rows grouped by adapter (one
// adapter for lora_linear, K for lora_linear_multi) and regenerates the dropout keep-mask from
// (seed, element offset) where it touches x, never storing it:
//
// * shrink:  out[i, :R]  = alpha * s_k * D?(src_i) M_k^T        (xa = D(x) A^T, gxa = s g B)
// * expand:  out[i, :C] += D?(alpha * s_k * coef_i M_k)          (y += s xa B^T, dx += D(gxa A))
// * reduce:  res[k]      = alpha * s_k * sum_{i in k} coef_i^T D?(src_i)   (grad A, grad B)
//
// with M_k (R, C), k = the row's adapter.  The dense loops are GEMM micro-kernels on GCC vector
// types of 32 bytes, two per chunk, MR rows (or 4 rows for reduce) at a time so
// that each load of M feeds several FMAs; accumulation in the input dtype, as BLAS does.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define VFM_ALWAYS_INLINE inline __attribute__((always_inline))
#define VFM_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

namespace vfm_cpu {
namespace lora {

// The contract's finaliser on one 32-bit word (H = uint32_t) or on eight lanes (H = U8 below).
template <typename H>
VFM_ALWAYS_INLINE H fmix32(H h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Dropout of one call: keep iff hash(seed, offset) >= thr; kept values are multiplied by scale.
struct Drop {
  uint32_t k0 = 0, k1 = 0, thr = 0;
  bool active = false;  // threshold > 0 (p > 0)
  double scale = 1.0;
};

VFM_ALWAYS_INLINE uint32_t hash_at(const Drop& d, uint64_t off) {
  return fmix32(fmix32(static_cast<uint32_t>(off) ^ d.k0) ^ d.k1 ^ (static_cast<uint32_t>(off >> 32) * 0x9E3779B9u));
}

// 32-byte vectors (one AVX2 / AVX-512VL register; GCC lowers wider generic vectors badly on
// AVX2).  A "chunk" is two of them: L = 16 floats or 8 doubles.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t iscalar;  // lane masks: all ones (kept) or 0
  typedef int32_t itype __attribute__((vector_size(32)));
  static constexpr int W = 8;
  static constexpr int L = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t iscalar;
  typedef int64_t itype __attribute__((vector_size(32)));
  static constexpr int W = 4;
  static constexpr int L = 8;
};

template <typename V, typename T>
VFM_ALWAYS_INLINE V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
VFM_ALWAYS_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Eight hash lanes on 32-bit words for the float kernels: whole vectors, a 32-bit lane index
// (no 64-bit induction variable to narrow) and plain loads of x (no masked loads).
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));

// All-ones lanes where the offsets with low words lo (lanes) and the high word folded into
// hi_mix = k1 ^ (hi * 0x9E3779B9) are kept, zero lanes where they are dropped.
VFM_ALWAYS_INLINE I8 keep8(U8 lo, uint32_t k0, uint32_t hi_mix, uint32_t thr) {
  const U8 h = fmix32(fmix32(lo ^ k0) ^ hi_mix);
  return h >= thr;
}

VFM_ALWAYS_INLINE U8 iota8(uint32_t lo0) {
  const U8 i = {0, 1, 2, 3, 4, 5, 6, 7};
  return i + lo0;
}

VFM_ALWAYS_INLINE Vec<float>::type select8(I8 keep, Vec<float>::type x) {
  return (Vec<float>::type)(keep & (I8)x);
}

// The walk over the keep-mask of offsets base + j, j in [0, n), shared by the dropout row
// helpers below: whole 8-lane vectors (float only) call vec8(j0, keep) with all-ones lanes where
// kept, the rest one(j, keep).  Offsets with one high word run on 32-bit lanes; otherwise every
// element is hashed on its own.
template <typename T, typename FV, typename FS>
VFM_ALWAYS_INLINE void keep_walk(const Drop& d, uint64_t base, int64_t n, const FV& vec8, const FS& one) {
  if (n == 0) return;
  const uint64_t end = base + static_cast<uint64_t>(n);
  if ((base >> 32) == ((end - 1) >> 32)) {  // one high word: a loop on 32-bit lanes
    const uint32_t hi_mix = d.k1 ^ (static_cast<uint32_t>(base >> 32) * 0x9E3779B9u);
    const uint32_t lo0 = static_cast<uint32_t>(base), k0 = d.k0, thr = d.thr;
    int64_t j0 = 0;
    if constexpr (sizeof(T) == 4) {
      U8 lo = iota8(lo0);
      for (; j0 + 8 <= n; j0 += 8, lo += 8u) vec8(j0, keep8(lo, k0, hi_mix, thr));
    }
#pragma omp simd
    for (int64_t j = j0; j < n; ++j) one(j, fmix32(fmix32((lo0 + static_cast<uint32_t>(j)) ^ k0) ^ hi_mix) >= thr);
  } else {
    for (int64_t j = 0; j < n; ++j) one(j, hash_at(d, base + static_cast<uint64_t>(j)) >= d.thr);
  }
}

// u[j] = keep(base + j) ? v[j] * s : 0 for j in [0, n).
template <typename T>
VFM_ALWAYS_INLINE void drop_row(const Drop& d, uint64_t base, const T* v, T s, int64_t n, T* u) {
  typedef Vec<float>::type V;
  keep_walk<T>(
      d, base, n,
      [&](int64_t j, I8 keep) VFM_ALWAYS_INLINE_LAMBDA {
        if constexpr (sizeof(T) == 4) vstore(u + j, select8(keep, vload<V>(v + j) * s));
      },
      [&](int64_t j, bool keep) VFM_ALWAYS_INLINE_LAMBDA { u[j] = keep ? v[j] * s : T(0); });
}

// o[j] += keep(base + j) ? t[j] * s : 0 for j in [0, n).
template <typename T>
VFM_ALWAYS_INLINE void drop_add_row(const Drop& d, uint64_t base, const T* t, T s, int64_t n, T* o) {
  typedef Vec<float>::type V;
  keep_walk<T>(
      d, base, n,
      [&](int64_t j, I8 keep) VFM_ALWAYS_INLINE_LAMBDA {
        if constexpr (sizeof(T) == 4) vstore(o + j, vload<V>(o + j) + select8(keep, vload<V>(t + j) * s));
      },
      [&](int64_t j, bool keep) VFM_ALWAYS_INLINE_LAMBDA { o[j] += keep ? t[j] * s : T(0); });
}

// Row w of the fused backward: u[j] = keep(base + j) ? v[j] * s : 0 and km[j] = keep ? all ones : 0
// for j in [0, n) (each mask element hashed once, used for both products).
template <typename T>
VFM_ALWAYS_INLINE void mask_row(const Drop& d, uint64_t base, const T* v, T s, int64_t n, T* u,
                                typename Vec<T>::iscalar* km) {
  using IT = typename Vec<T>::iscalar;
  typedef Vec<float>::type V;
  keep_walk<T>(
      d, base, n,
      [&](int64_t j, I8 keep) VFM_ALWAYS_INLINE_LAMBDA {
        if constexpr (sizeof(T) == 4) {
          vstore(km + j, keep);
          vstore(u + j, select8(keep, vload<V>(v + j) * s));
        }
      },
      [&](int64_t j, bool keep) VFM_ALWAYS_INLINE_LAMBDA {
        u[j] = keep ? v[j] * s : T(0);
        km[j] = keep ? IT(-1) : IT(0);
      });
}

constexpr int kMR = 6;      // rows per shrink / expand tile
constexpr int kRG = 4;      // rows per reduce step
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Shrink one tile of nrows <= kMR rows (u[m]: the rows, already dropped; entries m >= nrows
// repeat a valid row).  mt: M^T packed (C, RP) with RP a multiple of L (zero padded).
// o[m][r] = s * sum_j u[m][j] * mt[j][r] for r < R.
template <typename T>
VFM_ALWAYS_INLINE void shrink_tile(const T* const* u, int nrows, const T* mt, int64_t C, int64_t RP, int64_t R, T s,
                                   T* const* o) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L, W = Vec<T>::W;
  const T *u0 = u[0], *u1 = u[1], *u2 = u[2], *u3 = u[3], *u4 = u[4], *u5 = u[5];
  for (int64_t c0 = 0; c0 < RP; c0 += L) {
    V a0 = {}, b0 = {}, a1 = {}, b1 = {}, a2 = {}, b2 = {}, a3 = {}, b3 = {}, a4 = {}, b4 = {}, a5 = {}, b5 = {};
    const T* mp = mt + c0;
    for (int64_t j = 0; j < C; ++j) {
      const V p = vload<V>(mp + j * RP), q = vload<V>(mp + j * RP + W);
      T x;
      x = u0[j]; a0 += x * p; b0 += x * q;
      x = u1[j]; a1 += x * p; b1 += x * q;
      x = u2[j]; a2 += x * p; b2 += x * q;
      x = u3[j]; a3 += x * p; b3 += x * q;
      x = u4[j]; a4 += x * p; b4 += x * q;
      x = u5[j]; a5 += x * p; b5 += x * q;
    }
    T tmp[kMR][L];
    vstore(tmp[0], a0); vstore(tmp[0] + W, b0);
    vstore(tmp[1], a1); vstore(tmp[1] + W, b1);
    vstore(tmp[2], a2); vstore(tmp[2] + W, b2);
    vstore(tmp[3], a3); vstore(tmp[3] + W, b3);
    vstore(tmp[4], a4); vstore(tmp[4] + W, b4);
    vstore(tmp[5], a5); vstore(tmp[5] + W, b5);
    const int64_t n = std::min<int64_t>(L, R - c0);
    for (int m = 0; m < nrows; ++m)
      for (int64_t q = 0; q < n; ++q) o[m][c0 + q] = s * tmp[m][q];
  }
}

// The NR-row, 2-vector expand step of every expand kernel: lo[m] / hi[m] = sum_r e[m * lde + r] *
// a[r * lda + {0, W} + lanes] for the NR rows m (2 NR accumulators; each pair of loads of a feeds
// 2 NR FMAs).
template <typename T, int NR>
VFM_ALWAYS_INLINE void expand_rows(const T* e, int64_t lde, int64_t R, const T* a, int64_t lda,
                                   typename Vec<T>::type* lo, typename Vec<T>::type* hi) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V s[NR], t[NR];
#pragma GCC unroll 8
  for (int m = 0; m < NR; ++m) s[m] = t[m] = V{};
  for (int64_t r = 0; r < R; ++r) {
    const V p = vload<V>(a + r * lda), q = vload<V>(a + r * lda + W);
#pragma GCC unroll 8
    for (int m = 0; m < NR; ++m) {
      const T x = e[m * lde + r];
      s[m] += x * p;
      t[m] += x * q;
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < NR; ++m) {
    lo[m] = s[m];
    hi[m] = t[m];
  }
}

// Expand one tile: for m < nrows, out[m][:C] += D(sum_r coef[m * ldc + r] * mp[r][:]) (row m's
// dropout offsets start at base[m]); mp: M packed (R, CP), CP a multiple of L (zero padded);
// coef already holds every scale factor (rows m >= nrows: any finite values).
template <typename T>
VFM_ALWAYS_INLINE void expand_tile(const T* coef, int64_t ldc, int nrows, const T* mp, int64_t R, int64_t C, int64_t CP,
                                   const Drop& d, const uint64_t* base, T* const* out) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L, W = Vec<T>::W;
  const T ds = static_cast<T>(d.scale);
  for (int64_t c0 = 0; c0 < CP; c0 += L) {
    V lo[kMR], hi[kMR];
    expand_rows<T, kMR>(coef, ldc, R, mp + c0, CP, lo, hi);
    const int64_t n = std::min<int64_t>(L, C - c0);
    for (int m = 0; m < nrows; ++m) {
      T tmp[L];
      vstore(tmp, lo[m]);
      vstore(tmp + W, hi[m]);
      T* o = out[m] + c0;
      if (d.active) {
        drop_add_row<T>(d, base[m] + static_cast<uint64_t>(c0), tmp, ds, n, o);
      } else {
#pragma omp simd
        for (int64_t q = 0; q < n; ++q) o[q] += tmp[q];
      }
    }
  }
}

// Expand one tile into fresh rows: for m < nrows, out[m][:C] = add[m][:C] + alpha * sum_r
// coef[m * ldc + r] * mp[r][:] (add == nullptr: nothing added; add[m] may all be one bias row),
// stored straight from the registers (no read of out).  mp: M packed (R, CP), CP a multiple of L
// (zero padded); rows m >= nrows: any finite coef values, not stored.
template <typename T>
VFM_ALWAYS_INLINE void expand_store_tile(const T* coef, int64_t ldc, int nrows, const T* mp, int64_t R, int64_t C,
                                         int64_t CP, T alpha, const T* const* add, T* const* out) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L, W = Vec<T>::W;
  const V av = V{} + alpha;
  for (int64_t c0 = 0; c0 < CP; c0 += L) {
    V lo[kMR], hi[kMR];
    expand_rows<T, kMR>(coef, ldc, R, mp + c0, CP, lo, hi);
    const bool full = c0 + L <= C;
#pragma GCC unroll 8
    for (int m = 0; m < kMR; ++m) {  // unrolled: lo and hi stay in registers
      if (m >= nrows) break;
      V a = lo[m] * av, b = hi[m] * av;
      if (full) {
        if (add != nullptr) {
          a += vload<V>(add[m] + c0);
          b += vload<V>(add[m] + c0 + W);
        }
        vstore(out[m] + c0, a);
        vstore(out[m] + c0 + W, b);
        continue;
      }
      T tmp[L];
      vstore(tmp, a);
      vstore(tmp + W, b);
      for (int64_t q = 0; q < C - c0; ++q) out[m][c0 + q] = tmp[q] + (add != nullptr ? add[m][c0 + q] : T(0));
    }
  }
}

// Reduce step: acc[r * lda + :WP] += sum_g c[g * ldc + r] * u[g][:WP] for 4 rows (u rows zero
// padded to WP, a multiple of L; unused rows have c = 0 and u = 0).
template <typename T>
VFM_ALWAYS_INLINE void reduce_step(const T* c, int64_t ldc, const T* const* u, int64_t R, int64_t WP, T* acc,
                                   int64_t lda) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  const T *u0 = u[0], *u1 = u[1], *u2 = u[2], *u3 = u[3];
  int64_t r = 0;
  for (; r + 2 <= R; r += 2) {  // two ranks per pass: each load of u feeds four FMAs
    const T x0 = c[r], x1 = c[ldc + r], x2 = c[2 * ldc + r], x3 = c[3 * ldc + r];
    const T y0 = c[r + 1], y1 = c[ldc + r + 1], y2 = c[2 * ldc + r + 1], y3 = c[3 * ldc + r + 1];
    T* a = acc + r * lda;
    T* b = a + lda;
    for (int64_t v = 0; v < WP; v += W) {
      const V p0 = vload<V>(u0 + v), p1 = vload<V>(u1 + v), p2 = vload<V>(u2 + v), p3 = vload<V>(u3 + v);
      V s = vload<V>(a + v), t = vload<V>(b + v);
      s += x0 * p0;  // one FMA each (the loop's iterations are independent chains)
      t += y0 * p0;
      s += x1 * p1;
      t += y1 * p1;
      s += x2 * p2;
      t += y2 * p2;
      s += x3 * p3;
      t += y3 * p3;
      vstore(a + v, s);
      vstore(b + v, t);
    }
  }
  for (; r < R; ++r) {
    const T x0 = c[r], x1 = c[ldc + r], x2 = c[2 * ldc + r], x3 = c[3 * ldc + r];
    T* a = acc + r * lda;
    for (int64_t v = 0; v < WP; v += W) {
      V s = vload<V>(a + v);
      s += x0 * vload<V>(u0 + v) + x1 * vload<V>(u1 + v);
      s += x2 * vload<V>(u2 + v) + x3 * vload<V>(u3 + v);
      vstore(a + v, s);
    }
  }
}

// One register tile of reduce_block: NR ranks from r, L columns at a time, over nrows rows.
template <typename T, int NR>
VFM_ALWAYS_INLINE void reduce_tile(const T* c, int64_t ldc, const T* const* u, int nrows, int64_t r, int64_t WP,
                                   T* acc, int64_t lda) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W, L = Vec<T>::L;
  T* a = acc + r * lda;
  for (int64_t v = 0; v < WP; v += L) {
    V lo[NR], hi[NR];
#pragma GCC unroll 8
    for (int k = 0; k < NR; ++k) {
      lo[k] = vload<V>(a + k * lda + v);
      hi[k] = vload<V>(a + k * lda + v + W);
    }
    for (int m = 0; m < nrows; ++m) {
      const V p = vload<V>(u[m] + v), q = vload<V>(u[m] + v + W);
      const T* cm = c + m * ldc + r;
#pragma GCC unroll 8
      for (int k = 0; k < NR; ++k) {
        const T x = cm[k];
        lo[k] += x * p;
        hi[k] += x * q;
      }
    }
#pragma GCC unroll 8
    for (int k = 0; k < NR; ++k) {
      vstore(a + k * lda + v, lo[k]);
      vstore(a + k * lda + v + W, hi[k]);
    }
  }
}

// Reduce over a block of rows: acc[r * lda + :WP] += sum_{m < nrows} c[m * ldc + r] * u[m][:WP]
// (u rows zero padded to WP, a multiple of L).  Register tiles of 6 (then 4) ranks x L columns
// stay in registers over all the block's rows (12 accumulators; per row two loads of u and six
// broadcasts feed 12 FMAs, and acc is read and written once per block instead of once per row).
template <typename T>
VFM_ALWAYS_INLINE void reduce_block(const T* c, int64_t ldc, const T* const* u, int nrows, int64_t R, int64_t WP,
                                    T* acc, int64_t lda) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  int64_t r = 0;
  for (; r + 6 <= R; r += 6) reduce_tile<T, 6>(c, ldc, u, nrows, r, WP, acc, lda);
  for (; r + 4 <= R; r += 4) reduce_tile<T, 4>(c, ldc, u, nrows, r, WP, acc, lda);
  for (; r < R; ++r) {
    T* a = acc + r * lda;
    for (int64_t v = 0; v < WP; v += W) {
      V s = vload<V>(a + v);
      for (int m = 0; m < nrows; ++m) s += c[m * ldc + r] * vload<V>(u[m] + v);
      vstore(a + v, s);
    }
  }
}

}  // namespace lora
}  // namespace vfm_cpu
