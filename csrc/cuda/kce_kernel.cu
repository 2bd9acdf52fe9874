// CUDA kernel of vfm_C::kce_forward, the knowledge cross-entropy op (contract:
// vfm/ops/kce_reference.py; per-element maths shared with the CPU kernel: csrc/common/kce_math.h).
//
// Free of torch headers: compiled by nvcc alone; csrc/cuda/kce_binding.cpp checks the tensors and
// calls kce_forward_launch().
//
// Design
// ------
// * One thread block per row; the row is swept by the whole block with 16-byte vector loads
//   (4 fp32, 8 fp16/bf16 or 2 fp64 labels per load) after a scalar head that reaches 16-byte
//   alignment (any row stride works; rows whose logits, teacher and gradient are misaligned
//   relative to each other take the scalar path).  int64 row offsets, int64 label indices.
// * Pass 1 keeps, per thread, online (running-max) softmax states of every distribution the loss
//   needs: zc, zc / T, teacher / T (with the KL weighted sum), the allowed set (own running max:
//   exact for any penalty size), the rule posterior (with its KL sum), and sum_v w_v zc_v for label
//   smoothing.  One exp per element per state; the states are merged across the block with warp
//   shuffles and shared memory once per row.  At T = 1 the zc / T state is the zc state.
// * JSD needs its normalisers before it can sum, so it takes a middle pass (3 passes).
// * Pass 2 (only when a gradient is wanted) recomputes each element's gradient from the row
//   statistics and writes it once, in the logits' dtype.  Each thread reads element v before it
//   writes element v, so the gradient may overwrite the logits (inplace_backward).  The target's
//   logit and the top-k teacher's logits are gathered before pass 2; a top-k teacher's gradient
//   entries are rewritten after the dense pass (same block, after __syncthreads) from those
//   gathered values, so every element is rounded to its dtype once.
// * Accumulation in fp32 (fp64 for fp64 logits); exponentials via ex2.approx (relative error
//   2^-22), the softcap via the shared polynomial tanh of kce_math.h.
// * A row whose scales are all zero is not read: loss 0 and an exact zero gradient row.  A zero
//   scale skips its term (never multiplies it), so NaN in an uncounted row cannot leak.
// * The Python layer validates every index; if an out-of-range target, top-k index or group id
//   reaches the kernel anyway, that row's loss, parts and gradient are NaN (never clipped).
// * With -DVFM_CUDA_EMULATION (tests/cuda_emulation/emu.h, host compiler only) the same kernel
//   runs on the CPU, its threads as cooperative fibers, so CPU tests check its logic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "common/kce_math.h"
#include "cuda/kce_cuda.h"

namespace vfm_cuda {
namespace {

using vfm::kce::softcap;
using vfm::kce::softcap_grad_factor;

constexpr int KD_NONE = 0, KD_KL = 1, KD_REVERSE_KL = 2, KD_JSD = 3;
constexpr int PEN_NONE = 0, PEN_MASS = 1, PEN_POSTERIOR = 2;

// ------------------------------------------------------------------------------------------
// element types
// ------------------------------------------------------------------------------------------

template <typename S>
struct Elem;
template <>
struct Elem<float> {
  using A = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float a) { return a; }
};
template <>
struct Elem<double> {
  using A = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double a) { return a; }
};
template <>
struct Elem<__half> {
  using A = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float a) { return __float2half_rn(a); }
};
template <>
struct Elem<__nv_bfloat16> {
  using A = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float a) { return __float2bfloat16_rn(a); }
};

// exp and log in the accumulation type: ex2.approx for float (-inf -> 0, NaN -> NaN), libm for
// double.
__device__ __forceinline__ float ex(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#else  // the CPU emulation of the kernels (tests/cuda_emulation)
  return exp2f(x * 1.4426950408889634f);
#endif
}
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return __logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }
__device__ __forceinline__ float lg_exact(float x) { return logf(x); }
__device__ __forceinline__ double lg_exact(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A lowest() {
  return -static_cast<A>(sizeof(A) == 4 ? FLT_MAX : DBL_MAX);
}

// 0 * anything = 0 (e a probability, d possibly infinite where e is 0).
template <typename A>
__device__ __forceinline__ A weighted(A e, A d) {
  return e == A(0) ? A(0) : e * d;
}

// ------------------------------------------------------------------------------------------
// online softmax states
// ------------------------------------------------------------------------------------------

// S = sum exp(a - m), W = sum exp(a - m) * d over the entries pushed so far.  m starts at the
// lowest finite value, so -inf entries add exp(-inf) = 0 and a NaN entry poisons S (NaN > m is
// false, exp(NaN) = NaN); an all -inf row ends with S = 0, lse = -inf.
template <typename A>
struct St {
  A m, s, w;
  __device__ __forceinline__ void init() {
    m = lowest<A>();
    s = A(0);
    w = A(0);
  }
  __device__ __forceinline__ void push(A a) {
    if (a > m) {
      s = s * ex(m - a) + A(1);
      m = a;
    } else {
      s += ex(a - m);
    }
  }
  __device__ __forceinline__ void push_w(A a, A d) {
    if (a > m) {
      const A f = ex(m - a);
      s = s * f + A(1);
      w = weighted(f, w) + d;
      m = a;
    } else {
      const A e = ex(a - m);
      s += e;
      w += weighted(e, d);
    }
  }
  __device__ __forceinline__ void merge(A om, A os, A ow) {
    const A mn = om > m ? om : m;
    const A fa = m == mn ? A(1) : ex(m - mn);
    const A fb = om == mn ? A(1) : ex(om - mn);
    s = s * fa + os * fb;
    w = weighted(fa, w) + weighted(fb, ow);
    m = mn;
  }
  __device__ __forceinline__ A lse() const { return m + lg_exact(s); }
  __device__ __forceinline__ A mean_w() const { return w / s; }
};

template <typename A>
__device__ __forceinline__ A shfl(A v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// Shared scratch of the block reductions (one slot per warp).
template <typename A>
struct Red {
  A m[32], s[32], w[32];
};

// Merge every thread's state; every thread gets the block's state.
template <typename A>
__device__ void block_merge(St<A>& st, Red<A>& red) {
  for (int o = 16; o > 0; o >>= 1) {
    const A om = shfl(st.m, o), os = shfl(st.s, o), ow = shfl(st.w, o);
    st.merge(om, os, ow);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) {
    red.m[warp] = st.m;
    red.s[warp] = st.s;
    red.w[warp] = st.w;
  }
  __syncthreads();
  st.init();
  for (int q = 0; q < nw; ++q) st.merge(red.m[q], red.s[q], red.w[q]);
}

template <typename A>
__device__ A block_sum(A v, Red<A>& red) {
  for (int o = 16; o > 0; o >>= 1) v += shfl(v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) red.s[warp] = v;
  __syncthreads();
  A t = A(0);
  for (int q = 0; q < nw; ++q) t += red.s[q];
  return t;
}

template <typename A>
__device__ A block_max(A v, Red<A>& red) {
  for (int o = 16; o > 0; o >>= 1) {
    const A u = shfl(v, o);
    v = u > v ? u : v;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) red.m[warp] = v;
  __syncthreads();
  A t = lowest<A>();
  for (int q = 0; q < nw; ++q) t = red.m[q] > t ? red.m[q] : t;
  return t;
}

// ------------------------------------------------------------------------------------------
// row sweeps
// ------------------------------------------------------------------------------------------

template <typename S>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(S);
  S v[N];
};

__device__ __forceinline__ unsigned misalign(const void* p) {
  return static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
}

// Calls f(v, x_v, t_v) for every label v of the row, spread over the block (t_v = 0 without a
// teacher).  With WRITE, f's return value is stored into g[v] (read-before-write per thread, so
// g may equal x).  16-byte vector loads/stores where x, t and g share their 16-byte phase.
template <typename S, bool WRITE, typename F>
__device__ __forceinline__ void sweep(const S* x, const S* t, S* g, int64_t V, F&& f) {
  using E = Elem<S>;
  using A = typename E::A;
  constexpr int VEC = Vec<S>::N;
  const unsigned ph = misalign(x);
  bool vec_ok = ph % sizeof(S) == 0;
  if (t != nullptr) vec_ok = vec_ok && misalign(t) == ph;
  if (WRITE) vec_ok = vec_ok && misalign(g) == ph;
  int64_t head = vec_ok ? static_cast<int64_t>(((16u - ph) & 15u) / sizeof(S)) : V;
  if (head > V) head = V;
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int64_t v = tid; v < head; v += nt) {
    const A r = f(v, E::load(x[v]), t != nullptr ? E::load(t[v]) : A(0));
    if (WRITE) g[v] = E::store(r);
  }
  if (head == V) return;
  const int64_t nvec = (V - head) / VEC;
  const Vec<S>* xv = reinterpret_cast<const Vec<S>*>(x + head);
  const Vec<S>* tv = t != nullptr ? reinterpret_cast<const Vec<S>*>(t + head) : nullptr;
  Vec<S>* gv = WRITE ? reinterpret_cast<Vec<S>*>(g + head) : nullptr;
  // Software pipelining: the next vector of this thread is loaded before the current one is
  // used, so two 16-byte loads per stream are in flight per thread (each vector index belongs
  // to one thread, so the prefetch never reads an element already overwritten in place).
  Vec<S> xn, tn;
  if (tid < nvec) {
    xn = xv[tid];
    if (tv != nullptr) tn = tv[tid];
  }
  for (int64_t q = tid; q < nvec; q += nt) {
    const Vec<S> xs = xn;
    const Vec<S> ts = tn;
    if (q + nt < nvec) {
      xn = xv[q + nt];
      if (tv != nullptr) tn = tv[q + nt];
    }
    Vec<S> out;
    const int64_t v0 = head + q * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A r = f(v0 + j, E::load(xs.v[j]), tv != nullptr ? E::load(ts.v[j]) : A(0));
      if (WRITE) out.v[j] = E::store(r);
    }
    if (WRITE) gv[q] = out;
  }
  for (int64_t v = head + nvec * VEC + tid; v < V; v += nt) {
    const A r = f(v, E::load(x[v]), t != nullptr ? E::load(t[v]) : A(0));
    if (WRITE) g[v] = E::store(r);
  }
}

__device__ __forceinline__ bool bit_at(const int32_t* words, int64_t v) {
  return ((static_cast<uint32_t>(__ldg(words + (v >> 5))) >> (v & 31)) & 1u) != 0u;
}

// ------------------------------------------------------------------------------------------
// the kernel
// ------------------------------------------------------------------------------------------

template <typename S>
__global__ void __launch_bounds__(512) kce_kernel(const KceParams P) {
  using E = Elem<S>;
  using A = typename E::A;
  __shared__ Red<A> red;
  __shared__ A bcast[2];
#if defined(VFM_CUDA_EMULATION)
  unsigned char* dyn = vfm_emu::dynamic_shared_memory();
#else
  extern __shared__ __align__(16) unsigned char dyn[];
#endif
  const int64_t k = P.k;
  int32_t* sidx = reinterpret_cast<int32_t*>(dyn);
  A* su = reinterpret_cast<A*>(dyn + ((k * 4 + 15) / 16) * 16);  // top-k lp / T, then q
  A* szc = su + k;                                                  // top-k softcapped logits

  const int64_t i = blockIdx.x;
  const int64_t V = P.vocab;
  const int tid = threadIdx.x, nt = blockDim.x;
  const S* x = static_cast<const S*>(P.logits) + i * P.logits_rs;
  const bool full_teacher = P.teacher != nullptr;
  const S* trow = full_teacher ? static_cast<const S*>(P.teacher) + i * P.teacher_rs : nullptr;
  S* g = P.grad != nullptr ? static_cast<S*>(P.grad) + i * P.grad_rs : nullptr;

  const double T = P.temp;
  const A it = static_cast<A>(1.0 / T);
  const float sc = P.use_ce ? P.scales[0 * P.scales_rs + i * P.scales_cs] : 0.0f;
  const float sk = P.kd_mode != KD_NONE ? P.scales[1 * P.scales_rs + i * P.scales_cs] : 0.0f;
  const float sp = P.pen_mode != PEN_NONE ? P.scales[2 * P.scales_rs + i * P.scales_cs] : 0.0f;
  const float sz = P.use_z ? P.scales[3 * P.scales_rs + i * P.scales_cs] : 0.0f;
  const int64_t tgt = P.target[i * P.target_s];
  bool bad = false;
  int32_t gid = -1;
  if (P.allowed != nullptr) {
    gid = P.group_ids[i * P.group_s];
    if (gid < -1 || gid >= P.n_groups) {
      bad = true;
      gid = -1;
    }
  }
  const int32_t* words = gid >= 0 ? P.allowed + gid * P.allowed_rs : nullptr;
  const bool counted = tgt != P.ignore_index;
  const bool tgt_ok = tgt >= 0 && tgt < V;
  const bool ce_on = sc != 0.0f;
  if ((ce_on || (words != nullptr && counted)) && !tgt_ok) bad = true;
  const bool have_y = tgt_ok;  // address safety: the target is read only when in range
  const A outside = (words != nullptr && counted && have_y && !bit_at(words, tgt)) ? A(1) : A(0);
  const bool z_on = sz != 0.0f;
  const bool mass_on = sp != 0.0f && words != nullptr && P.pen_mode == PEN_MASS;
  const bool post_on = sp != 0.0f && words != nullptr && P.pen_mode == PEN_POSTERIOR;
  bool kd_on = sk != 0.0f;

  // ---- top-k teacher: qT = softmax over the valid entries of logprob / T -------------------
  const bool topk = kd_on && !full_teacher && P.topk_idx != nullptr;
  A lse_u = A(0);
  if (topk) {
    int nvalid = 0;
    for (int64_t j = tid; j < k; j += nt) {
      const int64_t v = P.topk_idx[i * P.topk_idx_rs + j * P.topk_idx_cs];
      const bool ok = v >= 0 && v < V;
      if (v < -1 || v >= V) bad = true;
      sidx[j] = ok ? static_cast<int32_t>(v) : -1;
      su[j] = ok ? static_cast<A>(P.topk_lp[i * P.topk_lp_rs + j * P.topk_lp_cs]) * it : -static_cast<A>(INFINITY);
      nvalid += ok ? 1 : 0;
    }
    A mloc = lowest<A>();
    for (int64_t j = tid; j < k; j += nt) mloc = su[j] > mloc ? su[j] : mloc;
    const A mu = block_max(mloc, red);
    A sloc = A(0);
    for (int64_t j = tid; j < k; j += nt) sloc += ex(su[j] - mu);
    const A s = block_sum(sloc, red);
    lse_u = mu + lg_exact(s);
    const A nv = block_sum(static_cast<A>(nvalid), red);
    if (nv == A(0)) kd_on = false;  // a row without teacher entries has no KD term
  }
  bad = __syncthreads_or(bad) != 0;

  if (!(ce_on || z_on || mass_on || post_on || kd_on)) {  // the row counts for nothing
    if (tid == 0) {
      A* parts = static_cast<A*>(P.parts);
      const A nan = bad ? static_cast<A>(NAN) : A(0);
      for (int q = 0; q < 4; ++q) parts[q * P.n_rows + i] = nan;
      parts[4 * P.n_rows + i] = bad ? nan : outside;
      static_cast<A*>(P.row_loss)[i] = nan;
    }
    if (g != nullptr) {
      const A fill = bad ? static_cast<A>(NAN) : A(0);
      sweep<S, true>(x, nullptr, g, V, [&](int64_t, A, A) { return fill; });
    }
    return;
  }

  const int kd_mode = kd_on ? P.kd_mode : KD_NONE;
  const bool kd_full = kd_mode != KD_NONE && full_teacher;
  const bool kl_full = kd_full && kd_mode == KD_KL;
  const bool rkl = kd_mode == KD_REVERSE_KL && full_teacher;
  const bool jsd = kd_mode == KD_JSD && full_teacher;
  const bool need_lse = ce_on || z_on || mass_on;
  const bool need_lse_t = kd_on || post_on;
  const bool t_is_1 = T == 1.0;
  const bool run_p = need_lse && !(t_is_1 && need_lse_t);  // at T = 1, lse(zc / T) is lse(zc)
  const bool need_t = kd_full || (post_on && full_teacher);
  const bool eps_on = ce_on && P.eps != 0.0;
  const bool has_cap = P.cap > 0.0;
  const A cap = static_cast<A>(P.cap), inv_cap = has_cap ? static_cast<A>(1.0 / P.cap) : A(0);
  const bool post_inf = P.rule_c == static_cast<double>(INFINITY);  // rule_strength >= 0
  const A rule_c = post_inf ? A(0) : static_cast<A>(P.rule_c);
  const A ninf = -static_cast<A>(INFINITY);
  const S* t = need_t ? trow : nullptr;
  const float* w = P.weight;

  auto zc_of = [&](A z) -> A { return has_cap ? softcap(z, cap, inv_cap) : z; };
  // s_rule of the posterior penalty at label v (s = t / T with a full teacher, else zc / T).
  auto rule_score = [&](int64_t v, A zc, A tv) -> A {
    const A s = (full_teacher ? tv : zc) * it;
    const bool in_a = bit_at(words, v);
    return in_a ? s : (post_inf ? ninf : s - rule_c);
  };

  // ---- pass 1: statistics -------------------------------------------------------------------
  St<A> stP, stT, stQ, stA, stR;
  stP.init();
  stT.init();
  stQ.init();
  stA.init();
  stR.init();
  A swz = A(0);
  sweep<S, false>(x, t, nullptr, V, [&](int64_t v, A z, A tv) -> A {
    const A zc = zc_of(z);
    if (run_p) stP.push(zc);
    if (mass_on && bit_at(words, v)) stA.push(zc);
    if (need_lse_t) {
      const A u = zc * it;
      if (rkl)
        stT.push_w(u, u - tv * it);
      else
        stT.push(u);
    }
    if (kd_full) {
      const A tq = tv * it;
      if (kd_mode == KD_KL)
        stQ.push_w(tq, tq - zc * it);
      else
        stQ.push(tq);
    }
    if (post_on) {
      const A sr = rule_score(v, zc, tv);
      stR.push_w(sr, sr - zc * it);
    }
    if (eps_on) swz += (w != nullptr ? static_cast<A>(__ldg(w + v)) : A(1)) * zc;
    return A(0);
  });
  if (run_p) block_merge(stP, red);
  if (need_lse_t) block_merge(stT, red);
  if (kd_full) block_merge(stQ, red);
  if (mass_on) block_merge(stA, red);
  if (post_on) block_merge(stR, red);
  if (eps_on) swz = block_sum(swz, red);

  const A lse_t = need_lse_t ? stT.lse() : A(0);
  const A lse = run_p ? stP.lse() : lse_t;
  const A lse_q = kd_full ? stQ.lse() : A(0);
  const A lse_a = mass_on ? stA.lse() : A(0);
  const A lse_r = post_on ? stR.lse() : A(0);
  const A Ta = static_cast<A>(T);

  // Gather zc at the target and at the top-k indices before pass 2 may overwrite the row.
  if (tid == 0) bcast[0] = (ce_on && have_y) ? zc_of(E::load(x[tgt])) : A(0);
  if (topk) {
    for (int64_t j = tid; j < k; j += nt) {
      const int32_t v = sidx[j];
      szc[j] = v >= 0 ? zc_of(E::load(x[v])) : A(0);
      su[j] = v >= 0 ? ex(su[j] - lse_u) : A(0);  // su now holds q_j
    }
  }
  __syncthreads();
  const A zc_y = bcast[0];

  A ce = A(0), kd = A(0), pen = A(0), w_y = A(1);
  if (ce_on) {
    w_y = (w != nullptr && have_y) ? static_cast<A>(w[tgt]) : A(1);
    const A eps = static_cast<A>(P.eps);
    ce = (A(1) - eps) * w_y * (lse - zc_y);
    if (eps_on) {
      const A sum_w = w != nullptr ? static_cast<A>(*P.sum_w) : static_cast<A>(V);
      ce += eps / static_cast<A>(V) * (sum_w * lse - swz);
    }
  }
  if (mass_on) pen = lse - lse_a;
  if (post_on) pen = Ta * Ta * (stR.mean_w() - lse_r + lse_t);
  if (kl_full) kd = Ta * Ta * (stQ.mean_w() + lse_t - lse_q);
  if (rkl) kd = Ta * Ta * (stT.mean_w() - lse_t + lse_q);
  if (topk) {
    // KD_i = sum_j q_j (u_j - lse_u - zc_j / T + lse_t), with u_j - lse_u = log q_j.
    A s = A(0);
    for (int64_t j = tid; j < k; j += nt)
      if (sidx[j] >= 0) s += weighted(su[j], lg_exact(su[j]) - szc[j] * it + lse_t);
    kd = Ta * Ta * block_sum(s, red);
  }

  const A beta = static_cast<A>(P.beta);
  A kl_pm = A(0);
  if (jsd) {  // middle pass: KL(qT || m) and KL(pT || m), m = b qT + (1 - b) pT
    A s_q = A(0), s_p = A(0);
    sweep<S, false>(x, t, nullptr, V, [&](int64_t, A z, A tv) -> A {
      const A lp = zc_of(z) * it - lse_t, lq = tv * it - lse_q;
      const A p = ex(lp), q = ex(lq);
      const A lm = lg(beta * q + (A(1) - beta) * p);
      s_q += weighted(q, lq - lm);
      s_p += weighted(p, lp - lm);
      return A(0);
    });
    const A kl_qm = block_sum(s_q, red);
    kl_pm = block_sum(s_p, red);
    kd = Ta * Ta * (beta * kl_qm + (A(1) - beta) * kl_pm);
  }

  if (tid == 0) {
    const A nan = static_cast<A>(NAN);
    const A pc = bad ? nan : (ce_on ? static_cast<A>(sc) * ce : A(0));
    const A pk = bad ? nan : (kd_on ? static_cast<A>(sk) * kd : A(0));
    const A pp = bad ? nan : ((mass_on || post_on) ? static_cast<A>(sp) * pen : A(0));
    const A pz = bad ? nan : (z_on ? static_cast<A>(sz) * lse * lse : A(0));
    A* parts = static_cast<A*>(P.parts);
    parts[0 * P.n_rows + i] = pc;
    parts[1 * P.n_rows + i] = pk;
    parts[2 * P.n_rows + i] = pp;
    parts[3 * P.n_rows + i] = pz;
    parts[4 * P.n_rows + i] = bad ? nan : outside;
    static_cast<A*>(P.row_loss)[i] = pc + pk + pp + pz;
  }
  if (g == nullptr) return;

  // ---- pass 2: gradient -----------------------------------------------------------------------
  // g = cp p + cpt pT - ceps w - (teacher, allowed-set and rule terms) - (one-hot), then times the
  // softcap factor.
  A cp = A(0), cpt = A(0);
  const A eps = static_cast<A>(P.eps);
  if (ce_on) {
    const A sum_w = (eps_on && w != nullptr) ? static_cast<A>(*P.sum_w) : static_cast<A>(V);
    cp += static_cast<A>(sc) * ((A(1) - eps) * w_y + (eps_on ? eps / static_cast<A>(V) * sum_w : A(0)));
  }
  if (z_on) cp += A(2) * static_cast<A>(sz) * lse;
  if (mass_on) cp += static_cast<A>(sp);
  if (kd_mode == KD_KL) cpt += static_cast<A>(sk) * Ta;
  if (post_on) cpt += static_cast<A>(sp) * Ta;
  if (t_is_1) {
    cp += cpt;
    cpt = A(0);
  }
  if (bad) cp = static_cast<A>(NAN);
  const A ceps = eps_on ? static_cast<A>(sc) * eps / static_cast<A>(V) : A(0);
  const A c_kd = jsd ? static_cast<A>(sk) * Ta * (A(1) - beta) : static_cast<A>(sk) * Ta;
  const A c_post = static_cast<A>(sp) * Ta;
  const A c_mass = static_cast<A>(sp);
  const A c_hot = static_cast<A>(sc) * (A(1) - eps) * w_y;
  const A rkl_c = rkl ? lse_t - lse_q + kd / (Ta * Ta) : A(0);
  const int64_t hot = (ce_on && have_y) ? tgt : -1;
  const bool p_on = cp != A(0) || bad;

  // Gradient at label v before the softcap factor (zc = softcapped logit, tv = teacher logit).
  auto grad_at = [&](int64_t v, A zc, A tv) -> A {
    A gv = A(0);
    if (p_on) gv += cp * ex(zc - lse);
    if (cpt != A(0)) gv += cpt * ex(zc * it - lse_t);
    if (eps_on) gv -= ceps * (w != nullptr ? static_cast<A>(__ldg(w + v)) : A(1));
    if (kl_full) gv -= c_kd * ex(tv * it - lse_q);
    if (rkl) {
      const A u = zc * it;
      gv += c_kd * weighted(ex(u - lse_t), (u - tv * it) - rkl_c);
    }
    if (jsd) {
      const A lp = zc * it - lse_t;
      const A p = ex(lp), q = ex(tv * it - lse_q);
      const A lm = lg(beta * q + (A(1) - beta) * p);
      gv += c_kd * weighted(p, lp - lm - kl_pm);
    }
    if (mass_on && bit_at(words, v)) gv -= c_mass * ex(zc - lse_a);
    if (post_on) gv -= c_post * ex(rule_score(v, zc, tv) - lse_r);
    if (v == hot) gv -= c_hot;
    return gv;
  };

  sweep<S, true>(x, t, g, V, [&](int64_t v, A z, A tv) -> A {
    const A zc = zc_of(z);
    A gv = grad_at(v, zc, tv);
    if (has_cap) gv *= softcap_grad_factor(zc, inv_cap);
    return gv;
  });
  if (topk) {
    __syncthreads();  // the dense values of the top-k labels are written: overwrite them
    for (int64_t j = tid; j < k; j += nt) {
      const int32_t v = sidx[j];
      if (v < 0) continue;
      const A zc = szc[j];
      A gv = grad_at(v, zc, A(0)) - c_kd * su[j];
      if (has_cap) gv *= softcap_grad_factor(zc, inv_cap);
      g[v] = E::store(gv);
    }
  }
}

template <typename S>
int launch(const KceParams& p, cudaStream_t stream) {
  using A = typename Elem<S>::A;
  const int64_t V = p.vocab;
  const int threads = V >= 32768 ? 512 : V >= 4096 ? 256 : 128;
  const int64_t k = p.topk_idx != nullptr ? p.k : 0;
  const size_t smem = static_cast<size_t>(((k * 4 + 15) / 16) * 16 + 2 * k * static_cast<int64_t>(sizeof(A)));
#if defined(VFM_CUDA_EMULATION)
  (void)stream;
  return vfm_emu::launch(p.n_rows, 1, vfm_emu::block_threads(threads), smem, [&] { kce_kernel<S>(p); });
#else
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kce_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  kce_kernel<S><<<static_cast<unsigned>(p.n_rows), threads, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
#endif
}

}  // namespace

int kce_forward_launch(const KceParams& p, void* stream) {
  if (p.n_rows == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kF32: return launch<float>(p, s);
    case kF64: return launch<double>(p, s);
    case kF16: return launch<__half>(p, s);
    case kBF16: return launch<__nv_bfloat16>(p, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace vfm_cuda
