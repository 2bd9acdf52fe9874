"""C++ CPU backend of ``lora_linear`` (the ``vfm._C`` extension's grouped low-rank kernels).

:data:`LORA_CPP` is a :class:`~vfm.ops.lora_reference.LowRankKernels` pair with exactly the
normalised signatures and semantics of :data:`vfm.ops.lora_reference.LORA_TORCH` (see that
module's docstring for the contract).  The (N, in) x (in, out) products run through BLAS; the
rank-r products that touch the dropout mask run in the register-tiled C++ kernels of
``csrc/cpu/lora_dropout.cpp`` (``vfm_C::lora_shrink`` / ``lora_expand_`` / ``lora_reduce``), which
regenerate the mask from (seed, offset) while they stream over x and never store it:

* forward: xa = D(x) A^T (shrink); y = x W^T + b, then y += scale * xa B^T in place;
* backward: gxa = scale * grad_y B; grad_x = grad_y W (BLAS) += D(gxa A) (expand, in place);
  grad_A = gxa^T D(x) (reduce); grad_B = scale * grad_y^T xa.

Without dropout, when x has at least as many rows as in_features, the adapter is folded into the
weight: W' = W + scale * B A (one (out, r) x (r, in) product), y = x W'^T + b and grad_x = grad_y
W', so the base GEMMs absorb the low-rank terms (the same sums, rounded in another order).  x and
an adapter in different dtypes, and grad_y in another dtype than x, take the reference path; x in
any dtype other than float32 / float64 is refused at backend selection (vfm.ops.lora_ops), so the
automatic choice picks ``torch`` for it and a forced ``cpp`` raises.  The extension is optional:
importing this module never fails, and :func:`cpp_available` says whether the backend can run and,
if not, why.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.ops.lora_reference import LowRankKernels, dropout_threshold, lora_backward_torch, lora_forward_torch

_OPS = ("lora_shrink", "lora_expand_", "lora_reduce", "lora_dropout_apply")
KERNEL_DTYPES = (torch.float32, torch.float64)
_STATUS: Optional[Tuple[bool, str]] = None


def cpp_available() -> Tuple[bool, str]:
    """(available, reason): reason is "" when ``vfm._C`` imports and has the low-rank ops."""
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    try:
        import vfm._C  # noqa: F401  (registers the vfm_C ops)
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError (bad .so), undefined symbols...
        _STATUS = (False, f"the native extension vfm._C failed to import: {type(exc).__name__}: {exc}")
        return _STATUS
    for name in _OPS:
        try:
            getattr(torch.ops.vfm_C, name)
        except (AttributeError, RuntimeError) as exc:
            _STATUS = (False, f"vfm._C imported but has no vfm_C::{name} op ({exc}); rebuild the extension")
            return _STATUS
    _STATUS = (True, "")
    return _STATUS


def check_cpp(device: torch.device) -> Optional[str]:
    """Registry check: None when the cpp low-rank backends can run on ``device``."""
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only (got {device.type})"
    ok, why = cpp_available()
    return None if ok else why


def native(x: Tensor, adapter: Tensor, grad_y: Optional[Tensor] = None) -> bool:
    """True when the C++ kernels take this call: x, the adapter (and grad_y) of one float32/64 dtype."""
    return (x.dtype in KERNEL_DTYPES and adapter.dtype == x.dtype and x.dim() == 2
            and (grad_y is None or grad_y.dtype == x.dtype))


def drop_args(dropout_p: float, seed: Tensor) -> Tuple[int, int, float]:
    """(seed, threshold, 1 / (1 - p)) for the kernels; threshold 0 switches dropout off."""
    if dropout_p <= 0.0:
        return 0, 0, 1.0
    return int(seed), dropout_threshold(dropout_p), 1.0 / (1.0 - float(dropout_p))


def fold_adapter(x: Tensor, dropout_p: float) -> bool:
    """Fold B A into the weight when there is no dropout and W' is no larger than the output."""
    return dropout_p <= 0.0 and x.shape[0] >= x.shape[1]


def lora_forward_cpp(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed) -> Tuple[Tensor, Tensor]:
    if not native(x, lora_a):
        return lora_forward_torch(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    ops = torch.ops.vfm_C
    xa = ops.lora_shrink(x, lora_a, None, None, 1.0, *drop_args(dropout_p, seed))
    if fold_adapter(x, dropout_p):
        return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scale), bias), xa
    y = F.linear(x, weight, bias)
    y.addmm_(xa, lora_b.t(), alpha=scale)
    return y, xa


def lora_backward_cpp(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs):
    if not native(x, lora_a, grad_y):
        return lora_backward_torch(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs)
    need_x, need_w, need_bias, need_a, need_b = needs
    ops = torch.ops.vfm_C
    drop = drop_args(dropout_p, seed)
    gxa = torch.mm(grad_y, lora_b).mul_(scale) if (need_x or need_a) else None
    gx = None
    if need_x:
        if fold_adapter(x, dropout_p):
            gx = torch.mm(grad_y, torch.addmm(weight, lora_b, lora_a, alpha=scale))
        else:
            gx = torch.mm(grad_y, weight)
            ops.lora_expand_(gx, gxa, lora_a, None, None, 1.0, *drop)
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    ga = ops.lora_reduce(gxa, x, 1, None, None, 1.0, *drop) if need_a else None
    gb = torch.mm(grad_y.t(), xa).mul_(scale) if need_b else None
    return gx, gw, gbias, ga, gb


LORA_CPP = LowRankKernels(lora_forward_cpp, lora_backward_cpp)
