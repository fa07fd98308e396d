"""Which (query block, key block) pairs a mask touches, from geometry alone (NumPy, no torch).

The output is two bool maps per pattern, *partial* (some pair of tokens attends, not all)
and *full* (every pair attends, all tokens real); ``blockmask.py`` turns them into a
BlockMask. :func:`spec_block_maps` handles a whole :class:`~flexna.spec.MaskSpec` in one
place: one map per distinct head pattern, packed samples as a block diagonal, extra-token
rows and columns, on top of :func:`order_block_maps` for one pattern in one pair of orders.

Method. A block of the tiled order is a union of at most ``2n - 1`` boxes
(:meth:`flexna.layout.TokenOrder.block_boxes`). With dilation 1 on every axis:

* the keys reached by a box of queries form the box whose per-axis interval is
  ``[lo(first), hi(last)]`` of the rule's *envelope* (windows are monotone and gap-free),
  so the key blocks *reached* by a query block are exactly the blocks touching those boxes;
* the keys attended by *every* query of the block form the box ``[max lo(last), min
  hi(first)]`` of the rule's *core*, so the *full* key blocks are exactly the complete
  blocks lying inside it.

Both are found by walking the boxes in runs contiguous in the key order, so the cost is
O(runs + pairs reached), never O(N^2). With dilation the unions are not boxes; the bounding
boxes then give candidates and an exact per-axis test over box pairs (per dilation
residue) decides. A rule that is not separable per axis takes that path too: its envelope
gives the candidates and its own box test (:meth:`~flexna.pattern.NAPattern.box_pairs`)
decides, exactly when the rule provides one. Orders whose blocks are not unions of boxes
(space-filling curves) go through :func:`token_block_maps`, per token.
"""

from __future__ import annotations

import math

import numpy as np

from flexna.cache import cached
from flexna.geometry import Region, ravel, region_or_full, region_shape, tile_grid
from flexna.layout import TokenLayout, TokenOrder
from flexna.pattern import NAPattern
from flexna.spec import MaskSpec

Maps = tuple[np.ndarray, np.ndarray]


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


def _fill_runs(rows: int, cols: int, owner: np.ndarray, first: np.ndarray,
               last: np.ndarray) -> np.ndarray:
    """Bool ``[rows, cols]`` map, True on ``[first, last]`` of row ``owner`` for every run.

    Either the runs' cells are listed (O(cells covered)) or, when that is more than the map,
    a difference array (+1 at each run's first column, -1 past its last, a cumsum along the
    rows; O(runs + rows x cols)). Empty runs (first > last) and overlapping runs are fine.
    """
    i32 = np.int32  # block indices: int32 arithmetic is ~2x faster than int64
    first, last = np.clip(first, 0, cols).astype(i32), np.clip(last, -1, cols - 1).astype(i32)
    owner = owner.astype(i32)
    ok = first <= last
    owner, first, last = owner[ok], first[ok], last[ok]
    lengths = last - first + 1
    total = int(lengths.sum())
    if total <= rows * cols:
        out = np.zeros(rows * cols, dtype=bool)
        starts = np.repeat(owner * i32(cols) + first - (np.cumsum(lengths, dtype=i32) - lengths), lengths)
        starts += np.arange(total, dtype=i32)
        out[starts] = True
        return out.reshape(rows, cols)
    width = cols + 1  # a cell lies in at most 2n - 1 runs (boxes): int8 counts suffice
    diff = np.bincount(owner * width + first, minlength=rows * width)
    diff -= np.bincount(owner * width + last + 1, minlength=rows * width)
    return np.cumsum(diff.astype(np.int8).reshape(rows, width), axis=1, dtype=np.int8)[:, :cols] > 0


def _box_runs(owner: np.ndarray, t_lo: np.ndarray, t_hi: np.ndarray, grid: tuple[int, ...],
              max_gap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    owner, t_lo, t_hi = owner.astype(np.int32), t_lo.astype(np.int32), t_hi.astype(np.int32)
    merge = []
    for j in range(1, n):
        sub = grid[j:]
        span = ravel(t_hi[:, j:], sub) - ravel(t_lo[:, j:], sub) + 1
        merge.append(math.prod(sub) - span < max_gap)
    if merge:
        m_ok = np.stack(merge, axis=1).astype(np.int32)  # m_ok[:, j-1]: may merge axis j into j-1
        run_axis = (n - 1) - np.flip(np.cumprod(np.flip(m_ok, 1), 1), 1).sum(1)
    else:
        run_axis = np.zeros(t_lo.shape[0], dtype=np.int32)
    prefix = np.arange(n)[None, :] < run_axis[:, None]
    extent = np.where(prefix, t_hi - t_lo + 1, 1).astype(np.int32)
    lines = extent.prod(axis=1, dtype=np.int32)
    if int(lines.sum()) == lines.size:  # one run per box: no walk
        return owner, ravel(t_lo, grid), ravel(t_hi, grid)
    row = np.repeat(np.arange(owner.size, dtype=np.int32), lines)
    offsets = np.cumsum(lines, dtype=np.int32) - lines
    local = np.arange(row.size, dtype=np.int32) - offsets[row]
    start_flat = np.zeros(row.size, dtype=np.int32)
    end_flat = np.zeros(row.size, dtype=np.int32)
    for a in reversed(range(n)):  # per axis: the step's coordinate, then the run's flat bounds
        ext = extent[:, a]
        if (ext == 1).all():
            step = 0
        else:
            e = ext[row]
            step = local % e
            local //= e
        lo_a = t_lo[row, a] + step
        stride = math.prod(grid[a + 1:])
        start_flat += lo_a * stride
        end_flat += np.where(prefix[row, a], lo_a, t_hi[row, a]) * stride
    return owner[row], start_flat, end_flat


def _range_extreme(table: np.ndarray, a: np.ndarray, b: np.ndarray, d: int, lowest: bool) -> np.ndarray:
    """min (``lowest``) or max of ``table`` over ``[a, b]`` for a table monotone per residue mod d."""
    if d == 1:
        return table[a] if lowest else table[b]
    off = np.arange(d)
    if lowest:
        return table[np.minimum(a[..., None] + off, b[..., None])].min(axis=-1)
    return table[np.maximum(b[..., None] - off, a[..., None])].max(axis=-1)


def exact_pairs(qa: np.ndarray, qb: np.ndarray, ka: np.ndarray, kb: np.ndarray, lo: np.ndarray,
                 hi: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis (some pair attends, every pair attends) for query/key intervals."""
    if d == 1:
        some = (lo[qa] <= kb) & (hi[qb] >= ka)
        every = (lo[qb] <= ka) & (hi[qa] >= kb)
        return some, every
    r = np.arange(d)
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
    pattern: NAPattern, axis: int, q_tile: int, kv_tile: int,
    q_span: tuple[int, int] | None = None, kv_span: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis tile tables ``(some, every)``, bool ``[tiles_q, tiles_kv]`` along ``axis``.

    ``some[i, j]``: a query of q tile ``i`` attends a key of kv tile ``j`` along this axis
    (rule envelope); ``every[i, j]``: all of them do (rule core) and neither tile is clipped
    by the end of its span (padding). Tiles start at the span's start (``q_span``/``kv_span``:
    ``(start, stop)``, default the whole axis).
    """
    length = pattern.shape[axis]
    q0, q1 = q_span or (0, length)
    k0, k1 = kv_span or (0, length)
    tq = np.arange(q0, q1, q_tile)
    tk = np.arange(k0, k1, kv_tile)
    qa, qb = tq[:, None], np.minimum(tq + q_tile, q1)[:, None] - 1
    ka, kb = tk[None, :], np.minimum(tk + kv_tile, k1)[None, :] - 1
    d = pattern.dilation[axis]
    some, _ = exact_pairs(qa, qb, ka, kb, *pattern.envelope_bounds(axis), d)
    _, every = exact_pairs(qa, qb, ka, kb, *pattern.core_bounds(axis), d)
    every = every & (tq + q_tile <= q1)[:, None] & (tk + kv_tile <= k1)[None, :]
    return some, every


def _tile_maps(pattern: NAPattern, q_tile: tuple[int, ...], kv_tile: tuple[int, ...],
               q_region: Region, kv_region: Region) -> Maps:
    """Block maps when every block is exactly one tile (one box): the answer factorises.

    Block ``b`` is tile ``unravel(b)`` of the grid, so "some pair attends" and "every pair
    attends" are products over axes of :func:`axis_tile_tables`; one broadcast AND gives
    the dense map.
    """
    n = pattern.ndim
    q_grid = tile_grid(region_shape(q_region), q_tile)
    kv_grid = tile_grid(region_shape(kv_region), kv_tile)
    some = full = np.ones([1] * (2 * n), dtype=bool)
    for a in range(n):
        s_a, e_a = axis_tile_tables(pattern, a, q_tile[a], kv_tile[a], q_region[a], kv_region[a])
        view = [1] * (2 * n)
        view[a], view[n + a] = q_grid[a], kv_grid[a]
        some = some & s_a.reshape(view)
        full = full & e_a.reshape(view)
    nq, nkv = math.prod(q_grid), math.prod(kv_grid)
    some = np.broadcast_to(some, (*q_grid, *kv_grid)).reshape(nq, nkv)
    full = np.broadcast_to(full, (*q_grid, *kv_grid)).reshape(nq, nkv)
    return some & ~full, full


def order_block_maps(
    pattern: NAPattern,
    q_order: TokenLayout | TokenOrder,
    kv_order: TokenLayout | TokenOrder,
    q_block: int,
    kv_block: int,
    q_region: Region | None = None,
    kv_region: Region | None = None,
) -> Maps:
    """Block maps of one pattern: ``(partial, full)``, bool ``[q blocks, kv blocks]``.

    Queries (keys) are the tokens of ``q_region`` (``kv_region``) in ``q_order``
    (``kv_order``), an order over that region; by default the whole layout.
    """
    n = pattern.ndim
    if not (isinstance(q_order, TokenLayout) and isinstance(kv_order, TokenLayout)):
        if q_region is not None or kv_region is not None:
            raise ValueError("regions need tiled token orders")
        return token_block_maps(pattern, q_order, kv_order, q_block, kv_block)
    q_region = region_or_full(q_region, pattern.shape)
    kv_region = region_or_full(kv_region, pattern.shape)
    q_shape, kv_shape = region_shape(q_region), region_shape(kv_region)
    q_tile, kv_tile = q_order.tile, kv_order.tile
    if n == 1:  # a 1-D block is one interval: treat it as a tile of its own
        q_tile, kv_tile = (q_block,), (kv_block,)
    q_tiles = q_block // math.prod(q_tile)
    kv_tiles = kv_block // math.prod(kv_tile)
    q_as_tile = block_as_tile(q_shape, q_tile, q_tiles)
    kv_as_tile = block_as_tile(kv_shape, kv_tile, kv_tiles)
    exact_boxes = pattern.separable and all(d == 1 for d in pattern.dilation)
    if q_as_tile is not None and kv_as_tile is not None and pattern.separable:
        return _tile_maps(pattern, q_as_tile, kv_as_tile, q_region, kv_region)
    q_boxes = q_order.block_boxes(q_block)
    kv_boxes = kv_order.block_boxes(kv_block) if not exact_boxes else ()
    if q_boxes is None or kv_boxes is None:
        raise ValueError(f"block sizes ({q_block}, {kv_block}) must hold whole tiles of {q_order.tile} "
                         f"/ {kv_order.tile}")
    kv_grid = tile_grid(kv_shape, kv_tile)
    num_kv = -(-math.prod(kv_grid) // kv_tiles)
    q_start = np.array([s for s, _ in q_region])
    kv_start = np.array([s for s, _ in kv_region])
    kv_last = np.array(kv_shape) - 1  # in region coordinates
    qlo, qhi, qcount = q_boxes
    qlo, qhi = qlo + q_start, qhi + q_start  # layout coordinates (empty slots stay lo > hi)
    num_q = qlo.shape[0]
    envelope = [pattern.envelope_bounds(a) for a in range(n)]
    core = [pattern.core_bounds(a) for a in range(n)]
    shape_max = np.array(pattern.shape) - 1
    qa = np.minimum(qlo, shape_max)
    qb = np.minimum(np.maximum(qhi, 0), shape_max)
    dil = pattern.dilation
    w_lo = np.stack([_range_extreme(envelope[a][0], qa[..., a], qb[..., a], dil[a], True)
                     for a in range(n)], -1)
    w_hi = np.stack([_range_extreme(envelope[a][1], qa[..., a], qb[..., a], dil[a], False)
                     for a in range(n)], -1)
    # the reached keys, clipped to the key region, in region coordinates
    w_lo = np.maximum(w_lo - kv_start, 0)
    w_hi = np.minimum(w_hi - kv_start, kv_last)
    q_real = qlo[..., 0] <= qhi[..., 0]  # [nq, S]: the box slot holds queries
    box_ok = q_real & (w_lo <= w_hi).all(-1)
    kv_t = np.array(kv_tile)
    owner = np.broadcast_to(np.arange(num_q)[:, None], box_ok.shape)[box_ok]
    run_owner, start, end = _box_runs(owner, w_lo[box_ok] // kv_t, w_hi[box_ok] // kv_t, kv_grid, kv_tiles)
    reached = _fill_runs(num_q, num_kv, run_owner, start // kv_tiles, end // kv_tiles)

    q_complete = qcount == q_block
    if exact_boxes:
        big = np.iinfo(np.int64).max
        i_lo = np.stack([np.where(q_real, core[a][0][qb[..., a]], -1).max(1) for a in range(n)], -1)
        i_hi = np.stack([np.where(q_real, core[a][1][qa[..., a]], big).min(1) for a in range(n)], -1)
        i_lo = np.maximum(i_lo - kv_start, 0)
        i_hi = np.minimum(i_hi - kv_start, kv_last)
        t_lo = -(-i_lo // kv_t)
        t_hi = (i_hi + 1) // kv_t - 1
        ok = q_complete & (t_lo <= t_hi).all(axis=1)
        rows = np.arange(num_q)[ok]
        run_owner, start, end = _box_runs(rows, t_lo[ok], t_hi[ok], kv_grid, 1)
        full = _fill_runs(num_q, num_kv, run_owner, -(-start // kv_tiles), (end + 1) // kv_tiles - 1)
        return reached & ~full, full

    klo, khi, kcount = kv_boxes  # type: ignore[misc]
    klo, khi = klo + kv_start, khi + kv_start
    slots = qlo.shape[1]
    cand_q, cand_kv = reached.nonzero()
    reached[:] = False
    full = np.zeros_like(reached)
    chunk = max(1, 2**22 // (slots * slots * n * max(dil)))
    for c0 in range(0, cand_q.size, chunk):
        qi, ki = cand_q[c0:c0 + chunk], cand_kv[c0:c0 + chunk]
        last = np.array(pattern.shape) - 1
        some, every = pattern.box_pairs(qa[qi][:, :, None, :], qb[qi][:, :, None, :],
                                        np.clip(klo[ki], 0, last)[:, None, :, :],
                                        np.clip(khi[ki], 0, last)[:, None, :, :])
        pair_ok = q_real[qi][:, :, None] & (klo[ki, :, 0] <= khi[ki, :, 0])[:, None, :]
        some_any = (some & pair_ok).reshape(qi.size, -1).any(1)
        every_all = ((every | ~pair_ok).reshape(qi.size, -1).all(1) & some_any
                     & q_complete[qi] & (kcount[ki] == kv_block))
        reached[qi, ki] = some_any & ~every_all
        full[qi, ki] = every_all
    return reached, full


def _residue_major(coord: np.ndarray, length: int, d: int) -> np.ndarray:
    """Axis coordinate ``y`` -> ``(y % d) * ceil(L / d) + y // d``: each dilation group contiguous,
    so a window (one group, step ``d``) is one interval. Keeps ``-1`` (padding)."""
    if d == 1:
        return coord
    return np.where(coord >= 0, (coord % d) * -(-length // d) + coord // d, -1)


def token_block_maps(pattern: NAPattern, q_order: TokenOrder, kv_order: TokenOrder,
                     q_block: int, kv_block: int) -> Maps:
    """Block maps for any pair of token orders, from per-token windows (exact for any dilation).

    Coordinates are taken residue-major per axis (:func:`_residue_major`), where every
    query's window is a box. Per query block, the union of its queries' envelope boxes is
    painted by an n-D difference array over the block's bounding box and the key blocks
    under it are *reached*; a key block is *full* when all its keys lie, on every axis,
    inside the intersection of the block's core windows, ``[max lo, min hi]`` (a rule
    separable per axis attends a pair iff every axis does), and neither block holds padding.
    O(tokens + sum over query blocks of their bounding boxes + blocks^2 * n).
    """
    n = pattern.ndim
    qc, kc = q_order.coords(), kv_order.coords()
    nq_blocks, nk_blocks = -(-len(qc) // q_block), -(-len(kc) // kv_block)
    ext = [d * -(-length // d) for length, d in zip(pattern.shape, pattern.dilation, strict=True)]
    key_block = np.full(ext, -1, dtype=np.int64)  # residue-major layout -> the key's block
    kr = np.stack([_residue_major(kc[:, a], pattern.shape[a], pattern.dilation[a]) for a in range(n)], 1)
    real_k: np.ndarray = np.asarray((kc >= 0).all(1))
    key_block[tuple(kr[real_k].T)] = np.arange(len(kc))[real_k] // kv_block
    real_q: np.ndarray = np.asarray((qc >= 0).all(1))
    bounds = []
    for fn in (pattern.envelope_bounds, pattern.core_bounds):
        lo_hi = []
        for a in range(n):
            lo, hi = fn(a)
            x = np.maximum(qc[:, a], 0)
            length, d = pattern.shape[a], pattern.dilation[a]
            lo_hi.append((_residue_major(lo[x], length, d), _residue_major(hi[x], length, d)))
        bounds.append(lo_hi)
    e_lo = np.stack([b[0] for b in bounds[0]], 1)  # [Nq, n]
    e_hi = np.stack([b[1] for b in bounds[0]], 1)
    c_lo = np.stack([b[0] for b in bounds[1]], 1)
    c_hi = np.stack([b[1] for b in bounds[1]], 1)
    reached = np.zeros((nq_blocks, nk_blocks), dtype=bool)
    corners = np.array(list(np.ndindex(*(2,) * n)), dtype=np.int64)  # [2^n, n]
    signs = (-1) ** corners.sum(1)
    for b in range(nq_blocks):
        sel = np.arange(b * q_block, min((b + 1) * q_block, len(qc)))
        sel = sel[real_q[sel] & (e_lo[sel] <= e_hi[sel]).all(1)]
        if sel.size == 0:
            continue
        boxes = np.unique(np.concatenate([e_lo[sel], e_hi[sel]], 1), axis=0)
        lo, hi = boxes[:, :n], boxes[:, n:]
        origin, size = lo.min(0), hi.max(0) - lo.min(0) + 1
        diff = np.zeros(size + 1, dtype=np.int32)
        for corner, sign in zip(corners, signs, strict=True):
            point = np.where(corner, hi + 1, lo) - origin
            np.add.at(diff, tuple(point.T), sign)
        for a in range(n):
            diff = np.cumsum(diff, axis=a, dtype=np.int32)
        covered = diff[tuple(slice(0, int(v)) for v in size)] > 0
        window = key_block[tuple(slice(int(o), int(o + v)) for o, v in zip(origin, size, strict=True))]
        hit = window[covered]
        reached[b, hit[hit >= 0]] = True

    def per_block(values: np.ndarray, real: np.ndarray, block: int, blocks: int, fill: int,
                  reduce: np.ufunc) -> np.ndarray:
        padded = np.full((blocks * block, n), fill, dtype=np.int64)
        padded[:len(values)] = np.where(real[:, None], values, fill)
        return reduce.reduce(padded.reshape(blocks, block, n), axis=1)

    big = np.iinfo(np.int64).max // 4
    i_lo = per_block(c_lo, real_q, q_block, nq_blocks, -big, np.maximum)
    i_hi = per_block(c_hi, real_q, q_block, nq_blocks, big, np.minimum)
    k_min = per_block(kr, real_k, kv_block, nk_blocks, big, np.minimum)
    k_max = per_block(kr, real_k, kv_block, nk_blocks, -big, np.maximum)
    q_complete = np.zeros(nq_blocks * q_block, dtype=bool)
    q_complete[:len(qc)] = real_q
    k_complete = np.zeros(nk_blocks * kv_block, dtype=bool)
    k_complete[:len(kc)] = real_k
    q_ok = np.asarray(q_complete.reshape(nq_blocks, q_block).all(1))
    k_ok = np.asarray(k_complete.reshape(nk_blocks, kv_block).all(1))
    full = np.ones((nq_blocks, nk_blocks), dtype=bool)
    for a in range(n):
        full &= (k_min[None, :, a] >= i_lo[:, None, a]) & (k_max[None, :, a] <= i_hi[:, None, a])
    full &= q_ok[:, None] & k_ok[None, :] & reached
    return reached & ~full, full


def spec_maps(spec: MaskSpec, host: object | None = None) -> Maps:
    """The spec's block maps (read-only NumPy), built once: the tile search's cost comparison
    and the BlockMask share them (``host``: the spec's host tables, when already built)."""
    def build() -> Maps:
        partial, full = spec_block_maps(spec, host)
        partial.flags.writeable = False
        full.flags.writeable = False
        return partial, full

    return cached(("maps", spec), build, lambda m: m[0].nbytes + m[1].nbytes)



def spec_block_maps(spec: MaskSpec, host_tables: object | None = None) -> Maps:
    """Block maps of a whole spec: ``(partial, full)``, bool ``[heads, q blocks, kv blocks]``.

    ``heads`` is the spec's pattern count (1: shared by all heads). Each distinct pattern's
    maps are built once; samples sit on the block diagonal; blocks holding extra tokens
    follow from the index rules, and the few blocks that straddle the end of the layout
    part are decided element by element (``host_tables``: the spec's
    :class:`~flexna.tables.HostTables`, built when needed and not given).
    """
    rows, cols = spec.num_q_blocks, spec.num_kv_blocks
    one = len(spec.samples) == 1 and spec.heads == 1 and not (spec.num_extra_q or spec.num_extra_kv)
    if one:  # the common case: the pattern's own maps, no copy into a larger array
        pm, fm = order_block_maps(spec.samples[0][0], spec.q_order(), spec.kv_order(), spec.q_block,
                                  spec.kv_block, spec.q_region, spec.kv_region)
        return pm[None], fm[None]
    partial = np.zeros((spec.heads, rows, cols), dtype=bool)
    full = np.zeros_like(partial)
    qb, kb = spec.q_block, spec.kv_block
    for i, group in enumerate(spec.samples):
        r0, c0 = spec.q_offsets[i] // qb, spec.kv_offsets[i] // kb
        done: dict[NAPattern, Maps] = {}
        for h, p in enumerate(group):
            if p not in done:
                done[p] = order_block_maps(p, spec.q_order(i), spec.kv_order(i), qb, kb,
                                           spec.q_region, spec.kv_region)
            pm, fm = done[p]
            partial[h, r0:r0 + pm.shape[0], c0:c0 + pm.shape[1]] = pm
            full[h, r0:r0 + fm.shape[0], c0:c0 + fm.shape[1]] = fm
    if not spec.num_extra_q and not spec.num_extra_kv:
        return partial, full
    return _with_extra_tokens(spec, partial | full, full, host_tables)


def _with_extra_tokens(spec: MaskSpec, some: np.ndarray, full: np.ndarray,
                       host_tables: object | None) -> Maps:
    """Extend layout maps by the blocks of extra queries (rows) and extra keys (columns)."""
    from flexna.tables import host_tables as build_host_tables

    nq, nk = spec.q_len, spec.kv_len
    lq, lk = spec.q_layout_len, spec.kv_layout_len
    qb, kb = spec.q_block, spec.kv_block
    qs = np.arange(spec.num_q_blocks) * qb
    ks = np.arange(spec.num_kv_blocks) * kb
    q_extra = np.minimum(qs + qb, nq) > lq  # the block holds extra queries
    k_extra = np.minimum(ks + kb, nk) > lk
    q_mixed = q_extra & (qs < lq)  # ... and layout ones: decided element-wise
    k_mixed = k_extra & (ks < lk)
    # every query attends the extra keys; extra queries reach every key block (each holds a
    # real key: a block starts inside a tile or sample, and a tile starts inside the layout)
    some = some | k_extra[None, None, :] | q_extra[None, :, None]
    complete = (qs + qb <= nq)[:, None] & (ks + kb <= nk)[None, :]
    only_extra_q = q_extra & ~q_mixed
    only_extra_k = k_extra & ~k_mixed
    # extra queries attend real keys only: their blocks are full where the key block has no padding
    host = build_host_tables(spec) if host_tables is None else host_tables
    # a key is real when every axis is: padding is -1 on the axis it pads only
    kv_real = (host.pos[:, :, :lk] >= 0).all(0)  # type: ignore[attr-defined]
    kv_block_real = _block_all(kv_real, kb, spec.num_kv_blocks)
    full = full | (complete & only_extra_k[None, :])[None]
    full = full | (complete[None] & only_extra_q[None, :, None] & (kv_block_real | k_extra)[:, None, :]
                   & ~k_mixed[None, None, :])
    mixed = complete[None] & (q_mixed[None, :, None] | k_mixed[None, None, :]) & some
    for h, r, c in zip(*mixed.nonzero(), strict=True):
        q = np.arange(r * qb, r * qb + qb)[:, None]
        kv = np.arange(c * kb, c * kb + kb)[None, :]
        full[h, r, c] = host.attends(h, q, kv).all()  # type: ignore[attr-defined]
    return some & ~full, full


def _block_all(flags: np.ndarray, block: int, blocks: int) -> np.ndarray:
    """``[heads, blocks]``: every position of the block (within ``flags``' length) is True."""
    heads, length = flags.shape
    padded = np.ones((heads, blocks * block), dtype=bool)
    padded[:, :length] = flags
    return np.asarray(padded.reshape(heads, blocks, block).all(axis=2))
