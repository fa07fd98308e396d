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

import torch

from flexna.geometry import axis_window_bounds, block_boxes, tile_grid
from flexna.pattern import NAPattern


def _ravel(coords: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    flat = torch.zeros_like(coords[..., 0])
    for a, size in enumerate(dims):
        flat = flat * size + coords[..., a]
    return flat


def _expand(owner: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand inclusive ranges ``[first, last]`` into ``(owner, value)`` pairs."""
    counts = (last - first + 1).clamp_min(0)
    owner_rep = torch.repeat_interleave(owner, counts)
    start_rep = torch.repeat_interleave(first, counts)
    offsets = torch.cumsum(counts, 0) - counts
    pos = torch.arange(owner_rep.numel(), device=owner.device) - torch.repeat_interleave(offsets, counts)
    return owner_rep, start_rep + pos


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
    qa: torch.Tensor, qb: torch.Tensor, ka: torch.Tensor, kb: torch.Tensor,
    lo: torch.Tensor, hi: torch.Tensor, d: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis (some pair attends, every pair attends) for query/key intervals."""
    if d == 1:
        some = (lo[qa] <= kb) & (hi[qb] >= ka)
        every = (lo[qb] <= ka) & (hi[qa] >= kb)
        return some, every
    r = torch.arange(d, device=qa.device)
    qa_, qb_, ka_, kb_ = qa[..., None], qb[..., None], ka[..., None], kb[..., None]
    xf = qa_ + (r - qa_) % d
    xl = qb_ - (qb_ - r) % d
    yf = ka_ + (r - ka_) % d
    yl = kb_ - (kb_ - r) % d
    top = lo.numel() - 1
    some = ((xf <= qb_) & (yf <= kb_) & (lo[xf.clamp(max=top)] <= yl)
            & (hi[xl.clamp(min=0)] >= yf)).any(dim=-1)
    every = ((qa == qb) & (ka == kb) & ((ka - qa) % d == 0)
             & (lo[qa] <= ka) & (ka <= hi[qa]))
    return some, every


def axis_tile_tables(
    pattern: NAPattern, axis: int, q_tile: int, kv_tile: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis tile tables ``(some, every)``, bool ``[tiles_q, tiles_kv]`` along ``axis``.

    ``some[i, j]``: a query of q tile ``i`` attends a key of kv tile ``j``
    along this axis; ``every[i, j]``: all of them do and neither tile is
    clipped by the layout's end (padding).
    """
    length = pattern.shape[axis]
    lo, hi = axis_window_bounds(length, pattern.kernel_size[axis], pattern.stride[axis],
                                pattern.dilation[axis], pattern.is_causal[axis], device)
    tq = torch.arange(-(-length // q_tile), device=device) * q_tile
    tk = torch.arange(-(-length // kv_tile), device=device) * kv_tile
    qa, qb = tq, torch.clamp(tq + q_tile, max=length) - 1
    ka, kb = tk, torch.clamp(tk + kv_tile, max=length) - 1
    some, every = _exact_pairs(qa[:, None], qb[:, None], ka[None, :], kb[None, :], lo, hi,
                               pattern.dilation[axis])
    every = every & (tq + q_tile <= length)[:, None] & (tk + kv_tile <= length)[None, :]
    return some, every


def _tile_maps(
    pattern: NAPattern, q_tile: tuple[int, ...], kv_tile: tuple[int, ...], device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block maps when every block is exactly one tile (one box): the answer factorises.

    Block ``b`` is tile ``unravel(b)`` of the grid, so "some pair attends" and
    "every pair attends" are products over axes of :func:`axis_tile_tables`;
    one broadcast AND gives the dense map.
    """
    n = pattern.ndim
    q_grid, kv_grid = tile_grid(pattern.shape, q_tile), tile_grid(pattern.shape, kv_tile)
    some = torch.ones(*q_grid, *kv_grid, dtype=torch.bool, device=device)
    full = torch.ones_like(some)
    for a in range(n):
        s_a, e_a = axis_tile_tables(pattern, a, q_tile[a], kv_tile[a], device)
        view = [1] * (2 * n)
        view[a], view[n + a] = q_grid[a], kv_grid[a]
        some &= s_a.reshape(view)
        full &= e_a.reshape(view)
    nq, nkv = math.prod(q_grid), math.prod(kv_grid)
    some, full = some.reshape(nq, nkv), full.reshape(nq, nkv)
    return some & ~full, full


def block_maps(
    pattern: NAPattern,
    q_tile: tuple[int, ...],
    kv_tile: tuple[int, ...],
    q_block: int,
    kv_block: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block maps of ``pattern``: ``(partial, full)``, bool ``[num_q_blocks, num_kv_blocks]``.

    ``q_block``/``kv_block`` are block sizes in tokens, multiples of the tile
    token counts. The maps are dense at block granularity only (BlockMask's
    own index tensors are that size); filling them costs O(pairs reached).
    """
    n = pattern.ndim
    if n == 1:  # a 1-D block is one interval: treat it as a tile of its own
        q_tile, kv_tile = (q_block,), (kv_block,)
    q_tiles = q_block // math.prod(q_tile)
    kv_tiles = kv_block // math.prod(kv_tile)
    if q_tiles == 1 and kv_tiles == 1:
        return _tile_maps(pattern, q_tile, kv_tile, device)
    kv_grid = tile_grid(pattern.shape, kv_tile)
    num_kv = -(-math.prod(kv_grid) // kv_tiles)
    qlo, qhi, qcount = block_boxes(pattern.shape, q_tile, q_tiles, device)
    num_q = qlo.shape[0]
    bounds = [axis_window_bounds(pattern.shape[a], pattern.kernel_size[a], pattern.stride[a],
                                 pattern.dilation[a], pattern.is_causal[a], device)
              for a in range(n)]
    box_ok = qlo[..., 0] <= qhi[..., 0]  # [nq, S]
    shape_max = torch.tensor(pattern.shape, device=device) - 1
    qa = torch.minimum(qlo, shape_max)
    qb = torch.minimum(qhi.clamp_min(0), shape_max)
    w_lo = torch.stack([_range_extreme(bounds[a][0], qa[..., a], qb[..., a],
                                       pattern.dilation[a], True) for a in range(n)], -1)
    w_hi = torch.stack([_range_extreme(bounds[a][1], qa[..., a], qb[..., a],
                                       pattern.dilation[a], False) for a in range(n)], -1)
    kv_t = torch.tensor(kv_tile, device=device)
    owner = torch.arange(num_q, device=device)[:, None].expand_as(box_ok)[box_ok]
    run_owner, start, end = _box_runs(owner, w_lo[box_ok] // kv_t, w_hi[box_ok] // kv_t,
                                      kv_grid, kv_tiles)
    q_idx, kv_idx = _expand(run_owner, start // kv_tiles, end // kv_tiles)
    reached = torch.zeros(num_q, num_kv, dtype=torch.bool, device=device)
    reached[q_idx, kv_idx] = True
    full = torch.zeros_like(reached)

    q_complete = qcount == q_block
    if all(d == 1 for d in pattern.dilation):
        big = torch.iinfo(torch.int64).max
        i_lo = torch.stack([torch.where(box_ok, bounds[a][0][qb[..., a]], -1).amax(1)
                            for a in range(n)], -1)
        i_hi = torch.stack([torch.where(box_ok, bounds[a][1][qa[..., a]], big).amin(1)
                            for a in range(n)], -1)
        t_lo = -(-i_lo // kv_t)
        t_hi = (i_hi + 1) // kv_t - 1
        ok = q_complete & (t_lo <= t_hi).all(dim=1)
        rows = torch.arange(num_q, device=device)[ok]
        run_owner, start, end = _box_runs(rows, t_lo[ok], t_hi[ok], kv_grid, 1)
        q_idx, kv_idx = _expand(run_owner, -(-start // kv_tiles), (end + 1) // kv_tiles - 1)
        full[q_idx, kv_idx] = True
        return reached & ~full, full

    klo, khi, kcount = block_boxes(pattern.shape, kv_tile, kv_tiles, device)
    slots = qlo.shape[1]
    cand_q, cand_kv = reached.nonzero(as_tuple=True)
    reached.zero_()
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
        pair_ok = box_ok[qi][:, :, None] & (klo[ki, :, 0] <= khi[ki, :, 0])[:, None, :]
        some = (some & pair_ok).flatten(1).any(1)
        every = ((every | ~pair_ok).flatten(1).all(1) & some
                 & q_complete[qi] & (kcount[ki] == kv_block))
        reached[qi, ki] = some & ~every
        full[qi, ki] = every
    return reached, full
