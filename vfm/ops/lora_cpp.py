"""C++ CPU backend of ``lora_linear`` (the ``vfm._C`` extension's grouped low-rank kernels).

:data:`LORA_CPP` is a :class:`~vfm.ops.lora_reference.LowRankKernels` pair with exactly the
normalised signatures and semantics of :data:`vfm.ops.lora_reference.LORA_TORCH` (see that
module's docstring for the contract).  The (N, in) x (in, out) products run through BLAS; the
rank-r products run in the register-tiled C++ kernels of ``csrc/cpu/lora_dropout.cpp`` and
``csrc/cpu/lora_backward.cpp``, which regenerate the dropout mask from (seed, offset) while they
stream over x and never store it:

* forward: ``lora_shrink_expand`` computes xa = D(x) A^T and writes y = b + scale * xa B^T in one
  pass over x (each tile's y rows stored from registers while its xa rows are in cache); the base
  GEMM then accumulates x W^T onto y in place (no second pass over y);
* backward: gxa = scale * grad_y B and grad_B = scale * (xa^T grad_y)^T in one pass over grad_y
  (``lora_shrink_reduce``, rows split between threads, one partial sum each, where BLAS leaves the
  N-long reduction to one thread); then ``lora_expand_reduce`` writes grad_x = D(gxa A) and
  computes grad_A = gxa^T D(x) in one pass over x (each mask element hashed once), and the base
  GEMM accumulates grad_y W onto grad_x.

Without dropout the rank-r term can be folded into the weight: when there are fewer input
features than rows (forward) or fewer output features than rows (backward), W + scale * B A
(``lora_merge``, one pass over W, an out x in temporary no larger than y) replaces the rank-r
expand over the N rows (:func:`merge_pays`); grad_A is then a ``lora_reduce``.  x and an adapter
in different dtypes, and grad_y in another dtype than x, take the reference path when the backend
was chosen automatically and raise when ``cpp`` was forced (see :func:`native`); x in any dtype
other than float32 / float64 is refused at backend selection (vfm.ops.lora_ops), so the automatic
choice picks ``torch`` for it and a forced ``cpp`` raises.  The extension is optional: importing
this module never fails, and :func:`cpp_available` says whether the backend can run and, if not, why.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vfm import _registry
from vfm.ops.lora_reference import LowRankKernels, dropout_threshold, lora_backward_torch, lora_forward_torch

_OPS = ("lora_shrink", "lora_expand_", "lora_reduce", "lora_dx_ga_", "lora_dropout_apply", "lora_shrink_reduce",
        "lora_shrink_expand", "lora_expand_reduce", "lora_merge", "lora_shrink_expand_grouped")
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
    """True when the C++ kernels take this call: x, the adapter (and grad_y) of one float32/64 dtype.

    When they do not (an adapter in another dtype than x), the automatic choice runs the
    reference code instead; a forced ``cpp`` backend never falls back silently, so then this raises
    :class:`~vfm.BackendUnavailableError` naming the dtypes.
    """
    ok = (x.dtype in KERNEL_DTYPES and adapter.dtype == x.dtype and x.dim() == 2
          and (grad_y is None or grad_y.dtype == x.dtype))
    if not ok and _registry.forced_backend() == "cpp":
        extra = "" if grad_y is None else f", grad_y {grad_y.dtype}"
        raise _registry.BackendUnavailableError(
            f"backend 'cpp' was forced but its low-rank kernels take x and the adapters in one dtype, float32 or "
            f"float64 (got x {x.dtype}, adapter {adapter.dtype}{extra}); use the torch backend")
    return ok


def drop_args(dropout_p: float, seed: Tensor) -> Tuple[int, int, float]:
    """(seed, threshold, 1 / (1 - p)) for the kernels; threshold 0 switches dropout off."""
    if dropout_p <= 0.0:
        return 0, 0, 1.0
    return int(seed), dropout_threshold(dropout_p), 1.0 / (1.0 - float(dropout_p))


def merge_pays(n_rows: int, n_features: int) -> bool:
    """Whether W + scale * B A (built at out x in x r multiply-adds) costs less than the rank-r term
    it replaces (n_rows x n_features x r, with a whole pass over an (n_rows, n_features) tensor).

    Only taken without dropout: with it the rank-r term sees D(x), not x, and cannot be merged.
    The merged weight rounds W + scale * B A once in x's dtype (float32 or float64 here), the same
    order of rounding error as the GEMM's own accumulation.
    """
    return n_features < n_rows


def merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """W + scale * B A (out, in) in one C++ pass over W (vfm_C::lora_merge; BLAS runs a rank-r
    GEMM at a fraction of its speed); a temporary, freed once the GEMM that reads it is done."""
    if weight.dtype == lora_a.dtype == lora_b.dtype and weight.dtype in KERNEL_DTYPES and weight.dim() == 2:
        return torch.ops.vfm_C.lora_merge(weight, lora_b, lora_a, scale)
    return torch.addmm(weight, lora_b, lora_a, alpha=scale)


def lora_forward_cpp(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed) -> Tuple[Tensor, Tensor]:
    if not native(x, lora_a):
        return lora_forward_torch(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    drop = drop_args(dropout_p, seed)
    if scale == 0.0:
        return F.linear(x, weight, bias), torch.ops.vfm_C.lora_shrink(x, lora_a, None, None, 1.0, *drop)
    if dropout_p <= 0.0 and merge_pays(x.shape[0], weight.shape[1]):
        # no dropout and fewer input features than rows: W + scale * B A (out x in, no larger than y)
        # costs less than the rank-r expand over the N rows, and the base GEMM then does the rest
        xa = torch.ops.vfm_C.lora_shrink(x, lora_a, None, None, 1.0, *drop)
        return F.linear(x, merged_weight(weight, lora_a, lora_b, scale), bias), xa
    # the rank-r part in one pass over x (xa, then bias + scale * xa B^T written while the tile's
    # xa rows are in cache); the base GEMM then accumulates onto it (no second pass over y)
    y, xa = torch.ops.vfm_C.lora_shrink_expand(x, lora_a, lora_b.t(), bias, scale, *drop)
    y.addmm_(x, weight.t())
    return y, xa


def low_rank_backward(grad_y, x, weight, lora_a, lora_b, xa, factor, dropout_p, seed, need_x, need_a, need_b):
    """(grad_x, grad of the effective A, grad_B) of y = x W^T + factor * (D(x) A^T) B^T.

    gxa = factor * grad_y B and grad_B = factor * (xa^T grad_y)^T in one C++ pass over grad_y
    (``lora_shrink_reduce``; either alone: shrink / reduce); then one C++ pass over x writes
    D(gxa A) into a fresh grad_x and computes gxa^T D(x) (``lora_expand_reduce``, each mask element
    hashed once), and BLAS accumulates grad_y W onto grad_x.  Without dropout and with fewer output
    features than rows, grad_x = grad_y (W + factor * B A) instead (see :func:`merge_pays`).
    """
    ops = torch.ops.vfm_C
    gb = None
    if need_b and (need_x or need_a):  # gxa and grad_B^T in one pass over grad_y
        gxa, gbt = ops.lora_shrink_reduce(grad_y, lora_b.t(), xa, factor)
        gb = gbt.t().contiguous()
    else:
        gxa = ops.lora_shrink(grad_y, lora_b.t(), None, None, factor, 0, 0, 1.0) if (need_x or need_a) else None
    gx = ga = None
    drop = drop_args(dropout_p, seed)
    if need_x and dropout_p <= 0.0 and merge_pays(grad_y.shape[0], weight.shape[0]):
        # grad_y W + gxa A = grad_y (W + factor * B A): the merged weight costs less than the
        # rank-r expand over the N rows when there are fewer output features than rows
        gx = torch.mm(grad_y, merged_weight(weight, lora_a, lora_b, factor))
        ga = ops.lora_reduce(gxa, x, 1, None, None, 1.0, *drop) if need_a else None
    elif need_x and need_a:  # D?(gxa A) and gxa^T D?(x) in one pass over x; grad_y W accumulates onto the first
        gx, ga = ops.lora_expand_reduce(gxa, lora_a, x, *drop)
        gx.addmm_(grad_y, weight)
    else:
        if need_x:
            if dropout_p > 0.0:
                gx = torch.mm(grad_y, weight)
                ops.lora_expand_(gx, gxa, lora_a, None, None, 1.0, *drop)
            else:  # rank-r product first, the base GEMM accumulates onto it
                gx = torch.mm(gxa, lora_a)
                gx.addmm_(grad_y, weight)
        if need_a:
            ga = ops.lora_reduce(gxa, x, 1, None, None, 1.0, *drop)
    if need_b and gb is None:  # (r, out) sums over the N rows: the C++ kernel splits the rows between threads
        gb = ops.lora_reduce(xa, grad_y, 1, None, None, factor, 0, 0, 1.0).t().contiguous()
    return gx, ga, gb


def lora_backward_cpp(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs):
    if not native(x, lora_a, grad_y):
        return lora_backward_torch(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs)
    need_x, need_w, need_bias, need_a, need_b = needs
    gx, ga, gb = low_rank_backward(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, need_x, need_a,
                                   need_b)
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    return gx, gw, gbias, ga, gb


LORA_CPP = LowRankKernels(lora_forward_cpp, lora_backward_cpp)
