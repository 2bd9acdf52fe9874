"""Row grouping for the multi-adapter kernels (``lora_linear_multi``): sort once, segment, tile.

The grouped kernels of :mod:`vfm.kernels.lora` visit rows through a permutation that puts the rows
of each adapter next to each other; a row tile never crosses an adapter boundary, so every program
works with one adapter's factors.  Everything here runs on the device with tensor ops and no host
synchronisation: the number of row tiles is bounded by ``cdiv(N, BLOCK_M) + K`` (each adapter adds
at most one partial tile), and tiles past the real count are marked idle (adapter -1) and return
at once.  Rows with adapter id -1 sit before every segment and belong to no tile: they skip the
adapter (their xa row stays 0 and they add nothing to any adapter's gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vfm.kernels.lora import BLOCK_M

__all__ = ["Segments", "segment_rows"]


class Segments(NamedTuple):
    """Row grouping of one call.

    order: (N,) int32 row indices sorted by adapter id (stable: caller's order within an adapter).
    first / end: (K,) int32 sorted positions [first, end) of each adapter's rows.
    tile_info: (T, 3) int32 rows (adapter, first, end) of each row tile, adapter -1 for idle tiles.
    """

    order: Tensor
    first: Tensor
    end: Tensor
    tile_info: Tensor


def segment_rows(adapter_ids: Tensor, n_adapters: int, block_m: int = BLOCK_M) -> Segments:
    """Group the rows by adapter (one sort per call) and cut each group into row tiles.

    Args:
        adapter_ids: (N,) int64 in [-1, K).
        n_adapters: K >= 1.
        block_m: rows per tile (the kernels' BLOCK_M).

    Returns:
        :class:`Segments` on adapter_ids' device.
    """
    n_rows = adapter_ids.shape[0]
    device = adapter_ids.device
    sorted_ids, order = torch.sort(adapter_ids, stable=True)
    adapters = torch.arange(n_adapters, device=device, dtype=sorted_ids.dtype)
    first = torch.searchsorted(sorted_ids, adapters, right=False)
    end = torch.searchsorted(sorted_ids, adapters, right=True)
    n_tiles = (end - first + (block_m - 1)) // block_m
    tiles_end = torch.cumsum(n_tiles, 0)
    max_tiles = (n_rows + block_m - 1) // block_m + n_adapters
    t = torch.arange(max_tiles, device=device, dtype=tiles_end.dtype)
    k = torch.searchsorted(tiles_end, t, right=True)  # adapter of tile t; K for idle tiles
    live = k < n_adapters
    kc = k.clamp(max=n_adapters - 1)
    local = t - (tiles_end[kc] - n_tiles[kc])
    tile_first = first[kc] + local * block_m
    tile_end = torch.minimum(end[kc], tile_first + block_m)
    info = torch.stack([torch.where(live, kc, torch.full_like(kc, -1)), tile_first, tile_end], 1)
    return Segments(order.to(torch.int32), first.to(torch.int32), end.to(torch.int32),
                    info.to(torch.int32).contiguous())
