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
from flexna.masks import MaskMod, _resolve_device, build_tables
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
            need = ("need >= 1" if per_tile == 1 else f"need a positive multiple of the {side} "
                    f"tile's token count {per_tile} (tile {tile})")
            raise ValueError(f"block_size for {side} = {size} is out of range: {need}")
    return sizes[0], sizes[1]


def ordered_indices(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[K, rows, cols]`` -> BlockMask's (counts ``[K, rows]``, indices ``[K, rows, cols]``), int32.

    Each row lists its True columns in increasing order, then zeros; contiguous (Flex's
    backward misreads strided index tensors: wrong dK/dV on CUDA). A True at column ``c``
    goes to position ``(running count) - 1`` of its row. On a GPU: a cumsum and one
    scatter over the whole map (False columns go to a spare column that is cut off), no
    sort and no host sync. On a CPU: the same positions for the nonzeros only (2x faster
    there, where the maps are sparse and scatters are slow).
    """
    if maps.is_cuda:
        return ordered_by_scatter(maps)
    k, rows, cols = maps.shape
    counts = maps.sum(dim=-1, dtype=torch.int32)
    flat = maps.reshape(k * rows, cols)
    row, col = flat.nonzero(as_tuple=True)
    flat_counts = counts.reshape(-1)
    starts = torch.cumsum(flat_counts, 0, dtype=torch.int64) - flat_counts
    pos = torch.arange(row.numel()) - starts[row]
    out = torch.zeros(k * rows, cols, dtype=torch.int32)
    out[row, pos] = col.to(torch.int32)
    return counts, out.reshape(k, rows, cols)


def ordered_by_scatter(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ordered_indices` without a host sync (the GPU path; runs on any device)."""
    k, rows, cols = maps.shape
    counts = maps.sum(dim=-1, dtype=torch.int32)
    pos = torch.where(maps, torch.cumsum(maps, dim=-1) - 1, cols)
    out = torch.zeros(k, rows, cols + 1, dtype=torch.int32, device=maps.device)
    cols_t = torch.arange(cols, dtype=torch.int32, device=maps.device).expand(k, rows, cols)
    out.scatter_(2, pos, cols_t)
    return counts, out[..., :cols].contiguous()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside: the build's CPU work (all of it on a CPU,
    the per-axis tables for a GPU) is small (~1e5 elements), and torch's thread pool
    collapses (10-100x slower) when other processes share the cores."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
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
    with single_threaded():
        partial, full = block_maps(pattern, q_tile, kv_tile, q_block, kv_block, device, **regions)
        tables = build_tables(pattern, q_tile, kv_tile, device, **regions)
        return assemble_block_mask(partial[None], full[None], (tables.q_len, tables.kv_len),
                                   (q_block, kv_block), tables.mask_mod())


def assemble_block_mask(partial: torch.Tensor, full: torch.Tensor, seq_lengths: tuple[int, int],
                        block_sizes: tuple[int, int], mask_mod: MaskMod) -> BlockMask:
    """BlockMask from ``[H, rows, cols]`` partial / full maps (H = 1: shared by all heads).

    The kv-major index tensors come from the maps, the q-major ones from their transposes;
    all four in one :func:`ordered_indices` pass when the maps are square, else two.
    """
    heads = partial.shape[0]
    maps = [partial, full, partial.transpose(1, 2), full.transpose(1, 2)]
    if partial.shape[1] == partial.shape[2]:
        num, idx = ordered_indices(torch.cat(maps))
        kv_num, kv_idx, q_num, q_idx = num[:2 * heads], idx[:2 * heads], num[2 * heads:], idx[2 * heads:]
    else:
        kv_num, kv_idx = ordered_indices(torch.cat(maps[:2]))
        q_num, q_idx = ordered_indices(torch.cat(maps[2:]))
    return BlockMask(
        seq_lengths=seq_lengths,
        kv_num_blocks=kv_num[None, :heads],
        kv_indices=kv_idx[None, :heads],
        full_kv_num_blocks=kv_num[None, heads:],
        full_kv_indices=kv_idx[None, heads:],
        q_num_blocks=q_num[None, :heads],
        q_indices=q_idx[None, :heads],
        full_q_num_blocks=q_num[None, heads:],
        full_q_indices=q_idx[None, heads:],
        BLOCK_SIZE=block_sizes,
        mask_mod=mask_mod,
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
