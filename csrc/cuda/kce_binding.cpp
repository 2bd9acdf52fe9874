// CUDA implementation of vfm_C::kce_forward (schema: csrc/ext.cpp; contract:
// vfm/ops/kce_reference.py): checks the tensors with TORCH_CHECK, fills KceParams and launches
// the kernel of csrc/cuda/kce_kernel.cu on the current stream.  Compiled into vfm._C only in CUDA
// builds; it includes no CUDA header (the stream comes through c10's device-generic interface).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cuda/kce_cuda.h"

namespace vfm_cuda {
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

void check_device(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "kce_forward (cuda): ", name, " must be on ", dev, ", got ", t.device());
}

void check_rows(const at::Tensor& t, const char* name, int64_t n_rows, int64_t vocab, const at::Device& dev) {
  check_device(t, name, dev);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n_rows && t.size(1) == vocab, "kce_forward (cuda): ", name,
              " must have shape (", n_rows, ", ", vocab, "), got ", t.sizes());
  TORCH_CHECK(vocab <= 1 || t.stride(1) == 1, "kce_forward (cuda): ", name,
              " must have a contiguous last dimension (stride(1) == 1), got strides ", t.strides());
}

void check_small(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                 const at::Device& dev) {
  check_device(t, name, dev);
  TORCH_CHECK(t.scalar_type() == dtype, "kce_forward (cuda): ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "kce_forward (cuda): ", name, " must have shape ", shape, ", got ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kce_forward_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& teacher, const std::optional<at::Tensor>& topk_idx,
    const std::optional<at::Tensor>& topk_lp, const std::optional<at::Tensor>& allowed_bits,
    const std::optional<at::Tensor>& group_ids, const at::Tensor& scales, const std::optional<at::Tensor>& grad,
    int64_t ignore_index, double label_smoothing, double softcap_value, double temperature, int64_t kd_mode,
    double jsd_beta, int64_t pen_mode, double rule_strength, bool use_ce, bool use_z) {
  TORCH_CHECK(logits.is_cuda(), "kce_forward (cuda): logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "kce_forward (cuda): logits must be (N, V), got ", logits.sizes());
  const at::Device dev = logits.device();
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, "kce_forward (cuda): logits need at least one label, got ", logits.sizes());
  TORCH_CHECK(V < (int64_t(1) << 31), "kce_forward (cuda): the vocabulary must be below 2^31, got ", V);
  check_rows(logits, "logits", N, V, dev);
  const int code = dtype_code(logits.scalar_type());
  TORCH_CHECK(code >= 0, "kce_forward (cuda): logits must be float32, float64, float16 or bfloat16, got ",
              logits.scalar_type());
  check_small(target, "target", at::kLong, {N}, dev);
  check_small(scales, "scales", at::kFloat, {4, N}, dev);
  TORCH_CHECK(kd_mode >= 0 && kd_mode <= 3, "kce_forward (cuda): kd_mode must be 0..3, got ", kd_mode);
  TORCH_CHECK(pen_mode >= 0 && pen_mode <= 2, "kce_forward (cuda): pen_mode must be 0..2, got ", pen_mode);
  TORCH_CHECK(temperature > 0.0, "kce_forward (cuda): temperature must be > 0, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "kce_forward (cuda): label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(softcap_value >= 0.0, "kce_forward (cuda): softcap must be >= 0 (0 = none), got ", softcap_value);
  TORCH_CHECK(rule_strength >= 0.0, "kce_forward (cuda): rule_strength must be >= 0, got ", rule_strength);
  TORCH_CHECK(kd_mode != 3 || (jsd_beta > 0.0 && jsd_beta < 1.0),
              "kce_forward (cuda): jsd_beta must be in (0, 1), got ", jsd_beta);

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
    check_small(*weight, "weight", at::kFloat, {V}, dev);
    TORCH_CHECK(weight->is_contiguous(), "kce_forward (cuda): weight must be contiguous");
    P.weight = weight->data_ptr<float>();
    if (use_ce && label_smoothing != 0.0) {
      sum_w = weight->sum(at::kDouble);  // on the device: no host synchronisation
      P.sum_w = sum_w.data_ptr<double>();
    }
  }
  if (teacher.has_value()) {
    check_rows(*teacher, "teacher", N, V, dev);
    TORCH_CHECK(teacher->scalar_type() == logits.scalar_type(),
                "kce_forward (cuda): teacher must have the logits' dtype ", logits.scalar_type(), ", got ",
                teacher->scalar_type(), " (vfm.ops.kce_cuda converts it)");
    P.teacher = teacher->data_ptr();
    P.teacher_rs = teacher->stride(0);
  }
  TORCH_CHECK(topk_idx.has_value() == topk_lp.has_value(), "kce_forward (cuda): topk_idx and topk_lp go together");
  if (topk_idx.has_value()) {
    TORCH_CHECK(!teacher.has_value(), "kce_forward (cuda): give either a full teacher or a top-k teacher, not both");
    TORCH_CHECK(kd_mode == 1 || kd_mode == 0,
                "kce_forward (cuda): a top-k teacher supports kd_mode = 1 (kl) only, got ", kd_mode);
    TORCH_CHECK(topk_idx->dim() == 2 && topk_idx->size(0) == N, "kce_forward (cuda): topk_idx must be (N, k), got ",
                topk_idx->sizes());
    const int64_t k = topk_idx->size(1);
    TORCH_CHECK(k <= kKceMaxTopK, "kce_forward (cuda): the top-k teacher may have at most ", kKceMaxTopK,
                " entries per row, got k = ", k);
    check_small(*topk_idx, "topk_idx", at::kLong, {N, k}, dev);
    check_small(*topk_lp, "topk_lp", at::kFloat, {N, k}, dev);
    P.topk_idx = topk_idx->data_ptr<int64_t>();
    P.topk_idx_rs = topk_idx->stride(0);
    P.topk_idx_cs = topk_idx->stride(1);
    P.topk_lp = topk_lp->data_ptr<float>();
    P.topk_lp_rs = topk_lp->stride(0);
    P.topk_lp_cs = topk_lp->stride(1);
    P.k = k;
  }
  TORCH_CHECK(kd_mode == 0 || teacher.has_value() || topk_idx.has_value(), "kce_forward (cuda): kd_mode ", kd_mode,
              " needs a teacher (full or top-k)");
  TORCH_CHECK(allowed_bits.has_value() == group_ids.has_value(),
              "kce_forward (cuda): allowed_bits and group_ids go together");
  TORCH_CHECK(pen_mode == 0 || allowed_bits.has_value(), "kce_forward (cuda): pen_mode ", pen_mode,
              " needs allowed_bits and group_ids");
  if (allowed_bits.has_value()) {
    TORCH_CHECK(allowed_bits->dim() == 2, "kce_forward (cuda): allowed_bits must be (G, W), got ",
                allowed_bits->sizes());
    const int64_t G = allowed_bits->size(0);
    check_small(*allowed_bits, "allowed_bits", at::kInt, {G, (V + 31) / 32}, dev);
    TORCH_CHECK(allowed_bits->stride(1) == 1 || allowed_bits->size(1) <= 1,
                "kce_forward (cuda): allowed_bits must have a contiguous last dimension");
    check_small(*group_ids, "group_ids", at::kInt, {N}, dev);
    P.allowed = allowed_bits->data_ptr<int32_t>();
    P.allowed_rs = allowed_bits->stride(0);
    P.n_groups = G;
    P.group_ids = group_ids->data_ptr<int32_t>();
    P.group_s = group_ids->stride(0);
  }
  if (grad.has_value()) {
    check_rows(*grad, "grad", N, V, dev);
    TORCH_CHECK(grad->scalar_type() == logits.scalar_type(), "kce_forward (cuda): grad must have the logits' dtype ",
                logits.scalar_type(), ", got ", grad->scalar_type());
    const bool shares = grad->storage().is_alias_of(logits.storage());
    TORCH_CHECK(!shares || (grad->data_ptr() == logits.data_ptr() && grad->strides() == logits.strides()),
                "kce_forward (cuda): grad may be logits itself, but must not partially overlap it");
    TORCH_CHECK(!teacher.has_value() || !grad->storage().is_alias_of(teacher->storage()),
                "kce_forward (cuda): grad must not overlap the teacher");
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
