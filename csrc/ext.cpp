// vfm._C: the optional native extension of vfm.
//
// * Op schemas live under the private namespace vfm_C (never vfm: the public ops are the Python
//   custom ops vfm::..., and the registry decides which kernel they run).  The per-device kernels
//   register with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu.
// * The pybind11 module exposes build facts for `vfm doctor`.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#define VFM_STRINGIFY_(x) #x
#define VFM_STRINGIFY(x) VFM_STRINGIFY_(x)

namespace vfm_cpu {
std::vector<std::string> compiled_isas();
std::string runtime_isa();
}  // namespace vfm_cpu

TORCH_LIBRARY(vfm_C, m) {
  // Knowledge cross-entropy, normalised form (contract: vfm/ops/kce_reference.py).
  // Returns (row_loss float32 [N], parts float32 [5, N]); writes d row_loss / d logits into grad
  // when given (grad may be logits itself).
  m.def(
      "kce_forward(Tensor logits, Tensor target, Tensor? weight, Tensor? teacher, Tensor? topk_idx, "
      "Tensor? topk_lp, Tensor? allowed_bits, Tensor? group_ids, Tensor scales, Tensor(a!)? grad, "
      "int ignore_index, float label_smoothing, float softcap, float temperature, int kd_mode, "
      "float jsd_beta, int pen_mode, float rule_strength, bool use_ce, bool use_z) -> (Tensor, Tensor)");
  // Pack a (G, V) bool mask into (G, ceil(V / 32)) int32 words, bit v % 32 of word v / 32 (the
  // allowed_bits format of kce_forward; vfm.ops.kce_reference.pack_allowed_bits).  CPU only.
  m.def("pack_bits(Tensor mask) -> Tensor");
  // LoRA dropout kernels (contract: vfm/ops/lora_reference.py; adapter: vfm/ops/lora_cpp.py).  The
  // keep-mask is regenerated from (seed, offset) and never stored.  threshold = floor(p * 2^32),
  // scale = 1 / (1 - p).  CPU, float32 / float64.
  // xa = D(x) A^T (N, r).
  m.def("lora_dropout_xa(Tensor x, Tensor a, int seed, int threshold, float scale) -> Tensor");
  // dx += D(gh A), in place (dx (N, in) contiguous).
  m.def("lora_dropout_dx_(Tensor(a!) dx, Tensor gh, Tensor a, int seed, int threshold, float scale) -> ()");
  // grad_a = gh^T D(x) (r, in).
  m.def("lora_dropout_ga(Tensor gh, Tensor x, int seed, int threshold, float scale) -> Tensor");
  // Grouped low-rank kernels (csrc/cpu/lora_dropout.cpp): rows grouped by adapter id (ids None: one
  // adapter; id -1: no adapter), scales (K,) float32 per adapter times alpha; the dropout D (on src
  // or on the added term) is active when threshold > 0.
  // out (N, R) = alpha * scales[k] * D(src_i) M_k^T.
  m.def(
      "lora_shrink(Tensor src, Tensor mats, Tensor? ids, Tensor? scales, float alpha, int seed, int threshold, "
      "float dscale) -> Tensor");
  // out (N, C) += D(alpha * scales[k] * coef_i M_k), in place.
  m.def(
      "lora_expand_(Tensor(a!) out, Tensor coef, Tensor mats, Tensor? ids, Tensor? scales, float alpha, int seed, "
      "int threshold, float dscale) -> ()");
  // (K, R, C) (or (R, C) without ids): alpha * scales[k] * sum_{i in adapter k} coef_i^T D(src_i).
  m.def(
      "lora_reduce(Tensor coef, Tensor src, int n_adapters, Tensor? ids, Tensor? scales, float alpha, int seed, "
      "int threshold, float dscale) -> Tensor");
  // D(x) as a new contiguous tensor.
  m.def("lora_dropout_apply(Tensor x, int seed, int threshold, float dscale) -> Tensor");
  // Backward pair fused: dx (N, C) += D(coef_i M_k) in place; returns (K, R, C) (or (R, C) without
  // ids) = sum_{i in adapter k} coef_i^T D(src_i).  Each mask element is hashed once; threshold 0:
  // no dropout.
  m.def(
      "lora_dx_ga_(Tensor(a!) dx, Tensor coef, Tensor mats, Tensor src, Tensor? ids, int seed, int threshold, "
      "float dscale) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = "0.1.0";
  pybind11::list isa;
  for (const auto& name : vfm_cpu::compiled_isas()) isa.append(name);
  info["isa"] = isa;                            // ISAs the hot CPU loops are compiled for
  info["isa_runtime"] = vfm_cpu::runtime_isa();  // the one this CPU dispatches to
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
#ifdef VFM_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
#ifdef VFM_CUDA_ARCHS
  info["cuda_archs"] = std::string(VFM_STRINGIFY(VFM_CUDA_ARCHS));
#else
  info["cuda_archs"] = std::string();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vfm native extension: C++ (OpenMP) CPU kernels and, when built with CUDA, GPU kernels";
  m.def("build_info", &build_info,
        "Build facts: version, isa (compiled ISAs), isa_runtime (the one dispatched to), openmp, "
        "omp_max_threads, with_cuda, cuda_archs.");
}
