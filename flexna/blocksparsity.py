"""Which (query block, key block) pairs a pattern touches, from geometry alone.

Pure index math on tensors (no FlexAttention): the output is two sorted
lists of block pairs, *any* (some pair of tokens attends) and *full* (every
pair attends, all tokens real). ``blockmask.py`` turns them into a BlockMask.

Method. A block of the tiled order is a union of at most ``2n - 1`` boxes
(:func:`flexna.geometry.block_boxes`). With dilation 1 on every axis:

* the keys reached by a box of queries form the box whose per-axis interval
  is ``[lo(first), hi(last)]`` (windows are monotone and gap-free), so the
  key blocks *reached* by a query block are exactly the blocks touching
  those boxes;
* the keys attended by *every* query of the block form the box
  ``[max lo(last), min hi(first)]``, so the *full* key blocks are exactly
  the complete blocks lying inside it.

Both are found by walking the boxes in runs contiguous in the
key order), so the cost is O(runs + pairs reached), never O(N^2). With
dilation the unions are not boxes; the bounding boxes then give candidates
and an exact per-axis test over box pairs (per dilation residue) decides.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

from flexna.geometry import Region, axis_window_bounds, block_boxes, region_or_full, region_shape, tile_grid
from flexna.pattern import NAPattern

Array = TypeVar("Array", torch.Tensor, np.ndarray)


def block_as_tile(shape: tuple[int, ...], tile: tuple[int, ...], block_tiles: int) -> tuple[int, ...] | None:
    """A tile whose single-tile blocks hold the same tokens as blocks of ``block_tiles`` tiles.

    ``block_tiles`` consecutive tiles of the row-major tile grid form one box when they are
    ``c`` whole rows of the grid's axes ``> j`` stacked along axis ``j`` and ``c`` divides the
    grid there (e.g. row-major 128-token blocks on a 256-wide image are 1x128 tiles). Block
    maps only depend on which tokens a block holds, so such blocks take the factorised path.
    """
    grid = tile_grid(shape, tile)
    for j in reversed(range(len(grid))):
        trailing = math.prod(grid[j + 1:])
        if block_tiles % trailing == 0 and grid[j] % (block_tiles // trailing) == 0:
            c = block_tiles // trailing
            return (*tile[:j], tile[j] * c, *(t * g for t, g in zip(tile[j + 1:], grid[j + 1:],
                                                                      strict=True)))
    return None


def _ravel(coords: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    flat = torch.zeros_like(coords[..., 0])
    for a, size in enumerate(dims):
        flat = flat * size + coords[..., a]
    return flat


def _fill_runs(rows: int, cols: int, owner: torch.Tensor, first: torch.Tensor,
               last: torch.Tensor) -> torch.Tensor:
    """Bool ``[rows, cols]`` map, True on ``[first, last]`` of row ``owner`` for every run.

    A difference array: +1 at each run's first column, -1 past its last, a cumsum along
    the rows; O(runs + rows x cols) with no per-pair expansion. Empty runs (first > last)
    and overlapping runs are fine.
    """
    weight = (first <= last).to(torch.int16)  # a cell lies in at most 2n - 1 runs (boxes)
    diff = torch.zeros(rows, cols + 1, dtype=torch.int16, device=owner.device)
    diff.index_put_((owner, first.clamp(0, cols)), weight, accumulate=True)
    diff.index_put_((owner, (last + 1).clamp(0, cols)), -weight, accumulate=True)
    return diff.cumsum(dim=1, dtype=torch.int16)[:, :cols] > 0


def _box_runs(
    owner: torch.Tensor, t_lo: torch.Tensor, t_hi: torch.Tensor, grid: tuple[int, ...],
    max_gap: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cover tile-grid boxes ``[t_lo, t_hi]`` with runs of row-major flat indices.

    A box is walked along its slowest axes ("prefix") and each step is one
    run ``[ravel(prefix, t_lo[m:]), ravel(prefix, t_hi[m:])]``. The run axis
    ``m`` is moved outwards while the holes between consecutive runs are
    shorter than ``max_gap`` tiles. With ``max_gap = 1`` runs hold exactly
    the box's tiles and no two runs touch, so a block lies inside the box iff
    it lies inside one run. With ``max_gap`` = tiles per block, a run may
    include holes, but no block fits in a hole, so the blocks a run touches
    are exactly the blocks the box touches in it (far fewer runs).
    Returns ``(owner, start, end)`` per run, inclusive.
    """
    n = len(grid)
    device = t_lo.device
    # span of the box restricted to axes >= j, in the flat index of grid[j:]
    merge = []
    for j in range(1, n):
        sub = grid[j:]
        span = _ravel(t_hi[:, j:], sub) - _ravel(t_lo[:, j:], sub) + 1
        merge.append(math.prod(sub) - span < max_gap)
    if merge:
        m_ok = torch.stack(merge, dim=1).long()  # m_ok[:, j-1]: may merge axis j into j-1
        run_axis = (n - 1) - torch.flip(torch.cumprod(torch.flip(m_ok, [1]), 1), [1]).sum(1)
    else:
        run_axis = torch.zeros(t_lo.shape[0], dtype=torch.long, device=device)
    axis = torch.arange(n, device=device)
    prefix = axis[None, :] < run_axis[:, None]
    extent = torch.where(prefix, t_hi - t_lo + 1, torch.ones_like(t_lo))
    lines = extent.prod(dim=1)
    row = torch.repeat_interleave(torch.arange(owner.numel(), device=device), lines)
    offsets = torch.cumsum(lines, 0) - lines
    local = torch.arange(row.numel(), device=device) - offsets[row]
    ext = extent[row]
    step = []
    for a in reversed(range(n)):
        step.append(local % ext[:, a])
        local = local // ext[:, a]
    step = torch.stack(step[::-1], dim=1)
    lo, hi = t_lo[row], t_hi[row]
    start = lo + step
    end = torch.where(prefix[row], start, hi)
    return owner[row], _ravel(start, grid), _ravel(end, grid)


def _range_extreme(table: torch.Tensor, a: torch.Tensor, b: torch.Tensor, d: int, lowest: bool) -> torch.Tensor:
    """min (``lowest``) or max of ``table`` over ``[a, b]`` for a table monotone per residue mod d."""
    if d == 1:
        return table[a] if lowest else table[b]
    off = torch.arange(d, device=a.device)
    if lowest:
        idx = torch.minimum(a[..., None] + off, b[..., None])
        return table[idx].amin(dim=-1)
    idx = torch.maximum(b[..., None] - off, a[..., None])
    return table[idx].amax(dim=-1)


def _exact_pairs(
    qa: Array, qb: Array, ka: Array, kb: Array, lo: Array, hi: Array, d: int,
) -> tuple[Array, Array]:
    """Per-axis (some pair attends, every pair attends) for query/key intervals.

    Works on torch tensors (on any device) and on NumPy arrays alike (the per-axis tile
    tables are computed with NumPy: ~1 us per operation instead of torch's ~5 us).
    """
    if d == 1:
        some = (lo[qa] <= kb) & (hi[qb] >= ka)
        every = (lo[qb] <= ka) & (hi[qa] >= kb)
        return some, every
    r = np.arange(d) if isinstance(qa, np.ndarray) else torch.arange(d, device=qa.device)
    qa_, qb_, ka_, kb_ = qa[..., None], qb[..., None], ka[..., None], kb[..., None]
    xf = qa_ + (r - qa_) % d
    xl = qb_ - (qb_ - r) % d
    yf = ka_ + (r - ka_) % d
    yl = kb_ - (kb_ - r) % d
    top = lo.shape[0] - 1
    some = ((xf <= qb_) & (yf <= kb_) & (lo[xf.clip(max=top)] <= yl)
            & (hi[xl.clip(min=0)] >= yf)).any(-1)
    every = ((qa == qb) & (ka == kb) & ((ka - qa) % d == 0)
             & (lo[qa] <= ka) & (ka <= hi[qa]))
    return some, every


def axis_tile_tables(
    pattern: NAPattern, axis: int, q_tile: int, kv_tile: int, device: torch.device | str | None = None,
    q_span: tuple[int, int] | None = None, kv_span: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis tile tables ``(some, every)``, bool ``[tiles_q, tiles_kv]`` along ``axis``.

    ``some[i, j]``: a query of q tile ``i`` attends a key of kv tile ``j``
    along this axis; ``every[i, j]``: all of them do and neither tile is
    clipped by the end of its span (padding). Tiles start at the span's
    start (``q_span``/``kv_span``: ``(start, stop)``, default the whole axis).
    """
    some, every = _axis_tile_tables_np(pattern, axis, q_tile, kv_tile, q_span, kv_span)
    some_t, every_t = torch.from_numpy(some), torch.from_numpy(every)
    if device is None or torch.device(device).type == "cpu":
        return some_t, every_t
    both = torch.stack([some_t, every_t]).to(device)
    return both[0], both[1]


def _axis_tile_tables_np(
    pattern: NAPattern, axis: int, q_tile: int, kv_tile: int,
    q_span: tuple[int, int] | None = None, kv_span: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`axis_tile_tables` as NumPy arrays (the CPU side of every build and of the tile search)."""
    length = pattern.shape[axis]
    lo, hi = (t.numpy() for t in axis_window_bounds(length, pattern.kernel_size[axis], pattern.stride[axis],
                                                    pattern.dilation[axis], pattern.is_causal[axis]))
    q0, q1 = q_span or (0, length)
    k0, k1 = kv_span or (0, length)
    tq = np.arange(q0, q1, q_tile)
    tk = np.arange(k0, k1, kv_tile)
    qa, qb = tq, np.minimum(tq + q_tile, q1) - 1
    ka, kb = tk, np.minimum(tk + kv_tile, k1) - 1
    some, every = _exact_pairs(qa[:, None], qb[:, None], ka[None, :], kb[None, :], lo, hi,
                               pattern.dilation[axis])
    every = every & (tq + q_tile <= q1)[:, None] & (tk + kv_tile <= k1)[None, :]
    return some, every


def _tile_maps(
    pattern: NAPattern, q_tile: tuple[int, ...], kv_tile: tuple[int, ...], device: torch.device | str | None,
    q_region: Region, kv_region: Region,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block maps when every block is exactly one tile (one box): the answer factorises.

    Block ``b`` is tile ``unravel(b)`` of the grid, so "some pair attends" and
    "every pair attends" are products over axes of :func:`axis_tile_tables`;
    one broadcast AND gives the dense map. The per-axis tables are tiny and
    built on the CPU, then moved in one copy: on a GPU the build is a handful
    of kernel launches.
    """
    n = pattern.ndim
    q_grid = tile_grid(region_shape(q_region), q_tile)
    kv_grid = tile_grid(region_shape(kv_region), kv_tile)
    tables = [t for a in range(n) for t in _axis_tile_tables_np(pattern, a, q_tile[a], kv_tile[a],
                                                                 q_region[a], kv_region[a])]
    flat = torch.from_numpy(np.concatenate([t.ravel() for t in tables]))
    moved = flat.to(device).split([t.size for t in tables])
    some = full = None
    for a in range(n):
        view = [1] * (2 * n)
        view[a], view[n + a] = q_grid[a], kv_grid[a]
        s_a, e_a = moved[2 * a].reshape(view), moved[2 * a + 1].reshape(view)
        some = s_a if some is None else some & s_a
        full = e_a if full is None else full & e_a
    nq, nkv = math.prod(q_grid), math.prod(kv_grid)
    some = some.expand(*q_grid, *kv_grid).reshape(nq, nkv)
    full = full.expand(*q_grid, *kv_grid).reshape(nq, nkv)
    return some & ~full, full


def block_maps(
    pattern: NAPattern,
    q_tile: tuple[int, ...],
    kv_tile: tuple[int, ...],
    q_block: int,
    kv_block: int,
    device: torch.device | str | None = None,
    *,
    q_region: Region | None = None,
    kv_region: Region | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block maps of ``pattern``: ``(partial, full)``, bool ``[num_q_blocks, num_kv_blocks]``.

    ``q_block``/``kv_block`` are block sizes in tokens, multiples of the tile
    token counts. Queries (keys) are the tokens of ``q_region`` (``kv_region``)
    in that region's own tiled order; by default the whole layout. The maps are
    dense at block granularity only (BlockMask's own index tensors are that
    size); filling them costs O(pairs reached).
    """
    n = pattern.ndim
    q_region = region_or_full(q_region, pattern.shape)
    kv_region = region_or_full(kv_region, pattern.shape)
    q_shape, kv_shape = region_shape(q_region), region_shape(kv_region)
    if n == 1:  # a 1-D block is one interval: treat it as a tile of its own
        q_tile, kv_tile = (q_block,), (kv_block,)
    q_tiles = q_block // math.prod(q_tile)
    kv_tiles = kv_block // math.prod(kv_tile)
    q_as_tile = block_as_tile(q_shape, q_tile, q_tiles)
    kv_as_tile = block_as_tile(kv_shape, kv_tile, kv_tiles)
    if q_as_tile is not None and kv_as_tile is not None:
        return _tile_maps(pattern, q_as_tile, kv_as_tile, device, q_region, kv_region)
    kv_grid = tile_grid(kv_shape, kv_tile)
    num_kv = -(-math.prod(kv_grid) // kv_tiles)
    q_start = torch.tensor([s for s, _ in q_region], device=device)
    kv_start = torch.tensor([s for s, _ in kv_region], device=device)
    kv_last = torch.tensor(kv_shape, device=device) - 1  # in region coordinates
    qlo, qhi, qcount = block_boxes(q_shape, q_tile, q_tiles, device)
    qlo, qhi = qlo + q_start, qhi + q_start  # layout coordinates (empty slots stay lo > hi)
    num_q = qlo.shape[0]
    bounds = [axis_window_bounds(pattern.shape[a], pattern.kernel_size[a], pattern.stride[a],
                                 pattern.dilation[a], pattern.is_causal[a], device)
              for a in range(n)]
    shape_max = torch.tensor(pattern.shape, device=device) - 1
    qa = torch.minimum(qlo, shape_max)
    qb = torch.minimum(qhi.clamp_min(0), shape_max)
    w_lo = torch.stack([_range_extreme(bounds[a][0], qa[..., a], qb[..., a],
                                       pattern.dilation[a], True) for a in range(n)], -1)
    w_hi = torch.stack([_range_extreme(bounds[a][1], qa[..., a], qb[..., a],
                                       pattern.dilation[a], False) for a in range(n)], -1)
    # the reached keys, clipped to the key region, in region coordinates
    w_lo = torch.maximum(w_lo - kv_start, torch.zeros_like(w_lo))
    w_hi = torch.minimum(w_hi - kv_start, kv_last)
    q_real = qlo[..., 0] <= qhi[..., 0]  # [nq, S]: the box slot holds queries
    box_ok = q_real & (w_lo <= w_hi).all(-1)
    kv_t = torch.tensor(kv_tile, device=device)
    owner = torch.arange(num_q, device=device)[:, None].expand_as(box_ok)[box_ok]
    run_owner, start, end = _box_runs(owner, w_lo[box_ok] // kv_t, w_hi[box_ok] // kv_t,
                                      kv_grid, kv_tiles)
    reached = _fill_runs(num_q, num_kv, run_owner, start // kv_tiles, end // kv_tiles)

    q_complete = qcount == q_block
    if all(d == 1 for d in pattern.dilation):
        big = torch.iinfo(torch.int64).max
        i_lo = torch.stack([torch.where(q_real, bounds[a][0][qb[..., a]], -1).amax(1)
                            for a in range(n)], -1)
        i_hi = torch.stack([torch.where(q_real, bounds[a][1][qa[..., a]], big).amin(1)
                            for a in range(n)], -1)
        i_lo = torch.maximum(i_lo - kv_start, torch.zeros_like(i_lo))
        i_hi = torch.minimum(i_hi - kv_start, kv_last)
        t_lo = -(-i_lo // kv_t)
        t_hi = (i_hi + 1) // kv_t - 1
        ok = q_complete & (t_lo <= t_hi).all(dim=1)
        rows = torch.arange(num_q, device=device)[ok]
        run_owner, start, end = _box_runs(rows, t_lo[ok], t_hi[ok], kv_grid, 1)
        full = _fill_runs(num_q, num_kv, run_owner, -(-start // kv_tiles), (end + 1) // kv_tiles - 1)
        return reached & ~full, full

    klo, khi, kcount = block_boxes(kv_shape, kv_tile, kv_tiles, device)
    klo, khi = klo + kv_start, khi + kv_start
    slots = qlo.shape[1]
    cand_q, cand_kv = reached.nonzero(as_tuple=True)
    reached.zero_()
    full = torch.zeros_like(reached)
    chunk = max(1, 2**22 // (slots * slots * n * max(pattern.dilation)))
    for c0 in range(0, cand_q.numel(), chunk):
        qi, ki = cand_q[c0:c0 + chunk], cand_kv[c0:c0 + chunk]
        some = torch.ones(qi.numel(), slots, slots, dtype=torch.bool, device=device)
        every = torch.ones_like(some)
        for a in range(n):
            qa_ = qa[qi, :, a][:, :, None]
            qb_ = qb[qi, :, a][:, :, None]
            ka_ = klo[ki, :, a].clamp(0, pattern.shape[a] - 1)[:, None, :]
            kb_ = khi[ki, :, a].clamp(0, pattern.shape[a] - 1)[:, None, :]
            s_a, e_a = _exact_pairs(qa_, qb_, ka_, kb_, bounds[a][0], bounds[a][1],
                                    pattern.dilation[a])
            some &= s_a
            every &= e_a
        pair_ok = q_real[qi][:, :, None] & (klo[ki, :, 0] <= khi[ki, :, 0])[:, None, :]
        some = (some & pair_ok).flatten(1).any(1)
        every = ((every | ~pair_ok).flatten(1).all(1) & some
                 & q_complete[qi] & (kcount[ki] == kv_block))
        reached[qi, ki] = some & ~every
        full[qi, ki] = every
    return reached, full
