"""FlexAttention ``BlockMask`` for a neighborhood pattern, built analytically.

``create_block_mask`` evaluates the mask_mod on all N^2 pairs; here the
block sets come from the geometry (:mod:`flexna.blocksparsity`) and are
only packed into BlockMask's index tensors. The result is identical to
``create_block_mask(na_mask_mod(...), ...)`` for the same orders and block
sizes: same full blocks, same partial blocks, same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch.nn.attention.flex_attention import BlockMask

from flexna.blocksparsity import block_maps
from flexna.geometry import Region, region_shape
from flexna.layout import as_region, as_tile
from flexna.masks import _resolve_device, build_tables
from flexna.pattern import BoolOrTuple, IntOrTuple, NAPattern, as_int_tuple

DEFAULT_BLOCK = 128


def resolve_block_sizes(
    block_size: int | Sequence[int] | None,
    q_tile: tuple[int, ...],
    kv_tile: tuple[int, ...],
) -> tuple[int, int]:
    """(q, kv) block sizes in tokens; ``None`` means each side's tile token count, or 128."""
    defaults = [math.prod(t) if math.prod(t) > 1 else DEFAULT_BLOCK for t in (q_tile, kv_tile)]
    if block_size is None:
        return defaults[0], defaults[1]
    if isinstance(block_size, Sequence) and not isinstance(block_size, str) and len(block_size) != 2:
        raise ValueError(f"block_size must have 2 entries (q, kv) or be one int, got "
                         f"{len(block_size)} entries: {tuple(block_size)!r}")
    sizes = as_int_tuple("block_size", block_size, 2)
    for side, size, tile in zip(("q", "kv"), sizes, (q_tile, kv_tile), strict=True):
        per_tile = math.prod(tile)
        if size < 1 or size % per_tile:
            raise ValueError(
                f"block_size for {side} = {size} is out of range: need a positive multiple "
                f"of the {side} tile's token count {per_tile} (tile {tile})"
            )
    return sizes[0], sizes[1]


def _ordered(block_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[rows, cols]`` -> BlockMask's (counts ``[1, 1, rows]``, indices ``[1, 1, rows, cols]``).

    Each row lists its True columns in increasing order, then the others (CUDA: one
    stable sort, no host sync) or zeros (CPU: a scatter, cheaper there).
    """
    rows, cols = block_map.shape
    if block_map.is_cuda:
        counts = block_map.sum(dim=1, dtype=torch.int32)
        indices = torch.argsort(block_map.to(torch.uint8), dim=1, descending=True, stable=True)
        # contiguous: Flex's backward misreads strided q_indices (wrong dK/dV on CUDA)
        return counts[None, None], indices.to(torch.int32).contiguous()[None, None]
    row, col = block_map.nonzero(as_tuple=True)
    counts = block_map.sum(dim=1, dtype=torch.int32)
    starts = torch.cumsum(counts, 0, dtype=torch.int64) - counts
    pos = torch.arange(row.numel(), device=row.device) - starts[row]
    indices = torch.zeros(rows, cols, dtype=torch.int32, device=block_map.device)
    indices[row, pos] = col.to(torch.int32)
    return counts[None, None], indices[None, None]


@contextmanager
def _single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the CPU build on one thread: its ops are small (~1e5 elements), and torch's
    thread pool collapses (10-30x slower) when other processes share the cores."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pattern_block_mask(
    pattern: NAPattern,
    q_tile: tuple[int, ...],
    kv_tile: tuple[int, ...],
    q_block: int,
    kv_block: int,
    device: torch.device,
    *,
    q_region: Region | None = None,
    kv_region: Region | None = None,
) -> BlockMask:
    """BlockMask of a validated pattern (see :func:`na_block_mask`)."""
    regions = {"q_region": q_region, "kv_region": kv_region}
    with _single_thread_on_cpu(device):
        partial, full = block_maps(pattern, q_tile, kv_tile, q_block, kv_block, device, **regions)
        tables = build_tables(pattern, q_tile, kv_tile, device, **regions)
        kv_num, kv_idx = _ordered(partial)
        full_kv_num, full_kv_idx = _ordered(full)
        q_num, q_idx = _ordered(partial.t())
        full_q_num, full_q_idx = _ordered(full.t())
    return BlockMask(
        seq_lengths=(tables.q_len, tables.kv_len),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_kv_num,
        full_kv_indices=full_kv_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=tables.mask_mod(),
    )


def na_block_mask(
    shape: IntOrTuple,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    *,
    q_tile: int | Sequence[int] | None = None,
    kv_tile: int | Sequence[int] | None = None,
    block_size: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    q_region: Sequence[Sequence[int]] | None = None,
    kv_region: Sequence[Sequence[int]] | None = None,
) -> BlockMask:
    """Analytic FlexAttention ``BlockMask`` of neighborhood attention.

    Arguments as :func:`flexna.na_mask_mod`. ``block_size`` is an int or a
    ``(q, kv)`` pair of token counts; by default 128 for a row-major side
    and the tile's token count for a tiled side (a block is then one tile);
    an explicit size must be a multiple of the side's tile token count.
    The mask is built with vectorised tensor ops on ``device`` in
    O(query blocks x key blocks reached) (never over all N^2 pairs) and
    equals ``create_block_mask(na_mask_mod(...), None, None, Nq, Nkv,
    BLOCK_SIZE=(q, kv))`` block for block, with full and partial blocks
    separated. Nq / Nkv are the (padded) lengths of the chosen orders.

    ``q_region`` / ``kv_region``: one ``(start, stop)`` pair per axis selecting
    a sub-box of the layout whose tokens are the queries / keys (in that box's
    own order, tiled by ``q_tile`` / ``kv_tile``), with the pattern of the whole
    layout: e.g. one shard's queries against its keys plus halo. Default: the
    whole layout.
    """
    pattern = NAPattern.create(shape, kernel_size, stride, dilation, is_causal)
    q_reg = as_region("q_region", q_region, pattern.shape)
    kv_reg = as_region("kv_region", kv_region, pattern.shape)
    q_t = as_tile("q_tile", q_tile, region_shape(q_reg) if q_reg else pattern.shape)
    kv_t = as_tile("kv_tile", kv_tile, region_shape(kv_reg) if kv_reg else pattern.shape)
    q_block, kv_block = resolve_block_sizes(block_size, q_t, kv_t)
    return pattern_block_mask(pattern, q_t, kv_t, q_block, kv_block, _resolve_device(device),
                              q_region=q_reg, kv_region=kv_reg)
