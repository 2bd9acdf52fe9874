// Shared declarations of the CPU knowledge cross-entropy kernel (vfm_C::kce_forward; contract:
// vfm/ops/kce_reference.py; maths: csrc/common/kce_math.h; design: csrc/cpu/knowledge_ce.cpp).
//
// * csrc/cpu/knowledge_ce.cpp: kce_row (one row, both passes) and its per-ISA clones.
// * csrc/cpu/kce_io.h, kce_lse.h: its element conversions, chunk loads / stores, chunk reductions
//   and online logsumexp (header-only, inlined into kce_row).
// * csrc/cpu/kce_forward_cpu.cpp: the argument checks, the OpenMP driver over the rows, the ISA
//   facts of vfm._C.build_info() and the CPU registration of the op.
//
// This header sets the floating-point options of every kernel file that includes it (see the
// pragma below), so include it before anything that defines the kernels' inline functions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
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

// Floating-point options of the kernels (kept here rather than in setup.py; they apply to every
// function defined after this point in a file that includes this header):
// * fp-contract=fast lets gcc fuse a * b + c into FMAs (the x86-64-v3/v4 clones have FMA; the ISO
//   C++ mode we build in defaults to off).  Contraction only removes roundings.
// * no-trapping-math lets gcc if-convert the selects of kce_math.h into blends, without which no
//   loop with a select vectorises.  It only drops the promise to raise FP exception flags in
//   program order; NaN and inf semantics are untouched (unlike -ffast-math, which we avoid).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast", "no-trapping-math")
#endif

#include "common/kce_math.h"

// The hot row functions are built once per ISA (target_clones; the dynamic loader picks the best
// for the running CPU).  -DVFM_KCE_NO_CLONES builds the baseline version only (to check the
// fallback path on any CPU).  VFM_HAVE_CLONES tells kce_forward_cpu.cpp's compiled_isas() which.
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

VFM_INLINE int64_t elem_size(int dt) { return dt == kF64 ? 8 : dt == kF32 ? 4 : 2; }

// Row i of the loss: writes row_loss[i], parts[:, i] and, when P.grad is set, the gradient row
// (defined in knowledge_ce.cpp, one clone per ISA; float32 accumulation for float32 / float16 /
// bfloat16 logits, float64 for float64 logits).
void kce_row_f32(const Params& P, int64_t i, Scratch& s);
void kce_row_f64(const Params& P, int64_t i, Scratch& s);

}  // namespace vfm_cpu
