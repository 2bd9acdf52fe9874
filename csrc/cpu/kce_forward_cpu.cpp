// Host entry point of the CPU knowledge cross-entropy (vfm_C::kce_forward; contract:
// vfm/ops/kce_reference.py): checks the arguments (csrc/common/kce_checks.h, shared with the CUDA
// binding, plus the value checks that only the CPU does), fills Params, allocates the outputs and
// runs the row kernel of knowledge_ce.cpp over the rows with OpenMP.  Also the ISA facts of
// vfm._C.build_info() and the CPU registration of the op.
#include "common/kce_checks.h"
#include "cpu/kce_cpu.h"

#include <optional>
#include <tuple>

namespace vfm_cpu {

static_assert(kF32 == 0 && kF64 == 1 && kF16 == 2 && kBF16 == 3, "dtype codes of common/kce_checks.h");

// ---------------------------------------------------------------------------------------------
// host entry point
// ---------------------------------------------------------------------------------------------

namespace {

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
  const vfm::kce_checks::Checker ck{"kce_forward: ", std::nullopt};  // CPU tensors
  ck.check_logits_dims(logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  ck.check_rows(logits, "logits", N, V, /*check_dtype=*/true);
  ck.check_small(target, "target", at::kLong, {N});
  ck.check_small(scales, "scales", at::kFloat, {4, N});
  ck.check_options(kd_mode, pen_mode, temperature, label_smoothing, softcap_value, rule_strength, jsd_beta);

  Params P;
  P.n_rows = N;
  P.vocab = V;
  P.logits = logits.data_ptr();
  P.logits_rs = logits.stride(0);
  P.logits_dt = vfm::kce_checks::dtype_code(logits.scalar_type());
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
    ck.check_weight(*weight, V);
    P.weight = weight->data_ptr<float>();
    double s = 0.0;
    for (int64_t v = 0; v < V; ++v) s += static_cast<double>(P.weight[v]);
    P.sum_w = s;
  } else {
    P.sum_w = static_cast<double>(V);
  }
  if (teacher.has_value()) {
    ck.check_rows(*teacher, "teacher", N, V, /*check_dtype=*/true);
    P.teacher = teacher->data_ptr();
    P.teacher_rs = teacher->stride(0);
    P.teacher_dt = vfm::kce_checks::dtype_code(teacher->scalar_type());
  }
  const int64_t k = ck.check_topk(topk_idx, topk_lp, teacher.has_value(), kd_mode, N, /*max_k=*/-1);
  if (topk_idx.has_value()) {
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
  const int64_t G = ck.check_teacher_and_allowed(teacher.has_value(), topk_idx.has_value(), allowed_bits, group_ids,
                                                 kd_mode, pen_mode, N, V);
  if (allowed_bits.has_value()) {
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
    P.inplace = ck.check_grad(*grad, logits, teacher, N, V, /*check_dtype=*/true);
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
