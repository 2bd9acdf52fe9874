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
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from vfm.kernels.kce_common import _LOG2E, _config, _int_power, _interpreting, triton_supports
from vfm.kernels.kce_fwd_kernel import _kce_fwd_kernel
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

__all__ = ["kce_forward_triton", "triton_supports", "_interpreting"]

# The kernel compares KD_MODE / PEN_MODE with these literal values.
assert (KD_KL, KD_REVERSE_KL, KD_JSD, PEN_MASS, PEN_POSTERIOR) == (1, 2, 3, 1, 2)


# ---------------------------------------------------------------------------- launcher --

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
