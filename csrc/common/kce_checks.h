// Input checks of vfm_C::kce_forward shared by its CPU binding (csrc/cpu/kce_forward_cpu.cpp) and
// its CUDA binding (csrc/cuda/kce_binding.cpp).  Schema: csrc/ext.cpp; contract:
// vfm/ops/kce_reference.py.
//
// Each check raises (TORCH_CHECK, a RuntimeError in Python) with "<prefix><argument> ..." where the
// prefix names the binding ("kce_forward: " on CPU, "kce_forward (cuda): " on CUDA).  The checks
// only look at metadata (device, dtype, shape, strides, storage) and the scalar options: checks
// that read tensor values (target / top-k index / group id ranges) stay in the CPU binding, since
// on CUDA they would synchronise with the device.
//
// Host-only: includes ATen (never include it from a .cu file; csrc/cuda/kce_cuda.h is the
// torch-free interface of the CUDA kernel).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace vfm {
namespace kce_checks {

// Element type codes of both kernels (vfm_cpu::DType and vfm_cuda::KceDType hold these values);
// -1 for a dtype the kernels do not take.
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: return -1;
  }
}

// Who is checking: the message prefix, and where every tensor must live (no device: on the CPU;
// a device: exactly on that one).
struct Checker {
  const char* prefix;                // "kce_forward: " or "kce_forward (cuda): "
  std::optional<at::Device> device;  // nullopt: CPU tensors

  void check_device(const at::Tensor& t, const char* name) const {
    if (device.has_value()) {
      TORCH_CHECK(t.device() == *device, prefix, name, " must be on ", *device, ", got ", t.device());
    } else {
      TORCH_CHECK(t.device().is_cpu(), prefix, name, " must be a CPU tensor, got ", t.device());
    }
  }

  // A (n_rows, vocab) tensor with a contiguous last dimension; with check_dtype, also one of the
  // four floating dtypes.
  void check_rows(const at::Tensor& t, const char* name, int64_t n_rows, int64_t vocab, bool check_dtype) const {
    check_device(t, name);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n_rows && t.size(1) == vocab, prefix, name, " must have shape (",
                n_rows, ", ", vocab, "), got ", t.sizes());
    TORCH_CHECK(vocab <= 1 || t.stride(1) == 1, prefix, name,
                " must have a contiguous last dimension (stride(1) == 1), got strides ", t.strides());
    if (check_dtype) {
      TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, prefix, name,
                  " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
    }
  }

  // A small tensor of exactly this dtype and shape.
  void check_small(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) const {
    check_device(t, name);
    TORCH_CHECK(t.scalar_type() == dtype, prefix, name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == shape, prefix, name, " must have shape ", shape, ", got ", t.sizes());
  }

  // logits is (N, V) with V >= 1 (its device, strides and dtype: check_rows).
  void check_logits_dims(const at::Tensor& logits) const {
    TORCH_CHECK(logits.dim() == 2, prefix, "logits must be (N, V), got ", logits.sizes());
    TORCH_CHECK(logits.size(1) >= 1, prefix, "logits need at least one label, got ", logits.sizes());
  }

  // The scalar options (kd_mode 0..3 = none, kl, reverse kl, jsd; pen_mode 0..2 = none, mass,
  // posterior).
  void check_options(int64_t kd_mode, int64_t pen_mode, double temperature, double label_smoothing,
                     double softcap_value, double rule_strength, double jsd_beta) const {
    TORCH_CHECK(kd_mode >= 0 && kd_mode <= 3, prefix, "kd_mode must be 0..3, got ", kd_mode);
    TORCH_CHECK(pen_mode >= 0 && pen_mode <= 2, prefix, "pen_mode must be 0..2, got ", pen_mode);
    TORCH_CHECK(temperature > 0.0, prefix, "temperature must be > 0, got ", temperature);
    TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, prefix, "label_smoothing must be in [0, 1], got ",
                label_smoothing);
    TORCH_CHECK(softcap_value >= 0.0, prefix, "softcap must be >= 0 (0 = none), got ", softcap_value);
    TORCH_CHECK(rule_strength >= 0.0, prefix, "rule_strength must be >= 0, got ", rule_strength);
    TORCH_CHECK(kd_mode != 3 || (jsd_beta > 0.0 && jsd_beta < 1.0), prefix, "jsd_beta must be in (0, 1), got ",
                jsd_beta);
  }

  // weight: contiguous float32 (V,).
  void check_weight(const at::Tensor& weight, int64_t V) const {
    check_small(weight, "weight", at::kFloat, {V});
    TORCH_CHECK(weight.is_contiguous(), prefix, "weight must be contiguous");
  }

  // The top-k teacher (topk_idx int64 (N, k), topk_lp float32 (N, k)), if given; returns k (0 when
  // there is none).  max_k >= 0 caps k (the CUDA kernel's limit); -1: no cap.
  int64_t check_topk(const std::optional<at::Tensor>& topk_idx, const std::optional<at::Tensor>& topk_lp,
                     bool has_teacher, int64_t kd_mode, int64_t N, int64_t max_k) const {
    TORCH_CHECK(topk_idx.has_value() == topk_lp.has_value(), prefix, "topk_idx and topk_lp go together");
    if (!topk_idx.has_value()) return 0;
    TORCH_CHECK(!has_teacher, prefix, "give either a full teacher or a top-k teacher, not both");
    TORCH_CHECK(kd_mode == 1 || kd_mode == 0, prefix, "a top-k teacher supports kd_mode = 1 (kl) only, got ",
                kd_mode);
    TORCH_CHECK(topk_idx->dim() == 2 && topk_idx->size(0) == N, prefix, "topk_idx must be (N, k), got ",
                topk_idx->sizes());
    const int64_t k = topk_idx->size(1);
    if (max_k >= 0) {
      TORCH_CHECK(k <= max_k, prefix, "the top-k teacher may have at most ", max_k, " entries per row, got k = ", k);
    }
    check_small(*topk_idx, "topk_idx", at::kLong, {N, k});
    check_small(*topk_lp, "topk_lp", at::kFloat, {N, k});
    return k;
  }

  // A KD term needs a teacher; a penalty needs the allowed sets.  Checks the allowed sets
  // (allowed_bits int32 (G, ceil(V / 32)) with a contiguous last dimension, group_ids int32 (N,)),
  // if given; returns G (0 when there are none).
  int64_t check_teacher_and_allowed(bool has_teacher, bool has_topk, const std::optional<at::Tensor>& allowed_bits,
                                    const std::optional<at::Tensor>& group_ids, int64_t kd_mode, int64_t pen_mode,
                                    int64_t N, int64_t V) const {
    TORCH_CHECK(kd_mode == 0 || has_teacher || has_topk, prefix, "kd_mode ", kd_mode,
                " needs a teacher (full or top-k)");
    TORCH_CHECK(allowed_bits.has_value() == group_ids.has_value(), prefix, "allowed_bits and group_ids go together");
    TORCH_CHECK(pen_mode == 0 || allowed_bits.has_value(), prefix, "pen_mode ", pen_mode,
                " needs allowed_bits and group_ids");
    if (!allowed_bits.has_value()) return 0;
    TORCH_CHECK(allowed_bits->dim() == 2, prefix, "allowed_bits must be (G, W), got ", allowed_bits->sizes());
    const int64_t G = allowed_bits->size(0);
    check_small(*allowed_bits, "allowed_bits", at::kInt, {G, (V + 31) / 32});
    TORCH_CHECK(allowed_bits->stride(1) == 1 || allowed_bits->size(1) <= 1, prefix,
                "allowed_bits must have a contiguous last dimension");
    check_small(*group_ids, "group_ids", at::kInt, {N});
    return G;
  }

  // grad: (N, V) in the logits' dtype, either logits itself or not overlapping it, and not
  // overlapping the teacher.  check_dtype as in check_rows.  Returns whether grad is logits.
  bool check_grad(const at::Tensor& grad, const at::Tensor& logits, const std::optional<at::Tensor>& teacher,
                  int64_t N, int64_t V, bool check_dtype) const {
    check_rows(grad, "grad", N, V, check_dtype);
    TORCH_CHECK(grad.scalar_type() == logits.scalar_type(), prefix, "grad must have the logits' dtype ",
                logits.scalar_type(), ", got ", grad.scalar_type());
    const bool shares = grad.storage().is_alias_of(logits.storage());
    TORCH_CHECK(!shares || (grad.data_ptr() == logits.data_ptr() && grad.strides() == logits.strides()), prefix,
                "grad may be logits itself, but must not partially overlap it");
    TORCH_CHECK(!teacher.has_value() || !grad.storage().is_alias_of(teacher->storage()), prefix,
                "grad must not overlap the teacher");
    return shares;
  }
};

}  // namespace kce_checks
}  // namespace vfm
