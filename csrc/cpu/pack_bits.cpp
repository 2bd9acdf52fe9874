// CPU kernel of vfm_C::pack_bits: a (G, V) bool mask -> (G, ceil(V / 32)) int32 words, bit v % 32
// of word v / 32 = mask[g, v] (little bit order; the padding bits of the last word are 0).  The
// format of vfm.ops.kce_reference.pack_allowed_bits, which calls this for contiguous CPU masks.
//
// Each word is built from its 32 bytes as four 8-byte loads, each packed with one multiply
// (pack_byte); OpenMP over rows, or over the words of a few long rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace vfm_cpu {
namespace {

// 8 labels (bytes, any nonzero = true) -> 8 bits: OR each byte's bits into its bit 0 (the shifts
// 4, 2, 1 only ever combine bits of the same byte into its low bit), keep bit 0, and gather the
// eight bit 0s with one multiply: byte k's bit lands at bit 56 + k, every other partial product
// below bit 56 or above bit 63, all at distinct positions (no carries).
inline uint32_t pack_byte(const uint8_t* p) {
  uint64_t q;
  std::memcpy(&q, p, 8);
  q |= q >> 4;
  q |= q >> 2;
  q |= q >> 1;
  q &= 0x0101010101010101ull;
  return static_cast<uint32_t>((q * 0x0102040810204080ull) >> 56);
}

inline uint32_t pack_word_full(const uint8_t* p) {
  return pack_byte(p) | (pack_byte(p + 8) << 8) | (pack_byte(p + 16) << 16) | (pack_byte(p + 24) << 24);
}

inline uint32_t pack_word_tail(const uint8_t* p, int m) {  // m < 32 labels
  uint32_t word = 0;
  for (int j = 0; j < m; ++j) word |= static_cast<uint32_t>(p[j] != 0) << j;
  return word;
}

inline void pack_words(const uint8_t* row, int64_t vocab, int64_t w0, int64_t w1, int32_t* out) {
  const int64_t full = vocab / 32;
  for (int64_t w = w0; w < w1; ++w) {
    const uint32_t word = w < full ? pack_word_full(row + 32 * w)
                                   : pack_word_tail(row + 32 * w, static_cast<int>(vocab - 32 * w));
    out[w] = static_cast<int32_t>(word);
  }
}

}  // namespace

at::Tensor pack_bits_cpu(const at::Tensor& mask) {
  TORCH_CHECK(mask.device().is_cpu(), "pack_bits: mask must be a CPU tensor, got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pack_bits: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2, "pack_bits: mask must be (G, V), got ", mask.sizes());
  const at::Tensor m = mask.contiguous();
  const int64_t G = m.size(0), V = m.size(1);
  const int64_t W = (V + 31) / 32;
  at::Tensor out = at::empty({G, W}, m.options().dtype(at::kInt));
  if (G == 0 || W == 0) return out;
  const uint8_t* src = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  int32_t* dst = out.data_ptr<int32_t>();
  const bool parallel = G * V >= (int64_t(1) << 18);
  if (G >= 2 * at::get_num_threads() || !parallel) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t g = 0; g < G; ++g) pack_words(src + g * V, V, 0, W, dst + g * W);
  } else {
    // Few long rows: split each row's words between the threads.
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* row = src + g * V;
      int32_t* orow = dst + g * W;
      at::parallel_for(0, W, 1024, [&](int64_t w0, int64_t w1) { pack_words(row, V, w0, w1, orow); });
    }
  }
  return out;
}

}  // namespace vfm_cpu

TORCH_LIBRARY_IMPL(vfm_C, CPU, m) { m.impl("pack_bits", &vfm_cpu::pack_bits_cpu); }
