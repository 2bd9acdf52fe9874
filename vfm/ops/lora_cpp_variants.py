"""C++ CPU backends of ``dora_linear``, ``adalora_linear`` and ``lora_linear_multi``.

Each is a :class:`~vfm.ops.lora_reference.LowRankKernels` pair with exactly the normalised
signatures and semantics of the matching ``*_TORCH`` pair of :mod:`vfm.ops.lora_reference` (whose
docstring is the contract).  As in :mod:`vfm.ops.lora_cpp`, (N, in) x (in, out) products run
through BLAS and everything that touches the dropout mask, or groups rows by adapter, runs in the
C++ kernels of ``csrc/cpu/lora_dropout.cpp`` (mask regenerated from (seed, offset), never stored):

* ``adalora_linear``: lora_linear's kernels with A_eff = A * E and the factor
  scale / (ranknum + 1e-5); grad_E = rowsum(grad_A_eff * A), grad_A = grad_A_eff * E (every rank
  computed, as the reference does).
* ``dora_linear``: with W' = W + scale * B A (whose row norms PEFT's DoRA needs anyway) and
  g = magnitude / ||W'||, the forward is ``y = x (g W')^T + b`` without dropout and
  ``y = x W^T + b + D(x) (g W' - W)^T`` with it (the same sum as PEFT's extra base pass), so
  every (N, out) term is a GEMM; without dropout and bias the magnitude's gradient comes from the
  output, colsum(grad_y * y) / magnitude (no GEMM), else it is rowsum(W' * grad_y^T D(x)) / ||W'||,
  sharing grad_y^T D(x) with the weight's gradient.  D(x) is materialised by the C++ kernel for
  the extra base pass (as the reference does) and dropped after the call.
* ``lora_linear_multi``: rows grouped by adapter id with a counting sort in C++ (id -1 rows take
  no adapter), register-tiled loops per adapter segment, OpenMP over row tiles and over
  (adapter, column panel) tasks; no Python loop over rows or adapters.  The forward's rank-r part
  is one pass over x (``lora_shrink_expand_grouped``: y stored from registers, then the base GEMM
  accumulates onto it).

Calls the kernels do not take (x not float32 / float64, adapters in another dtype than x) run the
reference implementation, as in :mod:`vfm.ops.lora_cpp`.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.ops.lora_cpp import drop_args, lora_forward_cpp, low_rank_backward, merged_weight, native
from vfm.ops.lora_reference import (
    ADALORA_EPS,
    LowRankKernels,
    adalora_backward_torch,
    adalora_forward_torch,
    dora_backward_torch,
    dora_forward_torch,
    dora_magnitude_grad_from_output,
    lora_multi_backward_torch,
    lora_multi_forward_torch,
)


# ---------------------------------------------------------------------------- AdaLoRA --
def _adalora_factor(ranknum: Tensor, scale: float, backward: bool = False) -> float:
    """scale / (ranknum + 1e-5) as a float (ranknum is a CPU tensor here: no device sync).

    Rounded as the reference rounds it: the forward divides by ranknum + 1e-5 (in ranknum's
    dtype); the backward multiplies by (ranknum + 1e-5).reciprocal() * scale, computed in
    ranknum's dtype (float32 for PEFT's buffer, so it differs from the forward's factor by a
    float32 rounding when the adapters are float64).
    """
    if backward:
        return float((ranknum + ADALORA_EPS).reciprocal().mul_(scale).reshape(()))
    return float(scale) / float((ranknum + ADALORA_EPS).reshape(()))


def adalora_forward_cpp(x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed):
    if not native(x, lora_a):
        return adalora_forward_torch(x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed)
    # y = x W^T + b + factor * (D(x) (A * E)^T) B^T: lora_linear's forward with the effective A
    return lora_forward_cpp(x, weight, bias, lora_a * lora_e[:, None], lora_b, _adalora_factor(ranknum, scale),
                            dropout_p, seed)


def adalora_backward_cpp(grad_y, x, weight, lora_a, lora_e, lora_b, ranknum, xa, scale, dropout_p, seed, needs):
    if not native(x, lora_a, grad_y):
        return adalora_backward_torch(grad_y, x, weight, lora_a, lora_e, lora_b, ranknum, xa, scale, dropout_p,
                                      seed, needs)
    need_x, need_w, need_bias, need_a, need_e, need_b = needs
    factor = _adalora_factor(ranknum, scale, backward=True)
    a_eff = lora_a * lora_e[:, None]
    gx, g_aeff, gb = low_rank_backward(grad_y, x, weight, a_eff, lora_b, xa, factor, dropout_p, seed, need_x,
                                       need_a or need_e, need_b)
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    ga = g_aeff * lora_e[:, None] if need_a else None
    ge = (g_aeff * lora_a).sum(1) if need_e else None
    return gx, gw, gbias, ga, ge, gb


# ------------------------------------------------------------------------------- DoRA --
_adapted_weight = merged_weight  # W' = W + scale * B A, (out, in), in the adapter dtype (= x's here)


def dora_forward_cpp(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed):
    if not native(x, lora_a):
        return dora_forward_torch(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed)
    ops = torch.ops.vfm_C
    with torch.no_grad():
        w_adapted = _adapted_weight(weight, lora_a, lora_b, scale)
        wn = torch.linalg.vector_norm(w_adapted, dim=1)
        g = (magnitude / wn)[:, None]
        if dropout_p <= 0.0:
            xa = ops.lora_shrink(x, lora_a, None, None, 1.0, 0, 0, 1.0)
            return F.linear(x, w_adapted.mul_(g), bias), xa, wn
        u = ops.lora_dropout_apply(x, *drop_args(dropout_p, seed))
        xa = torch.mm(u, lora_a.t())
        y = F.linear(x, weight, bias)
        y.addmm_(u, w_adapted.mul_(g).sub_(weight).t())
        return y, xa, wn


def dora_backward_cpp(grad_y, x, weight, lora_a, lora_b, magnitude, xa, wn, scale, dropout_p, seed, needs,
                      y=None, bias=None):
    if not native(x, lora_a, grad_y):
        return dora_backward_torch(grad_y, x, weight, lora_a, lora_b, magnitude, xa, wn, scale, dropout_p, seed,
                                   needs)
    need_x, need_w, need_bias, need_a, need_b, need_m = needs
    # y given (no dropout): grad_magnitude from the output, not from grad_y^T x (a GEMM)
    gm = dora_magnitude_grad_from_output(grad_y, y, magnitude, bias) if need_m and dropout_p <= 0.0 else None
    need_pu = need_w or (need_m and gm is None)
    ops = torch.ops.vfm_C
    g = (magnitude / wn)[:, None]
    w_adapted = _adapted_weight(weight, lora_a, lora_b, scale)
    dropping = dropout_p > 0.0
    u = ops.lora_dropout_apply(x, *drop_args(dropout_p, seed)) if dropping and (need_a or need_pu) else x
    gx = gw = ga = None
    if need_x:
        if dropping:
            gx = torch.mm(grad_y, weight)
            low = torch.mm(grad_y, (w_adapted * g).sub_(weight))
            gx.add_(ops.lora_dropout_apply(low, *drop_args(dropout_p, seed)))
        else:
            gx = torch.mm(grad_y, w_adapted * g)
    p_u = torch.mm(grad_y.t(), u) if need_pu else None  # grad_y^T D(x), (out, in)
    if need_w:
        gw = p_u * g if not dropping else torch.mm(grad_y.t(), x).add_(p_u * (g - 1))
    gbias = grad_y.sum(0) if need_bias else None
    if need_a:
        gxa = torch.mm(grad_y, lora_b * g).mul_(scale)
        ga = torch.mm(gxa.t(), u)
    gb = torch.mm(grad_y.t(), xa).mul_(g * scale) if need_b else None
    if need_m and gm is None:
        gm = (w_adapted * p_u).sum(1).div_(wn)
    return gx, gw, gbias, ga, gb, gm


# ---------------------------------------------------------------------- multi-adapter --
def lora_multi_forward_cpp(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed):
    if not native(x, a_stack):
        return lora_multi_forward_torch(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed)
    # the rank-r part in one pass over x (rows grouped by adapter, y stored from registers), then the
    # base GEMM accumulates onto y (no read-modify-write pass over y)
    y, xa = torch.ops.vfm_C.lora_shrink_expand_grouped(x, a_stack, b_stack.transpose(1, 2), adapter_ids, scalings,
                                                       bias, 1.0, *drop_args(dropout_p, seed))
    y.addmm_(x, weight.t())
    return y, xa


def lora_multi_backward_cpp(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p, seed, needs):
    if not native(x, a_stack, grad_y):
        return lora_multi_backward_torch(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p,
                                         seed, needs)
    need_x, need_w, need_bias, need_a, need_b = needs
    ops = torch.ops.vfm_C
    drop = drop_args(dropout_p, seed)
    n_adapters = a_stack.shape[0]
    gxa = None
    if need_x or need_a:  # gxa_i = s_k grad_y_i B_k (zero rows for id -1)
        gxa = ops.lora_shrink(grad_y, b_stack.transpose(1, 2), adapter_ids, scalings, 1.0, 0, 0, 1.0)
    gx = ga = None
    if need_x:
        gx = torch.mm(grad_y, weight)
    if need_x and need_a:  # one pass over x and grad_x (each mask element hashed once)
        ga = ops.lora_dx_ga_(gx, gxa, a_stack, x, adapter_ids, *drop)
    else:
        if need_x:
            ops.lora_expand_(gx, gxa, a_stack, adapter_ids, None, 1.0, *drop)
        if need_a:
            ga = ops.lora_reduce(gxa, x, n_adapters, adapter_ids, None, 1.0, *drop)
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    gb = None
    if need_b:
        gb = ops.lora_reduce(xa, grad_y, n_adapters, adapter_ids, scalings, 1.0, 0, 0, 1.0).transpose(1, 2)
        gb = gb.contiguous()  # the layout of b_stack (what the fake promises)
    return gx, gw, gbias, ga, gb


ADALORA_CPP = LowRankKernels(adalora_forward_cpp, adalora_backward_cpp)
DORA_CPP = LowRankKernels(dora_forward_cpp, dora_backward_cpp)
LORA_MULTI_CPP = LowRankKernels(lora_multi_forward_cpp, lora_multi_backward_cpp)
