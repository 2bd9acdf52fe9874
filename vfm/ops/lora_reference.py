"""Pure-PyTorch reference backend of the low-rank adapter ops, and their kernel contract.

Every backend of ``lora_linear``, ``dora_linear``, ``adalora_linear`` and ``lora_linear_multi``
registers a :class:`LowRankKernels` pair ``(forward, backward)`` with these signatures and returns
the same numbers (within the per-dtype tolerances of the tests).  The public functions in
:mod:`vfm.ops.lora_api` validate the user's arguments and turn them into this normalised form.

Common arguments:
    x: (N, in) input, ``stride(1) == 1``, any row stride; the *base dtype*.
    weight: (out, in) frozen or trainable base weight in the base dtype, any strides (a transposed
        view when PEFT's ``fan_in_fan_out`` is set; a kernel that needs a layout says so through
        its ``unsupported`` hook and the registry runs another backend).
    bias: (out,) in the base dtype, or None.
    lora_a: (r, in), lora_b: (out, r), r >= 1, both in the *adapter dtype* (may differ from the
        base dtype, e.g. fp32 adapters on a bf16 model, as PEFT's ``autocast_adapter_dtype``
        makes them).  As PEFT does, the low-rank branch runs in the adapter dtype: x is cast to it,
        the branch's output is added to the base output and the sum is rounded to the base dtype.
    scale: the python float ``scaling`` (alpha / r for LoRA, alpha / sqrt(r) for rsLoRA).
    dropout_p: p in [0, 1); 0.0 means no dropout (the public layer passes 0.0 when not training).
    seed: int64 tensor of shape () on the CPU; read only when dropout_p > 0.

Dropout D (bit-exact in every backend):
    For element (i, j) of x seen as a contiguous (N, in) matrix, offset = i * in + j (int64), and
    with k0 = seed & 0xFFFFFFFF, k1 = (seed >> 32) & 0xFFFFFFFF, lo = offset & 0xFFFFFFFF,
    hi = offset >> 32, all arithmetic on unsigned 32-bit words (multiplication modulo 2^32,
    logical shifts)::

        fmix32(h) = h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
        hash      = fmix32(fmix32(lo ^ k0) ^ k1 ^ (hi * 0x9E3779B9))

    The element is kept iff ``hash >= floor(p * 2^32)`` (unsigned compare), and a kept value is
    multiplied by ``1 / (1 - p)`` in the op-math type (fp32 for fp32/fp16/bf16, fp64 for fp64) and
    rounded to its dtype; a dropped one is 0.  D applies to x *after* its cast to the adapter dtype.
    The mask is a pure function of (seed, offset): backward regenerates it, nothing stores it, and
    the same seed gives the same mask on any device, in any backend and for any row order (the
    multi-adapter op uses the offsets of the caller's row order).  The reference computes the hash
    with int64 tensor ops masked to 32 bits (products split into 16-bit halves, so nothing
    overflows).

Forward/backward pairs (``needs`` is a tuple of bools, one per differentiable input in the order
listed; a backend returns None for every gradient it was not asked for):

* ``lora_linear``: ``forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed) -> (y, xa)``
  with y = x W^T + b + scale * (D(x) A^T) B^T (N, out) in the base dtype, and xa = D(x) A^T (N, r)
  in the adapter dtype (saved for backward; the only activation besides x itself).
  ``backward(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs)`` ->
  (grad_x, grad_weight, grad_bias, grad_a, grad_b), needs for (x, weight, bias, lora_a, lora_b).
* ``dora_linear`` (PEFT's DoRA, ``DoraLinearLayer.forward``): with g = magnitude / ||W + scale B A||
  (row norms, computed in the adapter dtype and detached: no gradient flows through them),
  u = D(x)::

        y = x W^T + b + (g - 1) * (u W^T) + g * scale * (u A^T) B^T       (dropout active)
        y = g * (x W^T) + b + g * scale * (x A^T) B^T                      (no dropout)

  The dropout form is PEFT's extra base pass on the dropped input.  ``forward(x, weight, bias,
  lora_a, lora_b, magnitude, scale, dropout_p, seed) -> (y, xa, weight_norm)``; ``backward(grad_y,
  x, weight, lora_a, lora_b, magnitude, xa, weight_norm, scale, dropout_p, seed, needs)`` -> (grad_x,
  grad_weight, grad_bias, grad_a, grad_b, grad_magnitude).  The magnitude's gradient needs
  u W^T + scale * xa B^T, which backward recomputes (one extra GEMM) instead of saving an (N, out)
  activation.
* ``adalora_linear`` (PEFT's ``SVDLinear``): ``y = x W^T + b + (D(x) (A * E)^T B^T) * scale /
  (ranknum + 1e-5)`` with lora_e (r,) and ranknum a (1,) tensor (read on the device: no host
  synchronisation).  ``forward(x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p,
  seed) -> (y, xa)`` with xa = D(x) (A * E)^T; ``backward(grad_y, x, weight, lora_a, lora_e, lora_b,
  ranknum, xa, scale, dropout_p, seed, needs)`` -> (grad_x, grad_weight, grad_bias, grad_a, grad_e,
  grad_b).  Ranks whose E entry is 0 contribute nothing to y, grad_x, grad_a and grad_b, so a kernel
  may skip their A/B work; lora_e's gradient (A_k D(x)) . (B_k^T grad_y) scale / (ranknum + 1e-5)
  must still be produced for them: PEFT initialises lora_E to zeros, so without it AdaLoRA would
  never start learning.  The reference computes every rank.
* ``lora_linear_multi``: ``forward(x, weight, bias, a_stack (K, r, in), b_stack (K, out, r),
  scalings (K,) float32, adapter_ids (N,) int64 in [-1, K), dropout_p, seed) -> (y, xa)``: row i
  uses adapter ``adapter_ids[i]`` (-1: the base layer only, xa row = 0).  ``backward(grad_y, x,
  weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p, seed, needs)`` -> (grad_x,
  grad_weight, grad_bias, grad_a_stack, grad_b_stack).  The reference sorts the rows by adapter
  and runs one GEMM pair per segment (one host synchronisation for the segment sizes).

Gradients are rounded once to their input's dtype; GEMMs and bias sums accumulate in fp32 (fp64
for fp64 inputs).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

MASK32 = 0xFFFFFFFF
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35
GOLDEN = 0x9E3779B9
ADALORA_EPS = 1e-5


class LowRankKernels(NamedTuple):
    """A backend's implementation of one low-rank op: its forward and its backward."""

    forward: Callable
    backward: Callable

    def __call__(self, *args):
        return self.forward(*args)


# ------------------------------------------------------------------------- dropout hash --
def dropout_threshold(p: float) -> int:
    """floor(p * 2^32): an element is kept iff its hash is >= this (unsigned)."""
    return int(math.floor(float(p) * 4294967296.0))


def _mul32(h: Tensor, c: int) -> Tensor:
    """(h * c) mod 2^32 for h in [0, 2^32) (int64) without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & MASK32


def fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def dropout_hash(seed: int, offsets: Tensor) -> Tensor:
    """The 32-bit hash of each int64 element offset (see the module docstring), as int64."""
    seed = int(seed)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    h = fmix32((offsets & MASK32) ^ k0)
    hi = offsets >> 32
    return fmix32(h ^ k1 ^ _mul32(hi, GOLDEN))


_CHUNK = 1 << 18  # elements hashed per step: two int64 buffers of 2 MiB stay in cache


def _mul32_(h: Tensor, c: int, tmp: Tensor) -> Tensor:
    """In-place (h * c) mod 2^32 (tmp: scratch of h's shape)."""
    torch.mul(h, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return h.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(MASK32)


def _fmix32_(h: Tensor, tmp: Tensor) -> Tensor:
    for shift, const in ((16, FMIX_C1), (13, FMIX_C2)):
        h.bitwise_xor_(torch.bitwise_right_shift(h, shift, out=tmp))
        _mul32_(h, const, tmp)
    return h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))


def dropout_keep_mask(seed: int, n_rows: int, n_cols: int, p: float, device=None, row0: int = 0) -> Tensor:
    """Bool (n_rows, n_cols) keep-mask of dropout with probability p for this seed.

    Row i of the result is row ``row0 + i`` of the (N, n_cols) view: equal, bit for bit, to
    ``dropout_hash(seed, (row0 + i) * n_cols + j) >= dropout_threshold(p)``; computed in place, a
    cache-sized chunk of offsets at a time (several times faster than the plain form).
    """
    seed = int(seed)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    thr = dropout_threshold(p)
    total, base = n_rows * n_cols, int(row0) * n_cols
    out = torch.empty((n_rows, n_cols), dtype=torch.bool, device=device)
    flat = out.view(-1)
    chunk = min(_CHUNK, max(total, 1))
    h = torch.empty(chunk, dtype=torch.int64, device=out.device)
    tmp = torch.empty_like(h)
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        hh, tt = h[:n], tmp[:n]
        torch.arange(base + start, base + start + n, out=hh)
        high = None
        if base + start + n - 1 > MASK32:  # offsets past 2^32: their high word enters the second round
            high = _mul32_(torch.bitwise_right_shift(hh, 32), GOLDEN, torch.empty_like(hh))
        _fmix32_(hh.bitwise_and_(MASK32).bitwise_xor_(k0), tt)
        hh.bitwise_xor_(k1)
        if high is not None:
            hh.bitwise_xor_(high)
        torch.ge(_fmix32_(hh, tt), thr, out=flat[start:start + n])
    return out


class _Dropout:
    """D for one call of an op: the keep-mask is hashed at most once, on first use, never stored."""

    def __init__(self, seed: Tensor, p: float, x: Tensor) -> None:
        self.p = float(p)
        self.seed = int(seed) if self.p > 0.0 else 0
        self.shape, self.device = tuple(x.shape), x.device
        self._keep: Optional[Tensor] = None

    def __call__(self, v: Tensor) -> Tensor:
        """D(v) for v of x's (N, in) shape: kept entries times 1 / (1 - p), dropped ones 0.

        D is diagonal, hence its own transpose: backward applies it to the input gradient too.
        """
        if self.p == 0.0:
            return v
        if self._keep is None:
            self._keep = dropout_keep_mask(self.seed, self.shape[0], self.shape[1], self.p, self.device)
        return torch.where(self._keep, v * (1.0 / (1.0 - self.p)), torch.zeros((), dtype=v.dtype, device=v.device))

    def input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """D(x cast to the adapter dtype); x itself (no copy) when there is neither cast nor dropout."""
        return self(x if x.dtype == dtype else x.to(dtype))


def apply_dropout(v: Tensor, seed: int, p: float) -> Tensor:
    """D(v) for a (N, in) tensor with this seed (a new tensor; v itself when p == 0)."""
    return _Dropout(torch.tensor(seed), p, v)(v)


def _add_into(y: Tensor, delta: Tensor) -> Tensor:
    """y += delta, computed in the promoted type and rounded to y's dtype (PEFT's `result + lora`)."""
    return y.add_(delta)


def _grad_input(grad_y: Tensor, weight: Tensor, low: Optional[Tensor], drop: _Dropout) -> Tensor:
    """grad_y W + D(low) in the base dtype (low: the low-rank branch's (N, in) input gradient)."""
    gx = torch.mm(grad_y, weight)
    if low is not None:
        _add_into(gx, drop(low))
    return gx


def _grad_input_lr(grad_y: Tensor, weight: Tensor, gxa: Tensor, a: Tensor, drop: _Dropout) -> Tensor:
    """grad_y W + D(gxa A): one accumulating GEMM when there is neither dropout nor a dtype change."""
    if drop.p == 0.0 and gxa.dtype == grad_y.dtype:
        return torch.mm(grad_y, weight).addmm_(gxa, a)
    return _grad_input(grad_y, weight, torch.mm(gxa, a), drop)


# ------------------------------------------------------------------------------- LoRA --
def lora_forward_torch(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed) -> Tuple[Tensor, Tensor]:
    drop = _Dropout(seed, dropout_p, x)
    u = drop.input(x, lora_a.dtype)
    xa = torch.mm(u, lora_a.t())
    y = F.linear(x, weight, bias)
    if y.dtype == lora_b.dtype:
        y.addmm_(xa, lora_b.t(), alpha=scale)
    else:
        _add_into(y, torch.mm(xa, lora_b.t()).mul_(scale))
    return y, xa


def lora_backward_torch(grad_y, x, weight, lora_a, lora_b, xa, scale, dropout_p, seed, needs):
    need_x, need_w, need_bias, need_a, need_b = needs
    drop = _Dropout(seed, dropout_p, x)
    g_low = grad_y.to(lora_b.dtype)
    gxa = torch.mm(g_low, lora_b).mul_(scale) if (need_x or need_a) else None
    gx = _grad_input_lr(grad_y, weight, gxa, lora_a, drop) if need_x else None
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    ga = torch.mm(gxa.t(), drop.input(x, lora_a.dtype)) if need_a else None
    gb = torch.mm(g_low.t(), xa).mul_(scale) if need_b else None
    return gx, gw, gbias, ga, gb


# ------------------------------------------------------------------------------- DoRA --
def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """||W + scale * B A|| per output row, in the adapter dtype (PEFT's ``get_weight_norm``)."""
    with torch.no_grad():
        adapted = weight.to(lora_a.dtype) + scale * torch.mm(lora_b, lora_a)
        return torch.linalg.vector_norm(adapted, dim=1).to(lora_a.dtype)


def dora_forward_torch(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed):
    drop = _Dropout(seed, dropout_p, x)
    wn = dora_weight_norm(weight, lora_a, lora_b, scale)
    g = magnitude / wn
    u = drop.input(x, lora_a.dtype)
    xa = torch.mm(u, lora_a.t())
    y = F.linear(x, weight, bias)
    if dropout_p > 0.0:
        base = F.linear(u, weight.to(u.dtype))  # PEFT's extra base pass on the dropped input
    else:
        base = y if bias is None else y - bias
    delta = (g - 1) * base + (g * scale) * torch.mm(xa, lora_b.t())
    return _add_into(y, delta), xa, wn


def dora_magnitude_grad_from_output(grad_y: Tensor, y: Optional[Tensor], magnitude: Tensor,
                                    bias: Optional[Tensor] = None, *, zero_ok: bool = False) -> Optional[Tensor]:
    """grad_magnitude from DoRA's own output, without the (N, in) x (in, out) product, or None.

    Without dropout, y = g * (x W'^T) + b with g = magnitude / ||W'||, so
    grad_magnitude = sum_i grad_y[i] * (x W'^T)[i] / ||W'|| = sum_i grad_y[i] * (y[i] - b) / magnitude:
    the column sums of grad_y * y minus b times those of grad_y (products in y's dtype, sums in
    float32 at least).  None (the caller then computes it the reference way) when y is not given,
    is in another dtype than the magnitude, some magnitude is exactly 0 (y carries no information
    about that column), or there is a bias and y is a 16-bit float (y - b would cancel digits y
    does not have when the bias dominates).  ``zero_ok=True`` skips the zero check (no host sync):
    the entries of a zero magnitude are then finite placeholders the caller must overwrite (the
    triton backend's :func:`~vfm.kernels.lora_dora.dora_zero_magnitude_grad_`).
    """
    if y is None or y.dtype != magnitude.dtype or y.shape != grad_y.shape:
        return None
    if bias is not None and (y.dtype not in (torch.float32, torch.float64) or bias.shape != y.shape[1:]):
        return None
    if not zero_ok and bool((magnitude == 0).any()):
        return None
    acc = torch.float32 if y.dtype in (torch.float16, torch.bfloat16) else y.dtype
    gy = grad_y.to(y.dtype)
    total = (gy * y).sum(0, dtype=acc)
    if bias is not None:
        total.sub_(gy.sum(0, dtype=acc) * bias.to(acc))
    divisor = torch.where(magnitude == 0, torch.ones_like(magnitude), magnitude) if zero_ok else magnitude
    return total.div_(divisor).to(magnitude.dtype)


def dora_backward_torch(grad_y, x, weight, lora_a, lora_b, magnitude, xa, wn, scale, dropout_p, seed, needs,
                        y=None, bias=None):
    """The reference backward; ``y`` and ``bias`` (DoRA's output and the base bias, passed by the op
    without dropout) are not used here: the reference keeps the defining formula for every gradient."""
    need_x, need_w, need_bias, need_a, need_b, need_m = needs
    drop = _Dropout(seed, dropout_p, x)
    adt = lora_a.dtype
    g = magnitude / wn
    g_low = grad_y.to(adt)
    gg = g_low * g  # d y / d (low-rank branch before its scale), per element
    u = drop.input(x, adt) if (need_a or need_m or (need_w and dropout_p > 0.0)) else None
    gxa = torch.mm(gg, lora_b).mul_(scale) if (need_x or need_a) else None
    gx = gw = None
    if dropout_p > 0.0:
        if need_x:
            low = torch.mm(g_low * (g - 1), weight.to(adt)).add_(torch.mm(gxa, lora_a))
            gx = _grad_input(grad_y, weight, low, drop)
        if need_w:
            gw = torch.mm(grad_y.t(), x)
            _add_into(gw, torch.mm((g_low * (g - 1)).t(), u))
    else:
        if need_x:
            gx = _grad_input_lr(gg.to(grad_y.dtype), weight, gxa, lora_a, drop)
        if need_w:
            gw = torch.mm(gg.to(grad_y.dtype).t(), x)
    gbias = grad_y.sum(0) if need_bias else None
    ga = torch.mm(gxa.t(), u) if need_a else None
    gb = torch.mm(gg.t(), xa).mul_(scale) if need_b else None
    gm = None
    if need_m:
        h = F.linear(u, weight.to(adt))
        h.addmm_(xa, lora_b.t(), alpha=scale)
        gm = (g_low * h).sum(0) / wn
    return gx, gw, gbias, ga, gb, gm


# ---------------------------------------------------------------------------- AdaLoRA --
def adalora_forward_torch(x, weight, bias, lora_a, lora_e, lora_b, scale, ranknum, dropout_p, seed):
    drop = _Dropout(seed, dropout_p, x)
    a_eff = lora_a * lora_e[:, None]
    xa = torch.mm(drop.input(x, lora_a.dtype), a_eff.t())
    y = F.linear(x, weight, bias)
    low = torch.mm(xa, lora_b.t()).mul_(scale).div_(ranknum + ADALORA_EPS)
    return _add_into(y, low), xa


def adalora_backward_torch(grad_y, x, weight, lora_a, lora_e, lora_b, ranknum, xa, scale, dropout_p, seed, needs):
    need_x, need_w, need_bias, need_a, need_e, need_b = needs
    drop = _Dropout(seed, dropout_p, x)
    factor = (ranknum + ADALORA_EPS).reciprocal().mul_(scale)
    g_low = grad_y.to(lora_b.dtype)
    a_eff = lora_a * lora_e[:, None]
    gxa = torch.mm(g_low, lora_b).mul_(factor) if (need_x or need_a or need_e) else None
    gx = _grad_input_lr(grad_y, weight, gxa, a_eff, drop) if need_x else None
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    ga = ge = None
    if need_a or need_e:
        g_aeff = torch.mm(gxa.t(), drop.input(x, lora_a.dtype))
        ga = g_aeff * lora_e[:, None] if need_a else None
        ge = (g_aeff * lora_a).sum(1) if need_e else None
    gb = torch.mm(g_low.t(), xa).mul_(factor) if need_b else None
    return gx, gw, gbias, ga, ge, gb


# ---------------------------------------------------------------------- multi-adapter --
def _segments(adapter_ids: Tensor, n_adapters: int) -> Sequence[Tuple[int, Tensor]]:
    """(adapter k, row indices using k) for each adapter that has rows; rows grouped by sorting."""
    order = torch.argsort(adapter_ids, stable=True)
    counts = torch.bincount(adapter_ids + 1, minlength=n_adapters + 1).tolist()  # slot 0: id -1
    out, start = [], counts[0]
    for k in range(n_adapters):
        n = counts[k + 1]
        if n:
            out.append((k, order[start:start + n]))
        start += n
    return out


def lora_multi_forward_torch(x, weight, bias, a_stack, b_stack, scalings, adapter_ids, dropout_p, seed):
    drop = _Dropout(seed, dropout_p, x)
    adt = a_stack.dtype
    u = drop.input(x, adt)
    y = F.linear(x, weight, bias)
    xa = u.new_zeros((x.shape[0], a_stack.shape[1]))
    low = u.new_zeros((x.shape[0], b_stack.shape[1]))
    for k, rows in _segments(adapter_ids, a_stack.shape[0]):
        xa_k = torch.mm(u.index_select(0, rows), a_stack[k].t())
        xa.index_copy_(0, rows, xa_k)
        low.index_copy_(0, rows, torch.mm(xa_k, b_stack[k].t()).mul_(scalings[k].to(adt)))
    return _add_into(y, low), xa


def lora_multi_backward_torch(grad_y, x, weight, a_stack, b_stack, scalings, adapter_ids, xa, dropout_p, seed, needs):
    need_x, need_w, need_bias, need_a, need_b = needs
    drop = _Dropout(seed, dropout_p, x)
    adt = a_stack.dtype
    g_low = grad_y.to(adt)
    u = drop.input(x, adt) if need_a else None
    low = g_low.new_zeros(x.shape) if need_x else None
    ga = torch.zeros_like(a_stack) if need_a else None
    gb = torch.zeros_like(b_stack) if need_b else None
    for k, rows in _segments(adapter_ids, a_stack.shape[0]):
        scale = scalings[k].to(adt)
        g_k = g_low.index_select(0, rows)
        if need_x or need_a:
            gxa = torch.mm(g_k, b_stack[k]).mul_(scale)
            if need_x:
                low.index_copy_(0, rows, torch.mm(gxa, a_stack[k]))
            if need_a:
                ga[k] = torch.mm(gxa.t(), u.index_select(0, rows))
        if need_b:
            gb[k] = torch.mm(g_k.t(), xa.index_select(0, rows)).mul_(scale)
    gx = _grad_input(grad_y, weight, low, drop) if need_x else None
    gw = torch.mm(grad_y.t(), x) if need_w else None
    gbias = grad_y.sum(0) if need_bias else None
    return gx, gw, gbias, ga, gb


LORA_TORCH = LowRankKernels(lora_forward_torch, lora_backward_torch)
DORA_TORCH = LowRankKernels(dora_forward_torch, dora_backward_torch)
ADALORA_TORCH = LowRankKernels(adalora_forward_torch, adalora_backward_torch)
LORA_MULTI_TORCH = LowRankKernels(lora_multi_forward_torch, lora_multi_backward_torch)
