// CPU kernel of vfm_C::kce_forward, the knowledge cross-entropy op (contract:
// vfm/ops/kce_reference.py; maths: csrc/common/kce_math.h).
//
// Design
// ------
// * One OpenMP task per row.  A row is swept in chunks of kChunk labels.  Logits that need work
//   (softcap, fp16/bf16 -> float) are converted into a small float (double for float64 logits)
//   buffer that lives in L1; fp32 logits and teachers are read in place.  Every quantity the loss
//   needs is then a simple branch-free loop over the chunk, which gcc vectorises with the
//   polynomial exp/log of kce_math.h; 1/T is applied inline (x * (1/T) - shift is one FMA).
//   Branches on the options are per chunk, never per element.
// * Pass 1 reads the logits (and teacher) once and keeps online (running-max) logsumexp states
//   with weighted sums: lse(zc), lse(zc/T), lse(t/T) with the KL sum, lse over the allowed set,
//   lse of the rule posterior with its KL sum, and sum_v w_v zc_v for label smoothing.  At T = 2,
//   lse(zc) and lse(zc/2) share one exp (exp(zc - 2m) = exp(zc/2 - m)^2), in both passes.  JSD
//   needs the normalisers before it can sum, so it takes one extra (middle) pass.
// * The allowed set (packed bits) is expanded per chunk into a 0/1 buffer, 32 labels per word in a
//   fixed-count loop, and used only through blends.  The mass penalty's lse over the allowed set
//   reuses the exps of lse(zc) (same shift) while the allowed max is within 60 of that shift (else
//   it takes its own shift), and in pass 2 its term joins the p term as a per-label coefficient.
// * Pass 2, only when a gradient is wanted, computes each element's gradient once and writes it
//   once, in the logits' dtype; sparse corrections (the CE one-hot, the top-k teacher) are applied
//   to the chunk before it is stored.  The pass reads element v before writing element v, so
//   `grad` may alias `logits` (inplace_backward); the only entries read after the row is
//   overwritten (zc at the target and at the top-k indices) are gathered before pass 2.
// * The hot row functions are compiled three times (target_clones: x86-64-v4 = AVX-512,
//   x86-64-v3 = AVX2 + FMA, baseline) and the dynamic loader picks the best for the running CPU.
// * No ATen operator runs in the hot path; the two small outputs are allocated with at::empty.
// * A fresh gradient tensor is asked to be backed by transparent huge pages (advise_huge_pages).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

// Floating-point options of this file's kernels (kept here rather than in setup.py):
// * fp-contract=fast lets gcc fuse a * b + c into FMAs (the x86-64-v3/v4 clones have FMA; the ISO
//   C++ mode we build in defaults to off).  Contraction only removes roundings.
// * no-trapping-math lets gcc if-convert the selects of kce_math.h into blends, without which no
//   loop with a select vectorises.  It only drops the promise to raise FP exception flags in
//   program order; NaN and inf semantics are untouched (unlike -ffast-math, which we avoid).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast", "no-trapping-math")
#endif

#include "common/kce_math.h"

// -DVFM_KCE_NO_CLONES builds the baseline version only (to check the fallback path on any CPU).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    !defined(VFM_KCE_NO_CLONES)
#define VFM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define VFM_HAVE_CLONES 1
#else
#define VFM_CLONES
#define VFM_HAVE_CLONES 0
#endif

namespace vfm_cpu {

using namespace vfm::kce;

constexpr int kChunk = 512;  // labels per chunk: 5 buffers of 2 KiB (float) stay in L1
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };
enum KdMode : int { KD_NONE = 0, KD_KL = 1, KD_REVERSE_KL = 2, KD_JSD = 3 };
enum PenMode : int { PEN_NONE = 0, PEN_MASS = 1, PEN_POSTERIOR = 2 };

// Everything a row needs, as raw pointers and element strides (validated by kce_forward_cpu).
struct Params {
  int64_t n_rows = 0, vocab = 0;
  const void* logits = nullptr;
  int64_t logits_rs = 0;
  int logits_dt = kF32;
  const void* teacher = nullptr;
  int64_t teacher_rs = 0;
  int teacher_dt = kF32;
  void* grad = nullptr;
  int64_t grad_rs = 0;
  bool inplace = false;
  const int64_t* target = nullptr;
  int64_t target_s = 0;
  const float* weight = nullptr;  // contiguous
  double sum_w = 0.0;
  const int64_t* topk_idx = nullptr;
  int64_t topk_idx_rs = 0, topk_idx_cs = 0;
  const float* topk_lp = nullptr;
  int64_t topk_lp_rs = 0, topk_lp_cs = 0;
  int64_t k = 0;
  const int32_t* allowed = nullptr;
  int64_t allowed_rs = 0;
  const int32_t* group_ids = nullptr;
  int64_t group_s = 0;
  const float* scales = nullptr;
  int64_t scales_rs = 0, scales_cs = 0;
  void* row_loss = nullptr;  // (N,), float32, or float64 for float64 logits
  void* parts = nullptr;     // (5, N) contiguous, same dtype
  int64_t ignore_index = -100;
  double eps = 0.0, cap = 0.0, temp = 1.0, beta = 0.5, rule_c = 0.0;
  int kd_mode = KD_NONE, pen_mode = PEN_NONE;
  bool use_ce = true, use_z = false;
};

// Per-thread scratch for the top-k teacher entries of the current row.
struct Scratch {
  std::vector<int64_t> idx;
  std::vector<double> u, q;
  explicit Scratch(int64_t k) : idx(k), u(k), q(k) {}
};

// ---------------------------------------------------------------------------------------------
// element conversions
// ---------------------------------------------------------------------------------------------

// Branch-free IEEE half <-> float (the algorithm of c10's fp16_ieee_*, written so that it inlines
// and vectorises inside the chunk loops; c10's own conversion does neither here).
VFM_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float(static_cast<int32_t>((two_w >> 4) + (0xE0u << 23))) * 0x1.0p-112f;
  const float denormalized = bits_to_float(static_cast<int32_t>((two_w >> 17) | (126u << 23))) - 0.5f;
  const uint32_t mag = two_w < (1u << 27) ? static_cast<uint32_t>(float_to_bits(denormalized))
                                          : static_cast<uint32_t>(float_to_bits(normalized));
  return bits_to_float(static_cast<int32_t>(sign | mag));
}

VFM_INLINE uint16_t float_to_half_bits(float f) {  // round to nearest even; NaN -> quiet NaN
  const uint32_t w = static_cast<uint32_t>(float_to_bits(f));
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  const float af = bits_to_float(static_cast<int32_t>(w & 0x7FFFFFFFu));
  float base = (af * 0x1.0p+112f) * 0x1.0p-110f;
  base = bits_to_float(static_cast<int32_t>((bias >> 1) + 0x07800000u)) + base;
  const uint32_t bits = static_cast<uint32_t>(float_to_bits(base));
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

VFM_INLINE uint16_t float_to_bf16_bits(float f) {  // round to nearest even; NaN -> quiet NaN
  const uint32_t b = static_cast<uint32_t>(float_to_bits(f));
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

template <typename A>
VFM_INLINE A to_acc(float v) { return static_cast<A>(v); }
template <typename A>
VFM_INLINE A to_acc(double v) { return static_cast<A>(v); }
template <typename A>
VFM_INLINE A to_acc(c10::Half v) { return static_cast<A>(half_bits_to_float(v.x)); }
template <typename A>
VFM_INLINE A to_acc(c10::BFloat16 v) { return static_cast<A>(bits_to_float(static_cast<int32_t>(v.x) << 16)); }

template <typename S, typename A>
struct FromAcc {
  static VFM_INLINE S convert(A v) { return static_cast<S>(v); }
};
template <typename A>
struct FromAcc<c10::Half, A> {
  static VFM_INLINE c10::Half convert(A v) {
    return c10::Half(float_to_half_bits(static_cast<float>(v)), c10::Half::from_bits());
  }
};
template <typename A>
struct FromAcc<c10::BFloat16, A> {
  static VFM_INLINE c10::BFloat16 convert(A v) {
    return c10::BFloat16(float_to_bf16_bits(static_cast<float>(v)), c10::BFloat16::from_bits());
  }
};
template <typename S, typename A>
VFM_INLINE S from_acc(A v) { return FromAcc<S, A>::convert(v); }

// ---------------------------------------------------------------------------------------------
// chunk loaders and stores
// ---------------------------------------------------------------------------------------------

// dst = softcap(src) (or src) converted to A.
template <typename A, typename S>
VFM_INLINE void load_logits_chunk(const S* src, int n, A* dst, bool has_cap, A cap, A inv_cap) {
  if (has_cap) {
#pragma omp simd
    for (int j = 0; j < n; ++j) dst[j] = softcap(to_acc<A>(src[j]), cap, inv_cap);
  } else {
#pragma omp simd
    for (int j = 0; j < n; ++j) dst[j] = to_acc<A>(src[j]);
  }
}

// dst = src converted to A.
template <typename A, typename S>
VFM_INLINE void convert_chunk(const S* src, int n, A* dst) {
#pragma omp simd
  for (int j = 0; j < n; ++j) dst[j] = to_acc<A>(src[j]);
}

template <typename A, typename S>
VFM_INLINE void store_chunk(const A* src, int n, S* dst) {
#pragma omp simd
  for (int j = 0; j < n; ++j) dst[j] = from_acc<S>(src[j]);
}

// The softcapped logits of chunk [c0, c0 + n) of row i; may point straight into the logits.
template <typename A>
VFM_INLINE const A* load_logits(const Params& P, int64_t i, int64_t c0, int n, A* buf, bool allow_direct) {
  const bool has_cap = P.cap > 0.0;
  const A cap = static_cast<A>(P.cap);
  const A inv_cap = has_cap ? static_cast<A>(1.0 / P.cap) : A(0);
  const int64_t off = i * P.logits_rs + c0;
  if (std::is_same<A, double>::value) {
    const double* src = static_cast<const double*>(P.logits) + off;
    if (allow_direct && !has_cap) return reinterpret_cast<const A*>(src);
    load_logits_chunk<A>(src, n, buf, has_cap, cap, inv_cap);
    return buf;
  }
  switch (P.logits_dt) {
    case kF16:
      load_logits_chunk<A>(static_cast<const c10::Half*>(P.logits) + off, n, buf, has_cap, cap, inv_cap);
      return buf;
    case kBF16:
      load_logits_chunk<A>(static_cast<const c10::BFloat16*>(P.logits) + off, n, buf, has_cap, cap, inv_cap);
      return buf;
    default: {
      const float* src = static_cast<const float*>(P.logits) + off;
      if (allow_direct && !has_cap) return reinterpret_cast<const A*>(src);
      load_logits_chunk<A>(src, n, buf, has_cap, cap, inv_cap);
      return buf;
    }
  }
}

// The teacher logits of chunk [c0, c0 + n) of row i, in A (not divided by T); may point straight
// into the teacher.
template <typename A>
VFM_INLINE const A* load_teacher(const Params& P, int64_t i, int64_t c0, int n, A* buf) {
  const int64_t off = i * P.teacher_rs + c0;
  switch (P.teacher_dt) {
    case kF64:
      if (std::is_same<A, double>::value)
        return reinterpret_cast<const A*>(static_cast<const double*>(P.teacher) + off);
      convert_chunk<A>(static_cast<const double*>(P.teacher) + off, n, buf);
      break;
    case kF16: convert_chunk<A>(static_cast<const c10::Half*>(P.teacher) + off, n, buf); break;
    case kBF16: convert_chunk<A>(static_cast<const c10::BFloat16*>(P.teacher) + off, n, buf); break;
    default:
      if (std::is_same<A, float>::value)
        return reinterpret_cast<const A*>(static_cast<const float*>(P.teacher) + off);
      convert_chunk<A>(static_cast<const float*>(P.teacher) + off, n, buf);
      break;
  }
  return buf;
}

template <typename A>
VFM_INLINE void store_grad(const Params& P, int64_t i, int64_t c0, int n, const A* g) {
  const int64_t off = i * P.grad_rs + c0;
  switch (P.logits_dt) {
    case kF64: store_chunk<A>(g, n, static_cast<double*>(P.grad) + off); break;
    case kF16: store_chunk<A>(g, n, static_cast<c10::Half*>(P.grad) + off); break;
    case kBF16: store_chunk<A>(g, n, static_cast<c10::BFloat16*>(P.grad) + off); break;
    default: store_chunk<A>(g, n, static_cast<float*>(P.grad) + off); break;
  }
}

// Where pass 2 may write its A results directly (the grad dtype is A itself).
template <typename A>
VFM_INLINE A* direct_grad(const Params& P, int64_t i, int64_t c0) {
  const bool same = std::is_same<A, double>::value ? P.logits_dt == kF64 : P.logits_dt == kF32;
  return same ? static_cast<A*>(P.grad) + i * P.grad_rs + c0 : nullptr;
}

VFM_INLINE int64_t elem_size(int dt) { return dt == kF64 ? 8 : dt == kF32 ? 4 : 2; }

// parts[:, i] = (ce, kd, pen, z, outside) and row_loss[i] = ce + kd + pen + z, summed in the output
// dtype like the reference (float32, float64 for float64 logits).
struct RowTerms {
  double ce, kd, pen, z;
};
template <typename O>
VFM_INLINE void write_row_outputs_as(const Params& P, int64_t i, RowTerms t, double outside) {
  O* parts = static_cast<O*>(P.parts);
  const int64_t N = P.n_rows;
  const O ce = static_cast<O>(t.ce), kd = static_cast<O>(t.kd), pen = static_cast<O>(t.pen), z = static_cast<O>(t.z);
  parts[0 * N + i] = ce;
  parts[1 * N + i] = kd;
  parts[2 * N + i] = pen;
  parts[3 * N + i] = z;
  parts[4 * N + i] = static_cast<O>(outside);
  static_cast<O*>(P.row_loss)[i] = ce + kd + pen + z;
}
VFM_INLINE void write_row_outputs(const Params& P, int64_t i, RowTerms t, double outside) {
  if (P.logits_dt == kF64)
    write_row_outputs_as<double>(P, i, t, outside);
  else
    write_row_outputs_as<float>(P, i, t, outside);
}

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

// ---------------------------------------------------------------------------------------------
// one row
// ---------------------------------------------------------------------------------------------

// Notation: x = zc (softcapped logits) and t (teacher logits) are chunk pointers in A; u = x / T
// and t / T are formed inline.  lse = logsumexp(x), lse_t = logsumexp(x / T),
// lse_q = logsumexp(t / T), lse_a = logsumexp over the allowed set, lse_r = logsumexp(s_rule).
template <typename A>
VFM_INLINE void kce_row(const Params& P, int64_t i, Scratch& scratch) {
  const int64_t V = P.vocab;
  const double T = P.temp;
  const bool t_is_1 = T == 1.0;
  const A it = static_cast<A>(1.0 / T);
  const double sc = P.use_ce ? P.scales[0 * P.scales_rs + i * P.scales_cs] : 0.0;
  const double sk = P.kd_mode != KD_NONE ? P.scales[1 * P.scales_rs + i * P.scales_cs] : 0.0;
  const double sp = P.pen_mode != PEN_NONE ? P.scales[2 * P.scales_rs + i * P.scales_cs] : 0.0;
  const double sz = P.use_z ? P.scales[3 * P.scales_rs + i * P.scales_cs] : 0.0;
  const int64_t tgt = P.target[i * P.target_s];
  const int32_t gid = P.allowed != nullptr ? P.group_ids[i * P.group_s] : -1;
  const int32_t* words = gid >= 0 ? P.allowed + gid * P.allowed_rs : nullptr;

  // "target counted, row constrained, target outside the allowed set" (independent of scales).
  const double outside = (words != nullptr && tgt != P.ignore_index && !allowed_bit(words, tgt)) ? 1.0 : 0.0;

  const bool ce_on = sc != 0.0;
  const bool z_on = sz != 0.0;
  const bool mass_on = sp != 0.0 && words != nullptr && P.pen_mode == PEN_MASS;
  const bool post_on = sp != 0.0 && words != nullptr && P.pen_mode == PEN_POSTERIOR;
  const bool full_teacher = P.teacher != nullptr;
  bool kd_on = sk != 0.0;

  // Top-k teacher: qT = softmax over the valid entries of logprob / T (in double: k is small).
  int64_t kv = 0;
  double lse_u = 0.0;
  if (kd_on && !full_teacher) {
    double m = neg_inf<double>();
    for (int64_t j = 0; j < P.k; ++j) {
      const int64_t v = P.topk_idx[i * P.topk_idx_rs + j * P.topk_idx_cs];
      if (v < 0) continue;
      scratch.idx[kv] = v;
      scratch.u[kv] = static_cast<double>(P.topk_lp[i * P.topk_lp_rs + j * P.topk_lp_cs]) / T;
      m = std::max(m, scratch.u[kv]);
      ++kv;
    }
    if (kv == 0) {
      kd_on = false;  // a row without teacher entries has no KD term
    } else {
      double s = 0.0;
      for (int64_t j = 0; j < kv; ++j) s += std::exp(scratch.u[j] - m);
      lse_u = m + std::log(s);
      for (int64_t j = 0; j < kv; ++j) scratch.q[j] = std::exp(scratch.u[j] - lse_u);
    }
  }

  if (!(ce_on || z_on || mass_on || post_on || kd_on)) {  // the row counts for nothing
    write_row_outputs(P, i, {0.0, 0.0, 0.0, 0.0}, outside);
    if (P.grad != nullptr)
      std::memset(static_cast<char*>(P.grad) + i * P.grad_rs * elem_size(P.logits_dt), 0,
                  static_cast<size_t>(V * elem_size(P.logits_dt)));
    return;
  }

  const int kd_mode = kd_on ? P.kd_mode : KD_NONE;
  const bool kd_full = kd_mode != KD_NONE && full_teacher;
  const bool kl_full = kd_full && kd_mode == KD_KL;
  const bool need_lse = ce_on || z_on || mass_on;
  const bool need_lse_t = kd_on || post_on;
  const bool fuse_t2 = T == 2.0 && need_lse && need_lse_t;  // one exp for both (lse_chunk_t2)
  const bool run_p = need_lse && !(t_is_1 && need_lse_t) && !fuse_t2;  // at T = 1, lse_t is lse
  const bool need_t = kd_full || (post_on && full_teacher);
  const bool need_mask = mass_on || post_on;
  const bool eps_on = ce_on && P.eps != 0.0;
  const bool post_inf = std::isinf(P.rule_c);
  const A rule_c = post_inf ? A(0) : static_cast<A>(P.rule_c);
  const A ninf = neg_inf<A>();

  alignas(64) A xbuf[kChunk], tbuf[kChunk], abuf[kChunk], mbuf[kChunk], gbuf[kChunk];

  // abuf = s_rule of the posterior penalty, s - C (1 - 1_A) or s restricted to A (C = inf), with
  // s = t / T (full teacher) or x / T.
  auto rule_scores = [&](const A* x, const A* t, int n) {
    const A* s = full_teacher ? t : x;
    if (post_inf) {
#pragma omp simd
      for (int j = 0; j < n; ++j) abuf[j] = mbuf[j] != A(0) ? s[j] * it : ninf;
    } else {
#pragma omp simd
      for (int j = 0; j < n; ++j) abuf[j] = s[j] * it - rule_c * (A(1) - mbuf[j]);
    }
  };
  // mbuf[j] = bit c0 + j of the row's allowed set, as A(0) / A(1).  c0 is a multiple of 32 and
  // kChunk of 32, so every word is expanded whole (32 fixed-count lanes: a broadcast, a variable
  // shift, an and and a convert, which gcc vectorises); the lanes past n are never read.
  auto expand_mask = [&](int64_t c0, int n) {
    const int32_t* wp = words + (c0 >> 5);
    const int nw = (n + 31) >> 5;
    for (int b = 0; b < nw; ++b) {
      const uint32_t word = static_cast<uint32_t>(wp[b]);
      A* dst = mbuf + 32 * b;
#pragma omp simd
      for (int j = 0; j < 32; ++j) dst[j] = static_cast<A>(static_cast<int32_t>((word >> j) & 1u));
    }
  };

  // ---- pass 1: statistics -------------------------------------------------------------------
  OnlineLSE acc_p, acc_t, acc_q, acc_a, acc_r;
  double sum_wz = 0.0;
  const A* no = nullptr;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, V - c0));
    const A* x = load_logits<A>(P, i, c0, n, xbuf, true);
    const A* t = need_t ? load_teacher<A>(P, i, c0, n, tbuf) : nullptr;
    if (need_mask) expand_mask(c0, n);
    const A* rkl_b = kd_mode == KD_REVERSE_KL ? t : nullptr;
    if (fuse_t2) {
      lse_chunk_t2(acc_t, acc_p, x, rkl_b, n);
    } else {
      // The allowed-set sum shares the exps of lse(zc): in acc_p, or at T = 1 in acc_t.
      if (run_p) lse_chunk(acc_p, x, A(1), no, A(1), n, mass_on ? &acc_a : nullptr, mbuf);
      if (need_lse_t) lse_chunk(acc_t, x, it, rkl_b, it, n, (mass_on && !run_p) ? &acc_a : nullptr, mbuf);
    }
    if (kd_full) lse_chunk(acc_q, t, it, kd_mode == KD_KL ? x : nullptr, it, n);
    if (mass_on && fuse_t2) lse_chunk_masked(acc_a, x, mbuf, masked_max(x, mbuf, n), n);
    if (post_on) {
      rule_scores(x, t, n);
      lse_chunk(acc_r, static_cast<const A*>(abuf), A(1), x, it, n);
    }
    if (eps_on) {
      A s = 0;
      if (P.weight != nullptr) {
        const float* w = P.weight + c0;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < n; ++j) s += static_cast<A>(w[j]) * x[j];
      } else {
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < n; ++j) s += x[j];
      }
      sum_wz += static_cast<double>(s);
    }
  }

  const double lse_t = need_lse_t ? acc_t.lse() : 0.0;
  double lse = (run_p || fuse_t2) ? acc_p.lse() : lse_t;  // at T = 1 (or when unused): lse_t
  // A +inf logit: logsumexp is +inf, as torch.logsumexp gives (the online sums hold
  // exp(inf - inf) = NaN).  CE, the z-loss and the mass penalty then give +inf as the reference
  // does, not NaN.  (A row holding NaN as well as +inf gives +inf here where torch gives NaN.)
  if (need_lse && ((run_p || fuse_t2) ? acc_p.m : acc_t.m) == std::numeric_limits<double>::infinity()) {
    lse = std::numeric_limits<double>::infinity();
  }
  const double lse_q = kd_full ? acc_q.lse() : 0.0;
  const double lse_a = mass_on ? acc_a.lse() : 0.0;
  const double lse_r = post_on ? acc_r.lse() : 0.0;

  // zc at the sparse positions, read before pass 2 may overwrite the row (in-place gradient).
  auto zc_at = [&](int64_t v) -> double {
    A one;
    return static_cast<double>(load_logits<A>(P, i, v, 1, &one, false)[0]);
  };

  double ce = 0.0, kd = 0.0, pen = 0.0, w_y = 1.0;
  if (ce_on) {
    w_y = P.weight != nullptr ? static_cast<double>(P.weight[tgt]) : 1.0;
    ce = ce_row(lse, zc_at(tgt), w_y, P.eps, static_cast<double>(V), P.sum_w, sum_wz);
  }
  if (mass_on) pen = lse - lse_a;
  if (post_on) pen = T * T * posterior_row(acc_r.mean_w(), lse_r, lse_t);
  if (kl_full) kd = T * T * kl_row(acc_q.mean_w(), lse_t, lse_q);
  if (kd_mode == KD_REVERSE_KL) kd = T * T * reverse_kl_row(acc_t.mean_w(), lse_t, lse_q);
  if (kd_mode == KD_KL && !full_teacher) {
    double s = 0.0;
    for (int64_t j = 0; j < kv; ++j)
      s += weighted(scratch.q[j], scratch.u[j] - lse_u - zc_at(scratch.idx[j]) / T + lse_t);
    kd = T * T * s;
  }

  const A beta = static_cast<A>(P.beta);
  const A lse_tA = static_cast<A>(lse_t), lse_qA = static_cast<A>(lse_q);
  double kl_pm = 0.0;
  if (kd_mode == KD_JSD) {  // middle pass: KL(qT || m) and KL(pT || m), m = b qT + (1 - b) pT
    double kl_qm = 0.0;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int n = static_cast<int>(std::min<int64_t>(kChunk, V - c0));
      const A* x = load_logits<A>(P, i, c0, n, xbuf, true);
      const A* t = load_teacher<A>(P, i, c0, n, tbuf);
      A s_q = 0, s_p = 0;
#pragma omp simd reduction(+ : s_q, s_p)
      for (int j = 0; j < n; ++j) {
        const A lp = x[j] * it - lse_tA, lq = t[j] * it - lse_qA;
        const A p = exp_nonpos(lp), q = exp_nonpos(lq);
        const A lm = log_approx(beta * q + (A(1) - beta) * p);
        s_q += weighted(q, lq - lm);
        s_p += weighted(p, lp - lm);
      }
      kl_qm += static_cast<double>(s_q);
      kl_pm += static_cast<double>(s_p);
    }
    kd = T * T * (P.beta * kl_qm + (1.0 - P.beta) * kl_pm);
  }

  write_row_outputs(P, i, {ce_on ? sc * ce : 0.0, kd_on ? sk * kd : 0.0, (mass_on || post_on) ? sp * pen : 0.0,
                           z_on ? sz * lse * lse : 0.0},
                    outside);
  if (P.grad == nullptr) return;

  // ---- pass 2: gradient -----------------------------------------------------------------------
  // g = cp p + cpt pT - ceps w - (teacher, allowed-set and rule terms) - (one-hot, top-k), then
  // times the softcap factor.  p and pT terms are merged where they share an exp.
  double cp = 0.0, cpt = 0.0;
  if (ce_on) cp += sc * ((1.0 - P.eps) * w_y + P.eps / static_cast<double>(V) * P.sum_w);
  if (z_on) cp += 2.0 * sz * lse;
  if (mass_on) cp += sp;
  if (kd_mode == KD_KL) cpt += sk * T;
  if (post_on) cpt += sp * T;
  if (t_is_1) {
    cp += cpt;
    cpt = 0.0;
  }
  const A cpA = static_cast<A>(cp), cptA = static_cast<A>(cpt);
  const A lseA = static_cast<A>(lse), lse_aA = static_cast<A>(lse_a), lse_rA = static_cast<A>(lse_r);
  // fuse_t2: p = e^2 and pT = e * exp(lse / 2 - lse_t) with e = exp(x / 2 - lse / 2).
  const A half_lseA = static_cast<A>(0.5 * lse);
  const A cpt2A = static_cast<A>(fuse_t2 ? cpt * std::exp(0.5 * lse - lse_t) : 0.0);
  const A ceps = eps_on ? static_cast<A>(sc * P.eps / static_cast<double>(V)) : A(0);
  const A c_kd = static_cast<A>(kd_mode == KD_JSD ? sk * T * (1.0 - P.beta) : sk * T);
  const A c_post = static_cast<A>(sp * T);
  const A c_mass = static_cast<A>(sp);
  const A c_hot = static_cast<A>(sc * (1.0 - P.eps) * w_y);
  // reverse KL: log pT - log qT - KL(pT || qT) = (x - t) / T - (lse_t - lse_q + KL).
  const A rkl_c = static_cast<A>(lse_t - lse_q + (kd_mode == KD_REVERSE_KL ? kd / (T * T) : 0.0));
  const A kl_pmA = static_cast<A>(kl_pm);
  const bool has_cap = P.cap > 0.0;
  const A inv_cap = has_cap ? static_cast<A>(1.0 / P.cap) : A(0);
  // Mass penalty: p_A = p * exp(lse - lse_a) on A, so its term joins the p term with a per-label
  // coefficient (a blend): cp - sp exp(lse - lse_a) on A, cp elsewhere.  Only where that factor is
  // moderate (p flushes to 0 below e^-88, so a p_A below e^-88 * e^20 is dropped, as noise next to
  // float rounding); otherwise (and when lse - lse_a is inf or NaN) the separate loop below.
  const double pen_gap = mass_on ? lse - lse_a : 0.0;
  const bool mass_fused = mass_on && !fuse_t2 && pen_gap <= 20.0;
  const A cp_allowedA = static_cast<A>(mass_fused ? cp - sp * std::exp(pen_gap) : cp);

  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, V - c0));
    const A* x = load_logits<A>(P, i, c0, n, xbuf, !P.inplace);  // in place: x must not be g
    const A* t = need_t ? load_teacher<A>(P, i, c0, n, tbuf) : nullptr;
    A* g = direct_grad<A>(P, i, c0);
    const bool direct = g != nullptr;
    if (!direct) g = gbuf;
    if (need_mask) expand_mask(c0, n);

    // student terms (and, in the common KL case, the teacher term in the same loop)
    bool kl_done = false;
    if (fuse_t2 && kl_full) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A e = exp_nonpos(x[j] * A(0.5) - half_lseA);
        g[j] = (cpA * e + cpt2A) * e - c_kd * exp_nonpos(t[j] * A(0.5) - lse_qA);
      }
      kl_done = true;
    } else if (fuse_t2) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A e = exp_nonpos(x[j] * A(0.5) - half_lseA);
        g[j] = (cpA * e + cpt2A) * e;
      }
    } else if (mass_fused && cpt != 0.0) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A c = mbuf[j] != A(0) ? cp_allowedA : cpA;
        g[j] = c * exp_nonpos(x[j] - lseA) + cptA * exp_nonpos(x[j] * it - lse_tA);
      }
    } else if (mass_fused) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = (mbuf[j] != A(0) ? cp_allowedA : cpA) * exp_nonpos(x[j] - lseA);
    } else if (cpt != 0.0 && cp != 0.0) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = cpA * exp_nonpos(x[j] - lseA) + cptA * exp_nonpos(x[j] * it - lse_tA);
    } else if (cpt != 0.0) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = cptA * exp_nonpos(x[j] * it - lse_tA);
    } else if (cp != 0.0) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = cpA * exp_nonpos(x[j] - lseA);
    } else {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = A(0);
    }
    if (eps_on) {
      if (P.weight != nullptr) {
        const float* w = P.weight + c0;
#pragma omp simd
        for (int j = 0; j < n; ++j) g[j] -= ceps * static_cast<A>(w[j]);
      } else {
#pragma omp simd
        for (int j = 0; j < n; ++j) g[j] -= ceps;
      }
    }
    if (kl_full && !kl_done) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] -= c_kd * exp_nonpos(t[j] * it - lse_qA);
    } else if (kd_mode == KD_REVERSE_KL) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A u = x[j] * it;
        g[j] += c_kd * weighted(exp_nonpos(u - lse_tA), (u - t[j] * it) - rkl_c);
      }
    } else if (kd_mode == KD_JSD) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A lp = x[j] * it - lse_tA;
        const A p = exp_nonpos(lp), q = exp_nonpos(t[j] * it - lse_qA);
        const A lm = log_approx(beta * q + (A(1) - beta) * p);
        g[j] += c_kd * weighted(p, lp - lm - kl_pmA);
      }
    }
    if (mass_on && !mass_fused) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] -= mbuf[j] != A(0) ? c_mass * exp_approx(x[j] - lse_aA) : A(0);
    }
    if (post_on) {
      rule_scores(x, t, n);
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] -= c_post * exp_nonpos(abuf[j] - lse_rA);
    }
    // Sparse corrections, before the softcap factor so each element is written once.
    if (ce_on && tgt >= c0 && tgt < c0 + n) g[tgt - c0] -= c_hot;
    if (kd_on && !full_teacher) {
      for (int64_t j = 0; j < kv; ++j) {
        const int64_t v = scratch.idx[j];
        if (v >= c0 && v < c0 + n) g[v - c0] -= c_kd * static_cast<A>(scratch.q[j]);
      }
    }
    if (has_cap) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] *= softcap_grad_factor(x[j], inv_cap);
    }
    if (!direct) store_grad<A>(P, i, c0, n, g);
  }
}

// The cloned entry points (one per accumulation type).
VFM_CLONES void kce_row_f32(const Params& P, int64_t i, Scratch& s) { kce_row<float>(P, i, s); }
VFM_CLONES void kce_row_f64(const Params& P, int64_t i, Scratch& s) { kce_row<double>(P, i, s); }

// ---------------------------------------------------------------------------------------------
// host entry point
// ---------------------------------------------------------------------------------------------

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return -1;
  }
}

void check_rows(const at::Tensor& t, const char* name, int64_t n_rows, int64_t vocab) {
  TORCH_CHECK(t.device().is_cpu(), "kce_forward: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n_rows && t.size(1) == vocab, "kce_forward: ", name,
              " must have shape (", n_rows, ", ", vocab, "), got ", t.sizes());
  TORCH_CHECK(vocab <= 1 || t.stride(1) == 1, "kce_forward: ", name,
              " must have a contiguous last dimension (stride(1) == 1), got strides ", t.strides());
  TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, "kce_forward: ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_small(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "kce_forward: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "kce_forward: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "kce_forward: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// A fresh gradient tensor is untouched memory: faulting it in 4 KiB pages costs more than the
// kernel itself on large vocabularies (about 100 ms for 2048 x 32000 fp32 on a 2-core VM).  Where
// transparent huge pages are in "madvise" mode, asking for them on the 2 MiB-aligned interior of
// a contiguous gradient (which the kernel overwrites entirely) makes those faults 512x fewer.
// Already-populated pages are not affected.  VFM_CPU_HUGEPAGES=0 turns this off.
void advise_huge_pages(const at::Tensor& grad) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("VFM_CPU_HUGEPAGES");
    return env == nullptr || std::string(env) != "0";
  }();
  const size_t bytes = static_cast<size_t>(grad.numel()) * grad.element_size();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!enabled || !grad.is_contiguous() || bytes < 16 * kHuge) return;  // only where faults matter
  const uintptr_t begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // best effort
#else
  (void)grad;
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kce_forward_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& topk_idx,
    const std::optional<at::Tensor>& topk_lp, const std::optional<at::Tensor>& allowed_bits,
    const std::optional<at::Tensor>& group_ids, const at::Tensor& scales, const std::optional<at::Tensor>& grad,
    int64_t ignore_index, double label_smoothing, double softcap_value, double temperature, int64_t kd_mode,
    double jsd_beta, int64_t pen_mode, double rule_strength, bool use_ce, bool use_z) {
  TORCH_CHECK(logits.dim() == 2, "kce_forward: logits must be (N, V), got ", logits.sizes());
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, "kce_forward: logits need at least one label, got ", logits.sizes());
  check_rows(logits, "logits", N, V);
  check_small(target, "target", at::kLong, {N});
  check_small(scales, "scales", at::kFloat, {4, N});
  TORCH_CHECK(kd_mode >= KD_NONE && kd_mode <= KD_JSD, "kce_forward: kd_mode must be 0..3, got ", kd_mode);
  TORCH_CHECK(pen_mode >= PEN_NONE && pen_mode <= PEN_POSTERIOR, "kce_forward: pen_mode must be 0..2, got ",
              pen_mode);
  TORCH_CHECK(temperature > 0.0, "kce_forward: temperature must be > 0, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "kce_forward: label_smoothing must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(softcap_value >= 0.0, "kce_forward: softcap must be >= 0 (0 = none), got ", softcap_value);
  TORCH_CHECK(rule_strength >= 0.0, "kce_forward: rule_strength must be >= 0, got ", rule_strength);
  TORCH_CHECK(kd_mode != KD_JSD || (jsd_beta > 0.0 && jsd_beta < 1.0), "kce_forward: jsd_beta must be in (0, 1), got ",
              jsd_beta);

  Params P;
  P.n_rows = N;
  P.vocab = V;
  P.logits = logits.data_ptr();
  P.logits_rs = logits.stride(0);
  P.logits_dt = dtype_code(logits.scalar_type());
  P.target = target.data_ptr<int64_t>();
  P.target_s = target.stride(0);
  P.scales = scales.data_ptr<float>();
  P.scales_rs = scales.stride(0);
  P.scales_cs = scales.stride(1);
  P.ignore_index = ignore_index;
  P.eps = label_smoothing;
  P.cap = softcap_value;
  P.temp = temperature;
  P.beta = jsd_beta;
  P.rule_c = rule_strength;
  P.kd_mode = static_cast<int>(kd_mode);
  P.pen_mode = static_cast<int>(pen_mode);
  P.use_ce = use_ce;
  P.use_z = use_z;

  if (weight.has_value()) {
    check_small(*weight, "weight", at::kFloat, {V});
    TORCH_CHECK(weight->is_contiguous(), "kce_forward: weight must be contiguous");
    P.weight = weight->data_ptr<float>();
    double s = 0.0;
    for (int64_t v = 0; v < V; ++v) s += static_cast<double>(P.weight[v]);
    P.sum_w = s;
  } else {
    P.sum_w = static_cast<double>(V);
  }
  if (teacher.has_value()) {
    check_rows(*teacher, "teacher", N, V);
    P.teacher = teacher->data_ptr();
    P.teacher_rs = teacher->stride(0);
    P.teacher_dt = dtype_code(teacher->scalar_type());
  }
  TORCH_CHECK(topk_idx.has_value() == topk_lp.has_value(), "kce_forward: topk_idx and topk_lp go together");
  if (topk_idx.has_value()) {
    TORCH_CHECK(!teacher.has_value(), "kce_forward: give either a full teacher or a top-k teacher, not both");
    TORCH_CHECK(kd_mode == KD_KL || kd_mode == KD_NONE,
                "kce_forward: a top-k teacher supports kd_mode = 1 (kl) only, got ", kd_mode);
    TORCH_CHECK(topk_idx->dim() == 2 && topk_idx->size(0) == N, "kce_forward: topk_idx must be (N, k), got ",
                topk_idx->sizes());
    const int64_t k = topk_idx->size(1);
    check_small(*topk_idx, "topk_idx", at::kLong, {N, k});
    check_small(*topk_lp, "topk_lp", at::kFloat, {N, k});
    P.topk_idx = topk_idx->data_ptr<int64_t>();
    P.topk_idx_rs = topk_idx->stride(0);
    P.topk_idx_cs = topk_idx->stride(1);
    P.topk_lp = topk_lp->data_ptr<float>();
    P.topk_lp_rs = topk_lp->stride(0);
    P.topk_lp_cs = topk_lp->stride(1);
    P.k = k;
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t v = P.topk_idx[r * P.topk_idx_rs + j * P.topk_idx_cs];
        TORCH_CHECK(v >= -1 && v < V, "kce_forward: topk_idx[", r, ", ", j, "] = ", v, " is outside [-1, ", V, ")");
      }
  }
  TORCH_CHECK(kd_mode == KD_NONE || teacher.has_value() || topk_idx.has_value(),
              "kce_forward: kd_mode ", kd_mode, " needs a teacher (full or top-k)");
  TORCH_CHECK(allowed_bits.has_value() == group_ids.has_value(), "kce_forward: allowed_bits and group_ids go together");
  TORCH_CHECK(pen_mode == PEN_NONE || allowed_bits.has_value(), "kce_forward: pen_mode ", pen_mode,
              " needs allowed_bits and group_ids");
  if (allowed_bits.has_value()) {
    TORCH_CHECK(allowed_bits->dim() == 2, "kce_forward: allowed_bits must be (G, W), got ", allowed_bits->sizes());
    const int64_t G = allowed_bits->size(0);
    check_small(*allowed_bits, "allowed_bits", at::kInt, {G, (V + 31) / 32});
    TORCH_CHECK(allowed_bits->stride(1) == 1 || allowed_bits->size(1) <= 1,
                "kce_forward: allowed_bits must have a contiguous last dimension");
    check_small(*group_ids, "group_ids", at::kInt, {N});
    P.allowed = allowed_bits->data_ptr<int32_t>();
    P.allowed_rs = allowed_bits->stride(0);
    P.group_ids = group_ids->data_ptr<int32_t>();
    P.group_s = group_ids->stride(0);
    for (int64_t r = 0; r < N; ++r) {
      const int32_t g = P.group_ids[r * P.group_s];
      TORCH_CHECK(g >= -1 && g < G, "kce_forward: group_ids[", r, "] = ", g, " is outside [-1, ", G, ")");
    }
  }
  // Targets are gathered where the CE term runs and, with an allowed set, where they count.
  for (int64_t r = 0; r < N; ++r) {
    const int64_t t = P.target[r * P.target_s];
    const bool ce_row_on = use_ce && P.scales[r * P.scales_cs] != 0.0f;
    const bool flag_row = P.allowed != nullptr && t != ignore_index;
    if (ce_row_on || flag_row)
      TORCH_CHECK(t >= 0 && t < V, "kce_forward: target[", r, "] = ", t, " is outside [0, ", V, ")");
  }
  if (grad.has_value()) {
    check_rows(*grad, "grad", N, V);
    TORCH_CHECK(grad->scalar_type() == logits.scalar_type(), "kce_forward: grad must have the logits' dtype ",
                logits.scalar_type(), ", got ", grad->scalar_type());
    const bool shares = grad->storage().is_alias_of(logits.storage());
    P.inplace = shares;
    TORCH_CHECK(!shares || (grad->data_ptr() == logits.data_ptr() && grad->strides() == logits.strides()),
                "kce_forward: grad may be logits itself, but must not partially overlap it");
    TORCH_CHECK(!teacher.has_value() || !grad->storage().is_alias_of(teacher->storage()),
                "kce_forward: grad must not overlap the teacher");
    P.grad = grad->data_ptr();
    P.grad_rs = grad->stride(0);
  }

  if (P.grad != nullptr && !P.inplace) advise_huge_pages(*grad);

  // float32 outputs, float64 for float64 logits (as the reference).
  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({N}, logits.options().dtype(out_dtype));
  at::Tensor parts = at::empty({5, N}, logits.options().dtype(out_dtype));
  P.row_loss = row_loss.data_ptr();
  P.parts = parts.data_ptr();
  if (N == 0) return {row_loss, parts};

  const bool f64 = P.logits_dt == kF64;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N)));
  const bool parallel = threads > 1 && N * V >= 16384;
  // Dynamic scheduling (rows differ in cost: uncounted rows are a memset), in chunks of rows that
  // cover at least 2 MiB of gradient so that two threads rarely fault in the same huge page, but
  // small enough to leave a few chunks per thread.
  const int64_t row_bytes = std::max<int64_t>(1, V * elem_size(P.logits_dt));
  const int64_t per_page = ((int64_t(2) << 20) + row_bytes - 1) / row_bytes;
  const int rows_per_task = static_cast<int>(std::max<int64_t>(1, std::min(per_page, N / (4 * threads))));
#pragma omp parallel num_threads(threads) if (parallel)
  {
    Scratch scratch(P.k);
#pragma omp for schedule(dynamic, rows_per_task)
    for (int64_t i = 0; i < N; ++i) {
      if (f64)
        kce_row_f64(P, i, scratch);
      else
        kce_row_f32(P, i, scratch);
    }
  }
  return {row_loss, parts};
}

// ISA facts for vfm._C.build_info().
std::vector<std::string> compiled_isas() {
#if VFM_HAVE_CLONES
  return {"x86-64-v4", "x86-64-v3", "x86-64"};
#else
  return {"default"};
#endif
}

std::string runtime_isa() {
#if VFM_HAVE_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
  return "x86-64";
#else
  return "default";
#endif
}

}  // namespace vfm_cpu

TORCH_LIBRARY_IMPL(vfm_C, CPU, m) { m.impl("kce_forward", &vfm_cpu::kce_forward_cpu); }
