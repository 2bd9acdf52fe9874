// CUDA implementation of vfm_C::kce_forward (schema: csrc/ext.cpp; contract:
// vfm/ops/kce_reference.py): checks the tensors with TORCH_CHECK, fills KceParams and launches
// the kernel of csrc/cuda/kce_kernel.cu on the current stream.  Compiled into vfm._C only in CUDA
// builds; it includes no CUDA header (the stream comes through c10's device-generic interface).
// The checks it shares with the CPU binding live in csrc/common/kce_checks.h; the CUDA-only ones
// (vocabulary below 2^31, teacher in the logits' dtype, top-k width) stay here.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/kce_checks.h"
#include "cuda/kce_cuda.h"

namespace vfm_cuda {

static_assert(kF32 == 0 && kF64 == 1 && kF16 == 2 && kBF16 == 3, "dtype codes of common/kce_checks.h");

std::tuple<at::Tensor, at::Tensor> kce_forward_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& topk_idx,
    const std::optional<at::Tensor>& topk_lp, const std::optional<at::Tensor>& allowed_bits,
    const std::optional<at::Tensor>& group_ids, const at::Tensor& scales, const std::optional<at::Tensor>& grad,
    int64_t ignore_index, double label_smoothing, double softcap_value, double temperature, int64_t kd_mode,
    double jsd_beta, int64_t pen_mode, double rule_strength, bool use_ce, bool use_z) {
  TORCH_CHECK(logits.is_cuda(), "kce_forward (cuda): logits must be a CUDA tensor, got ", logits.device());
  const at::Device dev = logits.device();
  const vfm::kce_checks::Checker ck{"kce_forward (cuda): ", dev};  // every tensor on the logits' device
  ck.check_logits_dims(logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V < (int64_t(1) << 31), "kce_forward (cuda): the vocabulary must be below 2^31, got ", V);
  ck.check_rows(logits, "logits", N, V, /*check_dtype=*/true);
  const int code = vfm::kce_checks::dtype_code(logits.scalar_type());
  ck.check_small(target, "target", at::kLong, {N});
  ck.check_small(scales, "scales", at::kFloat, {4, N});
  ck.check_options(kd_mode, pen_mode, temperature, label_smoothing, softcap_value, rule_strength, jsd_beta);

  KceParams P;
  P.n_rows = N;
  P.vocab = V;
  P.dtype = code;
  P.logits = logits.data_ptr();
  P.logits_rs = logits.stride(0);
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

  at::Tensor sum_w;  // keeps the device scalar alive until the launch is queued
  if (weight.has_value()) {
    ck.check_weight(*weight, V);
    P.weight = weight->data_ptr<float>();
    if (use_ce && label_smoothing != 0.0) {
      sum_w = weight->sum(at::kDouble);  // on the device: no host synchronisation
      P.sum_w = sum_w.data_ptr<double>();
    }
  }
  if (teacher.has_value()) {
    ck.check_rows(*teacher, "teacher", N, V, /*check_dtype=*/false);  // dtype: checked below
    TORCH_CHECK(teacher->scalar_type() == logits.scalar_type(),
                "kce_forward (cuda): teacher must have the logits' dtype ", logits.scalar_type(), ", got ",
                teacher->scalar_type(), " (vfm.ops.kce_cuda converts it)");
    P.teacher = teacher->data_ptr();
    P.teacher_rs = teacher->stride(0);
  }
  const int64_t k = ck.check_topk(topk_idx, topk_lp, teacher.has_value(), kd_mode, N, /*max_k=*/kKceMaxTopK);
  if (topk_idx.has_value()) {
    P.topk_idx = topk_idx->data_ptr<int64_t>();
    P.topk_idx_rs = topk_idx->stride(0);
    P.topk_idx_cs = topk_idx->stride(1);
    P.topk_lp = topk_lp->data_ptr<float>();
    P.topk_lp_rs = topk_lp->stride(0);
    P.topk_lp_cs = topk_lp->stride(1);
    P.k = k;
  }
  const int64_t G = ck.check_teacher_and_allowed(teacher.has_value(), topk_idx.has_value(), allowed_bits, group_ids,
                                                 kd_mode, pen_mode, N, V);
  if (allowed_bits.has_value()) {
    P.allowed = allowed_bits->data_ptr<int32_t>();
    P.allowed_rs = allowed_bits->stride(0);
    P.n_groups = G;
    P.group_ids = group_ids->data_ptr<int32_t>();
    P.group_s = group_ids->stride(0);
  }
  if (grad.has_value()) {
    ck.check_grad(*grad, logits, teacher, N, V, /*check_dtype=*/false);  // the logits' dtype
    P.grad = grad->data_ptr();
    P.grad_rs = grad->stride(0);
  }

  const auto out_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({N}, logits.options().dtype(out_dtype));
  at::Tensor parts = at::empty({5, N}, logits.options().dtype(out_dtype));
  P.row_loss = row_loss.data_ptr();
  P.parts = parts.data_ptr();
  if (N == 0) return {row_loss, parts};

  const c10::DeviceGuard guard(dev);
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  void* stream = impl.getStreamNativeHandle(impl.getStream(dev));
  const int err = kce_forward_launch(P, stream);
  TORCH_CHECK(err == 0, "kce_forward (cuda): kernel launch failed: ", cuda_error_string(err));
  return {row_loss, parts};
}

}  // namespace vfm_cuda

TORCH_LIBRARY_IMPL(vfm_C, CUDA, m) { m.impl("kce_forward", &vfm_cuda::kce_forward_cuda); }
