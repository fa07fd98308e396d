"""FlexAttention ``mask_mod`` for a neighborhood pattern, table driven.

Inside a partial block FlexAttention evaluates the mask_mod on every
(query, key) element, so it must be cheap. Instead of recovering N-D
coordinates with div/mod chains per element, we precompute per token:

* per key and axis, ``pos = (y % d) * L + y`` (just ``y`` when ``d == 1``);
* per query and axis, ``lo = g * L + lo(x)`` and ``hi = g * L + hi(x)``
  with ``g = x % d`` — the window bounds shifted into the query's dilation
  group, so that ``lo <= pos <= hi`` checks the window *and* the group.

A pair attends iff that holds on every axis: per element, ``3n`` loads and
``2n`` compares. The same tables describe any token order (row-major or
tiled), and padding is a key ``pos`` of ``-1`` / a query window ``[1, 0]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

    @property
    def q_len(self) -> int:
        return self.q_lo[0].numel()

    @property
    def kv_len(self) -> int:
        return self.kv_pos[0].numel()

    def mask_mod(self) -> MaskMod:
        """The FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` reading these tables."""
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


def build_tables(
    pattern: NAPattern,
    q_tile: tuple[int, ...],
    kv_tile: tuple[int, ...],
    device: torch.device | str | None = None,
    *,
    q_region: Region | None = None,
    kv_region: Region | None = None,
) -> MaskTables:
    """Lookup tables for ``pattern`` with queries in ``q_tile`` and keys in ``kv_tile`` order.

    Queries (keys) are the tokens of ``q_region`` (``kv_region``), a per-axis
    ``(start, stop)`` sub-box of the layout in its own tiled order; by default
    the whole layout. The per-axis columns are computed on the CPU and moved in
    one copy; each table is then one broadcast-and-permute on ``device``.
    """
    q_region = region_or_full(q_region, pattern.shape)
    kv_region = region_or_full(kv_region, pattern.shape)
    q_shape, kv_shape = region_shape(q_region), region_shape(kv_region)
    q_pad, kv_pad = padded_shape(q_shape, q_tile), padded_shape(kv_shape, kv_tile)
    q_cols, kv_cols = [], []
    for a in range(pattern.ndim):
        length, d = pattern.shape[a], pattern.dilation[a]
        lo, hi = axis_window_bounds(length, pattern.kernel_size[a], pattern.stride[a], d,
                                    pattern.is_causal[a])
        x = torch.arange(length)
        if d > 1:  # move the window into the query's dilation group
            shift = (x % d) * length
            lo, hi, x = lo + shift, hi + shift, x + shift
        (q0, q1), (k0, k1) = q_region[a], kv_region[a]
        q_cols += [_padded(lo[q0:q1], q_pad[a], 1), _padded(hi[q0:q1], q_pad[a], 0)]
        kv_cols.append(_padded(x[k0:k1], kv_pad[a], -1))
    wide = max(d * length for d, length in zip(pattern.dilation, pattern.shape, strict=True)) >= 2**31 - 1
    cols = q_cols + kv_cols
    moved = torch.cat(cols).to(torch.int64 if wide else torch.int32).to(device)
    moved = moved.split([c.numel() for c in cols])
    n = pattern.ndim
    q_all = axis_values_in_order([(i // 2, c) for i, c in enumerate(moved[:2 * n])], q_shape, q_tile)
    kv_all = axis_values_in_order(list(enumerate(moved[2 * n:])), kv_shape, kv_tile)
    q_lo, q_hi, kv_pos = q_all[0::2].unbind(0), q_all[1::2].unbind(0), kv_all.unbind(0)
    return MaskTables(pattern, q_tile, kv_tile, tuple(q_lo), tuple(q_hi), tuple(kv_pos))


def _padded(values: torch.Tensor, size: int, pad: int) -> torch.Tensor:
    """``values`` extended to ``size`` entries with ``pad`` (positions past the region's end)."""
    return torch.cat([values, torch.full((size - values.numel(),), pad)])


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
