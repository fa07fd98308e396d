"""Pure index math of the neighborhood pattern, in NumPy (no FlexAttention, no torch state).

Everything is per axis: a query coordinate ``x`` attends the keys
``lo[x], lo[x] + d, ..., hi[x]`` on that axis (original coordinates, step =
dilation), and a token pair attends iff every axis agrees. Along one axis and
within one dilation group, ``lo`` and ``hi`` never decrease with ``x`` and
neighbouring windows leave no gap, so the union of the windows of an interval
of queries is an interval and their intersection is an interval. The block-map
builder relies on exactly these two facts.

All host-side work of a mask build is NumPy: single-threaded by nature, so it stays
fast on a busy CPU without touching torch's process-global thread pool.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


def window_bounds(length: int, kernel: int, stride: int, dilation: int,
                  causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-query key window on one axis, ``(lo, hi)``: read-only int64 arrays of ``length``.

    Query ``x`` attends key ``y`` on this axis iff ``lo[x] <= y <= hi[x]`` and
    ``y % dilation == x % dilation`` (``lo`` and ``hi`` share ``x``'s residue): the rule of
    ``docs/SEMANTICS.md``. Cached (a pure function of five ints, O(length) memory); the
    arrays are read-only, so no caller can change what later callers get.
    """
    return _window_bounds(int(length), int(kernel), int(stride), int(dilation), bool(causal))


@functools.lru_cache(maxsize=256)
def _window_bounds(length: int, kernel: int, stride: int, dilation: int,
                   causal: bool) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(length, dtype=np.int64)
    g = x % dilation
    xg = x // dilation
    group_len = (length - g + dilation - 1) // dilation
    if causal:
        leader = np.minimum((xg // stride) * stride + stride - 1, group_len - 1)
        lo_g = np.maximum(leader - kernel + 1, 0)
        hi_g = xg
    else:
        left = kernel // 2
        right = kernel // 2 + kernel % 2 - 1
        leader = np.minimum((xg // stride) * stride + stride // 2, group_len - 1)
        centre = np.maximum(np.minimum(leader, group_len - 1 - right), left)
        lo_g = centre - left
        hi_g = centre + right
    lo, hi = g + dilation * lo_g, g + dilation * hi_g
    lo.flags.writeable = False
    hi.flags.writeable = False
    return lo, hi


def axis_window_bounds(
    length: int,
    kernel: int,
    stride: int,
    dilation: int,
    causal: bool,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`window_bounds` as int64 tensors on ``device`` (fresh copies: safe to modify)."""
    lo, hi = window_bounds(length, kernel, stride, dilation, causal)
    both = torch.from_numpy(np.stack([lo, hi]))
    if device is not None and torch.device(device).type != "cpu":
        both = both.to(device)
    return both[0], both[1]


def axis_pair_count(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> int:
    """Number of attending (x, y) pairs along one axis."""
    lo, hi = window_bounds(length, kernel, stride, dilation, causal)
    return int(((hi - lo) // dilation + 1).sum())


# Per axis ``(start, stop)``: the sub-box of the layout a side's tokens come from (queries of
# one shard against its keys plus halo, say). ``None`` is the whole layout.
Region = tuple[tuple[int, int], ...]


def region_or_full(region: Region | None, shape: tuple[int, ...]) -> Region:
    return tuple((0, length) for length in shape) if region is None else region


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in region)


def padded_shape(shape: tuple[int, ...], tile: tuple[int, ...]) -> tuple[int, ...]:
    """Layout shape rounded up to whole tiles on every axis."""
    return tuple(-(-length // t) * t for length, t in zip(shape, tile, strict=True))


def tile_grid(shape: tuple[int, ...], tile: tuple[int, ...]) -> tuple[int, ...]:
    """Number of tiles along each axis."""
    return tuple(-(-length // t) for length, t in zip(shape, tile, strict=True))


def unravel(index: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """Row-major coordinates of flat ``index`` in a grid ``dims``: shape ``[..., n]``."""
    coords = []
    rest = index
    for size in reversed(dims):
        coords.append(rest % size)
        rest = rest // size
    return np.stack(coords[::-1], axis=-1)


def ravel(coords: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """Flat row-major index of ``coords`` ``[..., n]`` in a grid ``dims``."""
    flat = np.zeros_like(coords[..., 0])
    for a, size in enumerate(dims):
        flat = flat * size + coords[..., a]
    return flat


def tiled_coords(shape: tuple[int, ...], tile: tuple[int, ...]) -> np.ndarray:
    """Coordinates of every position of the tiled token order, ``[N_tiled, n]`` int64.

    Position ``p`` holds tile ``p // prod(tile)`` (tiles in row-major order over
    the tile grid) and offset ``p % prod(tile)`` inside it (row-major in the
    tile). Positions outside the layout (padding) get coordinate ``-1`` on
    every axis. ``tile`` of all ones is plain row-major order.
    """
    grid = tile_grid(shape, tile)
    per_tile = math.prod(tile)
    p = np.arange(math.prod(grid) * per_tile, dtype=np.int64)
    coords = unravel(p // per_tile, grid) * np.array(tile) + unravel(p % per_tile, tile)
    inside = (coords < np.array(shape)).all(axis=-1, keepdims=True)
    return np.where(inside, coords, -1)


def ordered_coords(shape: tuple[int, ...], tile: tuple[int, ...],
                   device: torch.device | str | None = None) -> torch.Tensor:
    """:func:`tiled_coords` as a tensor on ``device``."""
    return torch.from_numpy(tiled_coords(shape, tile)).to(device or "cpu")


def block_boxes(shape: tuple[int, ...], tile: tuple[int, ...],
                block_tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each block of the tiled order into axis-aligned boxes of layout coordinates.

    Block ``b`` holds tiles ``[b * block_tiles, (b + 1) * block_tiles)`` of the
    row-major tile grid. A contiguous range of a row-major grid is a union of
    at most ``2n - 1`` boxes: per level ``j`` (axis ``j`` varies, faster axes
    span their whole extent, slower ones are fixed) a head piece that climbs to
    the next boundary and a tail piece that descends from the end. Each tile
    box maps to a box of layout coordinates clipped to the layout.

    Returns ``(lo, hi, count)``: ``lo``/``hi`` ``[blocks, 2n, n]`` inclusive
    coordinates (empty slots have ``lo > hi`` on axis 0) and ``count``
    ``[blocks]``, the number of real tokens in the block.
    """
    grid = tile_grid(shape, tile)
    n = len(grid)
    total = math.prod(grid)
    num_blocks = -(-total // block_tiles)
    s = np.arange(num_blocks, dtype=np.int32) * block_tiles  # tile indices fit int32 (< 2**31 tokens)
    e = np.minimum(s + block_tiles, total)
    big = total + 1  # unit above level 0: the whole grid is one unit

    def ru(v: np.ndarray, p: int) -> np.ndarray:
        return -(-v // p) * p

    def rd(v: np.ndarray, p: int) -> np.ndarray:
        return (v // p) * p

    seg_start, seg_end, seg_level = [], [], []
    for j in range(n):
        p = math.prod(grid[j + 1:])
        unit = math.prod(grid[j:]) if j > 0 else big
        a, z = ru(s, p), rd(e, p)
        head_end = np.maximum(np.minimum(z, ru(s, unit)), a)
        tail_start = np.maximum(np.maximum(a, rd(e, unit)), head_end)
        seg_start += [a, tail_start]
        seg_end += [head_end, np.maximum(z, tail_start)]
        seg_level += [j, j]
    start = np.stack(seg_start, axis=1)  # [blocks, 2n] in tile units
    end = np.stack(seg_end, axis=1)
    nonempty = end > start
    first = unravel(start, grid)  # [blocks, 2n, n]
    last = unravel(np.maximum(end - 1, 0), grid)
    level = np.array(seg_level)
    axis = np.arange(n)
    gmax = np.array(grid) - 1
    # axes before the level: fixed at first's coordinate; at the level: first..last;
    # after the level: whole extent.
    before = axis[None, :] < level[:, None]  # [2n, n]
    at = axis[None, :] == level[:, None]
    t_lo = np.where(before | at, first, 0)
    t_hi = np.where(before, first, np.where(at, last, np.broadcast_to(gmax, last.shape)))
    tile_a = np.array(tile)
    lo = t_lo * tile_a
    hi = np.minimum((t_hi + 1) * tile_a, np.array(shape)) - 1
    empty = np.array([1] + [0] * (n - 1))
    lo = np.where(nonempty[..., None], lo, empty)  # lo > hi on axis 0 marks empty
    hi = np.where(nonempty[..., None], hi, 0)
    count = np.where(nonempty, np.maximum(hi - lo + 1, 0).prod(axis=-1), 0).sum(axis=1)
    return lo, hi, count


def tile_window_bounds(length: int, tile: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-query key window on one axis of sliding tile attention (STA), ``(lo, hi)``.

    The axis is cut into ``G = length // tile`` tiles (``length`` a multiple of ``tile``);
    query ``x`` lies in tile ``X = x // tile``, whose window is the ``window`` whole tiles
    ``[C - left, C + right]`` with ``left = window // 2``, ``right = window - 1 - left`` and
    the centre tile ``C = clamp(X, left, G - 1 - right)`` (windows slide inward at the
    borders). In tokens: ``lo = (C - left) * tile``, ``hi = (C + right + 1) * tile - 1``.
    Read-only int64 arrays of ``length``, cached.
    """
    return _tile_window_bounds(int(length), int(tile), int(window))


@functools.lru_cache(maxsize=256)
def _tile_window_bounds(length: int, tile: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    tiles = length // tile
    left = window // 2
    right = window - 1 - left
    centre = np.clip(np.arange(length, dtype=np.int64) // tile, left, tiles - 1 - right)
    lo, hi = (centre - left) * tile, (centre + right + 1) * tile - 1
    lo.flags.writeable = False
    hi.flags.writeable = False
    return lo, hi
