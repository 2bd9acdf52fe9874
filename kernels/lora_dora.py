"""Triton kernels specific to DoRA (the ``triton`` backend of ``dora_linear``).

* :func:`dora_weight_norm` - ||W + scale * B A|| per output row in one pass over W: the low-rank
  product is recomputed tile by tile with ``tl.dot`` instead of materialising the (out, in) adapted
  weight, and the reference's roundings are kept (B A, its scaling and the sum are each rounded to
  the adapter dtype before squaring; the squares accumulate in fp32).
* :func:`dora_magnitude_grad` - grad_magnitude = sum_i grad_y[i] * (H[i] + scale * xa[i] B^T) / wn,
  with H = D(x) W^T computed by cuBLAS: the low-rank term is recomputed per tile and the column
  sums are written as per-row-tile fp32 partials added by ``torch.sum`` (no (N, out) temporary, no
  atomics).
* :func:`dora_zero_magnitude_grad_` - the same sum for the output columns whose magnitude is exactly 0,
  written into a grad_magnitude computed from DoRA's output (which carries no information about such
  a column); one program per column, the others return at once, so there is no host sync for the
  check (CUDA-graph safe) and no cost when no magnitude is 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vfm.kernels.lora import BLOCK_M, _block_r, _dot, _gpu_launch, _ieee

__all__ = ["dora_weight_norm", "dora_magnitude_grad", "dora_zero_magnitude_grad_"]

_BLOCK_O = 32
_BLOCK_C = 128 if _gpu_launch() else 64
_BLOCK_N = 128 if _gpu_launch() else 64


@triton.jit
def _weight_norm_kernel(W, stride_wo, stride_wi, A, stride_ar, stride_ai, B, stride_bo, stride_br, Out,
                        n_out, n_in, rank, scale,
                        BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """Out[o] = ||round(W[o] + round(scale * round(B[o] A)))||, rows o of one tile, fp32 sums."""
    adt = A.dtype.element_ty
    rows = (tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    omask = rows < n_out
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < rank
    b = tl.load(B + rows[:, None] * stride_bo + rr[None, :] * stride_br, mask=omask[:, None] & rmask[None, :],
                other=0.0)
    cc = tl.arange(0, BLOCK_C)
    sq = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, n_in, BLOCK_C):
        cols = c0 + cc
        cmask = cols < n_in
        a = tl.load(A + rr[:, None] * stride_ar + cols[None, :] * stride_ai, mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        ba = _dot(b, a, tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32), IEEE).to(adt)
        low = (ba.to(tl.float32) * scale).to(adt)
        w_ptr = W + rows[:, None] * stride_wo + cols[None, :].to(tl.int64) * stride_wi
        w = tl.load(w_ptr, mask=omask[:, None] & cmask[None, :], other=0.0).to(adt)
        v = (w.to(tl.float32) + low.to(tl.float32)).to(adt).to(tl.float32)
        sq += v * v
    tl.store(Out + rows, tl.sqrt(tl.sum(sq, axis=1)).to(Out.dtype.element_ty), mask=omask)


@triton.jit
def _magnitude_grad_kernel(G, stride_gm, stride_gn, H, stride_hm, stride_hn, XA, stride_xam, stride_xar,
                           B, stride_bn, stride_br, P, n_rows, n_out, rank, scale,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                           IEEE: tl.constexpr):
    """P[row tile, cols] = sum over the tile's rows of cast(G) * (H + scale * XA B^T), in fp32."""
    adt = XA.dtype.element_ty
    pid_m = tl.program_id(0)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = rows < n_rows
    cmask = cols < n_out
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < rank
    xa = tl.load(XA + rows[:, None] * stride_xam + rr[None, :] * stride_xar, mask=valid[:, None] & rmask[None, :],
                 other=0.0)
    bt = tl.load(B + cols[None, :] * stride_bn + rr[:, None] * stride_br, mask=rmask[:, None] & cmask[None, :],
                 other=0.0)
    acc = _dot(xa, bt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE) * scale
    m2 = valid[:, None] & cmask[None, :]
    h_ptr = H + rows[:, None] * stride_hm + cols[None, :].to(tl.int64) * stride_hn
    h = tl.load(h_ptr, mask=m2, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_gm + cols[None, :].to(tl.int64) * stride_gn, mask=m2, other=0.0).to(adt)
    s = tl.sum(g.to(tl.float32) * (h + acc), axis=0)
    tl.store(P + pid_m.to(tl.int64) * n_out + cols, s, mask=cmask)


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """||W + scale * B A|| per output row, in the adapter dtype (PEFT's ``get_weight_norm``, detached).

    Args:
        weight: (out, in) any strides and kernel dtype; lora_a: (r, in); lora_b: (out, r).
        scale: the LoRA scaling.

    Returns:
        (out,) in lora_a's dtype.
    """
    n_out, n_in = weight.shape
    rank = lora_a.shape[0]
    out = torch.empty(n_out, dtype=lora_a.dtype, device=weight.device)
    if n_out:
        _weight_norm_kernel[(triton.cdiv(n_out, _BLOCK_O),)](
            weight, weight.stride(0), weight.stride(1), lora_a, lora_a.stride(0), lora_a.stride(1),
            lora_b, lora_b.stride(0), lora_b.stride(1), out, n_out, n_in, rank, float(scale),
            BLOCK_O=_BLOCK_O, BLOCK_C=_BLOCK_C, BLOCK_R=_block_r(rank), IEEE=_ieee(lora_a.dtype), num_warps=4)
    return out


def dora_magnitude_grad(grad_y: Tensor, h: Tensor, xa: Tensor, lora_b: Tensor, scale: float, wn: Tensor) -> Tensor:
    """sum_i cast(grad_y[i]) * (h[i] + scale * xa[i] B^T) / wn, per output column.

    Args:
        grad_y: (N, out) any strides; h: (N, out) = D(x) W^T in the adapter dtype; xa: (N, r);
        lora_b: (out, r); wn: (out,) the detached weight norm.

    Returns:
        (out,) in the adapter dtype.
    """
    n_rows, n_out = grad_y.shape
    rank = xa.shape[1]
    grid_m = triton.cdiv(n_rows, BLOCK_M)
    part = torch.zeros((max(grid_m, 1), n_out), dtype=torch.float32, device=grad_y.device)
    if n_rows and n_out:
        _magnitude_grad_kernel[(grid_m, triton.cdiv(n_out, _BLOCK_N))](
            grad_y, grad_y.stride(0), grad_y.stride(1), h, h.stride(0), h.stride(1), xa, xa.stride(0), xa.stride(1),
            lora_b, lora_b.stride(0), lora_b.stride(1), part, n_rows, n_out, rank, float(scale),
            BLOCK_M=BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_R=_block_r(rank), IEEE=_ieee(xa.dtype), num_warps=4)
    return (part.sum(0) / wn.float()).to(xa.dtype)


@triton.jit
def _zero_magnitude_kernel(GM, M, G, stride_gm, stride_gn, X, stride_xm, stride_xk, W, stride_wo, stride_wi,
                           XA, stride_xam, stride_xar, B, stride_bo, stride_br, WN, n_rows, n_in, rank, scale,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Column j (one program): if M[j] == 0, GM[j] = sum_i cast(G[i, j]) * (round(x_i . W_j) + scale * xa_i . B_j)
    / WN[j] (fp32 sums, x_i . W_j rounded to the adapter dtype as the GEMM's output is); otherwise nothing."""
    adt = XA.dtype.element_ty
    j = tl.program_id(0).to(tl.int64)
    m = tl.load(M + j)
    if m == 0:
        rr = tl.arange(0, BLOCK_R)
        rmask = rr < rank
        b = tl.load(B + j * stride_bo + rr * stride_br, mask=rmask, other=0.0).to(tl.float32)
        cc = tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, n_rows, BLOCK_M):
            rows = (n0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            valid = rows < n_rows
            h = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c0 in range(0, n_in, BLOCK_C):
                cols = c0 + cc
                cmask = cols < n_in
                xv = tl.load(X + rows[:, None] * stride_xm + cols[None, :].to(tl.int64) * stride_xk,
                             mask=valid[:, None] & cmask[None, :], other=0.0).to(adt).to(tl.float32)
                wv = tl.load(W + j * stride_wo + cols.to(tl.int64) * stride_wi, mask=cmask, other=0.0)
                h += tl.sum(xv * wv.to(adt).to(tl.float32)[None, :], axis=1)
            h = h.to(adt).to(tl.float32)
            xa = tl.load(XA + rows[:, None] * stride_xam + rr[None, :] * stride_xar,
                         mask=valid[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            low = tl.sum(xa * b[None, :], axis=1) * scale
            g = tl.load(G + rows * stride_gm + j * stride_gn, mask=valid, other=0.0).to(adt).to(tl.float32)
            acc += g * (h + low)
        wn = tl.load(WN + j).to(tl.float32)
        tl.store(GM + j, (tl.sum(acc, axis=0) / wn).to(GM.dtype.element_ty))


def dora_zero_magnitude_grad_(grad_m: Tensor, magnitude: Tensor, grad_y: Tensor, x: Tensor, weight: Tensor,
                              xa: Tensor, lora_b: Tensor, scale: float, wn: Tensor) -> Tensor:
    """Overwrite grad_m[j] where magnitude[j] == 0 with the defining sum (see :func:`dora_magnitude_grad`),
    computed for those columns only; every other entry is left as it is.  No host sync.

    Args:
        grad_m: (out,) contiguous, modified in place; magnitude: (out,) contiguous; grad_y: (N, out);
        x: (N, in); weight: (out, in); xa: (N, r) = x A^T; lora_b: (out, r); scale: the LoRA scaling;
        wn: (out,) the detached weight norm.  Any strides for the 2-D tensors.

    Returns:
        grad_m.
    """
    n_rows, n_out = grad_y.shape
    rank = xa.shape[1]
    if n_out:
        _zero_magnitude_kernel[(n_out,)](
            grad_m, magnitude, grad_y, grad_y.stride(0), grad_y.stride(1), x, x.stride(0), x.stride(1),
            weight, weight.stride(0), weight.stride(1), xa, xa.stride(0), xa.stride(1),
            lora_b, lora_b.stride(0), lora_b.stride(1), wn, n_rows, x.shape[1], rank, float(scale),
            BLOCK_M=BLOCK_M, BLOCK_C=_BLOCK_C, BLOCK_R=_block_r(rank), num_warps=4)
    return grad_m
