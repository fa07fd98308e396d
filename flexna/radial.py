"""Radial attention (Li et al., 2025): static O(n log n) video attention whose window on a
frame's tokens shrinks as the frame distance grows, and its 3-D-window variant.

Both are one rule over a layout ``(frames, *spatial)``: for a query at frame ``i`` and a key
at frame ``j``, with ``d = |i - j|`` and its *group* ``g = bit_length(d)`` (0 for d = 0, 1
for d = 1, 2 for d = 2..3, 3 for d = 4..7, ...), the pair attends iff

* the key is on frame 0 and the rule has an attention **sink** (every query attends the
  first frame whole), or
* ``d % split[g] == 0`` (far frame pairs are kept only every ``split[g]``-th distance), and
  on every spatial axis ``|x_a - y_a| <= radius[g][a]`` (a band, clipped at the frame's
  borders: it shrinks there instead of sliding).

The window depends on the time offset, so the rule is not separable per axis: the pattern
gives per-axis envelope windows (a superset: the tables' bounds and the candidate blocks),
core windows, an element-wise check (the mask_mod, in closed form over the groups, no
table lookups) and an exact test for a pair of boxes (:meth:`RadialPattern.box_pairs`),
so the BlockMask's full and partial blocks are exact.

* :func:`radial_pattern` is the authors' rule (``radial_attn/attn_mask.py``,
  ``gen_log_mask_shrinked``: ``get_window_width`` and ``get_diagonal_split_mask``) on
  ``(num_frames, tokens_per_frame)``, in-frame tokens flattened row-major, before the
  authors coarsen it to 128-token blocks with their density heuristic (``shrinkMaskStrict``);
  flexna runs the token-level mask itself (Flex evaluates partial blocks).
* :func:`radial_window_pattern` is flexna's 3-D-window variant on ``(frames, H, W)``: a
  spatial box whose half-width halves as the frame distance doubles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from flexna.pattern import NAPattern, as_int_tuple, as_shape, fmt_dims

__all__ = ["RadialPattern", "radial_pattern", "radial_window_pattern"]


def _group(d: int | np.integer) -> int:
    return int(d).bit_length()


@dataclass(frozen=True)
class RadialPattern(NAPattern):
    """The radial rule of the module docstring over ``shape = (frames, *spatial)``.

    ``radius[g]``: per spatial axis half-width of frame-distance group ``g`` (``0 ..
    bit_length(frames - 1)``); ``split[g]``: keep distances divisible by it; ``sink``: every
    query attends frame 0. Build one with :func:`radial_pattern` or
    :func:`radial_window_pattern`. (``kernel_size`` is the layout: the NA fields are unused.)
    """

    radius: tuple[tuple[int, ...], ...] = ()
    split: tuple[int, ...] = ()
    sink: bool = False
    name: str = "radial"
    separable: ClassVar[bool] = False

    # ------------------------------------------------------------- per frame distance, host
    def _distance_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """``keep[d]`` (bool) and ``rad[d, a]`` for every frame distance ``d`` in ``[0, frames)``."""
        d = np.arange(self.shape[0])
        g = np.array([_group(v) for v in d])
        keep = d % np.array(self.split)[g] == 0
        return keep, np.array(self.radius, dtype=np.int64)[g].reshape(len(d), -1)

    def frame_attends(self) -> np.ndarray:
        """``[frames, frames]`` bool: some key of frame ``j`` is attended from frame ``i``."""
        f = self.shape[0]
        keep, _ = self._distance_tables()
        i, j = np.arange(f)[:, None], np.arange(f)[None, :]
        return keep[np.abs(i - j)] | (self.sink & (j == 0))

    def envelope_bounds(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Axis 0: from the first to the last frame attended, made monotone (suffix minimum
        / prefix maximum); spatial axes: the widest band of any kept distance, clipped."""
        length = self.shape[axis]
        if axis == 0:
            reach = self.frame_attends()
            lo = np.minimum.accumulate(reach.argmax(1)[::-1])[::-1]
            hi = np.maximum.accumulate(length - 1 - reach[:, ::-1].argmax(1))
            if self.sink:
                lo = np.zeros(length, dtype=np.int64)
        else:
            keep, rad = self._distance_tables()
            widest = int(rad[keep, axis - 1].max())
            if self.sink:
                widest = length
            x = np.arange(length)
            lo, hi = np.maximum(x - widest, 0), np.minimum(x + widest, length - 1)
        return _frozen(lo), _frozen(hi)

    def core_bounds(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """The query's own frame (distance 0, always kept) and its band there."""
        x = np.arange(self.shape[axis])
        if axis == 0:
            return _frozen(x), _frozen(x)
        r = self.radius[0][axis - 1]
        return _frozen(np.maximum(x - r, 0)), _frozen(np.minimum(x + r, self.shape[axis] - 1))

    # ------------------------------------------------------------- element-wise, NumPy or torch
    def _group_of(self, d: Any) -> list[Any]:
        """One-hot of the group of ``d`` (arrays or tensors): ``[d == 0, d == 1, 2 <= d < 4, ...]``."""
        return [(d >= (1 << (g - 1) if g else 0)) & (d < (1 << g)) for g in range(len(self.split))]

    def element_check(self, q: tuple[Any, ...], kv: tuple[Any, ...]) -> Any:
        d = abs(q[0] - kv[0])
        ok = None
        for g, in_group in enumerate(self._group_of(d)):
            term = in_group
            if self.split[g] > 1:
                term = term & (d % self.split[g] == 0)
            for a, r in enumerate(self.radius[g]):
                if r < self.shape[a + 1] - 1:  # a band narrower than the frame
                    term = term & (abs(q[a + 1] - kv[a + 1]) <= r)
            ok = term if ok is None else ok | term
        if self.sink:
            ok = ok | (kv[0] == 0)
        return ok

    # ------------------------------------------------------------- exact box pairs
    def box_pairs(self, q_lo: np.ndarray, q_hi: np.ndarray, k_lo: np.ndarray,
                  k_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact (some pair attends, every pair attends) for boxes of query and key coordinates
        (``[..., n]`` inclusive corners, broadcast).

        Two frame intervals realise every distance in ``[dmin, dmax]``, so per spatial axis a
        range-minimum table of the kept half-widths decides *every* (each realised distance
        must cover the boxes' spread), and a range-maximum table decides *some* with one
        spatial axis, or with several when the widths never grow with the distance (then the
        nearest distance is the best); other rules walk the distances.
        """
        keep, rad = self._distance_tables()
        f = self.shape[0]
        shape = np.broadcast_shapes(q_lo.shape[:-1], k_lo.shape[:-1])
        i0, i1 = np.broadcast_to(q_lo[..., 0], shape), np.broadcast_to(q_hi[..., 0], shape)
        j0, j1 = np.broadcast_to(k_lo[..., 0], shape), np.broadcast_to(k_hi[..., 0], shape)
        lo_max, hi_min = _range_tables(np.where(keep[:, None], rad, -1))
        gaps, spreads = [], []
        for a in range(1, self.ndim):
            qa, qb, ka, kb = q_lo[..., a], q_hi[..., a], k_lo[..., a], k_hi[..., a]
            gaps.append(np.broadcast_to(np.maximum(np.maximum(ka - qb, qa - kb), 0), shape))
            spreads.append(np.broadcast_to(np.maximum(kb - qa, qb - ka), shape))

        def distances(k_first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            dmin = np.maximum(np.maximum(k_first - i1, i0 - j1), 0)
            dmax = np.maximum(i1 - k_first, j1 - i0).clip(0, f - 1)
            return dmin.clip(0, f - 1), np.maximum(dmax, dmin.clip(0, f - 1))

        # every: the key frames other than a sink frame must satisfy every realised distance
        k_first = np.maximum(j0, 1) if self.sink else j0
        dmin, dmax = distances(k_first)
        every = np.ones(shape, dtype=bool)
        for a in range(self.ndim - 1):
            every &= hi_min[a][dmin, dmax] >= spreads[a]
        if self.sink:
            every |= j1 < 1  # only frame 0: the sink
        dmin, dmax = distances(j0)
        monotone = bool((np.diff(np.where(keep[:, None], rad, -1), axis=0) <= 0).all())
        if self.ndim == 2:
            some = lo_max[0][dmin, dmax] >= gaps[0]
        elif monotone:
            some = np.ones(shape, dtype=bool)
            for a in range(self.ndim - 1):
                some &= rad[dmin, a] >= gaps[a]
            some &= keep[dmin]
        else:
            some = np.zeros(shape, dtype=bool)
            for d in range(f):
                inside = (dmin <= d) & (d <= dmax) & keep[d]
                for a in range(self.ndim - 1):
                    inside &= rad[d, a] >= gaps[a]
                some |= inside
        if self.sink:
            some |= j0 == 0
        return some, every

    def density(self) -> float:
        """Exact fraction of attended (query, key) pairs (per frame pair, a product of band counts)."""
        keep, rad = self._distance_tables()
        f = self.shape[0]
        spatial = self.shape[1:]
        per_frame = math.prod(spatial) ** 2
        total = 0
        for i in range(f):
            for j in range(f):
                if self.sink and j == 0:
                    total += per_frame
                elif keep[abs(i - j)]:
                    total += math.prod(_band_pairs(length, int(r))
                                       for length, r in zip(spatial, rad[abs(i - j)], strict=True))
        return total / self.num_tokens**2

    @property
    def keys_per_query(self) -> int:
        """Average keys per query (rounded): the window depends on the query here."""
        return round(self.density() * self.num_tokens)

    def __str__(self) -> str:
        return (f"{self.name} layout {fmt_dims(self.shape)}, radii by distance group "
                f"{'/'.join(fmt_dims(r) for r in self.radius)}"
                + (f", split {'/'.join(map(str, self.split))}" if any(s > 1 for s in self.split) else "")
                + (", sink on frame 0" if self.sink else ""))


def _range_tables(values: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per column of ``values`` ``[F, m]``: ``[F, F]`` tables of the maximum and the minimum over
    every index range ``[lo, hi]`` (``lo <= hi``; other entries unused)."""
    f, m = values.shape
    maxima, minima = [], []
    for a in range(m):
        hi_ = np.full((f, f), -1, dtype=np.int64)
        lo_ = np.full((f, f), -1, dtype=np.int64)
        for start in range(f):
            hi_[start, start:] = np.maximum.accumulate(values[start:, a])
            lo_[start, start:] = np.minimum.accumulate(values[start:, a])
        maxima.append(hi_)
        minima.append(lo_)
    return maxima, minima


def _band_pairs(length: int, r: int) -> int:
    """Pairs ``(x, y)`` of ``[0, length)`` with ``|x - y| <= r``."""
    r = min(r, length - 1)
    return length + 2 * sum(length - k for k in range(1, r + 1))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    a.flags.writeable = False
    return a


def _make(shape: tuple[int, ...], radius: Sequence[tuple[int, ...]], split: Sequence[int], sink: bool,
          name: str) -> RadialPattern:
    base = NAPattern.create(shape, shape)
    return RadialPattern(base.shape, base.kernel_size, base.stride, base.dilation, base.is_causal,
                         tuple(radius), tuple(split), sink, name)


def radial_pattern(num_frames: int, tokens_per_frame: int, *, model: str = "hunyuan",
                   decay_factor: float = 1.0, block_size: int = 128) -> RadialPattern:
    """The authors' radial rule on the layout ``(num_frames, tokens_per_frame)``.

    Per frame distance ``d`` (group ``g = bit_length(d)``, ``B = bit_length(tokens_per_frame)``):
    the band half-width is the whole frame for ``d <= 1`` (``model="hunyuan"``) or ``d = 0``
    and half a frame (``tokens_per_frame // 2``) for ``d = 1`` (``model="wan"``), else
    ``max(2**B / 2**g * decay_factor, block_size)``; a distance is kept unless
    ``2**B / 2**g < 128``, then only when divisible by ``128 / (2**B / 2**g)`` (the authors'
    hard-coded 128); ``model="wan"`` adds the attention sink on frame 0.
    """
    for name, value, low in (("num_frames", num_frames, 1), ("tokens_per_frame", tokens_per_frame, 1),
                             ("block_size", block_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if model not in ("hunyuan", "wan"):
        raise ValueError(f"model = {model!r} is not supported: use 'hunyuan' or 'wan'")
    if isinstance(decay_factor, bool) or not isinstance(decay_factor, (int, float)) or not (
            math.isfinite(decay_factor) and decay_factor > 0):
        raise ValueError(f"decay_factor must be a finite number > 0, got {decay_factor!r}")
    shape = as_shape("shape", (num_frames, tokens_per_frame))
    t = tokens_per_frame
    top = 2 ** t.bit_length()
    radius, split = [], []
    for g in range(_group(num_frames - 1) + 1):
        if g == 0 or (g == 1 and model == "hunyuan"):
            width = t
        elif g == 1:
            width = t // 2
        else:
            width = math.floor(max(top / 2**g * decay_factor, block_size))
        radius.append((min(width, t),))
        decay = top / 2**g
        split.append(1 if decay >= 128 else int(128 / decay))
    return _make(shape, radius, split, model == "wan", f"radial ({model})")


def radial_window_pattern(shape: Sequence[int], radius: int | Sequence[int], *,
                          min_radius: int | Sequence[int] = 1, dense_frames: int = 1,
                          sink: bool = False) -> RadialPattern:
    """The 3-D-window variant on ``(frames, *spatial)``: frames up to ``dense_frames`` apart see
    a spatial box of half-width ``radius`` (per spatial axis); each doubling of the distance
    beyond halves it, never below ``min_radius``: for group ``g = bit_length(d)``,
    ``r_a = max(radius_a >> max(0, g - bit_length(dense_frames)), min_radius_a)``. Every frame
    distance is kept; ``sink``: every query also attends frame 0 whole.
    """
    shape_t = as_shape("shape", shape)
    if len(shape_t) < 2:
        raise ValueError(f"shape must be (frames, *spatial) with 2 or 3 axes, got {shape_t}")
    m = len(shape_t) - 1
    rad = as_int_tuple("radius", radius, m)
    low = as_int_tuple("min_radius", min_radius, m)
    for a in range(m):
        if rad[a] < 0:
            raise ValueError(f"radius[axis {a}] = {rad[a]} is out of range: need >= 0")
        if not 0 <= low[a] <= rad[a]:
            raise ValueError(f"min_radius[axis {a}] = {low[a]} is out of range: need 0 <= "
                             f"min_radius <= radius = {rad[a]}")
    if isinstance(dense_frames, bool) or not isinstance(dense_frames, int) or dense_frames < 0:
        raise ValueError(f"dense_frames must be an int >= 0, got {dense_frames!r}")
    if not isinstance(sink, bool):
        raise ValueError(f"sink must be a bool, got {sink!r}")
    dense_group = _group(dense_frames)
    radii = [tuple(max(r >> max(0, g - dense_group), lo) for r, lo in zip(rad, low, strict=True))
             for g in range(_group(shape_t[0] - 1) + 1)]
    return _make(shape_t, radii, [1] * len(radii), sink, "radial window")
