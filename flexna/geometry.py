"""Pure index math of the neighborhood pattern (no FlexAttention here).

Everything is per axis: a query coordinate ``x`` attends the keys
``lo[x], lo[x] + d, ..., hi[x]`` on that axis (original coordinates, step =
dilation), and a token pair attends iff every axis agrees. Along one axis and
within one dilation group, ``lo`` and ``hi`` never decrease with ``x`` and
neighbouring windows leave no gap, so the union of the windows of an interval
of queries is an interval and their intersection is an interval. The BlockMask
builder relies on exactly these two facts.
"""

from __future__ import annotations

import functools
import math

import torch


def axis_window_bounds(
    length: int,
    kernel: int,
    stride: int,
    dilation: int,
    causal: bool,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query key window on one axis, ``(lo, hi)``: int64 tensors of ``length``.

    Query ``x`` attends key ``y`` on this axis iff ``lo[x] <= y <= hi[x]`` and
    ``y % dilation == x % dilation`` (``lo`` and ``hi`` share ``x``'s residue).
    Computed once per argument set on the CPU (a pure function of five ints; cached,
    O(length) memory) and copied to ``device``. Callers must not modify the result.
    """
    lo, hi = _cpu_window_bounds(length, kernel, stride, dilation, causal)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        return lo, hi
    both = torch.stack([lo, hi]).to(device)
    return both[0], both[1]


@functools.lru_cache(maxsize=256)
def _cpu_window_bounds(length: int, kernel: int, stride: int, dilation: int,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(length)
    g = x % dilation
    xg = x // dilation
    group_len = (length - g + dilation - 1) // dilation
    if causal:
        leader = torch.minimum((xg // stride) * stride + stride - 1, group_len - 1)
        lo_g = (leader - kernel + 1).clamp_min(0)
        hi_g = xg
    else:
        left = kernel // 2
        right = kernel // 2 + kernel % 2 - 1
        leader = torch.minimum((xg // stride) * stride + stride // 2, group_len - 1)
        centre = torch.maximum(torch.minimum(leader, group_len - 1 - right),
                               torch.full_like(leader, left))
        lo_g = centre - left
        hi_g = centre + right
    return g + dilation * lo_g, g + dilation * hi_g


def axis_pair_count(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> int:
    """Number of attending (x, y) pairs along one axis."""
    lo, hi = axis_window_bounds(length, kernel, stride, dilation, causal)
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


def unravel(index: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Row-major coordinates of flat ``index`` in a grid ``dims``: shape ``[..., n]``."""
    coords = []
    rest = index
    for size in reversed(dims):
        coords.append(rest % size)
        rest = rest // size
    return torch.stack(coords[::-1], dim=-1)


def ordered_coords(
    shape: tuple[int, ...],
    tile: tuple[int, ...],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Coordinates of every position of the tiled token order, ``[N_tiled, n]`` int64.

    Position ``p`` holds tile ``p // prod(tile)`` (tiles in row-major order over
    the tile grid) and offset ``p % prod(tile)`` inside it (row-major in the
    tile). Positions outside the layout (padding) get coordinate ``-1`` on
    every axis. ``tile`` of all ones is plain row-major order.
    """
    grid = tile_grid(shape, tile)
    per_tile = math.prod(tile)
    p = torch.arange(math.prod(grid) * per_tile, device=device)
    coords = unravel(p // per_tile, grid) * torch.tensor(tile, device=device) + unravel(
        p % per_tile, tile
    )
    inside = (coords < torch.tensor(shape, device=device)).all(dim=-1, keepdim=True)
    return torch.where(inside, coords, torch.full_like(coords, -1))


def block_boxes(
    shape: tuple[int, ...],
    tile: tuple[int, ...],
    block_tiles: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    b = torch.arange(num_blocks, device=device)
    s = b * block_tiles
    e = torch.clamp(s + block_tiles, max=total)
    big = total + 1  # unit above level 0: the whole grid is one unit

    def ru(v: torch.Tensor, p: int) -> torch.Tensor:
        return -(-v // p) * p

    def rd(v: torch.Tensor, p: int) -> torch.Tensor:
        return (v // p) * p

    seg_start, seg_end, seg_level = [], [], []
    for j in range(n):
        p = math.prod(grid[j + 1:])
        unit = math.prod(grid[j:]) if j > 0 else big
        a, z = ru(s, p), rd(e, p)
        head_end = torch.minimum(z, ru(s, unit))
        head_end = torch.maximum(head_end, a)
        tail_start = torch.maximum(torch.maximum(a, rd(e, unit)), head_end)
        seg_start += [a, tail_start]
        seg_end += [head_end, torch.maximum(z, tail_start)]
        seg_level += [j, j]
    start = torch.stack(seg_start, dim=1)  # [blocks, 2n] in tile units
    end = torch.stack(seg_end, dim=1)
    nonempty = end > start
    first = unravel(start, grid)  # [blocks, 2n, n]
    last = unravel(torch.clamp(end - 1, min=0), grid)
    level = torch.tensor(seg_level, device=device)
    axis = torch.arange(n, device=device)
    gmax = torch.tensor(grid, device=device) - 1
    # axes before the level: fixed at first's coordinate; at the level: first..last;
    # after the level: whole extent.
    before = axis[None, :] < level[:, None]  # [2n, n]
    at = axis[None, :] == level[:, None]
    t_lo = torch.where(before | at, first, torch.zeros_like(first))
    t_hi = torch.where(before, first, torch.where(at, last, gmax.expand_as(last)))
    tile_t = torch.tensor(tile, device=device)
    shape_t = torch.tensor(shape, device=device)
    lo = t_lo * tile_t
    hi = torch.minimum((t_hi + 1) * tile_t, shape_t) - 1
    empty = torch.tensor([1] + [0] * (n - 1), device=device)
    lo = torch.where(nonempty[..., None], lo, empty)  # lo > hi on axis 0 marks empty
    hi = torch.where(nonempty[..., None], hi, torch.zeros_like(hi))
    count = torch.where(nonempty, (hi - lo + 1).clamp_min(0).prod(dim=-1), 0).sum(dim=1)
    return lo, hi, count
