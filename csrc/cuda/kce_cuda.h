// Launcher interface of the CUDA knowledge cross-entropy kernel (csrc/cuda/kce_kernel.cu).
//
// This header is free of torch and of CUDA headers: kce_kernel.cu is compiled by nvcc alone
// (`nvcc -c`, no torch headers), and kce_binding.cpp (compiled by the host compiler against
// torch) validates tensors with TORCH_CHECK, fills KceParams with raw pointers and element
// strides, and calls kce_forward_launch on the current CUDA stream.
#pragma once

#include <cstdint>

namespace vfm_cuda {

// Element type codes (the same as the CPU kernel's).
enum KceDType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// Everything the kernel reads and writes, as raw device pointers and element strides.  See
// vfm/ops/kce_reference.py for the meaning of every field (the normalised contract).
struct KceParams {
  int64_t n_rows = 0, vocab = 0;
  int dtype = kF32;                 // of logits, teacher and grad
  const void* logits = nullptr;     // (N, V), stride(1) == 1
  int64_t logits_rs = 0;
  const void* teacher = nullptr;    // (N, V) in the logits' dtype, or null
  int64_t teacher_rs = 0;
  void* grad = nullptr;             // (N, V) in the logits' dtype (may equal logits), or null
  int64_t grad_rs = 0;
  const int64_t* target = nullptr;  // (N,)
  int64_t target_s = 0;
  const float* weight = nullptr;    // (V,) contiguous, or null
  const double* sum_w = nullptr;    // device scalar: sum of weight (only read with label smoothing)
  const int64_t* topk_idx = nullptr;  // (N, k), or null
  int64_t topk_idx_rs = 0, topk_idx_cs = 0;
  const float* topk_lp = nullptr;     // (N, k)
  int64_t topk_lp_rs = 0, topk_lp_cs = 0;
  int64_t k = 0;
  const int32_t* allowed = nullptr;  // (G, ceil(V / 32)) packed words, or null
  int64_t allowed_rs = 0, n_groups = 0;
  const int32_t* group_ids = nullptr;  // (N,)
  int64_t group_s = 0;
  const float* scales = nullptr;       // (4, N)
  int64_t scales_rs = 0, scales_cs = 0;
  void* row_loss = nullptr;  // (N,) float32, float64 for float64 logits
  void* parts = nullptr;     // (5, N) contiguous, same dtype
  int64_t ignore_index = -100;
  double eps = 0.0, cap = 0.0, temp = 1.0, beta = 0.5, rule_c = 0.0;
  int kd_mode = 0, pen_mode = 0;
  bool use_ce = true, use_z = false;
};

// Largest top-k width the kernel takes (its entries live in shared memory).
constexpr int64_t kKceMaxTopK = 2048;

// Launches the kernel on `stream` (a cudaStream_t) of the current device.  Returns a
// cudaError_t as int: 0 on success.
int kce_forward_launch(const KceParams& p, void* stream);

// The CUDA error string of a code returned by a launcher.
const char* cuda_error_string(int code);

}  // namespace vfm_cuda
