"""FlexAttention ``BlockMask`` of a :class:`~flexna.spec.MaskSpec`, built analytically and
kept in flexna's one cache (:mod:`flexna.cache`).

``create_block_mask`` evaluates the mask_mod on all N^2 pairs; here the block sets come
from the geometry (:mod:`flexna.blocksparsity`, NumPy on the host) and are only packed into
BlockMask's index tensors. The result is identical to ``create_block_mask`` of the spec's
mask_mod for the same orders and block sizes: same full blocks, same partial blocks, same
order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask

from flexna.blocksparsity import spec_maps
from flexna.cache import cached
from flexna.pattern import BoolOrTuple, IntOrTuple, NAPattern
from flexna.spec import MaskSpec, check_mask_limit, resolve_block_sizes, resolve_device
from flexna.tables import MaskMod, build_tables, host_tables

__all__ = ["assemble_block_mask", "build_block_mask", "na_block_mask", "ordered_by_scatter",
           "ordered_indices", "resolve_block_sizes", "spec_block_mask"]


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _ordered_np(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy :func:`ordered_indices`: positions of the nonzeros only (sparse maps; int32 index
    arithmetic where the maps allow it, 3x faster than int64)."""
    k, rows, cols = maps.shape
    itype = np.int32 if maps.size < 2**31 else np.int64
    counts = maps.sum(axis=-1, dtype=np.int32)
    flat: np.ndarray = np.flatnonzero(maps).astype(itype)  # row-major: each row's columns in increasing order
    row = flat // itype(cols)
    starts = np.cumsum(counts.reshape(-1), dtype=itype) - counts.reshape(-1)
    dest = row * itype(cols) - starts[row]
    dest += np.arange(flat.size, dtype=itype)  # the i-th True of a row goes to column i
    out = np.zeros(maps.size, dtype=np.int32)
    out[dest] = flat - row * itype(cols)
    return counts, out.reshape(k, rows, cols)


def ordered_indices(maps: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[K, rows, cols]`` -> BlockMask's (counts ``[K, rows]``, indices ``[K, rows, cols]``), int32.

    Each row lists its True columns in increasing order, then zeros; contiguous (Flex's
    backward misreads strided index tensors: wrong dK/dV on CUDA). Maps on a GPU: one cumsum
    and one scatter (:func:`ordered_by_scatter`, no host sync); on the host: NumPy.
    """
    if isinstance(maps, torch.Tensor) and maps.device.type != "cpu":
        return ordered_by_scatter(maps)
    counts, idx = _ordered_np(maps.numpy() if isinstance(maps, torch.Tensor) else maps)
    return torch.from_numpy(counts), torch.from_numpy(idx)


def ordered_by_scatter(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ordered_indices` without a host sync (the GPU path; runs on any device)."""
    k, rows, cols = maps.shape
    counts = maps.sum(dim=-1, dtype=torch.int32)
    pos = torch.where(maps, torch.cumsum(maps, dim=-1) - 1, cols)
    out = torch.zeros(k, rows, cols + 1, dtype=torch.int32, device=maps.device)
    cols_t = torch.arange(cols, dtype=torch.int32, device=maps.device).expand(k, rows, cols)
    out.scatter_(2, pos, cols_t)
    return counts, out[..., :cols].contiguous()


def assemble_block_mask(partial: np.ndarray, full: np.ndarray, seq_lengths: tuple[int, int],
                        block_sizes: tuple[int, int], mask_mod: MaskMod,
                        device: torch.device) -> BlockMask:
    """BlockMask from ``[H, rows, cols]`` partial / full maps (H = 1: shared by all heads).

    The kv-major index tensors come from the maps, the q-major ones from their transposes,
    in one :func:`ordered_indices` pass (one host-to-device copy of the maps on a GPU).
    """
    heads = partial.shape[0]
    if device.type == "cpu":
        kv = _ordered_np(np.concatenate([partial, full]))
        q = _ordered_np(np.concatenate([partial.transpose(0, 2, 1), full.transpose(0, 2, 1)]))
        kv_num, kv_idx, q_num, q_idx = (torch.from_numpy(a) for a in (*kv, *q))
    else:
        maps = torch.from_numpy(np.concatenate([partial, full])).to(device)
        kv_num, kv_idx = ordered_by_scatter(maps)
        q_num, q_idx = ordered_by_scatter(maps.transpose(1, 2))
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


def build_block_mask(spec: MaskSpec, device: torch.device) -> BlockMask:
    """The BlockMask of ``spec`` on ``device`` (not cached: see :func:`spec_block_mask`)."""
    return _build(spec, device)[0]


def _build(spec: MaskSpec, device: torch.device) -> tuple[BlockMask, int]:
    """The BlockMask and the bytes it holds (index tensors and the mask_mod's tables); ``ValueError``
    first if it would exceed :func:`flexna.set_mask_limit`'s limit."""
    check_mask_limit(spec)
    host = host_tables(spec)
    partial, full = spec_maps(spec, host)
    tables = build_tables(spec, device, host=host)
    mask = assemble_block_mask(partial, full, (spec.q_len, spec.kv_len), (spec.q_block, spec.kv_block),
                               tables.mask_mod(), device)
    static_addresses(*index_tensors(mask), *tables.tensors)
    return mask, _tensor_bytes(*index_tensors(mask)) + tables.nbytes


def index_tensors(mask: BlockMask) -> tuple[torch.Tensor | None, ...]:
    """The block index tensors a BlockMask holds (kv-major and q-major, partial and full)."""
    return (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
            mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)


def static_addresses(*tensors: torch.Tensor | None) -> None:
    """Tell dynamo these tensors keep their address and shape while alive (a mask's, never written
    after it is built, and made for one layout, so its sizes are never dynamic): CUDA graphs
    (``mode="reduce-overhead"``) then read them in place instead of copying them into the
    graph's input buffers on every replay. Unguarded: a plan replaced by one with other tensors
    (a module's new pattern) re-records the graph, it does not recompile."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            for u in (t, t._base) if t._base is not None else (t,):  # dynamo wraps a view's base too
                torch._dynamo.mark_static_address(u, guard=False)
                torch._dynamo.mark_static(u)  # static shapes under dynamic=True too


def spec_block_mask(spec: MaskSpec, device: torch.device | str | None = None) -> BlockMask:
    """The BlockMask of ``spec`` on ``device``, from the cache (built on a miss)."""
    dev = resolve_device(device)
    return cached(("block_mask", spec, dev), lambda: _build(spec, dev), lambda v: v[1])[0]


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
    curve: str | None = None,
) -> BlockMask:
    """Analytic FlexAttention ``BlockMask`` of neighborhood attention.

    Arguments as :func:`flexna.na_mask_mod`. ``block_size`` is an int or a
    ``(q, kv)`` pair of token counts; by default 128 for a row-major side
    and the tile's token count for a tiled side (a block is then one tile);
    an explicit size must be a multiple of the side's tile token count.
    The block sets are computed from the geometry in O(query blocks x key blocks reached)
    (never over all N^2 pairs) and equal ``create_block_mask(na_mask_mod(...), None, None,
    Nq, Nkv, BLOCK_SIZE=(q, kv))`` block for block, with full and partial blocks
    separated. Nq / Nkv are the (padded) lengths of the chosen orders. Each call builds a
    new BlockMask (the functional API caches its own).

    ``q_region`` / ``kv_region``: one ``(start, stop)`` pair per axis selecting
    a sub-box of the layout whose tokens are the queries / keys (in that box's
    own order, tiled by ``q_tile`` / ``kv_tile``), with the pattern of the whole
    layout: e.g. one shard's queries against its keys plus halo. Default: the
    whole layout. ``curve``: ``"hilbert"`` or ``"morton"`` token order on both sides
    (see :func:`flexna.na_mask_mod`; block maps built per token, 128-token blocks by default).

    Example::

        mask = flexna.na_block_mask((64, 64), 13, q_tile=(8, 16), kv_tile=(8, 16), device="cuda")
        out = flex_attention(q, k, v, block_mask=mask)  # q, k, v in tile (8, 16) order
    """
    pattern = NAPattern.create(shape, kernel_size, stride, dilation, is_causal)
    spec = MaskSpec.create(pattern, q_tile=q_tile, kv_tile=kv_tile, block_size=block_size,
                           q_region=q_region, kv_region=kv_region, q_curve=curve, kv_curve=curve)
    return build_block_mask(spec, resolve_device(device))
