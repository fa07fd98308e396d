"""Token orders: the :class:`TokenOrder` protocol, the tiled order, and moving tensors.

A token order says where each token of a layout sits in the sequence attention runs
on (:meth:`TokenOrder.coords`) and which boxes of the layout a block of consecutive
positions covers (:meth:`TokenOrder.block_boxes`); the table and block-map builders
need nothing else from it. :class:`TokenLayout` (row-major or tiled) is the one
implementation of boxes of tiles; :class:`CurveOrder` (Hilbert, Morton) is the other.

Tiled order makes every tile of shape ``tile`` (one int per layout axis)
contiguous: tiles follow each other in row-major order over the tile grid and
the tokens inside a tile are row-major too. An axis not divisible by its tile
is padded at its end; padded positions hold zeros, are never attended by the
masks flexna builds, and are dropped again by :func:`untile_tokens`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from flexna.curves import CURVES, curve_order
from flexna.geometry import Region, block_boxes, padded_shape, tile_grid, tiled_coords, unravel
from flexna.pattern import MAX_TOKENS, as_int_tuple, as_shape
from flexna.row_gather import gather_rows


class TokenOrder(Protocol):
    """How the tokens of a layout (or of a region of it) are ordered in a sequence."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The (region's) layout shape this order arranges."""
        ...

    @property
    def length(self) -> int:
        """Sequence length, padding included."""
        ...

    @property
    def padded(self) -> tuple[int, ...]:
        """Per-axis extent of the coordinates a table column holds (the layout padded to whole
        tiles; the layout itself for an order without padding)."""
        ...

    def coords(self) -> np.ndarray:
        """``[length, n]`` layout coordinates of each position (``-1`` on every axis: padding)."""
        ...

    def block_boxes(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Blocks of ``block`` positions as unions of boxes: ``(lo, hi, count)`` as
        :func:`flexna.geometry.block_boxes` gives them, or ``None`` when a block is not a
        small union of boxes (the block-map builder then works per token)."""
        ...

    def token_table(self, columns: list[tuple[int, np.ndarray]],
                    out: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Per-position tables, one ``[length]`` row per column: row ``i`` is ``column_i`` read
        at the position's coordinate on ``axis_i`` (a column holds one value per padded
        coordinate, its value at padded positions). ``out``: the rows to write into."""
        ...


def as_tile(name: str, tile: int | Sequence[int] | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Validate a tile against a layout; ``None`` means row-major (all ones)."""
    if tile is None:
        return (1,) * len(shape)
    tile_t = as_int_tuple(name, tile, len(shape))
    for axis, t in enumerate(tile_t):
        if t < 1:
            raise ValueError(f"{name}[axis {axis}] = {t} is out of range: need >= 1")
    tokens = math.prod(padded_shape(shape, tile_t))
    if tokens > MAX_TOKENS:
        raise ValueError(
            f"{name} = {tile_t} pads layout {shape} to {tokens} tokens, more than int32 "
            "indices allow"
        )
    return tile_t


def as_region(name: str, region: Sequence[Sequence[int]] | None, shape: tuple[int, ...]) -> Region | None:
    """Validate a per-axis ``(start, stop)`` sub-box of the layout (``None``: the whole layout)."""
    if region is None:
        return None
    try:
        pairs = tuple((int(start), int(stop)) for start, stop in region)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be one (start, stop) pair per axis, got {region!r}") from None
    if len(pairs) != len(shape):
        raise ValueError(f"{name} must have one (start, stop) pair per axis ({len(shape)}), "
                         f"got {len(pairs)}: {region!r}")
    for axis, ((start, stop), length) in enumerate(zip(pairs, shape, strict=True)):
        if not 0 <= start < stop <= length:
            raise ValueError(f"{name}[axis {axis}] = ({start}, {stop}) is out of range: need "
                             f"0 <= start < stop <= {length}")
    return pairs


def tiled_length(shape: Sequence[int], tile: int | Sequence[int] | None) -> int:
    """Sequence length of the tiled order (layout padded to whole tiles)."""
    shape_t = as_shape("shape", shape)
    return math.prod(padded_shape(shape_t, as_tile("tile", tile, shape_t)))


def _check_spatial(x: torch.Tensor, first: int, shape: tuple[int, ...], what: str) -> None:
    n = len(shape)
    if x.dim() < first + n or tuple(x.shape[first:first + n]) != shape:
        raise ValueError(
            f"x must be shaped [batch, {', '.join(map(str, shape))}, ...] for {what}, "
            f"got {tuple(x.shape)}"
        )


def tile_tokens(x: torch.Tensor, shape: Sequence[int], tile: int | Sequence[int]) -> torch.Tensor:
    """``[B, *shape, *rest]`` (row-major layout) -> ``[B, N_tiled, *rest]`` (tiled order).

    Axes not divisible by their tile are zero-padded at their end.
    """
    shape_t = as_shape("shape", shape)
    tile_t = as_tile("tile", tile, shape_t)
    _check_spatial(x, 1, shape_t, "tile_tokens")
    return _permute_to_tiles(_pad_to_tiles(x, shape_t, tile_t), tile_grid(shape_t, tile_t), tile_t)


def _pad_to_tiles(x: torch.Tensor, shape: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the layout axes of ``[B, *shape, *rest]`` at their end to whole tiles."""
    padded = padded_shape(shape, tile)
    if padded == shape:
        return x
    pad: list[int] = [0, 0] * (x.dim() - 1 - len(shape))
    for length, p in zip(reversed(shape), reversed(padded), strict=True):
        pad += [0, p - length]
    return torch.nn.functional.pad(x, pad)


def _permute_to_tiles(x: torch.Tensor, grid: tuple[int, ...], tile: tuple[int, ...],
                      heads_first: bool = False) -> torch.Tensor:
    """``[B, *padded, *rest]`` with ``padded = grid * tile`` -> ``[B, N_tiled, *rest]``.

    ``heads_first``: ``rest = (heads, dim)`` goes to ``[B, heads, N_tiled, dim]`` in the same
    permutation.
    """
    n = len(grid)
    rest = tuple(x.shape[1 + n:])
    split = [x.shape[0]]
    for g, t in zip(grid, tile, strict=True):
        split += [g, t]
    x = x.reshape(*split, *rest)
    tokens = [1 + 2 * a for a in range(n)] + [2 + 2 * a for a in range(n)]
    trailing = list(range(1 + 2 * n, x.dim()))
    if heads_first:
        x = x.permute([0, trailing[0], *tokens, *trailing[1:]])
        return x.reshape(x.shape[0], rest[0], math.prod(grid) * math.prod(tile), *rest[1:])
    return x.permute([0, *tokens, *trailing]).reshape(x.shape[0], math.prod(grid) * math.prod(tile), *rest)


def untile_tokens(x: torch.Tensor, shape: Sequence[int], tile: int | Sequence[int]) -> torch.Tensor:
    """``[B, N_tiled, *rest]`` (tiled order) -> ``[B, *shape, *rest]``; drops padding."""
    shape_t = as_shape("shape", shape)
    tile_t = as_tile("tile", tile, shape_t)
    n = len(shape_t)
    padded = padded_shape(shape_t, tile_t)
    if x.dim() < 2 or x.shape[1] != math.prod(padded):
        raise ValueError(
            f"x must be shaped [batch, {math.prod(padded)}, ...] (layout {shape_t} in "
            f"tile {tile_t} order), got {tuple(x.shape)}"
        )
    rest = tuple(x.shape[2:])
    grid = tile_grid(shape_t, tile_t)
    x = x.reshape(x.shape[0], *grid, *tile_t, *rest)
    order = [0]
    for a in range(n):
        order += [1 + a, 1 + n + a]
    order += list(range(1 + 2 * n, x.dim()))
    x = x.permute(order).reshape(x.shape[0], *padded, *rest)
    index = (slice(None), *(slice(0, length) for length in shape_t))
    return x[index]


@dataclass(frozen=True)
class TokenLayout:
    """A layout and the token order a model keeps its sequence in: row-major or tiled.

    Build it with :meth:`create` (validated) or :func:`flexna.choose_layout` (tiles picked
    for a pattern). A model that stays in tiled order permutes once at its input
    (:meth:`to_tokens`) and once at its output (:meth:`from_tokens`); its attention layers
    take ``layout=`` and never permute. Padded positions (axes not divisible by the tile)
    hold zeros at the input, are never attended, and are dropped by :meth:`from_tokens`.
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]

    @classmethod
    def create(cls, shape: Sequence[int], tile: int | Sequence[int] | None = None) -> TokenLayout:
        shape_t = as_shape("shape", shape)
        return cls(shape_t, as_tile("tile", tile, shape_t))

    @property
    def is_row_major(self) -> bool:
        return math.prod(self.tile) == 1

    def coords(self) -> np.ndarray:
        return tiled_coords(self.shape, self.tile)

    def block_boxes(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        per_tile = math.prod(self.tile)
        if len(self.shape) == 1:  # a 1-D block is one interval: a tile of its own
            return block_boxes(self.shape, (block,), 1)
        if block % per_tile:
            return None
        return block_boxes(self.shape, self.tile, block // per_tile)

    def token_table(self, columns: list[tuple[int, np.ndarray]],
                    out: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """One strided copy per row, straight from the broadcast column (no intermediate)."""
        padded = padded_shape(self.shape, self.tile)
        grid = tile_grid(self.shape, self.tile)
        n = len(self.shape)
        split = [v for g, t in zip(grid, self.tile, strict=True) for v in (g, t)]
        order = [*[2 * a for a in range(n)], *[2 * a + 1 for a in range(n)]]
        tiled_shape = [split[i] for i in order]
        rows = out if out is not None else [np.empty(self.length, dtype=np.int64) for _ in columns]
        for (axis, values), dest in zip(columns, rows, strict=True):
            view = [1] * n
            view[axis] = padded[axis]
            source = np.broadcast_to(values.reshape(view), padded)
            if self.is_row_major:
                dest.reshape(padded)[...] = source
            else:
                dest.reshape(tiled_shape)[...] = source.reshape(split).transpose(order)
        return rows

    @property
    def length(self) -> int:
        """Sequence length in this order (the layout padded to whole tiles)."""
        return math.prod(padded_shape(self.shape, self.tile))

    @property
    def padded(self) -> tuple[int, ...]:
        return padded_shape(self.shape, self.tile)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *shape, *rest]`` -> ``[B, length, *rest]`` in this order."""
        if self.is_row_major:
            _check_spatial(x, 1, self.shape, "TokenLayout.to_tokens")
            return x.reshape(x.shape[0], self.length, *x.shape[1 + len(self.shape):])
        return tile_tokens(x, self.shape, self.tile)

    def from_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, length, *rest]`` in this order -> ``[B, *shape, *rest]``."""
        if self.is_row_major:
            if x.dim() < 2 or x.shape[1] != self.length:
                raise ValueError(f"x must be shaped [batch, {self.length}, ...] (layout "
                                 f"{self.shape}), got {tuple(x.shape)}")
            return x.reshape(x.shape[0], *self.shape, *x.shape[2:])
        return untile_tokens(x, self.shape, self.tile)

    def heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *shape, heads, dim]`` (NATTEN layout) -> ``[B, heads, length, dim]``, one copy.

        Eagerly a gather of whole token rows (:func:`gather_to_order`, near memory speed: the
        result is a ``[B, heads, length, dim]`` view of ``[B, length, heads, dim]`` memory,
        which FlexAttention reads as fast and whose layout its output keeps; its backward is
        the inverse gather). Inside ``torch.compile`` a reshape-permute (inductor fuses it).
        """
        if _gather_pays():
            return gather_to_order(x, self)
        x = _pad_to_tiles(x, self.shape, self.tile)
        x = _permute_to_tiles(x, tile_grid(self.shape, self.tile), self.tile, heads_first=True)
        return x.contiguous()  # a no-op unless reshape could return a view

    def from_heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, length, dim]`` -> ``[B, *shape, heads, dim]`` (one copy, drops padding)."""
        if self.is_row_major:
            return x.transpose(1, 2).reshape(x.shape[0], *self.shape, x.shape[1], x.shape[-1])
        if _gather_pays():
            return gather_from_order(x.transpose(1, 2), self).unflatten(1, self.shape)
        return untile_tokens(x.transpose(1, 2), self.shape, self.tile)


def _gather_pays() -> bool:
    """Eagerly the row gather; under torch.compile the reshape-permute (inductor fuses it)."""
    return not torch.compiler.is_compiling()


def order_index(order: TokenOrder, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(to_order, from_order)`` int64 index tensors of ``order`` on ``device``, cached.

    ``to_order[p]``: the row-major token at sequence position ``p`` (``-1``: padding);
    ``from_order[t]``: the position of row-major token ``t``. Each is the other's inverse
    (:func:`~flexna.row_gather.gather_rows`). Any :class:`TokenOrder` (from its
    :meth:`~TokenOrder.coords`).
    """
    from flexna.cache import cached

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        coords = order.coords()
        real = coords[:, 0] >= 0
        flat = np.ravel_multi_index(tuple(np.where(real, coords[:, a], 0) for a in range(coords.shape[1])),
                                    order.shape).astype(np.int64)
        inverse = np.empty(math.prod(order.shape), dtype=np.int64)
        inverse[flat[real]] = np.flatnonzero(real)
        moved = torch.from_numpy(np.concatenate((np.where(real, flat, -1), inverse))).to(device)
        return moved[:len(flat)], moved[len(flat):]

    return cached(("order-index", order, device), build, lambda t: 8 * sum(i.numel() for i in t))


def gather_to_order(x: torch.Tensor, order: TokenOrder) -> torch.Tensor:
    """``[B, *shape, heads, dim]`` -> ``[B, heads, length, dim]`` in ``order``: one row gather
    into ``[B, length, heads, dim]`` memory, returned as its heads-first view; padded positions
    hold zeros (as :func:`tile_tokens` gives them). Its backward is :func:`gather_from_order`'s
    gather (deterministic)."""
    _check_spatial(x, 1, order.shape, "gather_to_order")
    rows = x.reshape(x.shape[0], math.prod(order.shape), *x.shape[-2:])
    return gather_rows(rows, *order_index(order, x.device)).transpose(1, 2)


def gather_from_order(x: torch.Tensor, order: TokenOrder) -> torch.Tensor:
    """``[B, length, *rest]`` in ``order`` -> ``[B, prod(shape), *rest]`` row-major (one row
    gather; padding dropped)."""
    to_order, from_order = order_index(order, x.device)
    return gather_rows(x, from_order, to_order)


def as_curve(name: str, curve: object) -> str | None:
    """Validate a curve name (``None``: no curve)."""
    if curve is None:
        return None
    if not isinstance(curve, str) or curve not in CURVES:
        raise ValueError(f"{name} = {curve!r} is not a known curve: use one of {', '.join(CURVES)}")
    return curve


@dataclass(frozen=True)
class CurveOrder:
    """Tokens ordered along a space-filling curve: ``"hilbert"`` or ``"morton"`` (Z-order).

    Any shape of 2 or 3 axes: the tokens follow the curve of the smallest power-of-two cube
    holding the layout, cells outside the layout skipped (:mod:`flexna.curves`), so the
    sequence holds exactly the layout's tokens, without padding. A block of consecutive
    positions is then a compact region but not one box; the block-map builder works per
    token for it (:func:`flexna.blocksparsity.token_block_maps`).
    """

    shape: tuple[int, ...]
    curve: str

    @classmethod
    def create(cls, shape: Sequence[int], curve: str) -> CurveOrder:
        shape_t = as_shape("shape", shape)
        curve_t = as_curve("curve", curve)
        if len(shape_t) < 2:
            raise ValueError(f"curve = {curve!r} needs a layout of 2 or 3 axes, got shape {shape_t} "
                             "(a 1-D layout is its own curve: use row-major order)")
        return cls(shape_t, curve_t)  # type: ignore[arg-type]

    @property
    def length(self) -> int:
        return math.prod(self.shape)

    @property
    def padded(self) -> tuple[int, ...]:
        return self.shape

    def order(self) -> np.ndarray:
        """Row-major token index at each position (a permutation)."""
        return curve_order(self.shape, self.curve)

    def coords(self) -> np.ndarray:
        return unravel(self.order(), self.shape)

    def block_boxes(self, block: int) -> None:
        return None

    def token_table(self, columns: list[tuple[int, np.ndarray]],
                    out: list[np.ndarray] | None = None) -> list[np.ndarray]:
        coords = self.coords()
        rows = out if out is not None else [np.empty(self.length, dtype=np.int64) for _ in columns]
        for (axis, values), dest in zip(columns, rows, strict=True):
            dest[...] = values[coords[:, axis]]
        return rows

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *shape, *rest]`` -> ``[B, length, *rest]`` in curve order (one gather)."""
        _check_spatial(x, 1, self.shape, "CurveOrder.to_tokens")
        flat = x.reshape(x.shape[0], self.length, *x.shape[1 + len(self.shape):])
        return gather_rows(flat, *order_index(self, x.device))

    def from_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, length, *rest]`` in curve order -> ``[B, *shape, *rest]``."""
        if x.dim() < 2 or x.shape[1] != self.length:
            raise ValueError(f"x must be shaped [batch, {self.length}, ...] (layout {self.shape}), "
                             f"got {tuple(x.shape)}")
        return gather_from_order(x, self).reshape(x.shape[0], *self.shape, *x.shape[2:])

    def heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *shape, heads, dim]`` -> ``[B, heads, length, dim]`` in curve order (one row
        gather; a heads-first view of heads-last memory, as :meth:`TokenLayout.heads_first`)."""
        return gather_to_order(x, self)

    def from_heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, length, dim]`` -> ``[B, *shape, heads, dim]``."""
        return self.from_tokens(x.transpose(1, 2))
