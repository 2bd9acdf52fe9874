"""Blockwise fused linear knowledge cross-entropy: the loop every backend shares.

The [N, V] logits ``hidden @ weight.T + bias`` are never materialised.  For each block of ``Nb``
rows:

1. ``z_b = hidden_b @ weight.T (+ bias)`` into one reused ``[Nb, V]`` buffer (a BLAS / cuBLAS
   GEMM, fp32 accumulation inside the GEMM; ``addmm`` with ``out=`` so nothing is allocated);
   with a teacher head, ``t_b = teacher_hidden_b @ teacher_weight.T (+ teacher_bias)`` into a
   second reused buffer, without gradient;
2. the knowledge cross-entropy kernel of the chosen backend runs on the block *in place*: it
   writes the block's loss terms and overwrites ``z_b`` with ``G_b = d loss / d z_b`` (the
   per-row scales, denominators and packed allowed sets were computed once for the whole batch,
   so a block's numbers are exactly the rows' share of the whole loss);
3. ``grad_hidden_b = G_b @ weight`` (GEMM), ``grad_weight += G_b.T @ hidden_b`` (GEMM, into the
   weight-gradient accumulator) and ``grad_bias += G_b.sum(0)`` (fp32).

Three GEMMs per block and one ``[Nb, V]`` buffer (two with a teacher head).  GEMMs are BLAS's job
(MKL / OpenBLAS on CPU, cuBLAS on CUDA): no hand-written loop beats them, so every backend uses
``torch.mm``/``torch.addmm`` for them and differs only in the per-element kernel of step 2
(``torch``: the pure-PyTorch reference :func:`~vfm.ops.kce_reference.kce_forward_torch`;
``cpp``: the hand-written OpenMP/vectorised C++ kernel ``vfm_C::kce_forward``; ``triton``: the
Triton kernel of :mod:`vfm.kernels.knowledge_ce`).

Weight-gradient accumulation (``accum_fp32``): for fp32/fp64 weights the blocks accumulate
straight into the returned gradient.  For fp16/bf16 weights the default accumulates in fp32 and
rounds once at the end; the fp32 accumulator is split in two halves, the first living *inside the
returned half-precision gradient's own storage* (V/2 x H fp32 values fill exactly V x H half
values) and the second a separate V/2 x H fp32 tensor.  At the end the first half is converted
in place, in ascending row chunks (a chunk's half-precision rows land at or before the bytes it
was read from, never on rows still unread), and the second half is converted into the tail and
freed.  Peak memory: the returned gradient plus one half-size fp32 tensor (1.5x the gradient
instead of 3x for a separate fp32 accumulator).  On CUDA each block's GEMM writes fp32 straight
from half inputs (``addmm(..., out_dtype=torch.float32)``); where that variant is missing (CPU,
older torch) the block's gradient is upcast to fp32 first (exact, one extra fp32 block).
``accum_fp32=False`` accumulates in the weight's dtype (rounding every block).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from vfm.ops import flce_filter
from vfm.ops.kce_reference import KCEConfig

#: Bytes of logits buffers (student + teacher) a block may use when ``block_rows`` is not given.
BLOCK_BUDGET_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
_CONVERT_CHUNK_BYTES = 64 << 20
_MIXED_MM_OK = {}


def default_block_rows(n_rows: int, vocab: int, elem_bytes: int, n_buffers: int, device: torch.device) -> int:
    """Rows per block: as many as fit the device's buffer budget (:data:`BLOCK_BUDGET_BYTES`).

    Args:
        n_rows: N; vocab: V; elem_bytes: bytes per logit; n_buffers: 1, or 2 with a teacher head.
        device: device of the hidden states.

    Returns:
        Nb in [1, N] (a multiple of 16 when at least 16 rows fit).
    """
    budget = BLOCK_BUDGET_BYTES.get(device.type, BLOCK_BUDGET_BYTES["cuda"])
    rows = max(1, budget // max(1, vocab * elem_bytes * n_buffers))
    if rows >= 16:
        rows -= rows % 16
    return max(1, min(rows, max(n_rows, 1)))


def _mixed_addmm(acc: Tensor, g_t: Tensor, h: Tensor, first: bool) -> None:
    """acc (fp32) (+)= g_t @ h for half-precision g_t, h, accumulating in fp32."""
    key = acc.device.type
    if _MIXED_MM_OK.get(key, key == "cuda"):
        try:
            if first:
                torch.mm(g_t, h, out_dtype=torch.float32, out=acc)
            else:
                torch.addmm(acc, g_t, h, out_dtype=torch.float32, out=acc)
            _MIXED_MM_OK[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _MIXED_MM_OK[key] = False
    if first:
        torch.mm(g_t.float(), h.float(), out=acc)
    else:
        acc.addmm_(g_t.float(), h.float())


class WeightGradAccumulator:
    """Accumulates sum_b G_b.T @ hidden_b into a (V, H) gradient; see the module docstring.

    Args:
        vocab, hidden_size: V and H.
        dtype: dtype of the returned gradient (the weight's).
        device: its device.
        accum_fp32: accumulate half-precision gradients in fp32 (ignored for fp32/fp64).
    """

    def __init__(self, vocab: int, hidden_size: int, dtype: torch.dtype, device: torch.device, accum_fp32: bool):
        self.out = torch.empty(vocab, hidden_size, dtype=dtype, device=device)
        self.first = True
        self.mixed = accum_fp32 and dtype in (torch.float16, torch.bfloat16)
        if not self.mixed:
            self.parts: List[Tuple[int, int, Tensor]] = [(0, vocab, self.out)]
            return
        half = vocab // 2
        flat = self.out.view(-1)[: 2 * half * hidden_size]
        low = flat.view(torch.float32).view(half, hidden_size) if half else self.out.new_empty(
            (0, hidden_size), dtype=torch.float32)
        high = torch.empty(vocab - half, hidden_size, dtype=torch.float32, device=device)
        self.parts = [(0, half, low), (half, vocab, high)]

    def add(self, grad_block: Tensor, hidden_block: Tensor) -> None:
        """Add grad_block.T @ hidden_block (grad_block (m, V), hidden_block (m, H))."""
        for v0, v1, acc in self.parts:
            if v1 == v0:
                continue
            g_t = grad_block[:, v0:v1].t()
            if self.mixed:
                _mixed_addmm(acc, g_t, hidden_block, self.first)
            elif self.first:
                torch.mm(g_t, hidden_block, out=acc)
            else:
                acc.addmm_(g_t, hidden_block)
        self.first = False

    def zero_(self) -> "WeightGradAccumulator":
        """Start from zeros, so that :meth:`add_range` / :meth:`index_add` may touch any rows."""
        for _, _, acc in self.parts:
            acc.zero_()
        self.first = False
        return self

    def add_range(self, grad_cols: Tensor, hidden_block: Tensor, v0: int, v1: int) -> None:
        """Add grad_cols.T @ hidden_block to gradient rows [v0, v1) (grad_cols (m, v1 - v0)).

        Only after :meth:`zero_` (rows outside the range are not written).
        """
        for p0, p1, acc in self.parts:
            a, b = max(v0, p0), min(v1, p1)
            if b <= a:
                continue
            g_t = grad_cols[:, a - v0:b - v0].t()
            dst = acc[a - p0:b - p0]
            if self.mixed:
                _mixed_addmm(dst, g_t, hidden_block, False)
            else:
                dst.addmm_(g_t, hidden_block)

    def index_add(self, rows: Tensor, values: Tensor, valid: Optional[Tensor]) -> None:
        """gradient[rows[i]] += values[i] for the i where valid[i] (all if None; values fp32 (n, H)).

        No host synchronisation.  Only after :meth:`zero_`.
        """
        zero = values.new_zeros(())
        for p0, p1, acc in self.parts:
            if p1 == p0:
                continue
            if len(self.parts) == 1 and valid is None:
                flce_filter.scatter_add_rows(acc, rows, values.to(acc.dtype))
                continue
            inside = (rows >= p0) & (rows < p1)
            if valid is not None:
                inside &= valid
            idx = (rows - p0).clamp(0, p1 - p0 - 1)
            vals = torch.where(inside[:, None], values, zero)
            flce_filter.scatter_add_rows(acc, idx, vals.to(acc.dtype))  # a half accumulator rounds each add

    def finish(self) -> Tensor:
        """The (V, H) gradient in the weight's dtype (zeros if nothing was added)."""
        if self.first:
            self.parts = []
            return self.out.zero_()
        if self.mixed:
            (_, half, low), (_, vocab, high) = self.parts
            hidden_size = self.out.shape[1]
            step = max(1, _CONVERT_CHUNK_BYTES // max(1, 4 * hidden_size))
            for r0 in range(0, half, step):
                r1 = min(half, r0 + step)
                # Read fp32 rows [r0, r1) (bytes 4*r0*H ..), write half rows [r0, r1) (bytes 2*r0*H ..):
                # the write ends at or before rows not yet read, and goes through a copy.
                self.out[r0:r1].copy_(low[r0:r1].to(self.out.dtype))
            self.out[half:vocab].copy_(high)
        self.parts = []
        return self.out


def flce_blockwise(
    kce_impl: Callable,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    teacher: Optional[Tensor],
    topk_idx: Optional[Tensor],
    topk_lp: Optional[Tensor],
    allowed_bits: Optional[Tensor],
    group_ids: Optional[Tensor],
    scales: Tensor,
    teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor],
    cfg: KCEConfig,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    block_rows: int,
    accum_fp32: bool,
    grad_filter: float = 0.0,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Loss and gradients of the fused linear knowledge cross-entropy, block by block.

    Args:
        kce_impl: a knowledge cross-entropy backend with the signature of
            :func:`vfm.ops.kce_reference.kce_forward_torch` that accepts ``grad = logits``.
        hidden: (N, H), contiguous; weight: (V, H); bias: (V,) or None (all in one dtype).
        target, class_weight, teacher (full teacher logits (N, V) or None), topk_idx, topk_lp,
            allowed_bits, group_ids, scales (4, N): the normalised knowledge-CE arguments of the
            whole batch (:func:`vfm.ops.kce_api.prepare_arguments`).
        teacher_hidden (N, Ht), teacher_weight (V, Ht), teacher_bias (V,): a teacher head whose
            logits are computed block by block (no gradient), or None.
        cfg: scalar options.
        need_grad_hidden / need_grad_weight / need_grad_bias: which gradients to compute
            (for an upstream gradient of one on the summed loss).
        block_rows: Nb >= 1.
        accum_fp32: fp32 accumulation of a half-precision weight gradient.
        grad_filter: 0 for the exact gradients, or the relative tolerance ``eps`` in (0, 1) of the
            opt-in gradient filter (:mod:`vfm.ops.flce_filter`).

    Returns:
        (row_loss (N,), parts (5, N), grad_hidden (N, H) or None, grad_weight (V, H) or None,
        grad_bias (V,) or None).
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    need_any = need_grad_hidden or need_grad_weight or need_grad_bias
    loss_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    dev = hidden.device
    row_loss = torch.zeros(n_rows, dtype=loss_dtype, device=dev)
    parts = torch.zeros(5, n_rows, dtype=loss_dtype, device=dev)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None
    gw = WeightGradAccumulator(vocab, weight.shape[1], weight.dtype, dev, accum_fp32) if need_grad_weight else None
    gb = torch.zeros(vocab, dtype=loss_dtype, device=dev) if need_grad_bias else None
    if grad_filter > 0:
        flce_filter.reset_stats()
        if gw is not None:
            gw.zero_()
    nb = max(1, min(int(block_rows), n_rows))
    buf = torch.empty(nb, vocab, dtype=hidden.dtype, device=dev) if n_rows else None
    tbuf = None
    if teacher_hidden is not None and n_rows:
        tbuf = torch.empty(nb, vocab, dtype=teacher_hidden.dtype, device=dev)
    weight_t = weight.t()
    t_weight_t = teacher_weight.t() if teacher_weight is not None else None
    for r0 in range(0, n_rows, nb):
        r1 = min(n_rows, r0 + nb)
        m = r1 - r0
        z = buf[:m]
        h_b = hidden[r0:r1]
        if bias is not None:
            torch.addmm(bias, h_b, weight_t, out=z)
        else:
            torch.mm(h_b, weight_t, out=z)
        t_b = teacher[r0:r1] if teacher is not None else None
        if tbuf is not None:
            t_b = tbuf[:m]
            with torch.no_grad():
                if teacher_bias is not None:
                    torch.addmm(teacher_bias, teacher_hidden[r0:r1], t_weight_t, out=t_b)
                else:
                    torch.mm(teacher_hidden[r0:r1], t_weight_t, out=t_b)
        rl, pt = kce_impl(
            z, target[r0:r1], class_weight, t_b,
            topk_idx[r0:r1] if topk_idx is not None else None,
            topk_lp[r0:r1] if topk_lp is not None else None,
            allowed_bits, group_ids[r0:r1] if group_ids is not None else None,
            scales[:, r0:r1].contiguous(), z if need_any else None, cfg,
        )
        row_loss[r0:r1] = rl
        parts[:, r0:r1] = pt
        if not need_any:
            continue
        # z now holds G_b = d loss / d z_b.
        if grad_filter > 0:
            if gb is not None:
                gb.add_(z.sum(0, dtype=loss_dtype))
            flce_filter.filtered_block_grads(
                z, h_b, weight, target[r0:r1], cfg.ignore_index, grad_filter,
                grad_hidden[r0:r1] if grad_hidden is not None else None, gw)
            continue
        if grad_hidden is not None:
            torch.mm(z, weight, out=grad_hidden[r0:r1])
        if gw is not None:
            gw.add(z, h_b)
        if gb is not None:
            gb.add_(z.sum(0, dtype=loss_dtype))
    del buf, tbuf
    grad_weight = gw.finish() if gw is not None else None
    grad_bias = gb.to(bias.dtype) if gb is not None else None
    return row_loss, parts, grad_hidden, grad_weight, grad_bias
