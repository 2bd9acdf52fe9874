"""Shared pieces of the knowledge cross-entropy Triton kernels.

* ``@triton.jit`` helpers of the main kernel (:mod:`vfm.kernels.kce_fwd_kernel`): softcap, the
  lane-wise online log-sum-exp steps, the packed allowed-word reads and the per-label gradient
  (:func:`_kce_grad`);
* the launcher's host-side helpers: :func:`triton_supports` (which inputs the kernels take) and
  :func:`_config` (launch configuration measured on an H200).

See :mod:`vfm.kernels.knowledge_ce` for the kernel design.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from vfm.ops.kce_reference import KD_KL, KD_NONE, KCEConfig

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- helpers --
@triton.jit
def _softcap(z, cap):
    """Return (cap * tanh(z / cap), tanh(z / cap)) in fp32 without tl.tanh (absent in some versions).

    tanh(x) = sign(x) (1 - e) / (1 + e) with e = 2^(-2 |x| log2 e) in (0, 1]: no overflow for any x,
    +-inf map to +-1, NaN stays NaN.  For |x| < 1/4 the (1 - e) cancellation would cost ~1e-5
    relative accuracy, so an odd Taylor polynomial (error < 2e-8 there) is used instead.
    """
    x = z / cap
    ax = tl.abs(x)
    e = tl.exp2(-2.8853900817779268 * ax)
    th_big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    th_small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                           + x2 * (-0.05396825396825397
                                                                   + x2 * 0.021869488536155203))))
    th = tl.where(ax < 0.25, th_small, th_big)
    th = tl.where(x < 0, -th, th)
    return cap * th, th


@triton.jit
def _ipow(x, P: tl.constexpr):
    """x ** P for a small constexpr integer P (1..4) by multiplications."""
    if P == 1:
        r = x
    elif P == 2:
        r = x * x
    elif P == 3:
        r = x * x * x
    else:
        x2 = x * x
        r = x2 * x2
    return r


@triton.jit
def _lane_step(x, m):
    """One online-logsumexp step per lane (base 2), with one exp2 per element.

    Returns (new running max, factor for the old sum, weight of x relative to the new max).
    -inf inputs weigh 0 (also when the lane has only seen -inf so far: -inf - -inf would be NaN);
    NaN inputs give a NaN weight, so NaN propagates into the sums.
    """
    gt = x > m
    e = tl.exp2(-tl.abs(x - m))
    e = tl.where(x == float("-inf"), 0.0, e)
    return tl.where(gt, x, m), tl.where(gt, e, 1.0), tl.where(gt, 1.0, e)


@triton.jit
def _lane_merge(m):
    """Row max of per-lane maxima (0 when every lane is -inf) and each lane's rescale factor."""
    mx = tl.max(tl.max(m, axis=1), axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx, tl.exp2(m - mx)


@triton.jit
def _rsum(x):
    """Sum of a [ROWS, 32] block."""
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _words_block(bits_row, start, rows, v_bits):
    """The allowed words of the [ROWS, 32] block of labels start + 32 r + c: one word per block
    row (a per-label gather would cost a 64-bit address and a load per element).  ``v_bits`` is V
    for a constrained row, 0 otherwise (nothing is read then)."""
    return tl.load(bits_row + (start >> 5) + rows, mask=start + rows * 32 < v_bits, other=0)


@triton.jit
def _allowed_block(word, start, rows, cols, v_bits):
    """Bit c of word r, broadcast along the block row: whether label start + 32 r + c is allowed."""
    bit = (word[:, None] >> cols[None, :]) & 1
    return (bit != 0) & (start + rows[:, None] * 32 + cols[None, :] < v_bits)


@triton.jit
def _allowed_at(bits_row, offs, msk):
    """Bit v % 32 of word v // 32: whether label v is in the row's allowed set (gathered loads)."""
    word = tl.load(bits_row + (offs >> 5), mask=msk, other=0)
    return ((word >> (offs & 31)) & 1) != 0


@triton.jit
def _kce_grad(
    zc, th, offs, msk, allowed, q, lq2, W_ptr, y,
    lse2, lseT2, t_scale2, fac_p, fac_a, fac_r, w_out,
    cp, cT, cy, cw, ca, cr, ck, kl_nat, beta,
    kd_on, pen_on,
    HAS_CE: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, KD_MODE: tl.constexpr,
    HAS_TEACHER: tl.constexpr, PEN_MODE: tl.constexpr, RULE_INF: tl.constexpr,
    NEED_P: tl.constexpr, NEED_T: tl.constexpr, T_POW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """d(row_loss)/dz at the labels ``offs`` (dense block, or the top-k fix-up), fp32.

    q / lq2: the teacher's qT and log2 qT at those labels (q = 0 on the dense pass of a top-k
    teacher).  The c* coefficients are already zero for inactive terms; every teacher-derived
    vector is additionally masked with ``tl.where`` so a NaN teacher of an inactive term stays out.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    g = tl.zeros_like(zc)
    if NEED_T:
        aT = zc * t_scale2
        pT = tl.exp2(aT - lseT2)
        g += cT * pT  # kl: T pT, posterior: T pT (their -T qT / -T r parts below)
    if NEED_P:
        if T_POW > 0:
            p = _ipow(pT, T_POW) * fac_p
        else:
            p = tl.exp2(zc * LOG2E - lse2)
        g += cp * p  # CE, z-loss, mass penalty
        if PEN_MODE == 1:
            g -= ca * tl.where(allowed, p * fac_a, 0.0)
    if HAS_CE:
        g -= tl.where(offs == y, cy, 0.0)
        if SMOOTH:
            if HAS_WEIGHT:
                g -= cw * tl.load(W_ptr + offs, mask=msk, other=0.0)
            else:
                g -= cw
    if KD_MODE == 1:
        g -= tl.where(kd_on, ck * q, 0.0)
    elif KD_MODE == 2:
        # pT = 0 adds nothing (0 log 0 = 0): the log terms are -inf - -inf = NaN where student and
        # teacher are both -inf (masked vocabulary), so select rather than multiply by 0.
        g += tl.where(kd_on, tl.where(pT != 0.0, ck * pT * (((aT - lseT2) - lq2) * LN2 - kl_nat), 0.0), 0.0)
    elif KD_MODE == 3:
        lm2 = tl.log2(beta * q + (1.0 - beta) * pT)
        g += tl.where(kd_on, tl.where(pT != 0.0, (ck * (1.0 - beta)) * pT * (((aT - lseT2) - lm2) * LN2 - kl_nat),
                                      0.0), 0.0)
    if PEN_MODE == 2:
        if HAS_TEACHER:
            base = q
        else:
            base = pT
        if RULE_INF:
            r = tl.where(allowed, base, 0.0)
        else:
            r = tl.where(allowed, base, base * w_out)
        g -= tl.where(pen_on, cr * (r * fac_r), 0.0)
    if SOFTCAP:
        g = g * (1.0 - th * th)
    return g



# ---------------------------------------------------------------------------- launcher --
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _gpu_launch() -> bool:
    """Whether launches are configured for a GPU (block sizes, prefetch, device asserts).

    True off the interpreter; under ``TRITON_INTERPRET=1`` only with ``VFM_TRITON_GPU_LAUNCH=1``,
    which ``tests/test_triton_sm90_compile.py`` sets to record, from CPU tensors, the launches a GPU
    gets (the interpreter's own defaults are smaller blocks and no prefetch, for speed).
    """
    return not _interpreting() or os.environ.get("VFM_TRITON_GPU_LAUNCH", "0") == "1"


def triton_supports(
    logits: Tensor,
    teacher: Optional[Tensor] = None,
    topk_idx: Optional[Tensor] = None,
    grad: Optional[Tensor] = None,
    cfg: Optional[KCEConfig] = None,
) -> Optional[str]:
    """Why the Triton kernel cannot take these inputs, or None when it can.

    Unsupported: float64 (or other non fp32/fp16/bf16) logits, teacher or grad; a last-dim stride
    other than 1; a top-k teacher with a KD mode other than ``kl``; CPU tensors without
    ``TRITON_INTERPRET=1``.
    """
    for name, t in (("logits", logits), ("teacher", teacher), ("grad", grad)):
        if t is None:
            continue
        if t.dtype not in _SUPPORTED_DTYPES:
            return f"{name} is {t.dtype}; the triton kernels take float32, float16 or bfloat16"
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            return f"{name} must be 2-D with stride(1) == 1 (got shape {tuple(t.shape)}, strides {t.stride()})"
    if logits.device.type != "cuda" and not (logits.device.type == "cpu" and _interpreting()):
        return f"the triton kernels run on CUDA tensors (CPU only with TRITON_INTERPRET=1), got {logits.device}"
    if cfg is not None and topk_idx is not None and cfg.kd_mode not in (KD_NONE, KD_KL):
        return "a top-k teacher supports kd='kl' only"
    return None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _config(vocab: int, block: Optional[int], num_warps: Optional[int], prefetch: Optional[bool],
            stages: Optional[int], streams: int) -> Tuple[int, int, bool, int]:
    """Launch configuration: (BLOCK, num_warps, PREFETCH, STAGES).

    Every lane accumulator costs BLOCK / (32 num_warps) registers per thread, so the defaults keep
    4 to 8 elements per thread and several programs resident per SM.  Measured on an H200
    (N = 8192, V = 128256, bf16, triton 3.6, kernel alone, gradient included; 10% rows ignored):

    * logits alone: BLOCK 2048 / 8 warps, no prefetch: CE 1.44 ms (device copy 4.25 TB/s);
    * + teacher: BLOCK 1024 / 8 warps, hand prefetch: CE + KD(kl, T=2) 2.63 ms;
    * + allowed bits: BLOCK 512 / 4 warps, hand prefetch: CE + KD + mass 2.97 ms.

    Under the interpreter: BLOCK 1024, no prefetch (unless ``VFM_TRITON_GPU_LAUNCH=1``).  ``VFM_KCE_BLOCK`` / ``VFM_KCE_WARPS`` /
    ``VFM_KCE_PREFETCH`` / ``VFM_KCE_STAGES`` override them (benchmarks).  No autotuning: it
    would rerun the in-place kernel on its own output.
    """
    interp = not _gpu_launch()
    if block is None:
        if interp:
            default = 1024
        else:
            default = 2048 if streams == 1 else 1024 if streams == 2 else 512
        block = _env_int("VFM_KCE_BLOCK", default)
    block = max(32, min(triton.next_power_of_2(block), triton.next_power_of_2(vocab)))  # [BLOCK // 32, 32] tiles
    if num_warps is None:
        num_warps = _env_int("VFM_KCE_WARPS", 0) or max(1, min(8, block // 128))
    if prefetch is None:
        prefetch = bool(_env_int("VFM_KCE_PREFETCH", int(streams > 1 and not interp)))
    if stages is None:
        stages = _env_int("VFM_KCE_STAGES", 1)
    return block, num_warps, bool(prefetch), stages


def _int_power(temperature: float) -> int:
    """T when T is 1, 2, 3 or 4 exactly (then exp2(a) = exp2(a / T) ** T), else 0."""
    return int(temperature) if temperature in (1.0, 2.0, 3.0, 4.0) else 0
