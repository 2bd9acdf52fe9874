"""CUDA backend of ``lora_linear`` and ``lora_linear_multi`` (the CUDA half of ``vfm._C``).

:data:`LORA_CUDA` and :data:`LORA_MULTI_CUDA` are :class:`~vfm.ops.lora_reference.LowRankKernels`
pairs with exactly the normalised signatures and semantics of the reference's
(:mod:`vfm.ops.lora_reference` documents the contract, including the dropout hash).  Kernels
(``csrc/cuda/lora_kernels.cu``):

* ``vfm_C::lora_cuda_shrink``: xa_i = s_k D(x_i) A_k^T, one block per row, the dropout mask
  regenerated from (seed, offset) while the row is staged in shared memory (never stored);
* ``vfm_C::lora_cuda_expand_``: y_i += D(s_k coef_i M_k) in place (the forward's
  y += s_k xa B_k^T, and the backward's grad_x += D(gxa A_k));
* ``vfm_C::lora_cuda_dropout``: D(x) in the adapter dtype, for grad_A = gxa^T D(x) on the tensor
  cores.

``lora_linear``: the base GEMM and the up-projection run through cuBLAS (``torch.mm``), the
dropout work in the kernels; without dropout there is no mask, and every product is the
reference's cuBLAS call.  ``lora_linear_multi``: shrink/expand for the per-row adapters in both
passes (no sort, no host synchronisation in the forward); the adapter weights' gradients group
the rows by adapter (one host synchronisation) and run one GEMM pair per adapter, as the
reference does.  Dtypes the kernels do not take (pairs other than equal dtypes or fp16/bf16 with
fp32 adapters) and ranks above 128 run the reference computation, which gives the same numbers.
The extension is optional: importing this module never fails, and :func:`check_cuda` says why
the backend cannot run.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm.ops.lora_reference import (
    LowRankKernels,
    _segments,
    dropout_threshold,
    lora_backward_torch,
    lora_forward_torch,
    lora_multi_backward_torch,
    lora_multi_forward_torch,
)

#: Largest rank the shrink/expand kernels take (kLoraMaxRank in csrc/cuda/lora_cuda.h).
MAX_RANK = 128
_OPS = ("lora_cuda_shrink", "lora_cuda_expand_", "lora_cuda_dropout")
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_STATUS: Optional[Tuple[bool, str]] = None


def cuda_available() -> Tuple[bool, str]:
    """(available, reason) of the extension's CUDA low-rank kernels (reason "" when available)."""
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    from vfm.ops.kce_cuda import _extension_status

    for name in _OPS:
        ok, why = _extension_status(name)
        if not ok:
            _STATUS = (False, why)
            return _STATUS
    _STATUS = (True, "")
    return _STATUS


def check_cuda(device: torch.device) -> Optional[str]:
    """Registry check: None when the cuda low-rank backend can run on ``device``, else the reason."""
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only (got {device.type})"
    ok, why = cuda_available()
    if not ok:
        return why
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _kernels():
    """The namespace of the extension's CUDA ops (``torch.ops.vfm_C``); tests substitute an emulation."""
    return torch.ops.vfm_C


def pair_supported(src: torch.dtype, adapter: torch.dtype) -> bool:
    """Whether the kernels take inputs of dtype ``src`` with adapters of dtype ``adapter``."""
    if src == adapter:
        return src in _KERNEL_DTYPES
    return adapter == torch.float32 and src in (torch.float16, torch.bfloat16)


def _drop_args(dropout_p: float, seed: Tensor) -> Tuple[int, int, float]:
    """(seed, threshold, dscale) of the kernels; threshold 0 = no dropout."""
    if dropout_p <= 0.0:
        return 0, 0, 1.0
    return int(seed), dropout_threshold(dropout_p), 1.0 / (1.0 - float(dropout_p))


# ------------------------------------------------------------------------------- LoRA --
def _lora_kernel_ok(x: Tensor, lora_a: Tensor, dropout_p: float) -> bool:
    return dropout_p > 0.0 and x.dim() == 2 and pair_supported(x.dtype, lora_a.dtype) and lora_a.shape[0] <= MAX_RANK


def lora_forward_cuda(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed) -> Tuple[Tensor, Tensor]:
    """(y, xa) as :func:`~vfm.ops.lora_reference.lora_forward_torch`; xa = D(x) A^T by the shrink kernel."""
    if not _lora_kernel_ok(x, lora_a, dropout_p):
        return lora_forward_torch(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    xa = _kernels().lora_cuda_shrink(x, lora_a, None, None, 1.0, *_drop_args(dropout_p, seed))
    y = F.linear(x, weight, bias)
    if y.dtype == lora_b.dtype:
        y.addmm_(xa, lora_b.t(), alpha=scale)
    else:
        y.add_(torch.mm(xa, lora_b.t()).mul_(scale))
    return y, xa


def lora_backward_cuda(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs):
    """Gradients as :func:`~vfm.ops.lora_reference.lora_backward_torch`; the dropout in the kernels."""
    if not _lora_kernel_ok(x, lora_a, dropout_p) or not pair_supported(grad_y.dtype, lora_a.dtype):
        return lora_backward_torch(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs)
    need_x, need_w, need_bias, need_a, need_b = needs
    drop = _drop_args(dropout_p, seed)
    g_low = grad_y.to(lora_b.dtype)
    gxa = torch.mm(g_low, lora_b).mul_(scale) if (need_x or need_a) else None
    gx = None
    if need_x:
        gx = torch.mm(grad_y, weight)
        if gx.stride(-1) != 1:
            gx = gx.contiguous()
        _kernels().lora_cuda_expand_(gx, gxa, lora_a, None, None, 1.0, *drop)  # gx += D(gxa A)
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    ga = torch.mm(gxa.t(), _kernels().lora_cuda_dropout(x, lora_a.dtype, *drop)) if need_a else None
    gb = torch.mm(g_low.t(), xa).mul_(scale) if need_b else None
    return gx, gw, gbias, ga, gb


# ---------------------------------------------------------------------- multi-adapter --
def _multi_kernel_ok(x: Tensor, a_stack: Tensor) -> bool:
    return x.dim() == 2 and pair_supported(x.dtype, a_stack.dtype) and a_stack.shape[1] <= MAX_RANK


def lora_multi_forward_cuda(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed):
    """(y, xa) as :func:`~vfm.ops.lora_reference.lora_multi_forward_torch`, by the shrink/expand pair.

    Args: x (N, in), weight (out, in), bias (out,) or None, a_stack (K, r, in), b_stack (K, out, r),
    scalings (K,) float32, adapter_ids (N,) int64 in [-1, K), dropout_p, seed (int64 tensor).
    Returns y (N, out) in x's dtype and xa (N, r) in the adapter dtype (0 rows for id -1).
    """
    if not _multi_kernel_ok(x, a_stack):
        return lora_multi_forward_torch(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed)
    ids = adapter_ids.to(torch.int64).contiguous()
    scal = scalings.to(torch.float32).contiguous()
    xa = _kernels().lora_cuda_shrink(x, a_stack, ids, None, 1.0, *_drop_args(dropout_p, seed))
    y = F.linear(x, weight, bias)
    if y.stride(-1) != 1:
        y = y.contiguous()
    # y_i += s_k xa_i B_k^T: expand with M_k = B_k^T (r, out), a transposed view
    _kernels().lora_cuda_expand_(y, xa, b_stack.transpose(1, 2), ids, scal, 1.0, 0, 0, 1.0)
    return y, xa


def lora_multi_backward_cuda(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p, seed, needs):
    """Gradients as :func:`~vfm.ops.lora_reference.lora_multi_backward_torch`."""
    if not _multi_kernel_ok(x, a_stack) or not pair_supported(grad_y.dtype, a_stack.dtype):
        return lora_multi_backward_torch(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p,
                                         seed, needs)
    need_x, need_w, need_bias, need_a, need_b = needs
    adt = a_stack.dtype
    drop = _drop_args(dropout_p, seed)
    ids = adapter_ids.to(torch.int64).contiguous()
    scal = scalings.to(torch.float32).contiguous()
    gxa = None
    if need_x or need_a:  # gxa_i = s_k grad_y_i B_k (shrink with M_k = B_k^T)
        gxa = _kernels().lora_cuda_shrink(grad_y, b_stack.transpose(1, 2), ids, scal, 1.0, 0, 0, 1.0)
    gx = None
    if need_x:
        gx = torch.mm(grad_y, weight)
        if gx.stride(-1) != 1:
            gx = gx.contiguous()
        _kernels().lora_cuda_expand_(gx, gxa, a_stack, ids, None, 1.0, *drop)  # gx_i += D(gxa_i A_k)
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    ga = torch.zeros_like(a_stack) if need_a else None
    gb = torch.zeros_like(b_stack) if need_b else None
    if need_a or need_b:
        u = _kernels().lora_cuda_dropout(x, adt, *drop) if need_a else None
        g_low = grad_y.to(adt) if need_b else None
        for k, rows in _segments(ids, a_stack.shape[0]):
            if need_a:
                ga[k] = torch.mm(gxa.index_select(0, rows).t(), u.index_select(0, rows))
            if need_b:
                gb[k] = torch.mm(g_low.index_select(0, rows).t(), xa.index_select(0, rows)).mul_(scal[k].to(adt))
    return gx, gw, gbias, ga, gb


LORA_CUDA = LowRankKernels(lora_forward_cuda, lora_backward_cuda)
LORA_MULTI_CUDA = LowRankKernels(lora_multi_forward_cuda, lora_multi_backward_cuda)
