"""Opt-in gradient filter of the fused linear knowledge cross-entropy (``grad_filter=eps``).

After the knowledge-CE kernel has overwritten a block's logits ``z_b`` (Nb, V) with their gradient
``G_b``, the exact path spends two full GEMMs on it: ``G_b @ weight`` and ``G_b.T @ hidden_b``.
Most of ``G_b`` is tiny: away from the target, an entry is the row's scale times a probability
(``p_j``, ``p_j - q_j``, ...), and with a large vocabulary almost all probabilities are far below
the one or few that matter.  The filter splits ``G_b`` into

* the target entries ``G[i, t_i]`` (one per labelled row, usually the largest of its row), applied
  exactly as a gather / scatter: ``grad_hidden_i += G[i, t_i] * weight[t_i]`` and
  ``grad_weight[t_i] += G[i, t_i] * hidden_i``;
* the rest, cut into vocabulary chunks of :data:`CHUNK` columns.  A chunk is *skipped* when every
  entry of it, in every row of the block, satisfies ``|G[i, j]| <= eps * m_i``, where ``m_i`` is
  the largest ``|G[i, :]|`` of row ``i`` (target entry included).  The kept chunks are merged into
  at most :data:`MAX_RUNS` runs of consecutive columns (merging across the smallest gaps, which
  only keeps more), and each run costs two GEMMs on views, without copies.

So every dropped gradient entry is at most ``eps`` times the largest entry of its row, and the
error of the returned gradients is bounded entrywise by
``|d grad_weight[j, k]| <= eps * sum_i m_i |hidden[i, k]|`` and
``|d grad_hidden[i, k]| <= eps * m_i * sum_j |weight[j, k]|``.  The loss, the bias gradient and
every target entry are exact.  A chunk holding a NaN is never skipped (NaN propagates).  When more
than :data:`DENSE_FRACTION` of the chunks are kept the block takes the exact dense GEMMs.

Costs beyond the kept GEMMs: one ``aminmax`` pass over the block (no (Nb, V) temporary), one host
synchronisation per block to read the kept chunks, and O(Nb * H) gather / scatter work.
``eps = 2**-12`` is a reasonable start for bf16 (below bf16's resolution relative to the row's
largest entry); the filter pays off when the model's distributions are peaked or nearly uniform,
and costs one extra pass when they are not.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

#: Vocabulary columns per chunk (the unit that is kept or skipped).
CHUNK = 256
#: At most this many GEMM pairs per block; the closest kept runs are merged beyond it.
MAX_RUNS = 32
#: Above this fraction of kept chunks, the block takes the dense GEMMs.
DENSE_FRACTION = 0.75

#: Statistics of the last filtered call (chunks kept / total, runs, dense blocks), for logs and tests.
LAST_STATS: Dict[str, int] = {}


def reset_stats() -> None:
    """Start counting a new call in :data:`LAST_STATS`."""
    LAST_STATS.clear()
    LAST_STATS.update(blocks=0, dense_blocks=0, chunks=0, kept_chunks=0, runs=0)


def _runs(kept: List[bool], max_runs: int) -> List[Tuple[int, int]]:
    """Maximal runs [c0, c1) of kept chunks, merged across the smallest gaps down to max_runs."""
    runs: List[List[int]] = []
    for c, k in enumerate(kept):
        if not k:
            continue
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    while len(runs) > max_runs:
        gaps = [runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1)]
        i = min(range(len(gaps)), key=gaps.__getitem__)
        runs[i][1] = runs[i + 1][1]
        del runs[i + 1]
    return [(a, b) for a, b in runs]


def _chunk_absmax(g: Tensor) -> Tensor:
    """(m, n_chunks) fp32: max |g| over each chunk of CHUNK columns (last chunk may be short)."""
    m, vocab = g.shape
    full = vocab - vocab % CHUNK
    cols = []
    if full:
        lo, hi = torch.aminmax(g[:, :full].reshape(m, full // CHUNK, CHUNK), dim=2)
        cols.append(torch.maximum(hi.float(), lo.float().neg()))
    if full < vocab:
        lo, hi = torch.aminmax(g[:, full:], dim=1, keepdim=True)
        cols.append(torch.maximum(hi.float(), lo.float().neg()))
    return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]


def filtered_block_grads(
    g: Tensor,
    h_b: Tensor,
    weight: Tensor,
    target_b: Tensor,
    ignore_index: int,
    eps: float,
    grad_hidden_b: Optional[Tensor],
    gw,
    max_runs: Optional[int] = None,
) -> None:
    """Add one block's filtered gradient products (see the module docstring).

    Args:
        g: (m, V) the block's logits gradient ``G_b``, in the logits dtype; its target entries are
            zeroed in place (the bias gradient must have been taken before).
        h_b: (m, H) the block's hidden states; weight: (V, H).
        target_b: (m,) the block's targets (``ignore_index`` or out-of-range = no target entry).
        ignore_index: as the loss.
        eps: relative tolerance in (0, 1).
        grad_hidden_b: (m, H) written (not accumulated) with ``G_b @ weight``, or None.
        gw: a :class:`vfm.ops.flce_blockwise.WeightGradAccumulator` that was zeroed
            (:meth:`zero_`), or None.
        max_runs: cap on GEMM pairs (default :data:`MAX_RUNS`).
    """
    m, vocab = g.shape
    rows = torch.arange(m, device=g.device)
    valid = (target_b != ignore_index) & (target_b >= 0) & (target_b < vocab)
    tgt = torch.where(valid, target_b, torch.zeros_like(target_b))
    g_t = torch.where(valid, g[rows, tgt], torch.zeros((), dtype=g.dtype, device=g.device))
    # Zero the target entries (rows without a target write back their own value: no change).
    g[rows, tgt] = torch.where(valid, torch.zeros((), dtype=g.dtype, device=g.device), g[rows, tgt])

    absmax = _chunk_absmax(g)
    row_max = torch.maximum(absmax.amax(dim=1), g_t.float().abs())
    keep = (absmax > eps * row_max[:, None]) | torch.isnan(absmax)
    kept = keep.any(dim=0).tolist()  # the one host synchronisation of the block
    n_chunks = len(kept)
    n_kept = sum(kept)
    if n_kept > DENSE_FRACTION * n_chunks:
        runs = [(0, n_chunks)]
        LAST_STATS["dense_blocks"] = LAST_STATS.get("dense_blocks", 0) + 1
    else:
        runs = _runs(kept, MAX_RUNS if max_runs is None else max_runs)
    LAST_STATS["blocks"] = LAST_STATS.get("blocks", 0) + 1
    LAST_STATS["chunks"] = LAST_STATS.get("chunks", 0) + n_chunks
    LAST_STATS["kept_chunks"] = LAST_STATS.get("kept_chunks", 0) + n_kept
    LAST_STATS["runs"] = LAST_STATS.get("runs", 0) + len(runs)

    first = True
    for c0, c1 in runs:
        v0, v1 = c0 * CHUNK, min(vocab, c1 * CHUNK)
        g_run = g[:, v0:v1]
        if grad_hidden_b is not None:
            if first:
                torch.mm(g_run, weight[v0:v1], out=grad_hidden_b)
            else:
                grad_hidden_b.addmm_(g_run, weight[v0:v1])
        if gw is not None:
            gw.add_range(g_run, h_b, v0, v1)
        first = False
    if grad_hidden_b is not None:
        if first:
            grad_hidden_b.zero_()
        # Target entries: grad_hidden_i += G[i, t_i] * weight[t_i] (in fp32, rounded once).
        contrib = g_t.float()[:, None] * weight.index_select(0, tgt).float()
        grad_hidden_b.copy_(grad_hidden_b.float() + contrib)
    if gw is not None:
        gw.index_add(tgt, g_t.float()[:, None] * h_b.float(), valid)
