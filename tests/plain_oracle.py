"""An independent oracle for knowledge_cross_entropy: plain torch functions + autograd, float64.

It shares no code with vfm: CE comes from ``F.cross_entropy``, distillation from ``F.kl_div`` and
``log_softmax``, the penalties from ``logsumexp`` over masked logits, and every gradient from
autograd.  Tests compare each backend with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kl_rows(log_a, log_b):
    """KL(a || b) per row from log-probabilities (0 log 0 = 0)."""
    terms = F.kl_div(log_b, log_a, log_target=True, reduction="none")
    return torch.where(torch.isneginf(log_a), torch.zeros_like(terms), terms).sum(-1)


def plain_knowledge_ce(logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                       z_loss=0.0, softcap=None, ce_weight=1.0, teacher_logits=None, teacher_topk=None,
                       temperature=1.0, kd_weight=0.0, kd="kl", jsd_beta=0.5, allowed=None, penalty_weight=0.0,
                       penalty="mass", rule_strength=None, soft_mask=None, num_items_in_batch=None,
                       return_terms=False):
    """Differentiable float64 loss (autograd gives the gradient); same options as vfm's."""
    vocab = logits.shape[-1]
    lead = target.shape
    z = logits.reshape(-1, vocab).double()
    tgt = target.reshape(-1).long()
    n_rows = z.shape[0]
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = tgt != ignore_index
    soft = soft_mask.reshape(-1) if soft_mask is not None else valid
    w = weight.double() if weight is not None else None
    temp = float(temperature)

    ce = F.cross_entropy(z, tgt, weight=w, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    ce = torch.where(valid, ce, torch.zeros_like(ce))
    zero = torch.zeros(n_rows, dtype=torch.float64)
    kd_rows = zero
    log_pt = F.log_softmax(z / temp, dim=-1)
    teacher = None
    if teacher_logits is not None:
        teacher = teacher_logits.reshape(-1, vocab).double()
    if kd_weight != 0.0:
        if teacher is not None:
            log_qt = F.log_softmax(teacher / temp, dim=-1)
            if kd == "kl":
                kd_rows = _kl_rows(log_qt, log_pt)
            elif kd == "reverse_kl":
                kd_rows = _kl_rows(log_pt, log_qt)
            else:
                b = jsd_beta
                log_m = torch.logsumexp(torch.stack([log_qt + math.log(b), log_pt + math.log(1 - b)]), dim=0)
                kd_rows = b * _kl_rows(log_qt, log_m) + (1 - b) * _kl_rows(log_pt, log_m)
            kd_rows = temp * temp * kd_rows
        else:
            idx, lp = teacher_topk
            idx = idx.reshape(n_rows, -1).long()
            lp = lp.reshape(n_rows, -1).double()
            ok = idx >= 0
            u = torch.where(ok, lp / temp, torch.full_like(lp, -math.inf))
            log_q = u - torch.logsumexp(u, dim=-1, keepdim=True)
            q = torch.where(ok, log_q.exp(), torch.zeros_like(log_q))
            log_p_at = log_pt.gather(1, idx.clamp_min(0))
            terms = torch.where(ok, q * (torch.where(ok, log_q, torch.zeros_like(log_q)) - log_p_at),
                                torch.zeros_like(q))
            kd_rows = temp * temp * terms.sum(-1)
            kd_rows = torch.where(ok.any(-1), kd_rows, torch.zeros_like(kd_rows))

    pen_rows = zero
    n_outside = torch.zeros((), dtype=torch.long)
    if allowed is not None:
        if isinstance(allowed, torch.Tensor):
            mask = allowed.reshape(n_rows, vocab)
            constrained = torch.ones(n_rows, dtype=torch.bool)
        else:
            gm, gid = allowed
            gid = gid.reshape(-1).long()
            constrained = gid >= 0
            mask = gm[gid.clamp_min(0)]
        count = mask.sum(-1)
        constrained = constrained & (count > 0) & (count < vocab)
        safe_t = torch.where(valid, tgt, torch.zeros_like(tgt))
        outside_rows = valid & constrained & ~mask.gather(1, safe_t[:, None])[:, 0]
        n_outside = outside_rows.sum()
        if penalty_weight != 0.0:
            neg = torch.full_like(z, -math.inf)
            if penalty == "mass":
                pen = torch.logsumexp(z, -1) - torch.logsumexp(torch.where(mask, z, neg), -1)
            else:
                s = (teacher if teacher is not None else z.detach()) / temp
                if rule_strength is None:
                    s = torch.where(mask, s, neg)
                else:
                    s = s - rule_strength * (~mask).double()
                log_r = F.log_softmax(s, dim=-1).detach()
                pen = temp * temp * _kl_rows(log_r, log_pt)
            pen_rows = torch.where(constrained, pen, torch.zeros_like(pen))

    lse = torch.logsumexp(z, -1)
    z_rows = lse * lse

    def on(mask_rows, rows):
        return torch.where(mask_rows, rows, torch.zeros_like(rows))

    ce_rows = ce_weight * on(valid, ce)
    kd_rows = kd_weight * on(soft, kd_rows) if kd_weight != 0.0 else zero
    pen_rows = penalty_weight * on(soft, pen_rows) if penalty_weight != 0.0 else zero
    z_rows = z_loss * on(soft, z_rows) if z_loss != 0.0 else zero
    if reduction == "mean":
        if num_items_in_batch is not None:
            d_ce = d_soft = torch.as_tensor(float(num_items_in_batch), dtype=torch.float64)
        else:
            safe_t = torch.where(valid, tgt, torch.zeros_like(tgt))
            d_ce = (w[safe_t] * valid).sum() if w is not None else valid.sum().double()
            d_soft = soft.sum().double()
        inv_ce = 1.0 / d_ce if float(d_ce) > 0 else 0.0
        inv_soft = 1.0 / d_soft if float(d_soft) > 0 else 0.0
        terms = (ce_rows.sum() * inv_ce, kd_rows.sum() * inv_soft, pen_rows.sum() * inv_soft, z_rows.sum() * inv_soft)
    elif reduction == "sum":
        terms = (ce_rows.sum(), kd_rows.sum(), pen_rows.sum(), z_rows.sum())
    else:
        terms = tuple(r.reshape(lead) for r in (ce_rows, kd_rows, pen_rows, z_rows))
    loss = terms[0] + terms[1] + terms[2] + terms[3]
    if return_terms:
        return loss, terms, n_outside
    return loss
