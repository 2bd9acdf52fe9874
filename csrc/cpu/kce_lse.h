// Chunk reductions and online logsumexp of the CPU knowledge cross-entropy kernel
// (csrc/cpu/knowledge_ce.cpp): max / NaN scans (optionally over the allowed set) and the merges of
// a chunk into the running logsumexp states of pass 1 (OnlineLSE: csrc/common/kce_math.h).
// Header-only: everything here is inlined into kce_row (and so built per ISA clone).
#pragma once

#include "cpu/kce_cpu.h"  // first: the floating-point options of the kernels

namespace vfm_cpu {

// ---------------------------------------------------------------------------------------------
// chunk reductions
// ---------------------------------------------------------------------------------------------

template <typename A>
VFM_INLINE A chunk_max(const A* a, int n) {
  A m = neg_inf<A>();
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; ++j) m = a[j] > m ? a[j] : m;
  return m;
}

template <typename A>
VFM_INLINE bool chunk_has_nan(const A* a, int n) {
  for (int j = 0; j < n; ++j)
    if (a[j] != a[j]) return true;
  return false;
}

// Max over the allowed entries (mk[j] != 0) of a chunk, -inf if none; NaN is ignored (as in
// chunk_max).  A blend and a max per element: vectorises.
template <typename A>
VFM_INLINE A masked_max(const A* a, const A* mk, int n) {
  A m = neg_inf<A>();
  const A ninf = neg_inf<A>();
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; ++j) {
    const A v = mk[j] != A(0) ? a[j] : ninf;
    m = v > m ? v : m;
  }
  return m;
}

template <typename A>
VFM_INLINE bool masked_has_nan(const A* a, const A* mk, int n) {
  for (int j = 0; j < n; ++j)
    if (mk[j] != A(0) && a[j] != a[j]) return true;
  return false;
}

// Merge the allowed entries of a chunk (mk[j] != 0) into an online logsumexp, exactly as if the
// others were -inf: the exp is taken everywhere and the disallowed terms are selected away
// (a blend, no branch; the select also drops a NaN or garbage exp of a disallowed entry).
// ma = masked_max(a, mk, n).
template <typename A>
VFM_INLINE void lse_chunk_masked(OnlineLSE& acc, const A* a, const A* mk, A ma, int n) {
  const double m_new = acc.new_max(static_cast<double>(ma));
  if (m_new == neg_inf<double>()) {
    acc.merge_empty_block(masked_has_nan(a, mk, n));
    return;
  }
  const A shift = static_cast<A>(m_new);
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < n; ++j) {
    const A e = exp_nonpos(a[j] - shift);
    s += mk[j] != A(0) ? e : A(0);
  }
  acc.merge_block(m_new, static_cast<double>(s), 0.0);
}

// How far (in nats) the allowed set's max may sit below the full softmax's shift for the allowed
// sum to share the full softmax's exp: every allowed term that then flushes to 0 (more than 88
// below the shift) is below exp(-88 + kSharedShiftRange) = e^-28 of the allowed max's term.
constexpr double kSharedShiftRange = 60.0;

// Merge a chunk into an online logsumexp over the values a_j * sa (sa > 0):
// S += sum exp(a_j sa), and, when b is given, W += sum exp(a_j sa) * (a_j sa - b_j sb)
// (0 where exp(a_j sa) = 0).  Scaling inline (instead of storing a / T in a buffer) is free next
// to the exp: x * sa - shift is one FMA.  max(a * sa) = max(a) * sa since rounding is monotone.
// With acc_m (only for sa = 1), the allowed entries (mk[j] != 0) are also merged into acc_m, the
// logsumexp over the allowed set: from the same exps (one blend and add per element) when the
// allowed max is within kSharedShiftRange of this shift and the shift is finite (acc_m.m never
// exceeds acc.m, so the shared shift is a valid one for acc_m), else by lse_chunk_masked.
template <typename A>
VFM_INLINE void lse_chunk(OnlineLSE& acc, const A* a, A sa, const A* b, A sb, int n, OnlineLSE* acc_m = nullptr,
                          const A* mk = nullptr) {
  const double m_new = acc.new_max(static_cast<double>(chunk_max(a, n) * sa));
  bool shared = false;
  if (acc_m != nullptr) {
    const A ma = masked_max(a, mk, n);
    shared = m_new > neg_inf<double>() && m_new < pos_inf<double>() &&
             static_cast<double>(ma) >= m_new - kSharedShiftRange;
    if (!shared) lse_chunk_masked(*acc_m, a, mk, ma, n);
  }
  if (m_new == neg_inf<double>()) {
    acc.merge_empty_block(chunk_has_nan(a, n));
    return;
  }
  const A shift = static_cast<A>(m_new);
  A s = 0, w = 0, s_m = 0;
  if (shared && b != nullptr) {
#pragma omp simd reduction(+ : s, w, s_m)
    for (int j = 0; j < n; ++j) {
      const A v = a[j] * sa;
      const A e = exp_nonpos(v - shift);
      s += e;
      s_m += mk[j] != A(0) ? e : A(0);
      w += weighted(e, v - b[j] * sb);
    }
  } else if (shared) {
#pragma omp simd reduction(+ : s, s_m)
    for (int j = 0; j < n; ++j) {
      const A e = exp_nonpos(a[j] * sa - shift);
      s += e;
      s_m += mk[j] != A(0) ? e : A(0);
    }
  } else if (b != nullptr) {
#pragma omp simd reduction(+ : s, w)
    for (int j = 0; j < n; ++j) {
      const A v = a[j] * sa;
      const A e = exp_nonpos(v - shift);
      s += e;
      w += weighted(e, v - b[j] * sb);
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < n; ++j) s += exp_nonpos(a[j] * sa - shift);
  }
  acc.merge_block(m_new, static_cast<double>(s), static_cast<double>(w));
  if (shared) acc_m->merge_block(m_new, static_cast<double>(s_m), 0.0);
}

// At T = 2 the student's two statistics share one exp: with u = zc / 2 and e = exp(u - m),
// exp(zc - 2m) = e^2.  acc_t gets S = sum e (and, with b, the reverse-KL W = sum e (u - b / 2)),
// acc_p gets S = sum e^2.
template <typename A>
VFM_INLINE void lse_chunk_t2(OnlineLSE& acc_t, OnlineLSE& acc_p, const A* x, const A* b, int n) {
  const double m_new = acc_t.new_max(static_cast<double>(chunk_max(x, n) * A(0.5)));
  if (m_new == neg_inf<double>()) {
    const bool nan = chunk_has_nan(x, n);
    acc_t.merge_empty_block(nan);
    acc_p.merge_empty_block(nan);
    return;
  }
  const A shift = static_cast<A>(m_new);
  A s_t = 0, s_p = 0, w = 0;
  if (b != nullptr) {
#pragma omp simd reduction(+ : s_t, s_p, w)
    for (int j = 0; j < n; ++j) {
      const A u = x[j] * A(0.5);
      const A e = exp_nonpos(u - shift);
      s_t += e;
      s_p += e * e;
      w += weighted(e, u - b[j] * A(0.5));
    }
  } else {
#pragma omp simd reduction(+ : s_t, s_p)
    for (int j = 0; j < n; ++j) {
      const A e = exp_nonpos(x[j] * A(0.5) - shift);
      s_t += e;
      s_p += e * e;
    }
  }
  acc_t.merge_block(m_new, static_cast<double>(s_t), static_cast<double>(w));
  acc_p.merge_block(2.0 * m_new, static_cast<double>(s_p), 0.0);
}

}  // namespace vfm_cpu
