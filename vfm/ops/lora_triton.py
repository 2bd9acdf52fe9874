"""Triton backend of the low-rank adapter ops: ``lora_linear``, ``dora_linear``, ``adalora_linear``
and ``lora_linear_multi``.

Each ``*_TRITON`` constant is a :class:`~vfm.ops.lora_reference.LowRankKernels` pair with exactly
the normalised signatures and semantics of the reference (whose module docstring is the contract).
The dense base products stay in cuBLAS (``F.linear`` / ``torch.mm``, any weight layout); the
low-rank branch runs in the kernels of :mod:`vfm.kernels.lora`, which never add a full-size pass:

* forward: xa = D(x) A^T by the *shrink* kernel (x read once, dropout mask regenerated from the
  hash, x cast to the adapter dtype on load); then, with one dtype, y = b + scale * xa B^T (a small
  cuBLAS GEMM) into which the base GEMM accumulates in place (``addmm_``: cuBLAS reads it as C), or
  (``VFM_LORA_BASE_ACCUMULATES=0``) the base output first and ``y.addmm_(xa, B^T)``; with an
  adapter dtype different from x's, the *expand* kernel adds the fp32 low-rank term into y;
* backward: grad_x = grad_y W (cuBLAS) plus the dropout-masked ``gxa A`` (written by the *expand*
  kernel, then accumulated into by the cuBLAS GEMM; or added after it); grad_A = gxa^T D(x) by the
  *reduce* kernel (fp32 accumulation, D(x) never materialised); grad_B = grad_y^T xa (cuBLAS, or
  the reduce kernel when grad_y must be cast); grad of the bias and of W (only when asked) by torch.

Without dropout and with one dtype everywhere every product is a cuBLAS call with no extra copy.
``lora_linear_multi`` groups the rows by adapter once per call (:mod:`vfm.kernels.lora_multi`) and
runs the segmented forms of the same kernels (one program per (row tile of one adapter, output
tile)); its backward is grouped the same way; no Python loop over adapters or rows, no host
synchronisation.  AdaLoRA folds lora_e into A and the device-side factor scale / (ranknum + eps)
into B (no host synchronisation), then runs the LoRA path; masked ranks are zero rows of the folded
A and cost nothing beyond the rank padding (r is padded to 16 for ``tl.dot``; ranks are not
compacted, which would need a host synchronisation).  DoRA follows the reference's maths: its
per-column gain g = magnitude / ||W + scale B A|| is applied in the expand kernel's epilogue
(y = g * (x W^T) + b + g * scale * xa B^T), the weight norm is one pass over W
(:mod:`vfm.kernels.lora_dora`).  Without dropout the magnitude's gradient comes from the output
(column sums of grad_y * y, minus the bias's share; no GEMM), and the columns of a zero magnitude,
which the output says nothing about, get the defining sum from a kernel that computes it for them
only (one program per column, the others return at once: no host synchronisation to find them).
With dropout, or when y was changed in place after the forward, the low-rank term and the column
sums are fused after one extra GEMM; under dropout PEFT's extra base pass needs D(x) materialised
(one Triton pass) for the cuBLAS product u W^T.

x of dtype float64 is refused at backend selection (vfm.ops.lora_ops).  Adapters in float64 on a
float32 / half base run the reference's maths inside this backend (the kernels take fp32 / fp16 /
bf16 only).  Triton is imported on first use, never when vfm is imported.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.ops.knowledge_ce import triton_missing_reason
from vfm.ops.lora_reference import (
    ADALORA_EPS,
    LowRankKernels,
    adalora_backward_torch,
    adalora_forward_torch,
    dora_backward_torch,
    dora_magnitude_grad_from_output,
    dora_forward_torch,
    dora_weight_norm,
    lora_backward_torch,
    lora_forward_torch,
    lora_multi_backward_torch,
    lora_multi_forward_torch,
)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_triton(device: torch.device) -> Optional[str]:
    """Registry check: None when the Triton low-rank kernels can run on ``device``.

    CUDA tensors with triton installed; CPU tensors only under ``TRITON_INTERPRET=1`` (the
    registry never picks the interpreter by itself: CPU preference is cpp, then torch).
    """
    return triton_missing_reason(device)


def _k():
    from vfm.kernels import lora

    return lora


def _kd():
    from vfm.kernels import lora_dora

    return lora_dora


def _transposed(t: Tensor):
    """Strides (k, row, col) that read a 2-D factor as its transpose (one adapter)."""
    return 0, t.stride(1), t.stride(0)


def _stack_transposed(t: Tensor):
    """Strides (k, row, col) that read each matrix of a (K, m, n) stack as its transpose."""
    return t.stride(0), t.stride(2), t.stride(1)


# ------------------------------------------------------------------------------- LoRA --
def _shrink_or_mm(x: Tensor, a: Tensor, drop) -> Tensor:
    """xa = D(cast(x)) A^T: cuBLAS when there is neither dropout nor a cast, else the shrink kernel."""
    if not drop.active and x.dtype == a.dtype:
        return torch.mm(x, a.t())
    return _k().shrink(x, a, x.new_empty((x.shape[0], a.shape[0]), dtype=a.dtype), drop=drop)


def _grad_low(grad_y: Tensor, b: Tensor, scale) -> Tensor:
    """gxa = scale * cast(grad_y) B (N, r) in the adapter dtype, without a cast copy of grad_y."""
    if grad_y.dtype == b.dtype:
        return torch.mm(grad_y, b).mul_(scale)
    out = grad_y.new_empty((grad_y.shape[0], b.shape[1]), dtype=b.dtype)
    return _k().shrink(grad_y, b, out, a_strides=_transposed(b), alpha=scale)


def _base_accumulates() -> bool:
    """Whether the base GEMM accumulates into the low-rank term (``VFM_LORA_BASE_ACCUMULATES``, default 1).

    1: the small low-rank product is written first and the base GEMM adds into it (cuBLAS reads it
    as C in its epilogue), saving one read of the (N, out) / (N, in) result; 0: the base GEMM first,
    then the low-rank term added into its output (one read and one write more).  Both round the
    same two terms once each; the switch is for benchmarking on a GPU.
    """
    return os.environ.get("VFM_LORA_BASE_ACCUMULATES", "1").strip() != "0"


def _add_low_input_grad(gx: Tensor, gxa: Tensor, a: Tensor, drop) -> Tensor:
    """gx += D(gxa A) in gx's storage (one accumulating GEMM without dropout or cast)."""
    if not drop.active and gx.dtype == gxa.dtype:
        return gx.addmm_(gxa, a)
    return _k().expand(gx, gxa, a, b_strides=_transposed(a), drop=drop)


def _input_grad(grad_y: Tensor, weight: Tensor, gxa: Tensor, a: Tensor, drop) -> Tensor:
    """grad_y W + D(gxa A) in the base dtype."""
    if grad_y.dtype != gxa.dtype or not _base_accumulates():
        return _add_low_input_grad(torch.mm(grad_y, weight), gxa, a, drop)
    if drop.active:  # D(gxa A) written (not read) by the expand kernel, then the base GEMM adds into it
        low = grad_y.new_empty((grad_y.shape[0], a.shape[1]))
        _k().expand(low, gxa, a, b_strides=_transposed(a), drop=drop, load_y=False)
    else:
        low = torch.mm(gxa, a)
    return low.addmm_(grad_y, weight)


def _grad_a(gxa: Tensor, x: Tensor, drop) -> Tensor:
    """gxa^T D(cast(x)) (r, in): cuBLAS without dropout or cast, else the reduce kernel."""
    if not drop.active and x.dtype == gxa.dtype:
        return torch.mm(gxa.t(), x)
    return _k().reduce_rows(gxa, x, drop=drop)[0]


def _grad_b(grad_y: Tensor, xa: Tensor, scale) -> Tensor:
    """scale * cast(grad_y)^T xa (out, r)."""
    if grad_y.dtype == xa.dtype:
        return torch.mm(grad_y.t(), xa).mul_(scale)
    return _k().reduce_rows(xa, grad_y, alpha=scale, transpose=True)[0]


def lora_forward_triton(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    if lora_a.dtype not in KERNEL_DTYPES:
        return lora_forward_torch(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    drop = _k().dropout_args(dropout_p, seed)
    xa = _shrink_or_mm(x, lora_a, drop)
    if x.dtype == lora_b.dtype and _base_accumulates():
        if bias is not None:
            y = torch.addmm(bias, xa, lora_b.t(), alpha=scale)
        else:
            y = x.new_empty((x.shape[0], weight.shape[0]))
            y.addmm_(xa, lora_b.t(), beta=0.0, alpha=scale)  # beta 0: y's uninitialised content is ignored
        return y.addmm_(x, weight.t()), xa
    y = F.linear(x, weight, bias)
    if y.dtype == lora_b.dtype:
        y.addmm_(xa, lora_b.t(), alpha=scale)
    else:
        _k().expand(y, xa, lora_b, alpha=scale)
    return y, xa


def lora_backward_triton(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs):
    if lora_a.dtype not in KERNEL_DTYPES:
        return lora_backward_torch(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs)
    need_x, need_w, need_bias, need_a, need_b = needs
    drop = _k().dropout_args(dropout_p, seed)
    gxa = _grad_low(grad_y, lora_b, scale) if (need_x or need_a) else None
    gx = _input_grad(grad_y, weight, gxa, lora_a, drop) if need_x else None
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    ga = _grad_a(gxa, x, drop) if need_a else None
    gb = _grad_b(grad_y, xa, scale) if need_b else None
    return gx, gw, gbias, ga, gb


# ---------------------------------------------------------------------------- AdaLoRA --
def _adalora_fold(lora_a, lora_e, lora_b, scale, ranknum):
    """(A * E, B * scale / (ranknum + eps)): the factor stays on the device (no synchronisation)."""
    factor = (ranknum + ADALORA_EPS).reciprocal().mul_(scale).to(lora_b.dtype)
    return lora_a * lora_e[:, None], lora_b * factor


def adalora_forward_triton(x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed):
    if lora_a.dtype not in KERNEL_DTYPES:
        return adalora_forward_torch(x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed)
    a_eff, b_eff = _adalora_fold(lora_a, lora_e, lora_b, scale, ranknum)
    return lora_forward_triton(x, weight, bias, a_eff, b_eff, 1.0, dropout_p, seed)


def adalora_backward_triton(grad_y, x, weight, lora_a, lora_e, lora_b, ranknum, xa, scale, dropout_p, seed, needs):
    if lora_a.dtype not in KERNEL_DTYPES:
        return adalora_backward_torch(grad_y, x, weight, lora_a, lora_e, lora_b, ranknum, xa, scale, dropout_p,
                                      seed, needs)
    need_x, need_w, need_bias, need_a, need_e, need_b = needs
    a_eff, b_eff = _adalora_fold(lora_a, lora_e, lora_b, scale, ranknum)
    gx, gw, gbias, g_aeff, gb = lora_backward_triton(grad_y, x, weight, a_eff, b_eff, xa, 1.0, dropout_p, seed,
                                                      (need_x, need_w, need_bias, need_a or need_e, need_b))
    if need_b:  # grad wrt B of (B * factor) is factor * grad wrt the folded B
        gb = gb.mul_((ranknum + ADALORA_EPS).reciprocal().mul_(scale).to(gb.dtype))
    ga = g_aeff * lora_e[:, None] if need_a else None
    ge = (g_aeff * lora_a).sum(1) if need_e else None
    return gx, gw, gbias, ga, ge, gb


# ------------------------------------------------------------------------------- DoRA --
def dora_forward_triton(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed):
    if lora_a.dtype not in KERNEL_DTYPES:
        return dora_forward_torch(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed)
    k = _k()
    drop = k.dropout_args(dropout_p, seed)
    adt = lora_a.dtype
    wn = _kd().dora_weight_norm(weight, lora_a, lora_b, scale) if weight.dtype in KERNEL_DTYPES else \
        dora_weight_norm(weight, lora_a, lora_b, scale)
    g = magnitude / wn
    if not drop.active:
        xa = _shrink_or_mm(x, lora_a, drop)
        y = F.linear(x, weight)
        k.expand(y, xa, lora_b, alpha=scale, lmul=g, ymul=g, bias=bias)  # g*(xW^T) + b + g*scale*xa B^T
        return y, xa, wn
    u = k.dropout_apply(x, adt, drop)  # PEFT's extra base pass needs D(x) itself
    xa = torch.mm(u, lora_a.t())
    y = F.linear(x, weight, bias)
    base = F.linear(u, weight.to(adt))
    k.expand(y, xa, lora_b, alpha=scale, lmul=g, z=base, zmul=g - 1)
    return y, xa, wn


def dora_backward_triton(grad_y, x, weight, lora_a, lora_b, magnitude, xa, wn, scale, dropout_p, seed, needs,
                         y=None, bias=None):
    if lora_a.dtype not in KERNEL_DTYPES:
        return dora_backward_torch(grad_y, x, weight, lora_a, lora_b, magnitude, xa, wn, scale, dropout_p, seed,
                                   needs)
    need_x, need_w, need_bias, need_a, need_b, need_m = needs
    # y given (no dropout): grad_magnitude from the output, not from the extra GEMM x W^T below; the
    # columns of a zero magnitude (if any: no host sync to find out) get the defining sum from a kernel
    # that computes it for those columns only
    gm = dora_magnitude_grad_from_output(grad_y, y, magnitude, bias, zero_ok=True) \
        if need_m and dropout_p <= 0.0 else None
    if gm is not None:
        gm = _kd().dora_zero_magnitude_grad_(gm.contiguous(), magnitude.contiguous(), grad_y, x, weight, xa, lora_b,
                                             scale, wn)
    k = _k()
    drop = k.dropout_args(dropout_p, seed)
    adt = lora_a.dtype
    g = magnitude / wn
    u = k.dropout_apply(x, adt, drop) if drop.active and (need_a or (need_m and gm is None) or need_w) else None
    gxa = _grad_low(grad_y, lora_b * g[:, None], scale) if (need_x or need_a) else None  # scale * (gy*g) B
    gx = gw = None
    if drop.active:
        if need_x:
            gx = torch.mm(grad_y, weight)
            low = torch.mm(grad_y.to(adt), weight.to(adt) * (g - 1)[:, None])  # (gy * (g - 1)) W
            k.expand(gx, gxa, lora_a, b_strides=_transposed(lora_a), z=low, drop=drop)
        if need_w:
            gw = torch.mm(grad_y.t(), x)
            gw.add_(torch.mm(grad_y.to(adt).t(), u).mul_((g - 1)[:, None]))
    else:
        if need_x:
            gx = _add_low_input_grad(torch.mm(grad_y, (weight * g[:, None]).to(weight.dtype)), gxa, lora_a, drop)
        if need_w:
            gw = torch.mm(grad_y.t(), x).mul_(g[:, None])
    gbias = grad_y.sum(0) if need_bias else None
    ga = _grad_a(gxa, x, drop) if need_a else None
    gb = _grad_b(grad_y, xa, scale).mul_(g[:, None]) if need_b else None
    if need_m and gm is None:  # the extra GEMM u W^T; the low-rank term and the column sums are fused in one kernel
        h = F.linear(u if u is not None else x.to(adt), weight.to(adt))
        gm = _kd().dora_magnitude_grad(grad_y, h, xa, lora_b, scale, wn)
    return gx, gw, gbias, ga, gb, gm


# ---------------------------------------------------------------------- multi-adapter --
def _segments(adapter_ids: Tensor, n_adapters: int):
    from vfm.kernels.lora_multi import segment_rows

    return segment_rows(adapter_ids, n_adapters)


def lora_multi_forward_triton(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed):
    if a_stack.dtype not in KERNEL_DTYPES:
        return lora_multi_forward_torch(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed)
    k = _k()
    drop = k.dropout_args(dropout_p, seed)
    segs = _segments(adapter_ids, a_stack.shape[0])
    xa = x.new_zeros((x.shape[0], a_stack.shape[1]), dtype=a_stack.dtype)  # rows with id -1 stay 0
    k.shrink(x, a_stack, xa, drop=drop, segments=segs)
    y = F.linear(x, weight, bias)
    k.expand(y, xa, b_stack, alphas=scalings, segments=segs)
    return y, xa


def lora_multi_backward_triton(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p, seed,
                               needs):
    if a_stack.dtype not in KERNEL_DTYPES:
        return lora_multi_backward_torch(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p,
                                         seed, needs)
    need_x, need_w, need_bias, need_a, need_b = needs
    k = _k()
    drop = k.dropout_args(dropout_p, seed)
    n_adapters = a_stack.shape[0]
    segs = _segments(adapter_ids, n_adapters)
    gxa = None
    if need_x or need_a:  # rows with id -1 are never read
        gxa = grad_y.new_empty((grad_y.shape[0], a_stack.shape[1]), dtype=a_stack.dtype)
        k.shrink(grad_y, b_stack, gxa, a_strides=_stack_transposed(b_stack), alphas=scalings, segments=segs)
    gx = None
    if need_x:
        gx = torch.mm(grad_y, weight)
        k.expand(gx, gxa, a_stack, b_strides=_stack_transposed(a_stack), drop=drop, segments=segs)
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    ga = k.reduce_rows(gxa, x, n_adapters, drop=drop, segments=segs) if need_a else None
    gb = k.reduce_rows(xa, grad_y, n_adapters, alphas=scalings, segments=segs, transpose=True) if need_b else None
    return gx, gw, gbias, ga, gb


LORA_TRITON = LowRankKernels(lora_forward_triton, lora_backward_triton)
DORA_TRITON = LowRankKernels(dora_forward_triton, dora_backward_triton)
ADALORA_TRITON = LowRankKernels(adalora_forward_triton, adalora_backward_triton)
LORA_MULTI_TRITON = LowRankKernels(lora_multi_forward_triton, lora_multi_backward_triton)
