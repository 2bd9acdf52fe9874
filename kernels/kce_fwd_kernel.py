"""The main knowledge cross-entropy Triton kernel (one program per row); see
:mod:`vfm.kernels.knowledge_ce` for its design and launcher."""

from __future__ import annotations

import triton
import triton.language as tl

from vfm.kernels.kce_common import (
    _allowed_at,
    _allowed_block,
    _ipow,
    _kce_grad,
    _lane_merge,
    _lane_step,
    _rsum,
    _softcap,
    _words_block,
)


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
