// Shared host-side helpers of the low-rank adapter CPU kernels (csrc/cpu/lora_dropout.cpp: shrink,
// expand, dropout_apply; csrc/cpu/lora_backward.cpp: reduce, dx_ga_): rows grouped by adapter,
// the dropout parameters of one call, argument checks and the OpenMP split.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/lora_tiles.h"

// Per-ISA clones of the kernels (x86-64 GCC): the loader picks AVX-512, AVX2 or baseline code.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VFM_LORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VFM_LORA_CLONES
#endif

namespace vfm_cpu {
namespace lora {

// Rows grouped by adapter: segment k is order[start[k] .. start[k + 1]) (identity order and one
// segment when there are no ids); rows with id -1 belong to no segment.
struct Groups {
  int64_t K = 1;
  std::vector<int64_t> order, start;
  int64_t row(int64_t t) const { return order.empty() ? t : order[t]; }
};

struct Tile {
  int64_t k, t0, n;  // adapter, first position in the order, rows (<= kMR)
};

inline Groups group_rows(const c10::optional<at::Tensor>& ids_opt, int64_t N, int64_t K) {
  Groups g;
  g.K = K;
  if (!ids_opt.has_value()) {
    TORCH_CHECK(K == 1, "lora kernels: without adapter ids there must be one adapter, got K = ", K);
    g.start = {0, N};
    return g;
  }
  const at::Tensor& ids_in = *ids_opt;
  TORCH_CHECK(ids_in.dim() == 1 && ids_in.size(0) == N, "lora kernels: ids must have shape (", N, "), got ",
              ids_in.sizes());
  TORCH_CHECK(ids_in.device().is_cpu(), "lora kernels: ids must be a CPU tensor");
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  std::vector<int64_t> count(K + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(p[i] >= -1 && p[i] < K, "lora kernels: adapter id ", p[i], " of row ", i, " is outside [-1, ", K,
                ")");
    ++count[p[i] + 1];
  }
  g.start.assign(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) g.start[k + 1] = g.start[k] + count[k + 1];
  g.order.resize(g.start[K]);
  std::vector<int64_t> pos(g.start.begin(), g.start.end() - 1);
  for (int64_t i = 0; i < N; ++i)
    if (p[i] >= 0) g.order[pos[p[i]]++] = i;
  return g;
}

inline std::vector<Tile> row_tiles(const Groups& g) {
  std::vector<Tile> tiles;
  for (int64_t k = 0; k < g.K; ++k)
    for (int64_t t = g.start[k]; t < g.start[k + 1]; t += kMR) tiles.push_back({k, t, std::min<int64_t>(kMR, g.start[k + 1] - t)});
  return tiles;
}

inline Drop make_drop(int64_t seed, int64_t threshold, double dscale) {
  TORCH_CHECK(threshold >= 0 && threshold <= 0xFFFFFFFFll, "lora kernels: threshold must lie in [0, 2^32), got ",
              threshold);
  const uint64_t s = static_cast<uint64_t>(seed);
  Drop d;
  d.k0 = static_cast<uint32_t>(s & 0xFFFFFFFFull);
  d.k1 = static_cast<uint32_t>(s >> 32);
  d.thr = static_cast<uint32_t>(threshold);
  d.active = threshold > 0;
  d.scale = d.active ? dscale : 1.0;
  return d;
}

template <typename T>
std::vector<T> adapter_scales(const c10::optional<at::Tensor>& scales, int64_t K, double alpha) {
  std::vector<T> s(K, static_cast<T>(alpha));
  if (scales.has_value()) {
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == K, "lora kernels: scales must have shape (", K, "), got ",
                scales->sizes());
    const at::Tensor sc = scales->to(at::kCPU).to(at::kDouble).contiguous();
    const double* p = sc.data_ptr<double>();
    for (int64_t k = 0; k < K; ++k) s[k] = static_cast<T>(static_cast<T>(p[k]) * static_cast<T>(alpha));
  }
  return s;
}

inline void check_2d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// A (K, rows, ld) buffer holding src (K, rows, cols; any strides) zero padded to ld >= cols
// columns, in one loop: zeros + narrow + copy_ would be several dispatcher calls per packed factor,
// which is most of a small call's cost.  The kernels only read it: when src already has that
// layout (ld == cols, row-major contiguous) it is returned as is, without a copy; callers that
// keep their factors in the packed layout (vfm.peft's cached mixed-batch stacks) pay no packing.
template <typename T>
at::Tensor pack_padded(const at::Tensor& src, int64_t ld) {
  TORCH_CHECK(src.dim() == 2 || src.dim() == 3, "lora kernels: pack_padded takes a 2-D or 3-D tensor");
  const bool stack = src.dim() == 3;
  const int64_t K = stack ? src.size(0) : 1, rows = src.size(stack ? 1 : 0), cols = src.size(stack ? 2 : 1);
  const int64_t sk = stack ? src.stride(0) : 0, s0 = src.stride(stack ? 1 : 0), s1 = src.stride(stack ? 2 : 1);
  TORCH_CHECK(ld >= cols, "lora kernels: pack_padded needs ld >= cols");
  if (ld == cols && src.is_contiguous()) return src;
  at::Tensor out = stack ? at::empty({K, rows, ld}, src.options()) : at::empty({rows, ld}, src.options());
  const T* p = src.data_ptr<T>();
  T* d = out.data_ptr<T>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < rows; ++i, d += ld) {
      const T* s = p + k * sk + i * s0;
      if (s1 == 1) {
        std::copy(s, s + cols, d);
      } else {
        for (int64_t j = 0; j < cols; ++j) d[j] = s[j * s1];
      }
      std::fill(d + cols, d + ld, T(0));
    }
  return out;
}

// The optional (O,) bias of a forward op, contiguous (undefined when absent), checked against src.
inline at::Tensor checked_bias(const c10::optional<at::Tensor>& bias, int64_t O, const at::Tensor& src, const char* op) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == O &&
                  bias->scalar_type() == src.scalar_type(),
              op, ": bias must be a CPU tensor of shape (", O, ") and src's dtype, got ", bias->sizes(), " ",
              bias->scalar_type());
  return bias->contiguous();
}

// Three 2-D float32 / float64 CPU operands of one op, in one dtype ("op: a, b and c dtypes differ").
inline void check_2d_same(const char* op, const at::Tensor& t0, const char* n0, const at::Tensor& t1, const char* n1,
                          const at::Tensor& t2, const char* n2) {
  check_2d(t0, op, n0);
  check_2d(t1, op, n1);
  check_2d(t2, op, n2);
  TORCH_CHECK(t1.scalar_type() == t0.scalar_type() && t2.scalar_type() == t0.scalar_type(), op, ": ", n0, ", ", n1,
              " and ", n2, " dtypes differ");
}

inline at::Tensor unit_col(const at::Tensor& x) { return x.stride(1) == 1 || x.size(1) <= 1 ? x : x.contiguous(); }
inline int64_t row_stride(const at::Tensor& x) { return x.size(0) > 1 ? x.stride(0) : x.size(1); }

// (K, R, C) view of mats (2-D mats: one adapter).
inline at::Tensor as_stack(const at::Tensor& mats, const char* op) {
  TORCH_CHECK(mats.device().is_cpu(), op, ": mats must be a CPU tensor");
  TORCH_CHECK(mats.dim() == 2 || mats.dim() == 3, op, ": mats must be (R, C) or (K, R, C), got ", mats.sizes());
  return mats.dim() == 2 ? mats.unsqueeze(0) : mats;
}

// Tasks per OpenMP chunk so that each chunk holds at least ~64K multiply-adds: smaller work runs
// on the calling thread (at::parallel_for runs inline when the range fits in one grain), which
// spares the thread wake-up on small shapes (and a scheduler quantum when the cores are busy).
inline int64_t grain_rows(int64_t work_per_tile) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(work_per_tile, 1)); }

// Panel width of the reduce tasks: the (R, JP) accumulator stays in L1 (16 KiB), and there are
// enough (adapter, panel) tasks for every thread.
template <typename T>
inline int64_t panel_width(int64_t C, int64_t R, int64_t K) {
  constexpr int64_t L = lora::Vec<T>::L;
  int64_t jp = std::max<int64_t>(L, (16384 / static_cast<int64_t>(sizeof(T)) / R) / L * L);
  const int64_t want = (4 * at::get_num_threads() + K - 1) / K;
  jp = std::min(jp, std::max<int64_t>(2 * L, round_up((C + want - 1) / want, L)));
  return std::min(jp, round_up(C, L));
}

}  // namespace lora
}  // namespace vfm_cpu
