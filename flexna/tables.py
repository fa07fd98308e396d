"""Per-token tables of a :class:`~flexna.spec.MaskSpec` and the one ``mask_mod`` reading them.

Inside a partial block FlexAttention evaluates the mask_mod on every (query, key)
element, so it must be cheap. Instead of recovering N-D coordinates with div/mod chains
per element, the tables hold per token and axis

* per key, ``pos = (y % d) * L + y`` (just ``y`` when ``d == 1``);
* per query, ``lo = g * L + lo(x)`` and ``hi = g * L + hi(x)`` with ``g = x % d``: the
  window bounds shifted into the query's dilation group, so that ``lo <= pos <= hi``
  checks the window *and* the group.

A pair attends iff that holds on every axis. Every variant of a spec lives in the same
tables: padding is a key ``pos`` of ``-1`` and a query window ``[1, 0]``; packed samples
shift axis 0's values of sample ``i`` past those of the samples before it, so windows
never reach another sample; an extra query is a window over all values (it attends every
real key); extra keys (kv index ``>= kv_layout_len``) are the one index test added;
per-head patterns stack one table per head, read at ``h * N + index``.

With 2 or 3 axes the axes are fused into one int32 (SWAR: one field of ``B_a`` bits per
axis, whose top bit is a guard). Per key ``Y = sum pos_a << o_a``; per query ``LoG = sum
(lo_a - G_a) << o_a`` and ``HiG = sum (hi_a + G_a) << o_a`` with ``G_a = 1 << (B_a - 1)``.
Field ``a`` of ``Y - LoG`` is ``G_a + pos_a - lo_a`` and of ``HiG - Y`` is ``G_a + hi_a -
pos_a``; both lie in ``[1, 2 G_a)`` when every value is in ``[-1, G_a - 1)`` (so no borrow
crosses fields), and the guard bit is set iff the difference is ``>= 0``. So ``((Y - LoG)
& (HiG - Y) & G) == G`` tests every axis at once: 5 integer operations per element
instead of 7 (2-D) or 11 (3-D).

The tables are computed with NumPy on the host and moved to the device in one copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flexna.geometry import region_or_full
from flexna.pattern import MAX_TOKENS, BoolOrTuple, IntOrTuple, NAPattern
from flexna.spec import MaskSpec, resolve_device

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class HostTables:
    """The tables of a spec as NumPy arrays: ``lo``/``hi`` ``[n, heads, q_len]``, ``pos``
    ``[n, heads, kv_len]`` (``heads`` = the spec's pattern count) and per-axis maxima."""

    spec: MaskSpec
    lo: np.ndarray
    hi: np.ndarray
    pos: np.ndarray
    axis_max: tuple[int, ...]  # largest value on each axis (every value lies in [-1, max])
    # layout coordinates [n, len] (-1: padding, extra tokens), for a non-separable rule only
    q_coords: np.ndarray | None = None
    kv_coords: np.ndarray | None = None

    def attends(self, head: int, q: np.ndarray, kv: np.ndarray) -> np.ndarray:
        """The mask at broadcast index arrays ``q``, ``kv`` (the mask_mod, on the host)."""
        ok = np.ones(np.broadcast_shapes(q.shape, kv.shape), dtype=bool)
        for a in range(self.spec.ndim):
            y = self.pos[a, head][kv]
            ok &= (self.lo[a, head][q] <= y) & (y <= self.hi[a, head][q])
        if self.q_coords is not None and self.kv_coords is not None:
            rule = self.spec.samples[0][0]
            ok &= rule.element_check(tuple(self.q_coords[:, q]), tuple(self.kv_coords[:, kv])) | (
                q >= self.spec.q_layout_len)
        return ok | (kv >= self.spec.kv_layout_len)


def _sample_spans(spec: MaskSpec) -> list[int]:
    """Values axis 0 of each sample takes (the next sample's axis 0 starts past them)."""
    return [max(p.dilation[0] * p.shape[0] for p in group) for group in spec.samples]


def axis_maxima(spec: MaskSpec) -> tuple[int, ...]:
    """The largest table value on each axis (every value lies in ``[-1, max]``)."""
    n = spec.ndim
    out = [max(p.dilation[a] * p.shape[a] for g in spec.samples for p in g) - 1 for a in range(n)]
    out[0] = sum(_sample_spans(spec)) - 1
    return tuple(out)


def host_tables(spec: MaskSpec) -> HostTables:
    """Build the tables of ``spec`` (see the module docstring) in NumPy."""
    n = spec.ndim
    span0 = _sample_spans(spec)
    shift0 = np.cumsum([0, *span0[:-1]])
    axis_max = axis_maxima(spec)
    dtype = np.int64 if max(axis_max) >= MAX_TOKENS else np.int32
    lo = np.empty((n, spec.heads, spec.q_len), dtype=dtype)
    hi = np.empty_like(lo)
    pos = np.empty((n, spec.heads, spec.kv_len), dtype=dtype)
    q0s, kv0s = spec.q_offsets, spec.kv_offsets
    for i, group in enumerate(spec.samples):
        q_region = region_or_full(spec.q_region, group[0].shape)
        kv_region = region_or_full(spec.kv_region, group[0].shape)
        q_order, kv_order = spec.q_order(i), spec.kv_order(i)
        q_pad = _padded_lengths(q_order)
        kv_pad = _padded_lengths(kv_order)
        for h, p in enumerate(group):
            q_cols, kv_cols = [], []
            for a in range(n):
                length, d = p.shape[a], p.dilation[a]
                w_lo, w_hi = p.envelope_bounds(a)
                x = np.arange(length)
                shift = (x % d) * length + (shift0[i] if a == 0 else 0)
                (qa, qb), (ka, kb) = q_region[a], kv_region[a]
                q_cols += [(a, _padded((w_lo + shift)[qa:qb], q_pad[a], 1)),
                           (a, _padded((w_hi + shift)[qa:qb], q_pad[a], 0))]
                kv_cols.append((a, _padded((x + shift)[ka:kb], kv_pad[a], -1)))
            s0, s1 = q0s[i], q0s[i] + q_order.length
            q_order.token_table(q_cols, [t[a, h, s0:s1] for a in range(n) for t in (lo, hi)])
            lo[:, h, s1:q0s[i + 1]], hi[:, h, s1:q0s[i + 1]] = 1, 0  # block padding
            k0, k1 = kv0s[i], kv0s[i] + kv_order.length
            kv_order.token_table(kv_cols, [pos[a, h, k0:k1] for a in range(n)])
            pos[:, h, k1:kv0s[i + 1]] = -1
    end = spec.q_layout_len
    lo[:, :, end:] = 0  # extra queries: a window over every value (every real key)
    hi[:, :, end:] = np.array(axis_max)[:, None, None]
    pos[:, :, spec.kv_layout_len:] = -1  # extra keys: attended through the index test
    if spec.samples[0][0].separable:
        return HostTables(spec, lo, hi, pos, axis_max)
    return HostTables(spec, lo, hi, pos, axis_max, *_coordinates(spec))


def _coordinates(spec: MaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """Layout coordinates of every query and key position ``[n, len]``; -1 where none."""
    out = []
    for length, offsets, order, region in ((spec.q_len, spec.q_offsets, spec.q_order, spec.q_region),
                                           (spec.kv_len, spec.kv_offsets, spec.kv_order, spec.kv_region)):
        coords = np.full((spec.ndim, length), -1, dtype=np.int64)
        for i, group in enumerate(spec.samples):
            c = order(i).coords()
            start = np.array([s for s, _ in region_or_full(region, group[0].shape)])
            coords[:, offsets[i]:offsets[i] + len(c)] = np.where(c >= 0, c + start, -1).T
        out.append(coords)
    return out[0], out[1]


def _padded_lengths(order: object) -> tuple[int, ...]:
    return order.padded  # type: ignore[attr-defined]


def _padded(values: np.ndarray, size: int, pad: int) -> np.ndarray:
    """``values`` extended to ``size`` entries with ``pad`` (positions past the region's end)."""
    return np.concatenate([values, np.full(size - values.size, pad, dtype=values.dtype)])


def fused_fields(axis_max: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Per-axis ``(offsets, widths)`` in bits of the fused int32 tables, or ``None``.

    Values on axis ``a`` lie in ``[-1, axis_max[a]]`` (a padded query's window ``[1, 0]``
    included); a field holds them with one guard bit above: ``G_a = 1 << (B_a - 1) >
    axis_max[a] + 2``. Fusing pays from 2 axes on and needs
    the fields to fit in 31 bits (the sign bit stays clear).
    """
    if len(axis_max) < 2:
        return None
    widths = tuple((int(m) + 2).bit_length() + 1 for m in axis_max)
    if sum(widths) > 31:
        return None
    offsets = tuple(sum(widths[a + 1:]) for a in range(len(widths)))  # axis 0 highest
    return offsets, widths


def pattern_fields(pattern: NAPattern) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """:func:`fused_fields` of one pattern over its whole layout."""
    return fused_fields([d * length - 1 for d, length in zip(pattern.dilation, pattern.shape, strict=True)])


@dataclass(frozen=True, eq=False)
class FusedTables:
    """All axes of :class:`MaskTables` fused into one int32 per token (SWAR fields)."""

    lo_g: torch.Tensor  # [heads * Nq]: sum (lo_a - G_a) << o_a
    hi_g: torch.Tensor  # [heads * Nq]: sum (hi_a + G_a) << o_a
    pos: torch.Tensor  # [heads * Nkv]: sum pos_a << o_a
    # [Nq], every entry sum G_a << o_a: a tensor, so other widths do not recompile; read at the
    # query's index, as FLASH's CuTe code generation lowers no load at a constant index
    guards: torch.Tensor


@dataclass(frozen=True, eq=False)
class MaskTables:
    """Device tables of one spec: per axis ``[heads * Nq]`` / ``[heads * Nkv]`` (flat per head)."""

    spec: MaskSpec
    q_lo: tuple[torch.Tensor, ...]
    q_hi: tuple[torch.Tensor, ...]
    kv_pos: tuple[torch.Tensor, ...]
    fused: FusedTables | None = None
    q_coords: tuple[torch.Tensor, ...] = ()  # per axis, for a non-separable rule only
    kv_coords: tuple[torch.Tensor, ...] = ()

    @property
    def q_len(self) -> int:
        return self.spec.q_len

    @property
    def kv_len(self) -> int:
        return self.spec.kv_len

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every table tensor the mask_mod may read."""
        tensors = [*self.q_lo, *self.q_hi, *self.kv_pos, *self.q_coords, *self.kv_coords]
        if self.fused is not None:
            tensors += [self.fused.lo_g, self.fused.hi_g, self.fused.pos, self.fused.guards]
        return tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def mask_mod(self, fused: bool | None = None) -> MaskMod:
        """The FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of the spec.

        ``fused``: test all axes in one int32 (5 operations per element); ``None`` fuses
        when the tables were built fused (2-3 axes whose fields fit in 31 bits).
        """
        use_fused = fused or (fused is None and self.fused is not None)
        if use_fused and self.fused is None:
            raise ValueError("fused=True needs tables built with 2-3 axes whose fields fit in 31 "
                             "bits (see flexna.tables.fused_fields)")
        spec = self.spec
        per_head = spec.heads > 1
        nq, nkv = spec.q_len, spec.kv_len
        extra_from = spec.kv_layout_len if spec.num_extra_kv else None
        fused_t = self.fused if use_fused else None
        q_lo, q_hi, kv_pos = self.q_lo, self.q_hi, self.kv_pos
        rule = None if spec.samples[0][0].separable else spec.samples[0][0]
        q_coords, kv_coords, layout_q = self.q_coords, self.kv_coords, spec.q_layout_len

        def na_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                    kv_idx: torch.Tensor) -> torch.Tensor:
            qi = h * nq + q_idx if per_head else q_idx
            ki = h * nkv + kv_idx if per_head else kv_idx
            if fused_t is not None:
                y = fused_t.pos[ki]
                g = fused_t.guards[q_idx]
                ok = ((y - fused_t.lo_g[qi]) & (fused_t.hi_g[qi] - y) & g) == g
            else:
                y = kv_pos[0][ki]
                ok = (q_lo[0][qi] <= y) & (y <= q_hi[0][qi])
                for lo, hi, pos in zip(q_lo[1:], q_hi[1:], kv_pos[1:], strict=True):
                    y = pos[ki]
                    ok = ok & (lo[qi] <= y) & (y <= hi[qi])
            if rule is not None:
                inside = rule.element_check(tuple(c[q_idx] for c in q_coords),
                                            tuple(c[kv_idx] for c in kv_coords))
                ok = ok & (inside | (q_idx >= layout_q))
            if extra_from is not None:
                ok = ok | (kv_idx >= extra_from)
            return ok

        return na_mask


def build_tables(spec: MaskSpec, device: torch.device | str | None = None, *,
                 fused: bool = True, host: HostTables | None = None) -> MaskTables:
    """Device tables of ``spec``: computed in NumPy (``host``, when already built) and moved in
    one copy. ``fused=False`` skips the fused int32 tables. On the ``meta`` device only the
    shapes are made (nothing is computed)."""
    n = spec.ndim
    axis_max = axis_maxima(spec)
    wide = max(axis_max) >= MAX_TOKENS
    fields = fused_fields(axis_max) if fused and not wide else None
    dev = resolve_device(device)
    if dev.type == "meta":
        return _meta_tables(spec, fields is not None, torch.int64 if wide else torch.int32)
    host = host_tables(spec) if host is None else host
    cols = [host.lo.reshape(n, -1), host.hi.reshape(n, -1), host.pos.reshape(n, -1)]
    if fields is not None:  # int32 arithmetic: every field, and so every sum, fits in 31 bits
        offsets, widths = fields
        guards = [(1 << (w - 1)) << o for o, w in zip(offsets, widths, strict=True)]  # G_a << o_a
        lo_g, hi_g, pos_g = (np.zeros(c.shape[1], dtype=np.int32) for c in cols)
        for a, o in enumerate(offsets):
            lo_g += cols[0][a] << o
            hi_g += cols[1][a] << o
            pos_g += cols[2][a] << o
        lo_g -= sum(guards)
        hi_g += sum(guards)
        cols += [lo_g[None], hi_g[None], pos_g[None], np.full((1, spec.q_len), sum(guards), dtype=np.int32)]
    if host.q_coords is not None and host.kv_coords is not None:
        cols += [host.q_coords.astype(host.lo.dtype), host.kv_coords.astype(host.lo.dtype)]
    flat = np.concatenate([c.reshape(-1) for c in cols])
    moved = torch.from_numpy(flat).to(dev)
    parts = moved.split([c.size for c in cols])
    q_lo, q_hi, kv_pos = (tuple(p.reshape(n, -1).unbind(0)) for p in parts[:3])
    fused_t = None
    if fields is not None:
        fused_t = FusedTables(parts[3], parts[4], parts[5], parts[6])
    coords: tuple[tuple[torch.Tensor, ...], ...] = ((), ())
    if host.q_coords is not None:
        coords = (tuple(parts[-2].reshape(n, -1).unbind(0)), tuple(parts[-1].reshape(n, -1).unbind(0)))
    return MaskTables(spec, q_lo, q_hi, kv_pos, fused_t, *coords)


def _meta_tables(spec: MaskSpec, fused: bool, dtype: torch.dtype) -> MaskTables:
    def empty(length: int) -> torch.Tensor:
        return torch.empty(spec.heads * length, dtype=dtype, device="meta")

    n = spec.ndim
    fused_t = None
    if fused:
        fused_t = FusedTables(empty(spec.q_len), empty(spec.q_len), empty(spec.kv_len),
                              torch.empty(spec.q_len, dtype=dtype, device="meta"))
    return MaskTables(spec, tuple(empty(spec.q_len) for _ in range(n)),
                      tuple(empty(spec.q_len) for _ in range(n)),
                      tuple(empty(spec.kv_len) for _ in range(n)), fused_t)


def spec_mask_mod(spec: MaskSpec, device: torch.device | str | None = None) -> MaskMod:
    """The FlexAttention ``mask_mod`` of a :class:`~flexna.MaskSpec` (its tables on ``device``)."""
    return build_tables(spec, device).mask_mod()


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
    curve: str | None = None,
) -> MaskMod:
    """FlexAttention ``mask_mod`` of neighborhood attention over a token layout.

    Args:
        shape: token layout ``(L_1, ..., L_n)``, 1 to 3 axes.
        kernel_size, stride, dilation, is_causal: per-axis pattern parameters
            (a scalar applies to every axis); see ``docs/SEMANTICS.md``.
        q_tile, kv_tile: token order of queries / keys. ``None`` is row-major;
            a tile (one int per axis) is the tiled order of
            :func:`flexna.tile_tokens`, whose padded positions never attend.
        curve: ``"hilbert"`` or ``"morton"``: queries and keys in that space-filling curve
            order instead (2-3 axes, no tiles; :class:`flexna.CurveOrder` moves tensors).
        device: where the lookup tables live; must be the device of the
            tensors you run attention on (default: torch's default device).

    The returned function takes ``(b, h, q_idx, kv_idx)`` and works with
    ``create_mask``, ``create_block_mask`` and eager or compiled
    ``flex_attention``.

    Example::

        mask_mod = flexna.na_mask_mod((32, 32), 7)
        mask = torch.nn.attention.flex_attention.create_mask(mask_mod, None, None, 1024, 1024)
    """
    pattern = NAPattern.create(shape, kernel_size, stride, dilation, is_causal)
    spec = MaskSpec.create(pattern, q_tile=q_tile, kv_tile=kv_tile, q_curve=curve, kv_curve=curve)
    return build_tables(spec, device).mask_mod()
