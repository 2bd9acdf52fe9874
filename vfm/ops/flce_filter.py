"""Opt-in gradient filter of the fused linear knowledge cross-entropy (``grad_filter=eps``).

After the knowledge-CE kernel has overwritten a block's logits ``z_b`` (Nb, V) with their gradient
``G_b``, the exact path spends two full GEMMs on it: ``G_b @ weight`` and ``G_b.T @ hidden_b``.
Most of ``G_b`` is tiny: away from the target, an entry is the row's scale times a probability
(``p_j``, ``p_j - q_j``, ...), and with a large vocabulary almost all probabilities are far below
the few that matter.  With ``m_i`` the largest ``|G[i, :]|`` of row ``i``, the filter keeps every
entry with ``|G[i, j]| > eps * m_i`` (and every NaN) and may drop the others:

1. the target entries ``G[i, t_i]`` (one per labelled row) are always applied exactly, as a
   gather / scatter: ``grad_hidden_i += G[i, t_i] * weight[t_i]``,
   ``grad_weight[t_i] += G[i, t_i] * hidden_i``;
2. *sparse blocks*: when the kept entries of the block number at most :data:`SPARSE_PER_ROW` per
   row on average, they are applied the same way (in pieces of bounded memory) and everything
   else is dropped: no GEMM at all;
3. otherwise the block is cut into vocabulary chunks of :data:`CHUNK` columns; a chunk without a
   kept entry is skipped, the kept chunks are merged into at most :data:`MAX_RUNS` runs of
   consecutive columns (merging across the smallest gaps, which only keeps more), and each run
   costs two GEMMs on views, without copies; above :data:`DENSE_FRACTION` of the chunks the block
   takes the exact dense GEMMs.

So every dropped gradient entry is at most ``eps`` times the largest entry of its row, and the
error of the returned gradients is bounded entrywise by
``|d grad_weight[j, k]| <= eps * sum_i m_i |hidden[i, k]|`` and
``|d grad_hidden[i, k]| <= eps * m_i * sum_j |weight[j, k]|``.  The loss, the bias gradient and
every target entry are exact, and NaN propagates.

Costs beyond the kept work: two comparisons over the block into a boolean (Nb, V) mask (one byte
per logit, a second one while it is built), two host synchronisations per block (the count, then
the kept positions or chunks), and the gather / scatter of the kept entries.  ``eps = 2**-12`` is
a reasonable start for bf16 (below bf16's resolution relative to the row's largest entry).  The
filter pays off when each row has few probabilities above ``eps`` times its largest gradient entry
(peaked distributions, as from a trained model, or near-uniform ones over a huge vocabulary) and
costs the extra passes when not.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from vfm import _registry

#: Vocabulary columns per chunk (the unit that is kept or skipped).
CHUNK = 256
#: At most this many GEMM pairs per block; the closest kept runs are merged beyond it.
MAX_RUNS = 32
#: Above this fraction of kept chunks, the block takes the dense GEMMs.
DENSE_FRACTION = 0.75
#: A block whose kept entries average at most this many per row is applied sparsely (no GEMM).
SPARSE_PER_ROW = 64
#: Bytes of the fp32 (entries, H) temporaries of one piece of the sparse path.
SPARSE_PIECE_BYTES = 64 << 20

#: Statistics of the last filtered call (chunks kept / total, runs, dense blocks), for logs and tests.
LAST_STATS: Dict[str, int] = {}


def reset_stats() -> None:
    """Start counting a new call in :data:`LAST_STATS`."""
    LAST_STATS.clear()
    LAST_STATS.update(blocks=0, sparse_blocks=0, dense_blocks=0, chunks=0, kept_chunks=0, runs=0, kept_entries=0)


def _count(key: str, n: int = 1) -> None:
    LAST_STATS[key] = LAST_STATS.get(key, 0) + n


def scatter_add_rows(acc: Tensor, idx: Tensor, values: Tensor) -> None:
    """acc[idx[i]] += values[i] (repeated indices add up).

    ``index_add_`` on CUDA (atomics, so the order of the additions varies from run to run); on CPU,
    and on CUDA in deterministic mode (:func:`vfm.deterministic`), ``index_put_(accumulate=True)``,
    which sorts the indices and adds in a fixed order (on CPU more than ten times faster than
    ``index_add_`` into a large ``acc``).
    """
    if acc.device.type == "cpu" or _registry.deterministic():
        acc.index_put_((idx,), values, accumulate=True)
    else:
        acc.index_add_(0, idx, values)


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


def _kept_mask(g: Tensor, thr: Tensor) -> Tensor:
    """(m, V) bool: |g| > thr (per row) or NaN, without an (m, V) temporary of g's dtype."""
    keep = g.ge(-thr[:, None])
    keep &= g.le(thr[:, None])
    return keep.logical_not_()


def _kept_chunks(keep: Tensor) -> Tensor:
    """(n_chunks,) bool: chunks of CHUNK columns (the last may be short) holding a kept entry."""
    m, vocab = keep.shape
    full = vocab - vocab % CHUNK
    cols = []
    if full:
        cols.append(keep[:, :full].reshape(m, full // CHUNK, CHUNK).any(dim=2).any(dim=0))
    if full < vocab:
        cols.append(keep[:, full:].any().reshape(1))
    return torch.cat(cols) if len(cols) > 1 else cols[0]


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
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    g_t = torch.where(valid, g[rows, tgt], zero)
    # Zero the target entries (rows without a target write back their own value: no change).
    g[rows, tgt] = torch.where(valid, zero, g[rows, tgt])
    wide = torch.float64 if g.dtype == torch.float64 else torch.float32
    hi, lo = g.amax(dim=1), g.amin(dim=1)  # two passes beat aminmax's one on CPU
    row_max = torch.maximum(torch.maximum(hi.to(wide), lo.to(wide).neg()), g_t.to(wide).abs())
    keep = _kept_mask(g, eps * row_max)
    n_kept = int(torch.count_nonzero(keep))  # host synchronisation 1 (sum() would copy to int64 on CPU)
    _count("blocks")
    _count("kept_entries", n_kept)
    # Target entries first, in fp32: grad_hidden_i += G[i, t_i] * weight[t_i].
    gh32 = None
    if grad_hidden_b is not None:
        gh32 = g_t.to(wide)[:, None] * weight.index_select(0, tgt).to(wide)
    if gw is not None:
        gw.index_add(tgt, g_t.to(wide)[:, None] * h_b.to(wide), valid)

    if n_kept <= SPARSE_PER_ROW * m:
        _count("sparse_blocks")
        pos = keep.nonzero()  # host synchronisation 2
        del keep
        piece = max(1, SPARSE_PIECE_BYTES // (8 * max(1, h_b.shape[1])))
        for p0 in range(0, pos.shape[0], piece):
            r, c = pos[p0:p0 + piece].unbind(1)
            vals = g[r, c].to(wide)[:, None]
            if gh32 is not None:
                scatter_add_rows(gh32, r, vals * weight.index_select(0, c).to(wide))
            if gw is not None:
                gw.index_add(c, vals * h_b.index_select(0, r).to(wide), None)
        if grad_hidden_b is not None:
            grad_hidden_b.copy_(gh32)
        return

    kept = _kept_chunks(keep).tolist()  # host synchronisation 2
    del keep
    n_chunks, n_kept_chunks = len(kept), sum(kept)
    if n_kept_chunks > DENSE_FRACTION * n_chunks:
        runs = [(0, n_chunks)]
        _count("dense_blocks")
    else:
        runs = _runs(kept, MAX_RUNS if max_runs is None else max_runs)
    _count("chunks", n_chunks)
    _count("kept_chunks", n_kept_chunks)
    _count("runs", len(runs))
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
            grad_hidden_b.copy_(gh32)
        else:
            grad_hidden_b.copy_(grad_hidden_b.to(wide) + gh32)
