"""C++ CPU backend of ``lora_linear`` (the ``vfm._C`` extension's dropout kernels).

:data:`LORA_CPP` is a :class:`~vfm.ops.lora_reference.LowRankKernels` pair with exactly the
normalised signatures and semantics of :data:`vfm.ops.lora_reference.LORA_TORCH` (see that
module's docstring for the contract).  The dense products run through BLAS (``torch.mm`` /
``addmm``); everything that touches the dropout mask runs in the C++ kernels of
``csrc/cpu/lora_dropout.cpp``, which regenerate the mask from (seed, offset) while streaming over x
instead of building it with tensor ops:

* forward: xa = D(x) A^T (``vfm_C::lora_dropout_xa``);
* backward: grad_x = grad_y W (BLAS) += D(gxa A) (``vfm_C::lora_dropout_dx_``) and
  grad_A = gxa^T D(x) (``vfm_C::lora_dropout_ga``).

Without dropout there is no mask to regenerate, and every product is a BLAS call (the same code
as the reference's); x and an adapter in different dtypes also take that path.  x in any dtype
other than float32 / float64 is refused at backend selection (vfm.ops.lora_ops), so the
automatic choice picks ``torch`` for it and a forced ``cpp`` raises.  The
extension is optional: importing this module never fails, and :func:`cpp_available` says whether
the backend can run and, if not, why.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.ops.lora_reference import LowRankKernels, dropout_threshold, lora_backward_torch, lora_forward_torch

_OPS = ("lora_dropout_xa", "lora_dropout_dx_", "lora_dropout_ga")
_KERNEL_DTYPES = (torch.float32, torch.float64)
_STATUS: Optional[Tuple[bool, str]] = None


def cpp_available() -> Tuple[bool, str]:
    """(available, reason): reason is "" when ``vfm._C`` imports and has the LoRA dropout ops."""
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
    """Registry check: None when the cpp backend of lora_linear can run on ``device``."""
    if device.type != "cpu":
        return f"the cpp backend runs on CPU tensors only (got {device.type})"
    ok, why = cpp_available()
    return None if ok else why


def _kernel_args(x: Tensor, lora_a: Tensor, dropout_p: float, seed: Tensor):
    """(seed, threshold, scale) for the C++ kernels, or None when the reference path runs."""
    if dropout_p <= 0.0 or x.dtype != lora_a.dtype or x.dtype not in _KERNEL_DTYPES or x.dim() != 2:
        return None
    return int(seed), dropout_threshold(dropout_p), 1.0 / (1.0 - float(dropout_p))


def lora_forward_cpp(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed) -> Tuple[Tensor, Tensor]:
    args = _kernel_args(x, lora_a, dropout_p, seed)
    if args is None:
        return lora_forward_torch(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    xa = torch.ops.vfm_C.lora_dropout_xa(x, lora_a, *args)
    y = F.linear(x, weight, bias)
    y.addmm_(xa, lora_b.t(), alpha=scale)
    return y, xa


def lora_backward_cpp(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs):
    args = _kernel_args(x, lora_a, dropout_p, seed)
    if args is None or grad_y.dtype != x.dtype:
        return lora_backward_torch(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs)
    need_x, need_w, need_bias, need_a, need_b = needs
    gxa = torch.mm(grad_y, lora_b).mul_(scale) if (need_x or need_a) else None
    gx = None
    if need_x:
        gx = torch.mm(grad_y, weight)
        if not gx.is_contiguous():
            gx = gx.contiguous()
        torch.ops.vfm_C.lora_dropout_dx_(gx, gxa, lora_a, *args)
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    ga = torch.ops.vfm_C.lora_dropout_ga(gxa, x, *args) if need_a else None
    gb = torch.mm(grad_y.t(), xa).mul_(scale) if need_b else None
    return gx, gw, gbias, ga, gb


LORA_CPP = LowRankKernels(lora_forward_cpp, lora_backward_cpp)
