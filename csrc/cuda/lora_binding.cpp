// CUDA low-rank adapter ops of vfm._C (kernels: csrc/cuda/lora_kernels.cu; Python side:
// vfm/ops/lora_cuda.py; contract: vfm/ops/lora_reference.py).  Their schemas are defined here
// (TORCH_LIBRARY_FRAGMENT), since they exist only in CUDA builds, and implemented for the CUDA
// dispatch key.  The file includes no CUDA header: the stream comes through c10's device-generic
// interface.
//
// * lora_cuda_shrink(src (N, C), mats (K, R, C) or (R, C), ids?, scales?, alpha, seed, threshold,
//   dscale) -> (N, R) in mats' dtype: alpha * scales[k] * D(src_i) M_k^T (id -1: zero row).
// * lora_cuda_expand_(out (N, C), coef (N, R), mats (K, R, C) or (R, C), ids?, scales?, alpha,
//   seed, threshold, dscale): out_i += D(alpha * scales[k] * coef_i M_k), in place (id -1: none).
// * lora_cuda_dropout(src (N, C), dtype, seed, threshold, dscale) -> D(src cast to dtype).
// D is the contract's dropout (keep iff hash(seed, i * C + j) >= threshold, kept values times
// dscale); threshold 0 is the identity.  mats may have any strides (a transposed view works).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <optional>

#include "cuda/lora_cuda.h"

namespace vfm_cuda {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: return -1;
  }
}

void* current_stream(const at::Device& dev) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStreamNativeHandle(impl.getStream(dev));
}

DropoutArgs dropout_args(const char* op, int64_t seed, int64_t threshold, double dscale) {
  TORCH_CHECK(threshold >= 0 && threshold < (int64_t(1) << 32), op, ": threshold must be in [0, 2^32), got ",
              threshold);
  DropoutArgs d;
  d.seed = static_cast<uint64_t>(seed);
  d.threshold = static_cast<uint32_t>(threshold);
  d.dscale = dscale;
  return d;
}

void check_2d(const at::Tensor& t, const char* op, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " must have a unit column stride, got strides ",
              t.strides());
}

// mats as a (K, R, C) view (a 2-D (R, C) matrix is one adapter).
at::Tensor as_stack(const at::Tensor& mats, const char* op, const at::Device& dev) {
  TORCH_CHECK(mats.device() == dev, op, ": mats must be on ", dev, ", got ", mats.device());
  TORCH_CHECK(mats.dim() == 2 || mats.dim() == 3, op, ": mats must be (R, C) or (K, R, C), got ", mats.sizes());
  return mats.dim() == 2 ? mats.unsqueeze(0) : mats;
}

const int64_t* check_ids(const std::optional<at::Tensor>& ids, const char* op, int64_t N, int64_t K,
                         const at::Device& dev) {
  if (!ids.has_value()) {
    TORCH_CHECK(K == 1, op, ": without adapter ids there must be one adapter, got K = ", K);
    return nullptr;
  }
  TORCH_CHECK(ids->device() == dev, op, ": ids must be on ", dev, ", got ", ids->device());
  TORCH_CHECK(ids->scalar_type() == at::kLong && ids->dim() == 1 && ids->size(0) == N && ids->is_contiguous(), op,
              ": ids must be a contiguous int64 tensor of shape (", N, "), got ", ids->scalar_type(), " ",
              ids->sizes());
  return ids->data_ptr<int64_t>();
}

const float* check_scales(const std::optional<at::Tensor>& scales, const char* op, int64_t K, const at::Device& dev) {
  if (!scales.has_value()) return nullptr;
  TORCH_CHECK(scales->device() == dev, op, ": scales must be on ", dev, ", got ", scales->device());
  TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 1 && scales->size(0) == K &&
                  scales->is_contiguous(),
              op, ": scales must be a contiguous float32 tensor of shape (", K, "), got ", scales->scalar_type(), " ",
              scales->sizes());
  return scales->data_ptr<float>();
}

void check_pair(const char* op, const at::Tensor& a, const at::Tensor& mats) {
  TORCH_CHECK(lora_pair_supported(dtype_code(a.scalar_type()), dtype_code(mats.scalar_type())), op,
              ": unsupported dtypes ", a.scalar_type(), " with adapter dtype ", mats.scalar_type(),
              " (equal float dtypes, or float16 / bfloat16 with float32 adapters)");
}

}  // namespace

at::Tensor lora_cuda_shrink(const at::Tensor& src, const at::Tensor& mats_in, const std::optional<at::Tensor>& ids,
                            const std::optional<at::Tensor>& scales, double alpha, int64_t seed, int64_t threshold,
                            double dscale) {
  const char* op = "lora_cuda_shrink";
  TORCH_CHECK(src.is_cuda(), op, ": src must be a CUDA tensor, got ", src.device());
  const at::Device dev = src.device();
  check_2d(src, op, "src", dev);
  const at::Tensor mats = as_stack(mats_in, op, dev);
  const int64_t N = src.size(0), C = src.size(1), K = mats.size(0), R = mats.size(1);
  TORCH_CHECK(mats.size(2) == C, op, ": src is ", src.sizes(), " but mats is ", mats_in.sizes());
  TORCH_CHECK(R <= kLoraMaxRank, op, ": rank ", R, " is above the kernel's limit ", kLoraMaxRank);
  check_pair(op, src, mats);
  const int64_t* idp = check_ids(ids, op, N, K, dev);
  const float* sp = check_scales(scales, op, K, dev);
  const DropoutArgs d = dropout_args(op, seed, threshold, dscale);
  at::Tensor out = at::empty({N, R}, src.options().dtype(mats.scalar_type()));
  const c10::DeviceGuard guard(dev);
  const int err = lora_shrink_launch(src.data_ptr(), src.stride(0), dtype_code(src.scalar_type()), mats.data_ptr(),
                                     mats.stride(0), mats.stride(1), mats.stride(2), dtype_code(mats.scalar_type()),
                                     idp, K, sp, alpha, N, R, C, d, out.data_ptr(), current_stream(dev));
  TORCH_CHECK(err == 0, op, ": kernel launch failed: ", lora_cuda_error_string(err));
  return out;
}

void lora_cuda_expand_(at::Tensor out, const at::Tensor& coef_in, const at::Tensor& mats_in,
                       const std::optional<at::Tensor>& ids, const std::optional<at::Tensor>& scales, double alpha,
                       int64_t seed, int64_t threshold, double dscale) {
  const char* op = "lora_cuda_expand_";
  TORCH_CHECK(out.is_cuda(), op, ": out must be a CUDA tensor, got ", out.device());
  const at::Device dev = out.device();
  check_2d(out, op, "out", dev);
  check_2d(coef_in, op, "coef", dev);
  const at::Tensor mats = as_stack(mats_in, op, dev);
  const int64_t N = out.size(0), C = out.size(1), K = mats.size(0), R = mats.size(1);
  TORCH_CHECK(mats.size(2) == C && coef_in.size(0) == N && coef_in.size(1) == R, op, ": out is ", out.sizes(),
              ", coef is ", coef_in.sizes(), " and mats is ", mats_in.sizes());
  TORCH_CHECK(R <= kLoraMaxRank, op, ": rank ", R, " is above the kernel's limit ", kLoraMaxRank);
  TORCH_CHECK(coef_in.scalar_type() == mats.scalar_type(), op, ": coef (", coef_in.scalar_type(),
              ") and mats (", mats.scalar_type(), ") must share the adapter dtype");
  check_pair(op, out, mats);
  const at::Tensor coef = coef_in.contiguous();
  const int64_t* idp = check_ids(ids, op, N, K, dev);
  const float* sp = check_scales(scales, op, K, dev);
  const DropoutArgs d = dropout_args(op, seed, threshold, dscale);
  const c10::DeviceGuard guard(dev);
  const int err = lora_expand_launch(out.data_ptr(), out.stride(0), dtype_code(out.scalar_type()), coef.data_ptr(),
                                     mats.data_ptr(), mats.stride(0), mats.stride(1), mats.stride(2),
                                     dtype_code(mats.scalar_type()), idp, K, sp, alpha, N, R, C, d,
                                     current_stream(dev));
  TORCH_CHECK(err == 0, op, ": kernel launch failed: ", lora_cuda_error_string(err));
}

at::Tensor lora_cuda_dropout(const at::Tensor& src, at::ScalarType dtype, int64_t seed, int64_t threshold,
                             double dscale) {
  const char* op = "lora_cuda_dropout";
  TORCH_CHECK(src.is_cuda(), op, ": src must be a CUDA tensor, got ", src.device());
  const at::Device dev = src.device();
  check_2d(src, op, "src", dev);
  TORCH_CHECK(lora_pair_supported(dtype_code(src.scalar_type()), dtype_code(dtype)), op, ": unsupported dtypes ",
              src.scalar_type(), " to ", dtype);
  const DropoutArgs d = dropout_args(op, seed, threshold, dscale);
  const int64_t N = src.size(0), C = src.size(1);
  at::Tensor out = at::empty({N, C}, src.options().dtype(dtype));
  const c10::DeviceGuard guard(dev);
  const int err = lora_dropout_launch(src.data_ptr(), src.stride(0), dtype_code(src.scalar_type()),
                                      dtype_code(dtype), N, C, d, out.data_ptr(), current_stream(dev));
  TORCH_CHECK(err == 0, op, ": kernel launch failed: ", lora_cuda_error_string(err));
  return out;
}

}  // namespace vfm_cuda

TORCH_LIBRARY_FRAGMENT(vfm_C, m) {
  m.def(
      "lora_cuda_shrink(Tensor src, Tensor mats, Tensor? ids, Tensor? scales, float alpha, int seed, int threshold, "
      "float dscale) -> Tensor");
  m.def(
      "lora_cuda_expand_(Tensor(a!) out, Tensor coef, Tensor mats, Tensor? ids, Tensor? scales, float alpha, "
      "int seed, int threshold, float dscale) -> ()");
  m.def("lora_cuda_dropout(Tensor src, ScalarType dtype, int seed, int threshold, float dscale) -> Tensor");
}

TORCH_LIBRARY_IMPL(vfm_C, CUDA, m) {
  m.impl("lora_cuda_shrink", &vfm_cuda::lora_cuda_shrink);
  m.impl("lora_cuda_expand_", &vfm_cuda::lora_cuda_expand_);
  m.impl("lora_cuda_dropout", &vfm_cuda::lora_cuda_dropout);
}
