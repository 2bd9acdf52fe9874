// Element conversions and chunk loads / stores of the CPU knowledge cross-entropy kernel
// (csrc/cpu/knowledge_ce.cpp): float16 / bfloat16 <-> float written to vectorise, the softcapped
// logits and the teacher of one chunk of a row in the accumulation type A (in place where no
// conversion is needed), the gradient chunk stored in the logits' dtype, and the row outputs.
// Header-only: everything here is inlined into kce_row (and so built per ISA clone).
#pragma once

#include "cpu/kce_cpu.h"  // first: the floating-point options of the kernels

namespace vfm_cpu {

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

}  // namespace vfm_cpu
