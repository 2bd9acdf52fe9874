"""Pure-PyTorch reference backend of the knowledge cross-entropy op.

This module is also the *kernel contract*: every backend (``cpp``, ``triton``, ``cuda``)
implements :func:`kce_forward_torch`'s signature and returns the same numbers.  The public
function (:func:`vfm.functional.knowledge_cross_entropy`) validates the user's arguments and turns
them into this normalised form:

Args:
    logits: (N, V) float tensor, ``stride(1) == 1``; any row stride.
    target: (N,) int64. Rows whose CE scale is zero are never gathered (target may be
        ``ignore_index`` there).
    weight: (V,) float32 class weights, or None (all ones).
    teacher: (N, V) float tensor with ``stride(1) == 1``, or None.
    topk_idx: (N, k) int64 teacher indices (-1 = padding), or None.
    topk_lp: (N, k) float32 teacher log-probabilities, or None.
    allowed_bits: (G, W) int32, W = ceil(V / 32); bit ``v % 32`` of word ``v // 32`` of group g
        says whether label v is allowed; or None.
    group_ids: (N,) int32 group of each row; -1 = unconstrained (the Python layer already maps
        groups that allow every label, or none, to -1).
    scales: (4, N) float32 per-row multipliers of the CE, KD, penalty and z-loss terms; they fold in
        ce_weight / kd_weight / penalty_weight / z_loss, the reduction's denominators and the row
        masks (0 = the row does not count for that term; a zero-scale term is skipped, not
        multiplied, so NaN in an uncounted row never leaks).
    grad: (N, V) tensor in the logits' dtype (``stride(1) == 1``; it may be ``logits`` itself for
        ``inplace_backward``), or None when no gradient is wanted. The backend writes
        d(row_loss_i)/d(logits_i) into it, every element of every row (zeros for rows that count
        for nothing).
    cfg: :class:`KCEConfig` of scalar options.

Returns:
    (row_loss (N,), parts (5, N)), float32 (float64 allowed for float64 logits): parts rows are the scaled CE, KD, penalty and
    z-loss terms and the 0/1 flag "target is counted, row is constrained and target is outside
    the allowed set"; row_loss = parts[0] + parts[1] + parts[2] + parts[3].

Per row, with zc = softcap * tanh(z / softcap) (or z), lse = logsumexp(zc), p = softmax(zc),
pT = softmax(zc / T), qT = softmax(teacher / T):

* CE   = (1 - eps) * w[y] * (lse - zc[y]) + eps / V * sum_v w[v] * (lse - zc[v])
  grad = (1 - eps) * w[y] * (p - onehot(y)) + eps / V * (sum(w) * p - w)
* KD   kl: T^2 KL(qT || pT), grad T (pT - qT); reverse_kl: T^2 KL(pT || qT),
  grad T pT (log pT - log qT - KL(pT||qT)); jsd with m = b qT + (1-b) pT:
  T^2 (b KL(qT||m) + (1-b) KL(pT||m)), grad T (1-b) pT (log(pT/m) - KL(pT||m)).
  Top-k teacher (kl only): qT = softmax over the row's valid entries of logprob / T, zero
  elsewhere; a row without valid entries has KD = 0 and no KD gradient.
* mass penalty (T = 1): lse - logsumexp_{v in A} zc, grad p - p_A (p_A = softmax over A).
* posterior penalty: r = softmax(s - C (1 - 1_A)), s = teacher / T if a full teacher is given,
  else stopgrad(zc) / T; C = inf restricts s to A. Term T^2 KL(r || pT), grad T (pT - r).
* z-loss: lse^2, grad 2 lse p.
The gradient with respect to z is the gradient with respect to zc times 1 - (zc / softcap)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

KD_NONE, KD_KL, KD_REVERSE_KL, KD_JSD = 0, 1, 2, 3
PEN_NONE, PEN_MASS, PEN_POSTERIOR = 0, 1, 2
KD_MODES = {"kl": KD_KL, "reverse_kl": KD_REVERSE_KL, "jsd": KD_JSD}
PEN_MODES = {"mass": PEN_MASS, "posterior": PEN_POSTERIOR}


@dataclass(frozen=True)
class KCEConfig:
    """Scalar options of the normalised op (see the module docstring).

    Attributes:
        ignore_index: target value of rows that do not count for CE.
        label_smoothing: eps in [0, 1].
        softcap: c > 0, or 0.0 for no softcap.
        temperature: T > 0 of KD and of the posterior penalty.
        kd_mode: KD_NONE / KD_KL / KD_REVERSE_KL / KD_JSD (KD_NONE when there is no KD term).
        jsd_beta: b in (0, 1).
        pen_mode: PEN_NONE / PEN_MASS / PEN_POSTERIOR (PEN_NONE when there is no penalty term).
        rule_strength: C >= 0, ``math.inf`` for a hard restriction to the allowed set.
        use_ce: whether the CE term is computed at all (ce_weight != 0).
        use_z: whether the z-loss term is computed at all (z_loss != 0).
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: float = 0.0
    temperature: float = 1.0
    kd_mode: int = KD_NONE
    jsd_beta: float = 0.5
    pen_mode: int = PEN_NONE
    rule_strength: float = math.inf
    use_ce: bool = True
    use_z: bool = False


def unpack_allowed_bits(bits: Tensor, num_labels: int) -> Tensor:
    """Unpack (G, W) int32 words into a (G, V) bool mask (little bit order within a word)."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.reshape(bits.shape[0], bits.shape[1] * 32)[:, :num_labels].bool()  # G may be 0


def pack_allowed_bits(mask: Tensor) -> Tensor:
    """Pack a (G, V) bool mask into (G, ceil(V/32)) int32 words (little bit order within a word).

    Contiguous CPU bool masks go to the native packer ``vfm_C::pack_bits`` when ``vfm._C`` is
    loaded (outside torch.compile tracing); everything else takes the pure-torch path, which
    gathers 8 labels at a time as one int64 and packs their bytes into a bit byte with one
    multiply (bit k of byte 0 lands at bit 56 + k; no carries), without an int64 per label.
    """
    groups, num_labels = mask.shape
    words = (num_labels + 31) // 32
    if (
        mask.device.type == "cpu"
        and mask.dtype == torch.bool
        and type(mask) is Tensor
        and mask.is_contiguous()
        and not torch.compiler.is_compiling()
    ):
        from vfm.ops.kce_cpp import cpp_available

        if cpp_available()[0]:
            try:
                op = torch.ops.vfm_C.pack_bits
            except (AttributeError, RuntimeError):  # an extension built before pack_bits existed
                op = None
            if op is not None:
                return op(mask)
    out = torch.zeros(groups, words, dtype=torch.int32, device=mask.device)
    if groups == 0 or num_labels == 0:
        return out
    nbytes = (num_labels + 7) // 8
    src = None
    if mask.dtype == torch.bool and num_labels % 8 == 0 and mask.stride(-1) == 1:
        try:
            src = mask.view(torch.int64)  # needs rows of 8-byte multiples at an aligned offset
        except RuntimeError:
            src = None
    if src is None:
        padded = torch.zeros(groups, nbytes * 8, dtype=torch.bool, device=mask.device)
        padded[:, :num_labels] = mask
        src = padded.view(torch.int64)
    # byte k of a little-endian int64 (label 8i + k, 0 or 1) times 0x0102040810204080 lands at
    # bit 56 + k; every other partial product lands elsewhere below bit 56 or above bit 63.
    # (In place after the one product: each fresh (G, V/8) int64 temporary costs a page-fault pass.)
    as_bytes = src * 0x0102040810204080
    as_bytes >>= 56
    as_bytes &= 0xFF
    # 4 little-endian bytes per word: byte j holds labels 32w + 8j .. 32w + 8j + 7.
    out.view(torch.uint8).view(groups, words * 4)[:, :nbytes].copy_(as_bytes)
    return out


def _times(weight: Tensor, value: Tensor) -> Tensor:
    """weight * value with 0 * anything = 0 (a zero probability contributes nothing)."""
    return torch.where(weight == 0, torch.zeros_like(weight), weight * value)


def _where_rows(cond: Tensor, value: Tensor) -> Tensor:
    return torch.where(cond, value, torch.zeros_like(value))


def kce_forward_torch(
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
    """Reference implementation of the normalised op; see the module docstring."""
    n_rows, vocab = logits.shape
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    dev = logits.device
    z = logits.to(ct)
    scales = scales.to(ct)
    if cfg.softcap > 0:
        zc = cfg.softcap * torch.tanh(z / cfg.softcap)
    else:
        zc = z
    lse = torch.logsumexp(zc, dim=-1)
    p = torch.exp(zc - lse[:, None])
    g_total = torch.zeros_like(zc) if grad is not None else None
    zero_rows = torch.zeros(n_rows, dtype=ct, device=dev)
    ce_row, kd_row, pen_row, z_row = zero_rows, zero_rows, zero_rows, zero_rows
    outside = torch.zeros(n_rows, dtype=ct, device=dev)
    temp = float(cfg.temperature)

    def add_grad(scale_row: Tensor, active: Tensor, g_term: Tensor) -> None:
        if g_total is not None:
            g_total.add_(_where_rows(active[:, None], scale_row[:, None] * g_term))

    # ---- cross-entropy -------------------------------------------------------------------
    if cfg.use_ce:
        sc = scales[0]
        active = sc != 0
        tgt = torch.where(active, target, torch.zeros_like(target)).long()
        w = weight.to(ct) if weight is not None else torch.ones(vocab, dtype=ct, device=dev)
        w_y = w[tgt]
        eps = float(cfg.label_smoothing)
        nll = w_y * (lse - zc.gather(1, tgt[:, None])[:, 0])
        smooth = (w[None, :] * (lse[:, None] - zc)).sum(-1)
        ce = (1 - eps) * nll + eps / vocab * smooth if eps != 0.0 else nll  # no 0 * inf for -inf logits
        ce_row = _where_rows(active, sc * ce)
        if g_total is not None:
            onehot = torch.zeros_like(zc).scatter_(1, tgt[:, None], 1.0)
            g_ce = (1 - eps) * w_y[:, None] * (p - onehot) + eps / vocab * (w.sum() * p - w[None, :])
            add_grad(sc, active, g_ce)

    # ---- distillation --------------------------------------------------------------------
    need_t = cfg.kd_mode != KD_NONE or cfg.pen_mode == PEN_POSTERIOR
    if need_t:
        log_pt = torch.log_softmax(zc / temp, dim=-1)
        p_t = torch.exp(log_pt)
    if cfg.kd_mode != KD_NONE:
        sk = scales[1]
        active = sk != 0
        if teacher is not None:
            log_qt = torch.log_softmax(teacher.to(ct) / temp, dim=-1)
            q_t = torch.exp(log_qt)
            has_teacher = torch.ones(n_rows, dtype=torch.bool, device=dev)
        else:
            valid = topk_idx >= 0
            u = torch.where(valid, topk_lp.to(ct) / temp, torch.full_like(topk_lp, -math.inf, dtype=ct))
            has_teacher = valid.any(-1)
            lse_u = torch.logsumexp(u, dim=-1)
            q_sparse = torch.where(valid, torch.exp(u - lse_u[:, None]), torch.zeros_like(u))
            q_t = torch.zeros_like(zc).scatter_add_(1, topk_idx.clamp_min(0), q_sparse)
            log_qt = torch.log(q_t)  # -inf off the teacher's support; q_t * log_qt uses xlogy
        active = active & has_teacher
        if cfg.kd_mode == KD_KL:
            kl = (torch.xlogy(q_t, q_t) - _times(q_t, log_pt)).sum(-1)
            kd = temp * temp * kl
            g_kd = temp * (p_t - q_t)
        elif cfg.kd_mode == KD_REVERSE_KL:
            diff = log_pt - log_qt  # NaN where both are -inf: p_t = 0 there, and so is the term
            kl = _times(p_t, diff).sum(-1)
            kd = temp * temp * kl
            g_kd = temp * _times(p_t, diff - kl[:, None])
        else:
            beta = float(cfg.jsd_beta)
            m = beta * q_t + (1 - beta) * p_t
            log_m = torch.log(m)
            kl_qm = (torch.xlogy(q_t, q_t) - _times(q_t, log_m)).sum(-1)
            kl_pm = _times(p_t, log_pt - log_m).sum(-1)  # -inf - -inf where p_t = q_t = 0
            kd = temp * temp * (beta * kl_qm + (1 - beta) * kl_pm)
            g_kd = temp * (1 - beta) * _times(p_t, log_pt - log_m - kl_pm[:, None])
        kd_row = _where_rows(active, sk * kd)
        add_grad(sk, active, g_kd)

    # ---- knowledge penalty ---------------------------------------------------------------
    if allowed_bits is not None:
        gid = group_ids.long()
        constrained = gid >= 0
        table = unpack_allowed_bits(allowed_bits, vocab)
        if table.shape[0] == 0:  # no groups: every row is unconstrained (group -1)
            table = torch.zeros(1, vocab, dtype=torch.bool, device=dev)
        allowed = table[gid.clamp_min(0)]
        counted = target != cfg.ignore_index
        tgt = torch.where(counted, target, torch.zeros_like(target)).long()
        in_a = allowed.gather(1, tgt[:, None])[:, 0]
        outside = (counted & constrained & ~in_a).to(ct)
        if cfg.pen_mode != PEN_NONE:
            sp = scales[2]
            active = (sp != 0) & constrained
            neg_inf = torch.full_like(zc, -math.inf)
            if cfg.pen_mode == PEN_MASS:
                zc_a = torch.where(allowed, zc, neg_inf)
                lse_a = torch.logsumexp(zc_a, dim=-1)
                pen = lse - lse_a
                g_pen = p - torch.exp(zc_a - lse_a[:, None])
            else:
                s = (teacher.to(ct) if teacher is not None else zc.detach()) / temp
                if math.isinf(cfg.rule_strength):
                    s_rule = torch.where(allowed, s, neg_inf)
                else:
                    s_rule = s - cfg.rule_strength * (~allowed).to(ct)
                log_r = torch.log_softmax(s_rule, dim=-1)
                r = torch.exp(log_r)
                pen = temp * temp * (torch.xlogy(r, r) - _times(r, log_pt)).sum(-1)
                g_pen = temp * (p_t - r)
            pen_row = _where_rows(active, sp * pen)
            add_grad(sp, active, g_pen)

    # ---- z-loss --------------------------------------------------------------------------
    if cfg.use_z:
        sz = scales[3]
        active = sz != 0
        z_row = _where_rows(active, sz * lse * lse)
        add_grad(sz, active, 2.0 * lse[:, None] * p)

    if grad is not None:
        if cfg.softcap > 0:
            # rows that count for nothing keep exact zeros even where their logits are NaN
            g_total = torch.where(g_total == 0, g_total, g_total * (1.0 - (zc / cfg.softcap) ** 2))
        grad.copy_(g_total)
    parts = torch.stack([ce_row, kd_row, pen_row, z_row, outside])
    row_loss = parts[:4].sum(0)
    return row_loss, parts
