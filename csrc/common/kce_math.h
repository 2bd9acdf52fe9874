// Per-element and per-row maths of the knowledge cross-entropy op, shared by the C++ (CPU) and
// CUDA halves of vfm._C.  Everything here is header-only, branch-free where it sits in an inner
// loop (so gcc auto-vectorises it under `#pragma omp simd`), and marked VFM_HD so that nvcc
// compiles the very same code for the device.
//
// Conventions (see vfm/ops/kce_reference.py for the contract):
//   * zc = softcap * tanh(z / softcap) (or z), lse = logsumexp(zc), p = softmax(zc),
//     pT = softmax(zc / T), qT = softmax(teacher / T).
//   * "q * log q = 0 when q = 0": every weighted sum below skips entries whose weight is 0.
//   * NaN propagates: no clamp or select ever turns a NaN input into a number.
//   * Written so that a compiler may contract a * b + c into FMAs (the CPU kernel file asks gcc
//     for fp-contract=fast; nvcc contracts by default).
//
// The float versions are polynomials, measured against the double C library over their ranges:
// exp (Cody-Waite reduction + degree-4 minimax, our fit) <= 1 ulp, log (Cephes logf) <= 1 ulp,
// tanh (Cephes tanhf) <= 1.3 ulp.  The double versions call the C library (the float64 path is
// the accurate one, not the fast one).  Nothing here may be built with -ffast-math: it lets the
// compiler assume no NaN/inf and breaks NaN propagation and the -inf -> 0 rule.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define VFM_HD __host__ __device__
#define VFM_INLINE __forceinline__
#else
#define VFM_HD
#if defined(__GNUC__) || defined(__clang__)
#define VFM_INLINE inline __attribute__((always_inline))
#else
#define VFM_INLINE inline
#endif
#endif

namespace vfm {
namespace kce {

// ------------------------------------------------------------------------------------------
// bit casts
// ------------------------------------------------------------------------------------------

VFM_HD VFM_INLINE float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
#endif
}

VFM_HD VFM_INLINE int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
#endif
}

// Special values from the C macros (usable in device code without --expt-relaxed-constexpr).
template <typename A>
VFM_HD VFM_INLINE A pos_inf() {
  return static_cast<A>(INFINITY);
}
template <typename A>
VFM_HD VFM_INLINE A neg_inf() {
  return -static_cast<A>(INFINITY);
}
template <typename A>
VFM_HD VFM_INLINE A quiet_nan() {
  return static_cast<A>(NAN);
}

// ------------------------------------------------------------------------------------------
// exp
// ------------------------------------------------------------------------------------------

// exp(x) for float, branch-free: exp(x) = 2^n * exp(r), n = round(x * log2(e)), r = x - n ln 2
// (Cody-Waite split of ln 2, so r is exact), exp(r) = 1 + r + r^2 P(r) on |r| <= ln(2)/2 with a
// degree-4 minimax P (relative error 3e-9 before rounding; about 1 ulp in float).  2^n is built
// straight from its exponent bits, so the caller must keep n in [-127, 128] by clamping x to
// [-88, 88.5] first; the two ends of that range are then special cases for free: n = -127 gives
// the bit pattern of 0.0 (x below about -87.7, including -inf, gives 0: the true value is a
// denormal < 1.2e-38 that no softmax term can notice), n = 128 gives +inf (x above about 88.38).
// A NaN passes the clamps unchanged and poisons the polynomial, so NaN -> NaN.
VFM_HD VFM_INLINE float exp_core(float xc) {
  // Round x * log2(e) to the nearest integer with the 1.5 * 2^23 trick: adding the magic
  // constant leaves the integer in the low mantissa bits (valid for |t| < 2^22).
  const float kMagic = 12582912.0f;  // 1.5 * 2^23, bits 0x4B400000
  const float t = xc * 1.44269504088896341f + kMagic;
  const int32_t n = float_to_bits(t) - 0x4B400000;
  const float fn = t - kMagic;
  float r = xc - fn * 0.693359375f;  // ln 2 = C1 + C2, C1 exact in 9 bits
  r = r + fn * 2.12194440e-4f;
  float poly = 1.381461043e-03f;
  poly = poly * r + 8.368710987e-03f;
  poly = poly * r + 4.166838899e-02f;
  poly = poly * r + 1.666652113e-01f;
  poly = poly * r + 4.999999404e-01f;
  const float er = poly * (r * r) + r + 1.0f;
  return er * bits_to_float((n + 127) << 23);
}

// exp(x) for any float x (overflow -> +inf, -inf and underflow -> 0, NaN -> NaN).
VFM_HD VFM_INLINE float exp_approx(float x) {
  float xc = x < -88.0f ? -88.0f : x;
  xc = xc > 88.5f ? 88.5f : xc;
  return exp_core(xc);
}

// exp(x) for x <= 88 (softmax terms: x - max, x - lse), with -inf and underflow -> 0 and
// NaN -> NaN: one clamp fewer than exp_approx in the innermost loops.  Above 88.38 the result is
// garbage, so only call it where the argument is known not to be large and positive.
VFM_HD VFM_INLINE float exp_nonpos(float x) { return exp_core(x < -88.0f ? -88.0f : x); }

VFM_HD VFM_INLINE double exp_nonpos(double x) { return exp(x); }

VFM_HD VFM_INLINE double exp_approx(double x) { return exp(x); }

// ------------------------------------------------------------------------------------------
// log
// ------------------------------------------------------------------------------------------

// log(x) for float, branch-free (Cephes logf): x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log(x) = log1p(m - 1) + e ln 2 with a degree-9 polynomial.  Denormal inputs are scaled by 2^23
// first.  log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, NaN -> NaN.  Max error ~1 ulp.
VFM_HD VFM_INLINE float log_approx(float x) {
  const bool tiny = x < 1.17549435e-38f;  // denormal, zero or negative
  const float xs = tiny ? x * 8388608.0f : x;
  const int32_t bits = float_to_bits(xs);
  int32_t e = ((bits >> 23) & 0xff) - 126;  // xs = m * 2^e, m in [0.5, 1)
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);
  e = tiny ? e - 23 : e;
  const bool below = m < 0.707106781186547524f;
  const float fe = static_cast<float>(below ? e - 1 : e);
  m = below ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  float res = m + y;
  res = res + fe * 0.693359375f;
  res = x == 0.0f ? neg_inf<float>() : res;
  res = x < 0.0f ? quiet_nan<float>() : res;
  res = x == pos_inf<float>() ? x : res;
  res = x != x ? x : res;
  return res;
}

VFM_HD VFM_INLINE double log_approx(double x) { return log(x); }

// ------------------------------------------------------------------------------------------
// tanh and the softcap
// ------------------------------------------------------------------------------------------

// tanh for float, branch-free (Cephes tanhf): an odd polynomial for |x| < 0.625 (where
// 1 - 2 / (e^2x + 1) would cancel), 1 - 2 / (exp(2|x|) + 1) with the sign restored beyond.
// tanh(+-inf) = +-1, NaN -> NaN.  Max error ~2 ulp.
VFM_HD VFM_INLINE float tanh_approx(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float s = x * x;
  float poly = -5.70498872745e-3f;
  poly = poly * s + 2.06390887954e-2f;
  poly = poly * s - 5.37397155531e-2f;
  poly = poly * s + 1.33314422036e-1f;
  poly = poly * s - 3.33332819422e-1f;
  const float small = poly * s * x + x;
  const float e = exp_approx(ax + ax);
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = x < 0.0f ? -big : big;
  return ax < 0.625f ? small : big;  // NaN: comparison false -> big, which is NaN
}

VFM_HD VFM_INLINE double tanh_approx(double x) { return tanh(x); }

// zc = cap * tanh(z / cap); the caller passes inv_cap = 1 / cap.
template <typename A>
VFM_HD VFM_INLINE A softcap(A z, A cap, A inv_cap) {
  return cap * tanh_approx(z * inv_cap);
}

// d zc / d z = 1 - tanh^2 = 1 - (zc / cap)^2.
template <typename A>
VFM_HD VFM_INLINE A softcap_grad_factor(A zc, A inv_cap) {
  const A t = zc * inv_cap;
  return A(1) - t * t;
}

// ------------------------------------------------------------------------------------------
// weighted terms
// ------------------------------------------------------------------------------------------

// e * d with the convention 0 * anything = 0 (e is a probability or an unnormalised exp; d may be
// +-inf where e is 0, e.g. log q = -inf off the teacher's support).  NaN in e still propagates.
template <typename A>
VFM_HD VFM_INLINE A weighted(A e, A d) {
  return e == A(0) ? A(0) : e * d;
}

// Bit v of a packed allowed-set row (little bit order within int32 words).
VFM_HD VFM_INLINE bool allowed_bit(const int32_t* words, int64_t v) {
  return ((static_cast<uint32_t>(words[v >> 5]) >> (v & 31)) & 1u) != 0u;
}

// ------------------------------------------------------------------------------------------
// online (running-max) logsumexp with an optional weighted sum
// ------------------------------------------------------------------------------------------

// Running state of  S = sum_i exp(a_i - M)  and  W = sum_i exp(a_i - M) * d_i  over the entries
// seen so far, M the running max.  Blocks of entries are merged with merge_block(): the block's
// own sums must have been taken relative to the new max (see new_max()).  Row-level state is kept
// in double even for float inputs: it is touched once per block, and it keeps long rows exact.
struct OnlineLSE {
  double m = neg_inf<double>();
  double s = 0.0;
  double w = 0.0;

  // Max after seeing a block whose max is block_max (NaN in block_max is ignored here; the
  // block's sums carry the NaN instead).
  VFM_HD VFM_INLINE double new_max(double block_max) const { return block_max > m ? block_max : m; }

  // Merge a block's sums taken relative to m_new = new_max(...).
  VFM_HD VFM_INLINE void merge_block(double m_new, double block_s, double block_w) {
    const double f = m == m_new ? 1.0 : exp(m - m_new);  // m = -inf -> 0
    s = s * f + block_s;
    w = w * f + block_w;
    m = m_new;
  }

  // The block had no finite-or-+inf entry (only -inf and possibly NaN): its sums are 0, or NaN.
  VFM_HD VFM_INLINE void merge_empty_block(bool has_nan) {
    if (has_nan) {
      s = quiet_nan<double>();
      w = s;
    }
  }

  VFM_HD VFM_INLINE double lse() const { return m + log(s); }
  // Normalised weighted sum: sum_i softmax(a)_i * d_i.
  VFM_HD VFM_INLINE double mean_w() const { return w / s; }
};

// ------------------------------------------------------------------------------------------
// per-row loss terms from the pass-1 statistics (all in double; T = temperature)
// ------------------------------------------------------------------------------------------

// CE = (1 - eps) w_y (lse - zc_y) + eps / V * (sum_w * lse - sum_v w_v zc_v).
VFM_HD VFM_INLINE double ce_row(double lse, double zc_y, double w_y, double eps, double vocab, double sum_w,
                                double sum_wz) {
  double ce = (1.0 - eps) * w_y * (lse - zc_y);
  if (eps != 0.0) ce += eps / vocab * (sum_w * lse - sum_wz);
  return ce;
}

// KL(qT || pT) = sum q (t/T - zc/T) + lse_T - lse_t, where mean_w_q = sum q (t/T - zc/T).
VFM_HD VFM_INLINE double kl_row(double mean_w_q, double lse_T, double lse_t) { return mean_w_q + lse_T - lse_t; }

// KL(pT || qT) = sum pT (zc/T - t/T) - lse_T + lse_t.
VFM_HD VFM_INLINE double reverse_kl_row(double mean_w_p, double lse_T, double lse_t) {
  return mean_w_p - lse_T + lse_t;
}

// KL(r || pT) = sum r (s_rule - zc/T) - lse_r + lse_T.
VFM_HD VFM_INLINE double posterior_row(double mean_w_r, double lse_r, double lse_T) {
  return mean_w_r - lse_r + lse_T;
}

}  // namespace kce
}  // namespace vfm
