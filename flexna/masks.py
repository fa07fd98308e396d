"""FlexAttention ``mask_mod`` for a neighborhood pattern, table driven.

Inside a partial block FlexAttention evaluates the mask_mod on every
(query, key) element, so it must be cheap. Instead of recovering N-D
coordinates with div/mod chains per element, we precompute per token:

* per key and axis, ``pos = (y % d) * L + y`` (just ``y`` when ``d == 1``);
* per query and axis, ``lo = g * L + lo(x)`` and ``hi = g * L + hi(x)``
  with ``g = x % d`` — the window bounds shifted into the query's dilation
  group, so that ``lo <= pos <= hi`` checks the window *and* the group.

A pair attends iff that holds on every axis: ``2n`` compares and ``2n - 1``
ANDs per element (the loads are per row / column of a block). The same tables
describe any token order (row-major or tiled), and padding is a key ``pos`` of
``-1`` / a query window ``[1, 0]``.

With 2 or 3 axes the axes are packed into one int32 (SWAR: one field of
``B_a`` bits per axis, whose top bit is a guard). Per key ``Y = sum pos_a <<
o_a``; per query ``LoG = sum (lo_a - G_a) << o_a`` and ``HiG = sum (hi_a +
G_a) << o_a`` with ``G_a = 1 << (B_a - 1)``. Field ``a`` of ``Y - LoG`` is
``G_a + pos_a - lo_a`` and of ``HiG - Y`` is ``G_a + hi_a - pos_a``; both lie
in ``[1, 2 G_a)`` when every value is in ``[-1, G_a - 1)`` (so no borrow
crosses fields), and the guard bit is set iff the difference is ``>= 0``.
So ``((Y - LoG) & (HiG - Y) & G) == G`` tests every axis at once: 5 integer
operations per element instead of 7 (2-D) or 11 (3-D).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flexna.geometry import Region, axis_window_bounds, padded_shape, region_or_full, region_shape
from flexna.layout import as_tile, axis_values_in_order
from flexna.pattern import BoolOrTuple, IntOrTuple, NAPattern

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class MaskTables:
    """Per-token lookup tables of one pattern in one (q order, kv order) pair."""

    pattern: NAPattern
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    q_lo: tuple[torch.Tensor, ...]  # per axis, [Nq]
    q_hi: tuple[torch.Tensor, ...]
    kv_pos: tuple[torch.Tensor, ...]  # per axis, [Nkv]
    packed: PackedTables | None = None  # all axes in one int32 (see the module docstring)

    @property
    def q_len(self) -> int:
        return self.q_lo[0].numel()

    @property
    def kv_len(self) -> int:
        return self.kv_pos[0].numel()

    def mask_mod(self, packed: bool | None = None) -> MaskMod:
        """The FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` reading these tables.

        ``packed``: test all axes in one int32 (5 operations per element); ``None``
        packs when the tables were built packed (2-3 axes that fit in 31 bits).
        """
        if packed or (packed is None and self.packed is not None):
            if self.packed is None:
                raise ValueError("packed=True needs tables built with 2-3 axes whose fields fit "
                                 "in 31 bits (see flexna.masks.packed_fields)")
            return self.packed.mask_mod()
        q_lo, q_hi, kv_pos = self.q_lo, self.q_hi, self.kv_pos

        def na_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                    kv_idx: torch.Tensor) -> torch.Tensor:
            ok = None
            for lo, hi, pos in zip(q_lo, q_hi, kv_pos, strict=True):
                y = pos[kv_idx]
                axis_ok = (lo[q_idx] <= y) & (y <= hi[q_idx])
                ok = axis_ok if ok is None else ok & axis_ok
            return ok

        return na_mask


@dataclass(frozen=True, eq=False)
class PackedTables:
    """All axes of :class:`MaskTables` packed into one int32 per token (SWAR fields)."""

    lo_g: torch.Tensor  # [Nq]: sum (lo_a - G_a) << o_a
    hi_g: torch.Tensor  # [Nq]: sum (hi_a + G_a) << o_a
    pos: torch.Tensor  # [Nkv]: sum pos_a << o_a
    guards: torch.Tensor  # 0-d: sum G_a << o_a

    def mask_mod(self) -> MaskMod:
        lo_g, hi_g, pos, guards = self.lo_g, self.hi_g, self.pos, self.guards

        def na_mask_packed(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                           kv_idx: torch.Tensor) -> torch.Tensor:
            y = pos[kv_idx]
            return ((y - lo_g[q_idx]) & (hi_g[q_idx] - y) & guards) == guards

        return na_mask_packed


def packed_fields(pattern: NAPattern) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Per-axis ``(offsets, widths)`` in bits of the packed int32 tables, or ``None``.

    Table values on axis ``a`` lie in ``[-1, d_a * L_a]`` (dilation group shift
    included, padding ``-1`` / ``[1, 0]``); a field holds them with one guard bit
    above: ``G_a = 1 << (B_a - 1) > d_a * L_a + 1``. Packing pays from 2 axes on and
    needs the fields to fit in 31 bits (the sign bit stays clear).
    """
    if pattern.ndim < 2:
        return None
    widths = tuple((d * length + 1).bit_length() + 1
                   for d, length in zip(pattern.dilation, pattern.shape, strict=True))
    if sum(widths) > 31:
        return None
    offsets = tuple(sum(widths[a + 1:]) for a in range(pattern.ndim))  # axis 0 highest
    return offsets, widths


def build_tables(
    pattern: NAPattern,
    q_tile: tuple[int, ...],
    kv_tile: tuple[int, ...],
    device: torch.device | str | None = None,
    *,
    q_region: Region | None = None,
    kv_region: Region | None = None,
    packed: bool = True,
) -> MaskTables:
    """Lookup tables for ``pattern`` with queries in ``q_tile`` and keys in ``kv_tile`` order.

    Queries (keys) are the tokens of ``q_region`` (``kv_region``), a per-axis
    ``(start, stop)`` sub-box of the layout in its own tiled order; by default
    the whole layout. The per-axis columns are computed on the CPU and moved in
    one copy; each table is then one broadcast-and-permute on ``device``.
    ``packed=False`` skips the packed tables (callers that read the per-axis ones only).
    """
    q_region = region_or_full(q_region, pattern.shape)
    kv_region = region_or_full(kv_region, pattern.shape)
    q_shape, kv_shape = region_shape(q_region), region_shape(kv_region)
    q_pad, kv_pad = padded_shape(q_shape, q_tile), padded_shape(kv_shape, kv_tile)
    q_cols, kv_cols = [], []  # NumPy: a handful of tiny operations per axis
    for a in range(pattern.ndim):
        length, d = pattern.shape[a], pattern.dilation[a]
        lo, hi = (t.numpy() for t in axis_window_bounds(length, pattern.kernel_size[a], pattern.stride[a], d,
                                                        pattern.is_causal[a]))
        x = np.arange(length)
        if d > 1:  # move the window into the query's dilation group
            shift = (x % d) * length
            lo, hi, x = lo + shift, hi + shift, x + shift
        (q0, q1), (k0, k1) = q_region[a], kv_region[a]
        q_cols += [_padded(lo[q0:q1], q_pad[a], 1), _padded(hi[q0:q1], q_pad[a], 0)]
        kv_cols.append(_padded(x[k0:k1], kv_pad[a], -1))
    wide = max(d * length for d, length in zip(pattern.dilation, pattern.shape, strict=True)) >= 2**31 - 1
    n = pattern.ndim
    fields = packed_fields(pattern) if packed and not wide else None
    cols = q_cols + kv_cols
    if fields is not None:  # the packing constants travel in the same copy: [1 << o_a]..., guards
        offsets, widths = fields
        guards = sum(1 << (o + w - 1) for o, w in zip(offsets, widths, strict=True))
        cols.append(np.array([*(1 << o for o in offsets), guards]))
    flat = np.concatenate(cols).astype(np.int64 if wide else np.int32)
    moved = torch.from_numpy(flat).to(device).split([c.size for c in cols])
    q_all = axis_values_in_order([(i // 2, c) for i, c in enumerate(moved[:2 * n])], q_shape, q_tile)
    kv_all = axis_values_in_order(list(enumerate(moved[2 * n:3 * n])), kv_shape, kv_tile)
    q_lo, q_hi, kv_pos = q_all[0::2].unbind(0), q_all[1::2].unbind(0), kv_all.unbind(0)
    packed = None
    if fields is not None:
        # guards stays a tensor: patterns with other field widths must not recompile
        scale, guards_t = moved[3 * n][:n, None], moved[3 * n][n]
        lo_hi = (q_all.reshape(n, 2, -1) * scale[:, :, None]).sum(0, dtype=torch.int32)
        pos = (kv_all * scale).sum(0, dtype=torch.int32)
        packed = PackedTables(lo_hi[0] - guards_t, lo_hi[1] + guards_t, pos, guards_t)
    return MaskTables(pattern, q_tile, kv_tile, tuple(q_lo), tuple(q_hi), tuple(kv_pos), packed)


def _padded(values: np.ndarray, size: int, pad: int) -> np.ndarray:
    """``values`` extended to ``size`` entries with ``pad`` (positions past the region's end)."""
    return np.concatenate([values, np.full(size - values.size, pad, dtype=values.dtype)])


def na_mask_mod(
    shape: IntOrTuple,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    *,
    q_tile: int | Sequence[int] | None = None,
    kv_tile: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> MaskMod:
    """FlexAttention ``mask_mod`` of neighborhood attention over a token layout.

    Args:
        shape: token layout ``(L_1, ..., L_n)``, 1 to 3 axes.
        kernel_size, stride, dilation, is_causal: per-axis pattern parameters
            (a scalar applies to every axis); see ``SEMANTICS.md``.
        q_tile, kv_tile: token order of queries / keys. ``None`` is row-major;
            a tile (one int per axis) is the tiled order of
            :func:`flexna.tile_tokens`, whose padded positions never attend.
        device: where the lookup tables live; must be the device of the
            tensors you run attention on (default: torch's default device).

    The returned function takes ``(b, h, q_idx, kv_idx)`` and works with
    ``create_mask``, ``create_block_mask`` and eager or compiled
    ``flex_attention``.
    """
    pattern = NAPattern.create(shape, kernel_size, stride, dilation, is_causal)
    q_t = as_tile("q_tile", q_tile, pattern.shape)
    kv_t = as_tile("kv_tile", kv_tile, pattern.shape)
    return build_tables(pattern, q_t, kv_t, _resolve_device(device)).mask_mod()


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.empty(0).device
    return torch.device(device)
