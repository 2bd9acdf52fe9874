// CPU kernel of vfm_C::kce_forward, the knowledge cross-entropy op (contract:
// vfm/ops/kce_reference.py; maths: csrc/common/kce_math.h): kce_row, one row of the loss, and its
// per-ISA clones.  Params / Scratch and the build options: csrc/cpu/kce_cpu.h; conversions, chunk
// loads / stores: kce_io.h; chunk reductions, online logsumexp: kce_lse.h; argument checks, the
// OpenMP driver over the rows and the op registration: kce_forward_cpu.cpp.
//
// Design
// ------
// * One OpenMP task per row.  A row is swept in chunks of kChunk labels.  Logits that need work
//   (softcap, fp16/bf16 -> float) are converted into a small float (double for float64 logits)
//   buffer that lives in L1; fp32 logits and teachers are read in place.  Every quantity the loss
//   needs is then a simple branch-free loop over the chunk, which gcc vectorises with the
//   polynomial exp/log of kce_math.h; 1/T is applied inline (x * (1/T) - shift is one FMA).
//   Branches on the options are per chunk, never per element.
// * Pass 1 reads the logits (and teacher) once and keeps online (running-max) logsumexp states
//   with weighted sums: lse(zc), lse(zc/T), lse(t/T) with the KL sum, lse over the allowed set,
//   lse of the rule posterior with its KL sum, and sum_v w_v zc_v for label smoothing.  At T = 2,
//   lse(zc) and lse(zc/2) share one exp (exp(zc - 2m) = exp(zc/2 - m)^2), in both passes.  JSD
//   needs the normalisers before it can sum, so it takes one extra (middle) pass.
// * The allowed set (packed bits) is expanded per chunk into a 0/1 buffer, 32 labels per word in a
//   fixed-count loop, and used only through blends.  The mass penalty's lse over the allowed set
//   reuses the exps of lse(zc) (same shift) while the allowed max is within 60 of that shift (else
//   it takes its own shift), and in pass 2 its term joins the p term as a per-label coefficient.
// * Pass 2, only when a gradient is wanted, computes each element's gradient once and writes it
//   once, in the logits' dtype; sparse corrections (the CE one-hot, the top-k teacher) are applied
//   to the chunk before it is stored.  The pass reads element v before writing element v, so
//   `grad` may alias `logits` (inplace_backward); the only entries read after the row is
//   overwritten (zc at the target and at the top-k indices) are gathered before pass 2.
// * The hot row functions are compiled three times (target_clones: x86-64-v4 = AVX-512,
//   x86-64-v3 = AVX2 + FMA, baseline) and the dynamic loader picks the best for the running CPU.
// * No ATen operator runs in the hot path; the two small outputs are allocated with at::empty
//   (kce_forward_cpu.cpp).
// * A fresh gradient tensor is asked to be backed by transparent huge pages (advise_huge_pages,
//   kce_forward_cpu.cpp).
#include "cpu/kce_cpu.h"  // first: the floating-point options (#pragma GCC optimize), VFM_CLONES
#include "cpu/kce_io.h"
#include "cpu/kce_lse.h"

namespace vfm_cpu {

// ---------------------------------------------------------------------------------------------
// one row
// ---------------------------------------------------------------------------------------------

// Notation: x = zc (softcapped logits) and t (teacher logits) are chunk pointers in A; u = x / T
// and t / T are formed inline.  lse = logsumexp(x), lse_t = logsumexp(x / T),
// lse_q = logsumexp(t / T), lse_a = logsumexp over the allowed set, lse_r = logsumexp(s_rule).
template <typename A>
VFM_INLINE void kce_row(const Params& P, int64_t i, Scratch& scratch) {
  const int64_t V = P.vocab;
  const double T = P.temp;
  const bool t_is_1 = T == 1.0;
  const A it = static_cast<A>(1.0 / T);
  const double sc = P.use_ce ? P.scales[0 * P.scales_rs + i * P.scales_cs] : 0.0;
  const double sk = P.kd_mode != KD_NONE ? P.scales[1 * P.scales_rs + i * P.scales_cs] : 0.0;
  const double sp = P.pen_mode != PEN_NONE ? P.scales[2 * P.scales_rs + i * P.scales_cs] : 0.0;
  const double sz = P.use_z ? P.scales[3 * P.scales_rs + i * P.scales_cs] : 0.0;
  const int64_t tgt = P.target[i * P.target_s];
  const int32_t gid = P.allowed != nullptr ? P.group_ids[i * P.group_s] : -1;
  const int32_t* words = gid >= 0 ? P.allowed + gid * P.allowed_rs : nullptr;

  // "target counted, row constrained, target outside the allowed set" (independent of scales).
  const double outside = (words != nullptr && tgt != P.ignore_index && !allowed_bit(words, tgt)) ? 1.0 : 0.0;

  const bool ce_on = sc != 0.0;
  const bool z_on = sz != 0.0;
  const bool mass_on = sp != 0.0 && words != nullptr && P.pen_mode == PEN_MASS;
  const bool post_on = sp != 0.0 && words != nullptr && P.pen_mode == PEN_POSTERIOR;
  const bool full_teacher = P.teacher != nullptr;
  bool kd_on = sk != 0.0;

  // Top-k teacher: qT = softmax over the valid entries of logprob / T (in double: k is small).
  int64_t kv = 0;
  double lse_u = 0.0;
  if (kd_on && !full_teacher) {
    double m = neg_inf<double>();
    for (int64_t j = 0; j < P.k; ++j) {
      const int64_t v = P.topk_idx[i * P.topk_idx_rs + j * P.topk_idx_cs];
      if (v < 0) continue;
      scratch.idx[kv] = v;
      scratch.u[kv] = static_cast<double>(P.topk_lp[i * P.topk_lp_rs + j * P.topk_lp_cs]) / T;
      m = std::max(m, scratch.u[kv]);
      ++kv;
    }
    if (kv == 0) {
      kd_on = false;  // a row without teacher entries has no KD term
    } else {
      double s = 0.0;
      for (int64_t j = 0; j < kv; ++j) s += std::exp(scratch.u[j] - m);
      lse_u = m + std::log(s);
      for (int64_t j = 0; j < kv; ++j) scratch.q[j] = std::exp(scratch.u[j] - lse_u);
    }
  }

  if (!(ce_on || z_on || mass_on || post_on || kd_on)) {  // the row counts for nothing
    write_row_outputs(P, i, {0.0, 0.0, 0.0, 0.0}, outside);
    if (P.grad != nullptr)
      std::memset(static_cast<char*>(P.grad) + i * P.grad_rs * elem_size(P.logits_dt), 0,
                  static_cast<size_t>(V * elem_size(P.logits_dt)));
    return;
  }

  const int kd_mode = kd_on ? P.kd_mode : KD_NONE;
  const bool kd_full = kd_mode != KD_NONE && full_teacher;
  const bool kl_full = kd_full && kd_mode == KD_KL;
  const bool need_lse = ce_on || z_on || mass_on;
  const bool need_lse_t = kd_on || post_on;
  const bool fuse_t2 = T == 2.0 && need_lse && need_lse_t;  // one exp for both (lse_chunk_t2)
  const bool run_p = need_lse && !(t_is_1 && need_lse_t) && !fuse_t2;  // at T = 1, lse_t is lse
  const bool need_t = kd_full || (post_on && full_teacher);
  const bool need_mask = mass_on || post_on;
  const bool eps_on = ce_on && P.eps != 0.0;
  const bool post_inf = std::isinf(P.rule_c);
  const A rule_c = post_inf ? A(0) : static_cast<A>(P.rule_c);
  const A ninf = neg_inf<A>();

  alignas(64) A xbuf[kChunk], tbuf[kChunk], abuf[kChunk], mbuf[kChunk], gbuf[kChunk];

  // abuf = s_rule of the posterior penalty, s - C (1 - 1_A) or s restricted to A (C = inf), with
  // s = t / T (full teacher) or x / T.
  auto rule_scores = [&](const A* x, const A* t, int n) {
    const A* s = full_teacher ? t : x;
    if (post_inf) {
#pragma omp simd
      for (int j = 0; j < n; ++j) abuf[j] = mbuf[j] != A(0) ? s[j] * it : ninf;
    } else {
#pragma omp simd
      for (int j = 0; j < n; ++j) abuf[j] = s[j] * it - rule_c * (A(1) - mbuf[j]);
    }
  };
  // mbuf[j] = bit c0 + j of the row's allowed set, as A(0) / A(1).  c0 is a multiple of 32 and
  // kChunk of 32, so every word is expanded whole (32 fixed-count lanes: a broadcast, a variable
  // shift, an and and a convert, which gcc vectorises); the lanes past n are never read.
  auto expand_mask = [&](int64_t c0, int n) {
    const int32_t* wp = words + (c0 >> 5);
    const int nw = (n + 31) >> 5;
    for (int b = 0; b < nw; ++b) {
      const uint32_t word = static_cast<uint32_t>(wp[b]);
      A* dst = mbuf + 32 * b;
#pragma omp simd
      for (int j = 0; j < 32; ++j) dst[j] = static_cast<A>(static_cast<int32_t>((word >> j) & 1u));
    }
  };

  // ---- pass 1: statistics -------------------------------------------------------------------
  OnlineLSE acc_p, acc_t, acc_q, acc_a, acc_r;
  double sum_wz = 0.0;
  const A* no = nullptr;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, V - c0));
    const A* x = load_logits<A>(P, i, c0, n, xbuf, true);
    const A* t = need_t ? load_teacher<A>(P, i, c0, n, tbuf) : nullptr;
    if (need_mask) expand_mask(c0, n);
    const A* rkl_b = kd_mode == KD_REVERSE_KL ? t : nullptr;
    if (fuse_t2) {
      lse_chunk_t2(acc_t, acc_p, x, rkl_b, n);
    } else {
      // The allowed-set sum shares the exps of lse(zc): in acc_p, or at T = 1 in acc_t.
      if (run_p) lse_chunk(acc_p, x, A(1), no, A(1), n, mass_on ? &acc_a : nullptr, mbuf);
      if (need_lse_t) lse_chunk(acc_t, x, it, rkl_b, it, n, (mass_on && !run_p) ? &acc_a : nullptr, mbuf);
    }
    if (kd_full) lse_chunk(acc_q, t, it, kd_mode == KD_KL ? x : nullptr, it, n);
    if (mass_on && fuse_t2) lse_chunk_masked(acc_a, x, mbuf, masked_max(x, mbuf, n), n);
    if (post_on) {
      rule_scores(x, t, n);
      lse_chunk(acc_r, static_cast<const A*>(abuf), A(1), x, it, n);
    }
    if (eps_on) {
      A s = 0;
      if (P.weight != nullptr) {
        const float* w = P.weight + c0;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < n; ++j) s += static_cast<A>(w[j]) * x[j];
      } else {
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < n; ++j) s += x[j];
      }
      sum_wz += static_cast<double>(s);
    }
  }

  const double lse_t = need_lse_t ? acc_t.lse() : 0.0;
  double lse = (run_p || fuse_t2) ? acc_p.lse() : lse_t;  // at T = 1 (or when unused): lse_t
  // A +inf logit: logsumexp is +inf, as torch.logsumexp gives (the online sums hold
  // exp(inf - inf) = NaN).  CE, the z-loss and the mass penalty then give +inf as the reference
  // does, not NaN.  (A row holding NaN as well as +inf gives +inf here where torch gives NaN.)
  if (need_lse && ((run_p || fuse_t2) ? acc_p.m : acc_t.m) == std::numeric_limits<double>::infinity()) {
    lse = std::numeric_limits<double>::infinity();
  }
  const double lse_q = kd_full ? acc_q.lse() : 0.0;
  const double lse_a = mass_on ? acc_a.lse() : 0.0;
  const double lse_r = post_on ? acc_r.lse() : 0.0;

  // zc at the sparse positions, read before pass 2 may overwrite the row (in-place gradient).
  auto zc_at = [&](int64_t v) -> double {
    A one;
    return static_cast<double>(load_logits<A>(P, i, v, 1, &one, false)[0]);
  };

  double ce = 0.0, kd = 0.0, pen = 0.0, w_y = 1.0;
  if (ce_on) {
    w_y = P.weight != nullptr ? static_cast<double>(P.weight[tgt]) : 1.0;
    ce = ce_row(lse, zc_at(tgt), w_y, P.eps, static_cast<double>(V), P.sum_w, sum_wz);
  }
  if (mass_on) pen = lse - lse_a;
  if (post_on) pen = T * T * posterior_row(acc_r.mean_w(), lse_r, lse_t);
  if (kl_full) kd = T * T * kl_row(acc_q.mean_w(), lse_t, lse_q);
  if (kd_mode == KD_REVERSE_KL) kd = T * T * reverse_kl_row(acc_t.mean_w(), lse_t, lse_q);
  if (kd_mode == KD_KL && !full_teacher) {
    double s = 0.0;
    for (int64_t j = 0; j < kv; ++j)
      s += weighted(scratch.q[j], scratch.u[j] - lse_u - zc_at(scratch.idx[j]) / T + lse_t);
    kd = T * T * s;
  }

  const A beta = static_cast<A>(P.beta);
  const A lse_tA = static_cast<A>(lse_t), lse_qA = static_cast<A>(lse_q);
  double kl_pm = 0.0;
  if (kd_mode == KD_JSD) {  // middle pass: KL(qT || m) and KL(pT || m), m = b qT + (1 - b) pT
    double kl_qm = 0.0;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int n = static_cast<int>(std::min<int64_t>(kChunk, V - c0));
      const A* x = load_logits<A>(P, i, c0, n, xbuf, true);
      const A* t = load_teacher<A>(P, i, c0, n, tbuf);
      A s_q = 0, s_p = 0;
#pragma omp simd reduction(+ : s_q, s_p)
      for (int j = 0; j < n; ++j) {
        const A lp = x[j] * it - lse_tA, lq = t[j] * it - lse_qA;
        const A p = exp_nonpos(lp), q = exp_nonpos(lq);
        const A lm = log_approx(beta * q + (A(1) - beta) * p);
        s_q += weighted(q, lq - lm);
        s_p += weighted(p, lp - lm);
      }
      kl_qm += static_cast<double>(s_q);
      kl_pm += static_cast<double>(s_p);
    }
    kd = T * T * (P.beta * kl_qm + (1.0 - P.beta) * kl_pm);
  }

  write_row_outputs(P, i, {ce_on ? sc * ce : 0.0, kd_on ? sk * kd : 0.0, (mass_on || post_on) ? sp * pen : 0.0,
                           z_on ? sz * lse * lse : 0.0},
                    outside);
  if (P.grad == nullptr) return;

  // ---- pass 2: gradient -----------------------------------------------------------------------
  // g = cp p + cpt pT - ceps w - (teacher, allowed-set and rule terms) - (one-hot, top-k), then
  // times the softcap factor.  p and pT terms are merged where they share an exp.
  double cp = 0.0, cpt = 0.0;
  if (ce_on) cp += sc * ((1.0 - P.eps) * w_y + P.eps / static_cast<double>(V) * P.sum_w);
  if (z_on) cp += 2.0 * sz * lse;
  if (mass_on) cp += sp;
  if (kd_mode == KD_KL) cpt += sk * T;
  if (post_on) cpt += sp * T;
  if (t_is_1) {
    cp += cpt;
    cpt = 0.0;
  }
  const A cpA = static_cast<A>(cp), cptA = static_cast<A>(cpt);
  const A lseA = static_cast<A>(lse), lse_aA = static_cast<A>(lse_a), lse_rA = static_cast<A>(lse_r);
  // fuse_t2: p = e^2 and pT = e * exp(lse / 2 - lse_t) with e = exp(x / 2 - lse / 2).
  const A half_lseA = static_cast<A>(0.5 * lse);
  const A cpt2A = static_cast<A>(fuse_t2 ? cpt * std::exp(0.5 * lse - lse_t) : 0.0);
  const A ceps = eps_on ? static_cast<A>(sc * P.eps / static_cast<double>(V)) : A(0);
  const A c_kd = static_cast<A>(kd_mode == KD_JSD ? sk * T * (1.0 - P.beta) : sk * T);
  const A c_post = static_cast<A>(sp * T);
  const A c_mass = static_cast<A>(sp);
  const A c_hot = static_cast<A>(sc * (1.0 - P.eps) * w_y);
  // reverse KL: log pT - log qT - KL(pT || qT) = (x - t) / T - (lse_t - lse_q + KL).
  const A rkl_c = static_cast<A>(lse_t - lse_q + (kd_mode == KD_REVERSE_KL ? kd / (T * T) : 0.0));
  const A kl_pmA = static_cast<A>(kl_pm);
  const bool has_cap = P.cap > 0.0;
  const A inv_cap = has_cap ? static_cast<A>(1.0 / P.cap) : A(0);
  // Mass penalty: p_A = p * exp(lse - lse_a) on A, so its term joins the p term with a per-label
  // coefficient (a blend): cp - sp exp(lse - lse_a) on A, cp elsewhere.  Only where that factor is
  // moderate (p flushes to 0 below e^-88, so a p_A below e^-88 * e^20 is dropped, as noise next to
  // float rounding); otherwise (and when lse - lse_a is inf or NaN) the separate loop below.
  const double pen_gap = mass_on ? lse - lse_a : 0.0;
  const bool mass_fused = mass_on && !fuse_t2 && pen_gap <= 20.0;
  const A cp_allowedA = static_cast<A>(mass_fused ? cp - sp * std::exp(pen_gap) : cp);

  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, V - c0));
    const A* x = load_logits<A>(P, i, c0, n, xbuf, !P.inplace);  // in place: x must not be g
    const A* t = need_t ? load_teacher<A>(P, i, c0, n, tbuf) : nullptr;
    A* g = direct_grad<A>(P, i, c0);
    const bool direct = g != nullptr;
    if (!direct) g = gbuf;
    if (need_mask) expand_mask(c0, n);

    // student terms (and, in the common KL case, the teacher term in the same loop)
    bool kl_done = false;
    if (fuse_t2 && kl_full) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A e = exp_nonpos(x[j] * A(0.5) - half_lseA);
        g[j] = (cpA * e + cpt2A) * e - c_kd * exp_nonpos(t[j] * A(0.5) - lse_qA);
      }
      kl_done = true;
    } else if (fuse_t2) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A e = exp_nonpos(x[j] * A(0.5) - half_lseA);
        g[j] = (cpA * e + cpt2A) * e;
      }
    } else if (mass_fused && cpt != 0.0) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A c = mbuf[j] != A(0) ? cp_allowedA : cpA;
        g[j] = c * exp_nonpos(x[j] - lseA) + cptA * exp_nonpos(x[j] * it - lse_tA);
      }
    } else if (mass_fused) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = (mbuf[j] != A(0) ? cp_allowedA : cpA) * exp_nonpos(x[j] - lseA);
    } else if (cpt != 0.0 && cp != 0.0) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = cpA * exp_nonpos(x[j] - lseA) + cptA * exp_nonpos(x[j] * it - lse_tA);
    } else if (cpt != 0.0) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = cptA * exp_nonpos(x[j] * it - lse_tA);
    } else if (cp != 0.0) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = cpA * exp_nonpos(x[j] - lseA);
    } else {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] = A(0);
    }
    if (eps_on) {
      if (P.weight != nullptr) {
        const float* w = P.weight + c0;
#pragma omp simd
        for (int j = 0; j < n; ++j) g[j] -= ceps * static_cast<A>(w[j]);
      } else {
#pragma omp simd
        for (int j = 0; j < n; ++j) g[j] -= ceps;
      }
    }
    if (kl_full && !kl_done) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] -= c_kd * exp_nonpos(t[j] * it - lse_qA);
    } else if (kd_mode == KD_REVERSE_KL) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A u = x[j] * it;
        g[j] += c_kd * weighted(exp_nonpos(u - lse_tA), (u - t[j] * it) - rkl_c);
      }
    } else if (kd_mode == KD_JSD) {
#pragma omp simd
      for (int j = 0; j < n; ++j) {
        const A lp = x[j] * it - lse_tA;
        const A p = exp_nonpos(lp), q = exp_nonpos(t[j] * it - lse_qA);
        const A lm = log_approx(beta * q + (A(1) - beta) * p);
        g[j] += c_kd * weighted(p, lp - lm - kl_pmA);
      }
    }
    if (mass_on && !mass_fused) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] -= mbuf[j] != A(0) ? c_mass * exp_approx(x[j] - lse_aA) : A(0);
    }
    if (post_on) {
      rule_scores(x, t, n);
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] -= c_post * exp_nonpos(abuf[j] - lse_rA);
    }
    // Sparse corrections, before the softcap factor so each element is written once.
    if (ce_on && tgt >= c0 && tgt < c0 + n) g[tgt - c0] -= c_hot;
    if (kd_on && !full_teacher) {
      for (int64_t j = 0; j < kv; ++j) {
        const int64_t v = scratch.idx[j];
        if (v >= c0 && v < c0 + n) g[v - c0] -= c_kd * static_cast<A>(scratch.q[j]);
      }
    }
    if (has_cap) {
#pragma omp simd
      for (int j = 0; j < n; ++j) g[j] *= softcap_grad_factor(x[j], inv_cap);
    }
    if (!direct) store_grad<A>(P, i, c0, n, g);
  }
}

// The cloned entry points (one per accumulation type).
VFM_CLONES void kce_row_f32(const Params& P, int64_t i, Scratch& s) { kce_row<float>(P, i, s); }
VFM_CLONES void kce_row_f64(const Params& P, int64_t i, Scratch& s) { kce_row<double>(P, i, s); }

}  // namespace vfm_cpu
