"""Small Triton kernels around the knowledge cross-entropy kernel: per-call argument work on device.

* :func:`kce_prologue` - one launch that replaces the ~20 small torch ops of the Python layer:
  the per-row scales (4, N) of CE / KD / penalty / z-loss (row masks, the reduction's denominators,
  the term weights), the target range check, the allowed group ids' range check and their mapping
  (groups that allow every label, or none, become -1).  One program walks the rows twice (sums,
  then scales), so there is no host synchronisation and no atomics.  A violated range check is a
  device-side assertion on CUDA (like ``torch._assert_async``); the kernel also writes an error
  word that the host reads on CPU (free there) to raise the usual ``ValueError``.
* :func:`kce_scale_grad_` - the backward of a reduced loss: multiplies the fused gradient by the
  upstream gradient in place, reading that gradient from device memory; every program returns at
  once when it is exactly 1 (what ``loss.backward()`` sends), so the usual backward costs one
  near-empty launch, no host synchronisation and no pass over the [N, V] gradient.

Both are tested against the torch computations they replace (``tests/test_kce_prologue.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from vfm.kernels.kce_common import _gpu_launch, _interpreting

__all__ = ["kce_prologue", "kce_scale_grad_", "ERR_TARGET", "ERR_GROUP"]

ERR_TARGET = 1  # bit of the error word: a counted target lies outside [0, V)
ERR_GROUP = 2  # bit of the error word: a group id lies outside [-1, G)
_ITEMS_NONE, _ITEMS_VALUE, _ITEMS_TENSOR = 0, 1, 2
_GIDS_NONE, _GIDS_GIVEN, _GIDS_IDENTITY = 0, 1, 2


@triton.jit(debug=True)  # debug: tl.device_assert is compiled in (only used when ASSERT)
def _kce_prologue_kernel(
    Y_ptr, SM_ptr, W_ptr, GIN_ptr, UNC_ptr, ITEMS_ptr,
    S_ptr, s_stride, GOUT_ptr, ERR_ptr,
    N, V, G, ignore_index, items_value, c_ce, c_kd, c_pen, c_z,
    HAS_SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, ITEMS: tl.constexpr,
    GIDS: tl.constexpr, ASSERT: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program.  Y target (N,) int, SM soft mask (N,) bool, W class weights (V,) fp32, GIN group
    ids (N,) int, UNC (G,) bool "group unconstrained", ITEMS num_items_in_batch (a 0-d tensor);
    outputs S scales (4, N) fp32 (row stride s_stride), GOUT (N,) int32 group ids, ERR () int32.
    ITEMS: 0 none, 1 the float ``items_value``, 2 read ITEMS_ptr.  GIDS: 0 none, 1 read GIN,
    2 identity (row i is group i: a dense allowed mask)."""
    base = tl.arange(0, BLOCK)
    d0 = tl.zeros([BLOCK], tl.float32)  # CE denominator: counted rows (their class weights)
    d1 = tl.zeros([BLOCK], tl.float32)  # KD / penalty / z-loss denominator: soft_mask rows
    bad_y = tl.zeros([BLOCK], tl.int32)
    bad_g = tl.zeros([BLOCK], tl.int32)
    # ---- pass 1: range checks and the reduction's sums ---------------------------------
    for start in range(0, N, BLOCK):
        offs = start + base
        m = offs < N
        y = tl.load(Y_ptr + offs, mask=m, other=ignore_index).to(tl.int64)
        valid = m & (y != ignore_index)
        in_range = (y >= 0) & (y < V)
        bad_y += (valid & ~in_range).to(tl.int32)
        if MEAN:
            if ITEMS == 0:
                if HAS_WEIGHT:
                    ok = valid & in_range
                    d0 += tl.load(W_ptr + tl.where(ok, y, 0), mask=ok, other=0.0)
                else:
                    d0 += valid.to(tl.float32)
                if HAS_SOFT:
                    d1 += (tl.load(SM_ptr + offs, mask=m, other=0) != 0).to(tl.float32)
                else:
                    d1 += valid.to(tl.float32)
        if GIDS == 1:
            g = tl.load(GIN_ptr + offs, mask=m, other=-1).to(tl.int64)
            bad_g += (m & ((g < -1) | (g >= G))).to(tl.int32)
    n_bad_y = tl.sum(bad_y, axis=0)
    n_bad_g = tl.sum(bad_g, axis=0)
    err = tl.where(n_bad_y > 0, 1, 0) + tl.where(n_bad_g > 0, 2, 0)
    tl.store(ERR_ptr, err.to(tl.int32))
    if ASSERT:
        tl.device_assert(n_bad_y == 0, "knowledge_cross_entropy: target holds values outside [0, V) "
                                       "that are not ignore_index")
        tl.device_assert(n_bad_g == 0, "knowledge_cross_entropy: allowed group_ids outside [-1, G)")
    inv0 = 1.0
    inv1 = 1.0
    if MEAN:
        if ITEMS == 1:
            den0 = items_value + tl.zeros([1], tl.float32)
            den1 = den0
        elif ITEMS == 2:
            den0 = tl.load(ITEMS_ptr + tl.zeros([1], tl.int32)).to(tl.float32)
            den1 = den0
        else:
            den0 = tl.sum(d0, axis=0) + tl.zeros([1], tl.float32)
            den1 = tl.sum(d1, axis=0) + tl.zeros([1], tl.float32)
        # correctly rounded 1 / d (a plain fp32 division may be approximate on a GPU)
        inv0 = tl.sum(tl.where(den0 > 0, tl.math.div_rn(tl.full([1], 1.0, tl.float32), den0), 0.0), axis=0)
        inv1 = tl.sum(tl.where(den1 > 0, tl.math.div_rn(tl.full([1], 1.0, tl.float32), den1), 0.0), axis=0)
    # ---- pass 2: the scales and the group ids ------------------------------------------
    for start in range(0, N, BLOCK):
        offs = start + base
        m = offs < N
        y = tl.load(Y_ptr + offs, mask=m, other=ignore_index).to(tl.int64)
        m0 = (y != ignore_index).to(tl.float32)
        if HAS_SOFT:
            m1 = (tl.load(SM_ptr + offs, mask=m, other=0) != 0).to(tl.float32)
        else:
            m1 = m0
        if MEAN:
            b0 = m0 * inv0
            b1 = m1 * inv1
        else:
            b0 = m0
            b1 = m1
        tl.store(S_ptr + offs, b0 * c_ce, mask=m)
        tl.store(S_ptr + s_stride + offs, b1 * c_kd, mask=m)
        tl.store(S_ptr + 2 * s_stride + offs, b1 * c_pen, mask=m)
        tl.store(S_ptr + 3 * s_stride + offs, b1 * c_z, mask=m)
        if GIDS != 0:
            if GIDS == 1:
                g = tl.load(GIN_ptr + offs, mask=m, other=-1).to(tl.int64)
            else:
                g = offs.to(tl.int64)
            known = m & (g >= 0) & (g < G)
            unc = tl.load(UNC_ptr + tl.where(known, g, 0), mask=known, other=1) != 0
            tl.store(GOUT_ptr + offs, tl.where(known & ~unc, g, -1).to(tl.int32), mask=m)


def kce_prologue(
    target: Tensor,
    soft_mask: Optional[Tensor],
    weight: Optional[Tensor],
    group_ids: Optional[Tensor],
    unconstrained: Optional[Tensor],
    num_items: "Optional[float | Tensor]",
    *,
    vocab: int,
    ignore_index: int,
    mean: bool,
    coefs: Tuple[float, float, float, float],
    dense_groups: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Per-row scales, range checks and group-id mapping in one launch.

    Computes what :func:`vfm.ops.kce_api.knowledge_cross_entropy` computes with torch ops:
    ``masks = [target != ignore_index, soft_mask or the same]``; for ``mean`` each mask row is
    divided by its denominator (``num_items`` for both, else the counted rows' class weights
    (count without ``weight``) and the soft_mask count; 0 when the denominator is not > 0);
    ``scales = [m0 * ce_weight, m1 * kd_weight, m1 * penalty_weight, m1 * z_loss]``.

    Args:
        target: (N,) integer class indices (any integer dtype, contiguous).
        soft_mask: (N,) bool rows that count for KD / penalty / z-loss, or None (= counted rows).
        weight: (V,) float32 class weights, or None.
        group_ids: (N,) integer allowed-group ids (-1 = unconstrained), or None.
        unconstrained: (G,) bool, True for groups that allow every label or none (needed with
            ``group_ids`` or ``dense_groups``).
        num_items: ``num_items_in_batch``: a Python number, a 0-d / 1-element tensor on the
            target's device, or None.
        vocab: V.
        ignore_index: target value of rows that do not count for CE.
        mean: ``reduction == "mean"``.
        coefs: (ce_weight, kd_weight, penalty_weight, z_loss).
        dense_groups: row i uses group i (a dense (N, V) allowed mask); ``group_ids`` is None.

    Returns:
        (scales (4, N) float32, group_ids (N,) int32 with unconstrained groups mapped to -1 or
        None, error word () int32: bit ``ERR_TARGET`` / ``ERR_GROUP`` set when a range check
        failed; on CUDA a failure also trips a device-side assertion).
    """
    n_rows = target.shape[0]
    dev = target.device
    scales = torch.empty(4, n_rows, dtype=torch.float32, device=dev)
    err = torch.empty((), dtype=torch.int32, device=dev)
    gids_mode = _GIDS_IDENTITY if dense_groups else _GIDS_GIVEN if group_ids is not None else _GIDS_NONE
    gout = torch.empty(n_rows, dtype=torch.int32, device=dev) if gids_mode else None
    if n_rows == 0:
        err.zero_()
        return scales, gout, err
    if num_items is None:
        items_mode, items_value, items_ptr = _ITEMS_NONE, 0.0, target
    elif isinstance(num_items, Tensor):
        items_mode, items_value, items_ptr = _ITEMS_TENSOR, 0.0, num_items
    else:
        items_mode, items_value, items_ptr = _ITEMS_VALUE, float(num_items), target
    dummy = target
    n_groups = int(unconstrained.shape[0]) if unconstrained is not None else 0
    block = max(128, min(4096, triton.next_power_of_2(n_rows)))
    _kce_prologue_kernel[(1,)](
        target, soft_mask if soft_mask is not None else dummy, weight if weight is not None else dummy,
        group_ids if group_ids is not None else dummy, unconstrained if n_groups else dummy,
        items_ptr, scales, scales.stride(0), gout if gout is not None else dummy, err,
        n_rows, vocab, n_groups, ignore_index, items_value, *(float(c) for c in coefs),
        HAS_SOFT=soft_mask is not None, HAS_WEIGHT=weight is not None, MEAN=bool(mean), ITEMS=items_mode,
        GIDS=gids_mode, ASSERT=_gpu_launch() and (dev.type == "cuda" or _interpreting()), BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return scales, gout, err


@triton.jit
def _kce_scale_kernel(G_ptr, g_stride, F_ptr, V, BLOCK: tl.constexpr):
    """Row ``program_id`` of G (row stride g_stride, last stride 1) times the scalar at F_ptr,
    in place; nothing at all when that scalar, rounded to G's dtype, is exactly 1."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.load(F_ptr).to(G_ptr.dtype.element_ty).to(tl.float32)
    if f != 1.0:
        g_row = G_ptr + row * g_stride
        base = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            offs = start + base
            msk = offs < V
            g = tl.load(g_row + offs, mask=msk, other=0.0).to(tl.float32)
            tl.store(g_row + offs, (g * f).to(G_ptr.dtype.element_ty), mask=msk)


def kce_scale_grad_(grad: Tensor, factor: Tensor) -> Tensor:
    """``grad *= factor`` in place, skipped on device when ``factor`` is exactly 1.

    Same numbers as ``grad.mul_(factor.to(grad.dtype))`` (the factor is rounded to the gradient's
    dtype first, the product is rounded once).

    Args:
        grad: (N, V) fp32 / fp16 / bf16 tensor with ``stride(1) == 1`` (any row stride).
        factor: a one-element tensor on grad's device (the upstream gradient of a reduced loss).

    Returns:
        ``grad`` itself.
    """
    n_rows, vocab = grad.shape
    if n_rows == 0 or vocab == 0:
        return grad
    block = max(128, min(4096 if _gpu_launch() else 1024, triton.next_power_of_2(vocab)))
    _kce_scale_kernel[(n_rows,)](grad, grad.stride(0), factor, vocab, BLOCK=block,
                                 num_warps=4 if block <= 1024 else 8)
    return grad
