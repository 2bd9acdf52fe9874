"""Triton backend of the knowledge cross-entropy op (``vfm::knowledge_cross_entropy``).

:func:`kce_forward_triton` has exactly the signature and semantics of
:func:`vfm.ops.kce_reference.kce_forward_torch` (whose module docstring is the contract): it returns
``(row_loss (N,) float32, parts (5, N) float32)`` and, when ``grad`` is given, writes
d(row_loss_i)/d(logits_i) into it (``grad`` may be the logits themselves: ``inplace_backward``).

Kernel design (one program per row, the vocabulary walked in ``BLOCK``-wide chunks, each chunk a
[BLOCK / 32, 32] tile so that one packed allowed word serves a tile row):

* Pass 1 reads the logits (and the teacher) once and keeps, per *lane* of the block, an online
  (running-max) log-sum-exp of every distribution the loss needs: zc (softcapped logits), zc / T,
  teacher / T, plus the KL sums of kl / reverse_kl, the posterior penalty's tilted teacher (or
  student) and the mass penalty's allowed-set sum, which share the running max of the
  distribution they re-weight (no extra exponential).  Lane-wise accumulators need no cross-thread
  reduction inside the loop; the lanes are merged once per row at the end.  One ``exp2`` per
  element per distribution: log2(e) is folded into the prescale of each input.
* Pass 2 (only when a gradient is wanted) recomputes the probabilities from the row statistics
  and stores the gradient once, cast to ``grad``'s dtype.  JSD needs KL(pT || m) in its gradient,
  so it has a middle pass (3 passes).  A top-k teacher's loss is computed over its k entries, its
  gradient's sparse part is written after the dense store (``tl.debug_barrier`` between them, same
  program) by recomputing the k full gradient values from logits gathered *before* pass 2 (so the
  in-place mode, which overwrites the logits, is safe).
* When the student's temperature is a small integer (T in 1..4) and both p and pT are needed,
  exp2(a) = exp2(a / T)^T: p costs a multiplication instead of an exponential in both passes.
* Terms whose per-row scale is 0 are skipped with ``tl.where`` (never multiplied), so NaN in a row
  that does not count for a term cannot leak; a row that counts for nothing is not read at all:
  loss 0 and a zero gradient row.  NaN in a counted row propagates.
* int64 row offsets (row * stride), int32 offsets inside a row; any row stride, last stride 1.
* Loads are software-pipelined by hand (``PREFETCH``: chunk i + 1 is loaded before chunk i is
  used, also in the in-place pass, where it reads addresses not yet written); the launch
  configuration is chosen per input set from H200 measurements (see :func:`_config`), no host
  synchronisation, no [N, V] temporary.

Enum values are hard-coded in the kernel: KD_MODE 1 = kl, 2 = reverse_kl, 3 = jsd; PEN_MODE
1 = mass, 2 = posterior (those of :mod:`vfm.ops.kce_reference`).

Numerical scope (documented deviations from the fp64-exact reference):

* Everything accumulates in fp32 whatever the input dtype; float64 inputs are not supported
  (:func:`triton_supports` says so; the launcher raises ``TypeError``).
* The mass penalty's allowed-set sum and the posterior penalty's tilted sum reuse the running max
  of their base distribution: they are exact while the allowed set holds more than ~2^-120 of the
  base probability (a penalty below ~80 nats); beyond that the penalty overflows to inf.
* ``q * log q`` is taken as 0 where q == 0, also where the student's logit is -inf (the reference
  returns NaN for 0 * -inf there).
* A row that counts for nothing gets an exact zero gradient row even with a softcap and NaN
  logits (the reference multiplies its zeros by the NaN softcap factor there).
* Top-k indices must be distinct within a row (the contract says so): the sparse fix-up writes
  each entry once.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from vfm.ops.kce_reference import (
    KD_JSD,
    KD_KL,
    KD_NONE,
    KD_REVERSE_KL,
    PEN_MASS,
    PEN_NONE,
    PEN_POSTERIOR,
    KCEConfig,
)

__all__ = ["kce_forward_triton", "triton_supports"]

# The kernel compares KD_MODE / PEN_MODE with these literal values.
assert (KD_KL, KD_REVERSE_KL, KD_JSD, PEN_MASS, PEN_POSTERIOR) == (1, 2, 3, 1, 2)

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- helpers --
@triton.jit
def _softcap(z, cap):
    """Return (cap * tanh(z / cap), tanh(z / cap)) in fp32 without tl.tanh (absent in some versions).

    tanh(x) = sign(x) (1 - e) / (1 + e) with e = 2^(-2 |x| log2 e) in (0, 1]: no overflow for any x,
    +-inf map to +-1, NaN stays NaN.  For |x| < 1/4 the (1 - e) cancellation would cost ~1e-5
    relative accuracy, so an odd Taylor polynomial (error < 2e-8 there) is used instead.
    """
    x = z / cap
    ax = tl.abs(x)
    e = tl.exp2(-2.8853900817779268 * ax)
    th_big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    th_small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                           + x2 * (-0.05396825396825397
                                                                   + x2 * 0.021869488536155203))))
    th = tl.where(ax < 0.25, th_small, th_big)
    th = tl.where(x < 0, -th, th)
    return cap * th, th


@triton.jit
def _ipow(x, P: tl.constexpr):
    """x ** P for a small constexpr integer P (1..4) by multiplications."""
    if P == 1:
        r = x
    elif P == 2:
        r = x * x
    elif P == 3:
        r = x * x * x
    else:
        x2 = x * x
        r = x2 * x2
    return r


@triton.jit
def _lane_step(x, m):
    """One online-logsumexp step per lane (base 2), with one exp2 per element.

    Returns (new running max, factor for the old sum, weight of x relative to the new max).
    -inf inputs weigh 0 (also when the lane has only seen -inf so far: -inf - -inf would be NaN);
    NaN inputs give a NaN weight, so NaN propagates into the sums.
    """
    gt = x > m
    e = tl.exp2(-tl.abs(x - m))
    e = tl.where(x == float("-inf"), 0.0, e)
    return tl.where(gt, x, m), tl.where(gt, e, 1.0), tl.where(gt, 1.0, e)


@triton.jit
def _lane_merge(m):
    """Row max of per-lane maxima (0 when every lane is -inf) and each lane's rescale factor."""
    mx = tl.max(tl.max(m, axis=1), axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx, tl.exp2(m - mx)


@triton.jit
def _rsum(x):
    """Sum of a [ROWS, 32] block."""
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _words_block(bits_row, start, rows, v_bits):
    """The allowed words of the [ROWS, 32] block of labels start + 32 r + c: one word per block
    row (a per-label gather would cost a 64-bit address and a load per element).  ``v_bits`` is V
    for a constrained row, 0 otherwise (nothing is read then)."""
    return tl.load(bits_row + (start >> 5) + rows, mask=start + rows * 32 < v_bits, other=0)


@triton.jit
def _allowed_block(word, start, rows, cols, v_bits):
    """Bit c of word r, broadcast along the block row: whether label start + 32 r + c is allowed."""
    bit = (word[:, None] >> cols[None, :]) & 1
    return (bit != 0) & (start + rows[:, None] * 32 + cols[None, :] < v_bits)


@triton.jit
def _allowed_at(bits_row, offs, msk):
    """Bit v % 32 of word v // 32: whether label v is in the row's allowed set (gathered loads)."""
    word = tl.load(bits_row + (offs >> 5), mask=msk, other=0)
    return ((word >> (offs & 31)) & 1) != 0


@triton.jit
def _kce_grad(
    zc, th, offs, msk, allowed, q, lq2, W_ptr, y,
    lse2, lseT2, t_scale2, fac_p, fac_a, fac_r, w_out,
    cp, cT, cy, cw, ca, cr, ck, kl_nat, beta,
    kd_on, pen_on,
    HAS_CE: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, KD_MODE: tl.constexpr,
    HAS_TEACHER: tl.constexpr, PEN_MODE: tl.constexpr, RULE_INF: tl.constexpr,
    NEED_P: tl.constexpr, NEED_T: tl.constexpr, T_POW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """d(row_loss)/dz at the labels ``offs`` (dense block, or the top-k fix-up), fp32.

    q / lq2: the teacher's qT and log2 qT at those labels (q = 0 on the dense pass of a top-k
    teacher).  The c* coefficients are already zero for inactive terms; every teacher-derived
    vector is additionally masked with ``tl.where`` so a NaN teacher of an inactive term stays out.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    g = tl.zeros_like(zc)
    if NEED_T:
        aT = zc * t_scale2
        pT = tl.exp2(aT - lseT2)
        g += cT * pT  # kl: T pT, posterior: T pT (their -T qT / -T r parts below)
    if NEED_P:
        if T_POW > 0:
            p = _ipow(pT, T_POW) * fac_p
        else:
            p = tl.exp2(zc * LOG2E - lse2)
        g += cp * p  # CE, z-loss, mass penalty
        if PEN_MODE == 1:
            g -= ca * tl.where(allowed, p * fac_a, 0.0)
    if HAS_CE:
        g -= tl.where(offs == y, cy, 0.0)
        if SMOOTH:
            if HAS_WEIGHT:
                g -= cw * tl.load(W_ptr + offs, mask=msk, other=0.0)
            else:
                g -= cw
    if KD_MODE == 1:
        g -= tl.where(kd_on, ck * q, 0.0)
    elif KD_MODE == 2:
        g += tl.where(kd_on, ck * pT * (((aT - lseT2) - lq2) * LN2 - kl_nat), 0.0)
    elif KD_MODE == 3:
        lm2 = tl.log2(beta * q + (1.0 - beta) * pT)
        g += tl.where(kd_on, (ck * (1.0 - beta)) * pT * (((aT - lseT2) - lm2) * LN2 - kl_nat), 0.0)
    if PEN_MODE == 2:
        if HAS_TEACHER:
            base = q
        else:
            base = pT
        if RULE_INF:
            r = tl.where(allowed, base, 0.0)
        else:
            r = tl.where(allowed, base, base * w_out)
        g -= tl.where(pen_on, cr * (r * fac_r), 0.0)
    if SOFTCAP:
        g = g * (1.0 - th * th)
    return g


# ------------------------------------------------------------------------------ kernel --
@triton.jit
def _kce_fwd_kernel(
    Z_ptr, z_stride, TE_ptr, te_stride, G_ptr, g_stride,
    Y_ptr, W_ptr, BITS_ptr, bits_stride, GID_ptr,
    TKI_ptr, tki_stride, TKL_ptr, tkl_stride, K,
    S_ptr, s_stride,
    LOSS_ptr, PARTS_ptr, N, V,
    ignore_index, eps, eps_over_v, cap, temp, t_scale2, beta, c_rule2, w_out,
    HAS_CE: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    KD_MODE: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TOPK: tl.constexpr,
    HAS_BITS: tl.constexpr, PEN_MODE: tl.constexpr, RULE_INF: tl.constexpr,
    HAS_Z: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GRAD: tl.constexpr,
    NEED_P: tl.constexpr, NEED_T: tl.constexpr, T_POW: tl.constexpr,
    BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr,
):
    """One program per row.  Pointers: Z logits (N, V), TE teacher (N, V), G gradient (N, V),
    Y target (N,) int64, W class weights (V,) fp32, BITS allowed words (G, W) int32, GID group of
    each row (N,) int32, TKI / TKL top-k indices int64 / log-probs (N, K), S scales (4, N) fp32,
    LOSS (N,) fp32 and PARTS (5, N) fp32 outputs.  Strides are row strides (last stride 1).
    t_scale2 = log2(e) / T (inputs prescaled to base 2), c_rule2 = C log2(e), w_out = exp(-C).
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at LLM sizes
    z_row = Z_ptr + row * z_stride
    te_row = TE_ptr + row * te_stride
    # Blocks are [ROWS, 32] (label start + 32 r + c): one allowed word per block row.
    ROWS: tl.constexpr = BLOCK // 32
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, 32)
    lane = rows[:, None] * 32 + cols[None, :]

    # ---- per-row flags and scales ---------------------------------------------------------
    y = tl.load(Y_ptr + row)
    yc = tl.where((y >= 0) & (y < V), y, 0).to(tl.int32)  # address safety only (validated above)
    # All four scales are always present; a term the kernel was not built for is off.
    sc = tl.load(S_ptr + row)
    sk = tl.load(S_ptr + s_stride + row)
    sp = tl.load(S_ptr + 2 * s_stride + row)
    sz = tl.load(S_ptr + 3 * s_stride + row)
    ce_on = (sc != 0.0) & HAS_CE
    kd_on = (sk != 0.0) & (KD_MODE != 0)
    pen_on = (sp != 0.0) & (PEN_MODE != 0)
    z_on = (sz != 0.0) & HAS_Z
    outside = 0.0
    bits_row = BITS_ptr
    if HAS_BITS:
        gid = tl.load(GID_ptr + row)
        constrained = gid >= 0
        bits_row = BITS_ptr + tl.where(constrained, gid, 0).to(tl.int64) * bits_stride
        counted = y != ignore_index
        y_word = tl.load(bits_row + (yc >> 5), mask=constrained, other=0)
        y_bit = (y_word >> (yc & 31)) & 1
        outside = tl.where(counted & constrained & (y_bit == 0), 1.0, 0.0)
        pen_on = pen_on & constrained
        v_bits = tl.where(constrained, V, 0)  # unconstrained rows read no allowed words
    if HAS_TOPK:
        kofs = tl.arange(0, K_BLOCK)
        kidx = tl.load(TKI_ptr + row * tki_stride + kofs, mask=kofs < K, other=-1)
        kval = (kofs < K) & (kidx >= 0) & (kidx < V)
        kidx = tl.where(kval, kidx, 0).to(tl.int32)
        kd_on = kd_on & (tl.max(kval.to(tl.int32), axis=0) > 0)  # no valid entry: KD = 0
    any_on = ce_on | kd_on | pen_on | z_on

    if any_on:
        # Everything read before the gradient overwrites the logits (in-place mode).
        zy = tl.load(z_row + yc).to(tl.float32)
        if SOFTCAP:
            zy, _thy = _softcap(zy, cap)
        w_y = 1.0
        if HAS_WEIGHT:
            w_y = tl.load(W_ptr + yc)
        if HAS_TOPK:
            klp = tl.load(TKL_ptr + row * tkl_stride + kofs, mask=kval, other=0.0).to(tl.float32)
            ku = tl.where(kval, klp * t_scale2, NEG_INF)
            kmx = tl.max(ku, axis=0)
            kmx = tl.where(kmx == NEG_INF, 0.0, kmx)
            ke = tl.exp2(ku - kmx)
            ksum = tl.sum(ke, axis=0)
            klse2 = kmx + tl.log2(ksum)
            kq = ke / ksum
            kz = tl.load(z_row + kidx, mask=kval, other=0.0).to(tl.float32)
            kth = kz
            if SOFTCAP:
                kz, kth = _softcap(kz, cap)

        # ---- pass 1: one read, lane-wise online log-sum-exps ---------------------------
        mT = tl.full([ROWS, 32], NEG_INF, tl.float32)  # running max of zc / T (base 2)
        sT = tl.zeros([ROWS, 32], tl.float32)
        mP = tl.full([ROWS, 32], NEG_INF, tl.float32)  # running max of zc (base 2) when T_POW == 0
        sP = tl.zeros([ROWS, 32], tl.float32)
        sA = tl.zeros([ROWS, 32], tl.float32)  # mass penalty: allowed part of sP
        mQ = tl.full([ROWS, 32], NEG_INF, tl.float32)  # teacher / T
        sQ = tl.zeros([ROWS, 32], tl.float32)
        aQ = tl.zeros([ROWS, 32], tl.float32)  # kl: sum q (tq - aT), relative to mQ
        aR = tl.zeros([ROWS, 32], tl.float32)  # reverse kl: sum pT (aT - tq), relative to mT
        sR = tl.zeros([ROWS, 32], tl.float32)  # posterior: tilted base sum
        aPo = tl.zeros([ROWS, 32], tl.float32)  # posterior: sum r (log r - aT)
        sW = tl.zeros([ROWS, 32], tl.float32)  # smoothing: sum w, sum w zc
        sWZ = tl.zeros([ROWS, 32], tl.float32)
        if PREFETCH:  # software pipelining by hand: block i + 1 is in flight while i is computed
            zn = tl.load(z_row + lane, mask=lane < V, other=0.0)
            if HAS_TEACHER:
                tn = tl.load(te_row + lane, mask=lane < V, other=float("-inf"))
            if HAS_BITS:
                wn = _words_block(bits_row, 0, rows, v_bits)
        for start in tl.range(0, V, BLOCK, num_stages=STAGES):
            offs = start + lane
            msk = offs < V
            if PREFETCH:
                zc = zn.to(tl.float32)
                zn = tl.load(z_row + offs + BLOCK, mask=offs + BLOCK < V, other=0.0)
                if HAS_TEACHER:
                    t = tn.to(tl.float32)
                    tn = tl.load(te_row + offs + BLOCK, mask=offs + BLOCK < V, other=float("-inf"))
                if HAS_BITS:
                    word = wn
                    wn = _words_block(bits_row, start + BLOCK, rows, v_bits)
            else:
                zc = tl.load(z_row + offs, mask=msk, other=0.0).to(tl.float32)
                if HAS_TEACHER:
                    t = tl.load(te_row + offs, mask=msk, other=float("-inf")).to(tl.float32)
                if HAS_BITS:
                    word = _words_block(bits_row, start, rows, v_bits)
            if SOFTCAP:
                zc, _th = _softcap(zc, cap)
            zc = tl.where(msk, zc, NEG_INF)
            allowed = msk
            if HAS_BITS:
                allowed = _allowed_block(word, start, rows, cols, v_bits)
            if NEED_T:
                aT = zc * t_scale2
                mT, soT, wxT = _lane_step(aT, mT)
                sT = sT * soT + wxT
            if NEED_P:
                if T_POW > 0:
                    soP = _ipow(soT, T_POW)
                    wxP = _ipow(wxT, T_POW)
                else:
                    mP, soP, wxP = _lane_step(zc * LOG2E, mP)
                sP = sP * soP + wxP
                if PEN_MODE == 1:
                    sA = sA * soP + tl.where(allowed, wxP, 0.0)
            if HAS_TEACHER:
                tq = t * t_scale2
                mQ, soQ, wxQ = _lane_step(tq, mQ)
                sQ = sQ * soQ + wxQ
                if KD_MODE == 1:
                    aQ = aQ * soQ + tl.where(wxQ == 0.0, 0.0, wxQ * (tq - aT))
            if KD_MODE == 2:
                aR = aR * soT + tl.where(wxT == 0.0, 0.0, wxT * (aT - tq))
            if PEN_MODE == 2:
                if HAS_TEACHER:
                    b = tq
                    sob = soQ
                    wxb = wxQ
                else:
                    b = aT
                    sob = soT
                    wxb = wxT
                if RULE_INF:
                    wr = tl.where(allowed, wxb, 0.0)
                    d = b - aT
                else:
                    wr = tl.where(allowed, wxb, wxb * w_out)
                    d = b - aT - tl.where(allowed, 0.0, c_rule2)
                sR = sR * sob + wr
                aPo = aPo * sob + tl.where(wr == 0.0, 0.0, wr * d)
            if SMOOTH:
                if HAS_WEIGHT:
                    w = tl.load(W_ptr + offs, mask=msk, other=0.0)
                    sW += w
                    sWZ += tl.where(msk, w * zc, 0.0)
                else:
                    sWZ += tl.where(msk, zc, 0.0)

        # ---- merge the lanes: row statistics (base-2 log-sum-exps) -----------------------
        lse2 = 0.0
        lseT2 = 0.0
        lseq2 = 0.0
        if NEED_T:
            MT, fT = _lane_merge(mT)
            lseT2 = MT + tl.log2(_rsum(sT * fT))
        if NEED_P:
            if T_POW > 0:
                MP = MT * T_POW
                fP = _ipow(fT, T_POW)
            else:
                MP, fP = _lane_merge(mP)
            lse2 = MP + tl.log2(_rsum(sP * fP))
        if HAS_TEACHER:
            MQ, fQ = _lane_merge(mQ)
            SQ = _rsum(sQ * fQ)
            lseq2 = MQ + tl.log2(SQ)
        lse = lse2 * LN2

        ce_part = 0.0
        kd_part = 0.0
        pen_part = 0.0
        z_part = 0.0
        cp = 0.0
        cT = 0.0
        cy = 0.0
        cw = 0.0
        ca = 0.0
        cr = 0.0
        fac_a = 0.0
        fac_r = 0.0
        fac_p = 1.0
        kl_nat = 0.0
        ck = sk * temp
        if NEED_P:
            if T_POW > 0:
                fac_p = tl.exp2(lseT2 * T_POW - lse2)
        if HAS_CE:
            sum_w = V * 1.0
            if HAS_WEIGHT:
                sum_w = _rsum(sW)
            ce = (1.0 - eps) * w_y * (lse - zy)
            if SMOOTH:
                ce += eps_over_v * (lse * sum_w - _rsum(sWZ))
            ce_part = tl.where(ce_on, sc * ce, 0.0)
            cp += tl.where(ce_on, sc * ((1.0 - eps) * w_y + eps_over_v * sum_w), 0.0)
            cy = tl.where(ce_on, sc * (1.0 - eps) * w_y, 0.0)
            cw = tl.where(ce_on, sc * eps_over_v, 0.0)
        if HAS_Z:
            z_part = tl.where(z_on, sz * lse * lse, 0.0)
            cp += tl.where(z_on, 2.0 * sz * lse, 0.0)
        if KD_MODE == 1:
            cT += tl.where(kd_on, ck, 0.0)
            if HAS_TOPK:
                kaT = kz * t_scale2
                kl2 = tl.sum(tl.where(kq == 0.0, 0.0, kq * ((ku - klse2) - (kaT - lseT2))), axis=0)
            else:
                kl2 = _rsum(aQ * fQ) / SQ - lseq2 + lseT2
            kd_part = tl.where(kd_on, sk * (temp * temp * LN2) * kl2, 0.0)
        elif KD_MODE == 2:
            kl_nat = (_rsum(aR * fT) / _rsum(sT * fT) - lseT2 + lseq2) * LN2
            kd_part = tl.where(kd_on, sk * (temp * temp) * kl_nat, 0.0)
        elif KD_MODE == 3:
            # ---- JSD middle pass: KL(qT || m) and KL(pT || m) need the normalised pT, qT ----
            kqm = tl.zeros([ROWS, 32], tl.float32)
            kpm = tl.zeros([ROWS, 32], tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + lane
                msk = offs < V
                zc = tl.load(z_row + offs, mask=msk, other=0.0).to(tl.float32)
                if SOFTCAP:
                    zc, _th = _softcap(zc, cap)
                zc = tl.where(msk, zc, NEG_INF)
                t = tl.load(te_row + offs, mask=msk, other=float("-inf")).to(tl.float32)
                lpT2 = zc * t_scale2 - lseT2
                lq2 = t * t_scale2 - lseq2
                pT = tl.exp2(lpT2)
                q = tl.exp2(lq2)
                lm2 = tl.log2(beta * q + (1.0 - beta) * pT)
                kqm += tl.where(q == 0.0, 0.0, q * (lq2 - lm2))
                kpm += tl.where(pT == 0.0, 0.0, pT * (lpT2 - lm2))
            kl_qm = _rsum(kqm) * LN2
            kl_nat = _rsum(kpm) * LN2
            kd_part = tl.where(kd_on, sk * (temp * temp) * (beta * kl_qm + (1.0 - beta) * kl_nat), 0.0)
        if PEN_MODE == 1:
            lseA2 = MP + tl.log2(_rsum(sA * fP))
            pen_part = tl.where(pen_on, sp * (lse2 - lseA2) * LN2, 0.0)
            cp += tl.where(pen_on, sp, 0.0)
            ca = tl.where(pen_on, sp, 0.0)
            fac_a = tl.where(pen_on, tl.exp2(lse2 - lseA2), 0.0)
        elif PEN_MODE == 2:
            if HAS_TEACHER:
                Mb = MQ
                fb = fQ
                lseb2 = lseq2
            else:
                Mb = MT
                fb = fT
                lseb2 = lseT2
            SR = _rsum(sR * fb)
            lser2 = Mb + tl.log2(SR)
            pen2 = _rsum(aPo * fb) / SR - lser2 + lseT2
            pen_part = tl.where(pen_on, sp * (temp * temp * LN2) * pen2, 0.0)
            cT += tl.where(pen_on, sp * temp, 0.0)
            cr = tl.where(pen_on, sp * temp, 0.0)
            fac_r = tl.where(pen_on, tl.exp2(lseb2 - lser2), 0.0)

        tl.store(PARTS_ptr + row, ce_part)
        tl.store(PARTS_ptr + N + row, kd_part)
        tl.store(PARTS_ptr + 2 * N + row, pen_part)
        tl.store(PARTS_ptr + 3 * N + row, z_part)
        tl.store(PARTS_ptr + 4 * N + row, outside)
        tl.store(LOSS_ptr + row, ((ce_part + kd_part) + pen_part) + z_part)

        # ---- pass 2: the gradient, stored once in grad's dtype ---------------------------
        if HAS_GRAD:
            g_row = G_ptr + row * g_stride
            if PREFETCH:
                zn = tl.load(z_row + lane, mask=lane < V, other=0.0)
                if HAS_TEACHER:
                    tn = tl.load(te_row + lane, mask=lane < V, other=float("-inf"))
                if HAS_BITS:
                    wn = _words_block(bits_row, 0, rows, v_bits)
            for start in tl.range(0, V, BLOCK, num_stages=STAGES):
                offs = start + lane
                msk = offs < V
                if PREFETCH:
                    # In place, block i + 1 is read before block i is written: other addresses.
                    zc = zn.to(tl.float32)
                    zn = tl.load(z_row + offs + BLOCK, mask=offs + BLOCK < V, other=0.0)
                    if HAS_TEACHER:
                        t = tn.to(tl.float32)
                        tn = tl.load(te_row + offs + BLOCK, mask=offs + BLOCK < V, other=float("-inf"))
                    if HAS_BITS:
                        word = wn
                        wn = _words_block(bits_row, start + BLOCK, rows, v_bits)
                else:
                    zc = tl.load(z_row + offs, mask=msk, other=0.0).to(tl.float32)
                    if HAS_TEACHER:
                        t = tl.load(te_row + offs, mask=msk, other=float("-inf")).to(tl.float32)
                    if HAS_BITS:
                        word = _words_block(bits_row, start, rows, v_bits)
                th = zc
                if SOFTCAP:
                    zc, th = _softcap(zc, cap)
                allowed = msk
                if HAS_BITS:
                    allowed = _allowed_block(word, start, rows, cols, v_bits)
                q = 0.0
                lq2 = 0.0
                if HAS_TEACHER:
                    lq2 = t * t_scale2 - lseq2
                    q = tl.exp2(lq2)
                g = _kce_grad(
                    zc, th, offs, msk, allowed, q, lq2, W_ptr, yc,
                    lse2, lseT2, t_scale2, fac_p, fac_a, fac_r, w_out,
                    cp, cT, cy, cw, ca, cr, ck, kl_nat, beta, kd_on, pen_on,
                    HAS_CE, HAS_WEIGHT, SMOOTH, KD_MODE, HAS_TEACHER, PEN_MODE, RULE_INF,
                    NEED_P, NEED_T, T_POW, SOFTCAP,
                )
                tl.store(g_row + offs, g.to(G_ptr.dtype.element_ty), mask=msk)
            if HAS_TOPK:
                # The k teacher entries: overwrite the dense values with the full gradient
                # (dense part - T qT).  Same program, other threads may own these addresses.
                tl.debug_barrier()
                kallowed = kval
                if HAS_BITS:
                    kallowed = _allowed_at(bits_row, kidx, kval & (kidx < v_bits))
                gk = _kce_grad(
                    kz, kth, kidx, kval, kallowed, kq, 0.0, W_ptr, yc,
                    lse2, lseT2, t_scale2, fac_p, fac_a, fac_r, w_out,
                    cp, cT, cy, cw, ca, cr, ck, kl_nat, beta, kd_on, pen_on,
                    HAS_CE, HAS_WEIGHT, SMOOTH, KD_MODE, HAS_TEACHER, PEN_MODE, RULE_INF,
                    NEED_P, NEED_T, T_POW, SOFTCAP,
                )
                tl.store(g_row + kidx, gk.to(G_ptr.dtype.element_ty), mask=kval)
    else:
        # The row counts for no term: loss 0, zero gradient, the logits are never read.
        tl.store(PARTS_ptr + row, 0.0)
        tl.store(PARTS_ptr + N + row, 0.0)
        tl.store(PARTS_ptr + 2 * N + row, 0.0)
        tl.store(PARTS_ptr + 3 * N + row, 0.0)
        tl.store(PARTS_ptr + 4 * N + row, outside)
        tl.store(LOSS_ptr + row, 0.0)
        if HAS_GRAD:
            g_row = G_ptr + row * g_stride
            zero = tl.zeros([ROWS, 32], tl.float32).to(G_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK):
                offs = start + lane
                tl.store(g_row + offs, zero, mask=offs < V)


# ---------------------------------------------------------------------------- launcher --
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_supports(
    logits: Tensor,
    teacher: Optional[Tensor] = None,
    topk_idx: Optional[Tensor] = None,
    grad: Optional[Tensor] = None,
    cfg: Optional[KCEConfig] = None,
) -> Optional[str]:
    """Why the Triton kernel cannot take these inputs, or None when it can.

    Unsupported: float64 (or other non fp32/fp16/bf16) logits, teacher or grad; a last-dim stride
    other than 1; a top-k teacher with a KD mode other than ``kl``; CPU tensors without
    ``TRITON_INTERPRET=1``.
    """
    for name, t in (("logits", logits), ("teacher", teacher), ("grad", grad)):
        if t is None:
            continue
        if t.dtype not in _SUPPORTED_DTYPES:
            return f"{name} is {t.dtype}; the triton kernels take float32, float16 or bfloat16"
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            return f"{name} must be 2-D with stride(1) == 1 (got shape {tuple(t.shape)}, strides {t.stride()})"
    if logits.device.type != "cuda" and not (logits.device.type == "cpu" and _interpreting()):
        return f"the triton kernels run on CUDA tensors (CPU only with TRITON_INTERPRET=1), got {logits.device}"
    if cfg is not None and topk_idx is not None and cfg.kd_mode not in (KD_NONE, KD_KL):
        return "a top-k teacher supports kd='kl' only"
    return None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _config(vocab: int, block: Optional[int], num_warps: Optional[int], prefetch: Optional[bool],
            stages: Optional[int], streams: int) -> Tuple[int, int, bool, int]:
    """Launch configuration: (BLOCK, num_warps, PREFETCH, STAGES).

    Every lane accumulator costs BLOCK / (32 num_warps) registers per thread, so the defaults keep
    4 to 8 elements per thread and several programs resident per SM.  Measured on an H200
    (N = 8192, V = 128256, bf16, triton 3.6, kernel alone, gradient included; 10% rows ignored):

    * logits alone: BLOCK 2048 / 8 warps, no prefetch: CE 1.44 ms (device copy 4.25 TB/s);
    * + teacher: BLOCK 1024 / 8 warps, hand prefetch: CE + KD(kl, T=2) 2.63 ms;
    * + allowed bits: BLOCK 512 / 4 warps, hand prefetch: CE + KD + mass 2.97 ms.

    Under the interpreter: BLOCK 1024, no prefetch.  ``VFM_KCE_BLOCK`` / ``VFM_KCE_WARPS`` /
    ``VFM_KCE_PREFETCH`` / ``VFM_KCE_STAGES`` override them (benchmarks).  No autotuning: it
    would rerun the in-place kernel on its own output.
    """
    interp = _interpreting()
    if block is None:
        if interp:
            default = 1024
        else:
            default = 2048 if streams == 1 else 1024 if streams == 2 else 512
        block = _env_int("VFM_KCE_BLOCK", default)
    block = max(32, min(triton.next_power_of_2(block), triton.next_power_of_2(vocab)))  # [BLOCK // 32, 32] tiles
    if num_warps is None:
        num_warps = _env_int("VFM_KCE_WARPS", 0) or max(1, min(8, block // 128))
    if prefetch is None:
        prefetch = bool(_env_int("VFM_KCE_PREFETCH", int(streams > 1 and not interp)))
    if stages is None:
        stages = _env_int("VFM_KCE_STAGES", 1)
    return block, num_warps, bool(prefetch), stages


def _int_power(temperature: float) -> int:
    """T when T is 1, 2, 3 or 4 exactly (then exp2(a) = exp2(a / T) ** T), else 0."""
    return int(temperature) if temperature in (1.0, 2.0, 3.0, 4.0) else 0


def kce_forward_triton(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    teacher: Optional[Tensor],
    topk_idx: Optional[Tensor],
    topk_lp: Optional[Tensor],
    allowed_bits: Optional[Tensor],
    group_ids: Optional[Tensor],
    scales: Tensor,
    grad: Optional[Tensor],
    cfg: KCEConfig,
) -> Tuple[Tensor, Tensor]:
    """Triton implementation of the normalised op; see :mod:`vfm.ops.kce_reference`.

    Args:
        logits: (N, V) fp32 / fp16 / bf16, ``stride(1) == 1``, any row stride.
        target: (N,) int64.
        weight: (V,) float32 class weights, or None.
        teacher: (N, V) fp32 / fp16 / bf16 teacher logits (any of them, independent of the
            logits' dtype), ``stride(1) == 1``, or None.
        topk_idx / topk_lp: (N, k) int64 indices (-1 = padding) / log-probabilities, or None.
        allowed_bits: (G, ceil(V / 32)) int32 packed allowed sets, or None.
        group_ids: (N,) int32 group of each row (-1 = unconstrained), with ``allowed_bits``.
        scales: (4, N) float32 per-row scales of CE, KD, penalty, z-loss.
        grad: (N, V) tensor (may be ``logits`` itself) that receives the gradient, or None.
        cfg: :class:`~vfm.ops.kce_reference.KCEConfig`.

    Returns:
        (row_loss (N,) float32, parts (5, N) float32).

    Raises:
        TypeError / ValueError: for inputs :func:`triton_supports` rejects.
    """
    return _kce_launch(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids,
                       scales, grad, cfg)


def _kce_launch(logits, target, weight, teacher, topk_idx, topk_lp, allowed_bits, group_ids, scales, grad,
                cfg: KCEConfig, block: Optional[int] = None, num_warps: Optional[int] = None,
                prefetch: Optional[bool] = None, stages: Optional[int] = None):
    why = triton_supports(logits, teacher, topk_idx, grad, cfg)
    if why is not None:
        err = TypeError if "float" in why or "bfloat" in why else ValueError
        raise err(f"knowledge_cross_entropy (triton backend): {why}")
    n_rows, vocab = logits.shape
    dev = logits.device
    row_loss = torch.empty(n_rows, dtype=torch.float32, device=dev)
    parts = torch.empty(5, n_rows, dtype=torch.float32, device=dev)
    if n_rows == 0:
        return row_loss, parts
    if teacher is not None and topk_idx is not None:
        raise ValueError("knowledge_cross_entropy (triton backend): give a full teacher or a top-k one, not both")

    kd_mode = int(cfg.kd_mode)
    has_topk = kd_mode == KD_KL and topk_idx is not None and teacher is None
    has_teacher = teacher is not None and (kd_mode != KD_NONE or cfg.pen_mode == PEN_POSTERIOR)
    if kd_mode != KD_NONE and not (has_teacher or has_topk):
        raise ValueError("knowledge_cross_entropy (triton backend): a KD term needs a teacher")
    has_bits = allowed_bits is not None
    pen_mode = int(cfg.pen_mode) if has_bits else PEN_NONE
    use_ce = bool(cfg.use_ce)
    eps = float(cfg.label_smoothing)
    smooth = use_ce and eps != 0.0
    has_weight = use_ce and weight is not None
    temp = float(cfg.temperature)
    need_t = kd_mode != KD_NONE or pen_mode == PEN_POSTERIOR
    need_p = use_ce or bool(cfg.use_z) or pen_mode == PEN_MASS
    t_pow = _int_power(temp) if (need_t and need_p) else 0
    rule = float(cfg.rule_strength)
    rule_inf = math.isinf(rule)
    softcap = float(cfg.softcap)

    target = target.contiguous()
    scales = scales.to(torch.float32).contiguous()
    dummy = logits
    w = weight.to(torch.float32).contiguous() if has_weight else dummy
    te = teacher if has_teacher else dummy
    if has_bits:
        bits = allowed_bits.to(torch.int32).contiguous()
        gids = group_ids.to(torch.int32).contiguous()
    else:
        bits, gids = dummy, dummy
    if has_topk:
        tki = topk_idx.to(torch.int64)
        tkl = topk_lp.to(torch.float32)
        if tki.stride(-1) != 1:
            tki = tki.contiguous()
        if tkl.stride(-1) != 1:
            tkl = tkl.contiguous()
        k = tki.shape[1]
    else:
        tki, tkl, k = dummy, dummy, 1
    g = grad if grad is not None else dummy
    streams = 1 + int(has_teacher) + int(has_bits)
    block, warps, prefetch, stages = _config(vocab, block, num_warps, prefetch, stages, streams)
    k_block = max(2, triton.next_power_of_2(max(k, 1)))

    _kce_fwd_kernel[(n_rows,)](
        logits, logits.stride(0), te, te.stride(0) if has_teacher else 0, g, g.stride(0) if grad is not None else 0,
        target, w, bits, bits.stride(0) if has_bits else 0, gids,
        tki, tki.stride(0) if has_topk else 0, tkl, tkl.stride(0) if has_topk else 0, k,
        scales, scales.stride(0),
        row_loss, parts, n_rows, vocab,
        int(cfg.ignore_index), eps, eps / vocab, softcap if softcap > 0 else 1.0, temp, _LOG2E / temp,
        float(cfg.jsd_beta), (rule * _LOG2E) if not rule_inf else 0.0, math.exp(-rule) if not rule_inf else 0.0,
        HAS_CE=use_ce, HAS_WEIGHT=has_weight, SMOOTH=smooth,
        KD_MODE=kd_mode, HAS_TEACHER=has_teacher, HAS_TOPK=has_topk,
        HAS_BITS=has_bits, PEN_MODE=pen_mode, RULE_INF=rule_inf,
        HAS_Z=bool(cfg.use_z), SOFTCAP=softcap > 0, HAS_GRAD=grad is not None,
        NEED_P=need_p, NEED_T=need_t, T_POW=t_pow,
        BLOCK=block, K_BLOCK=k_block, PREFETCH=prefetch, STAGES=stages,
        num_warps=warps,
    )
    return row_loss, parts
