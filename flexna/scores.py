"""FlexAttention ``score_mod``s for neighborhood attention: relative positional bias & co.

Relative positional bias (RPB, NAT / DiNAT). A learnable per-head table is
indexed, per axis, by the key's offset from the query *in dilation-group
coordinates* (``x' = x div d``, ``y' = y div d``):

* non-causal axis, kernel ``k``, stride ``s``: table length ``2k - 1 + (s - 1)``,
  index ``(y' - x') + (k - 1) + (s - 1 - s // 2)``. Queries of a stride group
  share a window that contains the group's leader, so ``y' - x'`` spans
  ``[-(k - 1) - (s - 1 - s // 2), (k - 1) + s // 2]`` and the table covers
  every offset the pattern can produce (odd or even ``k``). With ``s = 1``
  this is exactly NAT's ``rpb`` of shape ``[heads, 2k - 1]`` and index
  ``(y' - x') + (k - 1)``.
* causal axis: keys are at most ``k - 1`` behind the query, never ahead:
  table length ``k``, index ``(y' - x') + (k - 1)`` (NAT's formula, left half).

Tables are ``[heads, R_1, ..., R_n]``; :func:`rpb_table_shape` gives ``R``.
The score_mod reads two per-token tables (a query base and a key base whose
sum is the flat table index) and one table entry: three loads per score.
Extra tokens (index ``>= N``) get no bias.

Per-head patterns (:class:`flexna.PerHead`): every head indexes its own row of
the table with its own pattern (e.g. DiNAT's half-local / half-dilated heads:
same kernel, per-head dilation). All heads must give the same table shape, i.e.
the same ``rpb_table_shape(kernel_size, stride, is_causal)``; the per-token
tables then have a head dimension ``[H, N]``.

Packed layouts (variable resolution, :mod:`flexna.packing`): each sample's
tokens index the (shared) table with their own layout's coordinates. Tiled orders and
regions index it with the token's layout coordinates: one table serves every order.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch

from flexna.blockmask import cached, static_addresses
from flexna.geometry import region_or_full
from flexna.pattern import NAPattern, as_bool_tuple, as_int_tuple, head_patterns
from flexna.spec import MaskSpec, TensorMeta, resolve_device

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rpb_table_shape(kernel_size: object, stride: object = 1, is_causal: object = False,
                    ndim: int | None = None) -> tuple[int, ...]:
    """Per-axis RPB table lengths ``(R_1, ..., R_n)`` (see the module docstring)."""
    if ndim is None:
        ndim = 1 if isinstance(kernel_size, numbers.Integral) else len(kernel_size)  # type: ignore[arg-type]
    ks = as_int_tuple("kernel_size", kernel_size, ndim)
    ss = as_int_tuple("stride", stride, ndim)
    cs = as_bool_tuple("is_causal", is_causal, ndim)
    for a, (k, st) in enumerate(zip(ks, ss, strict=True)):
        if k < 1:
            raise ValueError(f"kernel_size[axis {a}] = {k} is out of range: need >= 1")
        if not 1 <= st <= k:
            raise ValueError(f"stride[axis {a}] = {st} is out of range: need 1 <= stride <= kernel_size = {k}")
    return tuple(k if c else 2 * k - 1 + s - 1 for k, s, c in zip(ks, ss, cs, strict=True))


def _table_shape_of(pattern: NAPattern) -> tuple[int, ...]:
    return rpb_table_shape(pattern.kernel_size, pattern.stride, pattern.is_causal, pattern.ndim)


def _rpb_offsets(pattern: NAPattern) -> tuple[int, ...]:
    return tuple(k - 1 if c else (k - 1) + (s - 1 - s // 2) for k, s, c in
                 zip(pattern.kernel_size, pattern.stride, pattern.is_causal, strict=True))


def rpb_bases(spec: MaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-token ``(q_base [heads, q_len], kv_base [heads, kv_len])`` of a spec (NumPy int32).

    The flat table index of a pair is ``q_base[q] + kv_base[kv]`` (each head with its own
    pattern, each sample with its own layout's coordinates, every order and region of the
    spec); padding and extra tokens hold 0.
    """
    q_base = np.zeros((spec.heads, spec.q_len), dtype=np.int64)
    kv_base = np.zeros((spec.heads, spec.kv_len), dtype=np.int64)
    for i, group in enumerate(spec.samples):
        q_start = np.array([s for s, _ in region_or_full(spec.q_region, group[0].shape)])
        kv_start = np.array([s for s, _ in region_or_full(spec.kv_region, group[0].shape)])
        q_coords, kv_coords = spec.q_order(i).coords(), spec.kv_order(i).coords()
        q_real, kv_real = q_coords[:, 0] >= 0, kv_coords[:, 0] >= 0
        q_coords, kv_coords = q_coords + q_start, kv_coords + kv_start
        q0, k0 = spec.q_offsets[i], spec.kv_offsets[i]
        for h, p in enumerate(group):
            sizes, offsets = _table_shape_of(p), _rpb_offsets(p)
            qb = np.zeros(len(q_coords), dtype=np.int64)
            kb = np.zeros(len(kv_coords), dtype=np.int64)
            step = 1
            for a in reversed(range(p.ndim)):
                qb += (offsets[a] - q_coords[:, a] // p.dilation[a]) * step
                kb += (kv_coords[:, a] // p.dilation[a]) * step
                step *= sizes[a]
            q_base[h, q0:q0 + qb.size] = np.where(q_real, qb, 0)
            kv_base[h, k0:k0 + kb.size] = np.where(kv_real, kb, 0)
    return q_base.astype(np.int32), kv_base.astype(np.int32)


def rpb_token_tables(spec: MaskSpec, device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rpb_bases` on ``device``, flat per head (``[heads * q_len]``), from the cache."""
    dev = resolve_device(device)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        q_base, kv_base = rpb_bases(spec)
        both = torch.from_numpy(np.concatenate([q_base.reshape(-1), kv_base.reshape(-1)])).to(dev)
        tables = both[:q_base.size], both[q_base.size:]
        static_addresses(*tables)  # read in place by CUDA graphs (see the function)
        return tables

    return cached(("rpb", spec, dev), build, lambda t: 4 * (t[0].numel() + t[1].numel()))


def _heads_text(heads: list[int]) -> str:
    return f"head {heads[0]}" if len(heads) == 1 else f"heads {heads}"


def common_table_shape(shapes: Sequence[tuple[int, ...]], name: str = "rel_pos_bias") -> tuple[int, ...]:
    """The one table shape of per-head ``shapes`` (one entry per head), or a ``ValueError``
    naming which heads give which shape."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for h, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(h)
    if len(groups) > 1:
        listed = "; ".join(f"{_heads_text(hs)}: {shape}" for shape, hs in groups.items())
        raise ValueError(
            f"{name} needs one table shape for all heads, but the per-head patterns give "
            f"different rpb_table_shape(kernel_size, stride, is_causal): {listed}. Per-head "
            "dilation is fine; kernel_size, stride and is_causal must give the same table"
        )
    return next(iter(groups))


def check_rpb(table: torch.Tensor | TensorMeta, patterns: NAPattern | Sequence[NAPattern], num_heads: int,
              name: str = "rel_pos_bias", device: torch.device | None = None) -> None:
    """``ValueError`` unless ``table`` is a floating tensor ``[num_heads, *table shape]``
    (on ``device``, when given: the query's).

    ``patterns``: one pattern for all heads, or one per head (:class:`flexna.PerHead`),
    whose table shapes must agree.
    """
    patterns = (patterns,) if isinstance(patterns, NAPattern) else tuple(patterns)
    sizes = common_table_shape([_table_shape_of(p) for p in patterns], name)
    tensor_like = isinstance(table, (torch.Tensor, TensorMeta))
    if not tensor_like or tuple(table.shape) != (num_heads, *sizes):
        got = tuple(table.shape) if tensor_like else type(table).__name__
        what = (f"{patterns[0]}" if len(patterns) == 1 else
                f"{len(patterns)} per-head patterns on layout {patterns[0].shape}")
        raise ValueError(
            f"{name} must be a tensor shaped [heads, *table] = {(num_heads, *sizes)} for "
            f"{what} with {num_heads} heads, got {got}"
        )
    if table.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} dtype must be float32, float16 or bfloat16, got {table.dtype}")
    if device is not None and table.device != device:
        raise ValueError(f"{name} is on {table.device}, query on {device}")


def spec_rpb_score_mod(table: torch.Tensor, spec: MaskSpec, device: torch.device | str | None = None
                       ) -> ScoreMod:
    """:func:`bias_score_mod` with the spec's per-token tables from the cache."""
    q_base, kv_base = rpb_token_tables(spec, table.device if device is None else device)
    return bias_score_mod(table, q_base, kv_base, spec)


def bias_score_mod(table: torch.Tensor, q_base: torch.Tensor, kv_base: torch.Tensor,
                   spec: MaskSpec) -> ScoreMod:
    """score + ``table[h].flatten()[q_base + kv_base]`` for the spec's tokens (0 for pairs with
    an extra token); ``q_base``/``kv_base`` from :func:`rpb_token_tables`."""
    flat = table.reshape(table.shape[0], -1)
    top = flat.shape[1] - 1
    per_head = spec.heads > 1
    nq, nkv = spec.q_len, spec.kv_len
    lq, lk = spec.q_layout_len, spec.kv_layout_len
    has_extra = bool(spec.num_extra_q or spec.num_extra_kv)

    def rpb_score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                      kv_idx: torch.Tensor) -> torch.Tensor:
        if per_head:
            idx = q_base[h * nq + q_idx] + kv_base[h * nkv + kv_idx]
        else:
            idx = q_base[q_idx] + kv_base[kv_idx]
        # masked pairs may index anywhere: keep them in the table (no min/max, which FLASH's
        # CuTe code generation does not lower)
        bias = flat[h, torch.where((idx >= 0) & (idx <= top), idx, 0)]
        if has_extra:
            bias = torch.where((q_idx < lq) & (kv_idx < lk), bias, torch.zeros_like(bias))
        return score + bias

    return rpb_score_mod


def rel_pos_bias_score_mod(table: torch.Tensor, shape: object, kernel_size: object, stride: object = 1,
                           dilation: object = 1, is_causal: object = False, *, num_extra_q: int = 0,
                           num_extra_kv: int = 0, device: torch.device | str | None = None) -> ScoreMod:
    """``score_mod`` adding ``table[h, idx_1, ..., idx_n]`` (see module docstring) to each score.

    ``table``: ``[heads, *rpb_table_shape(kernel_size, stride, is_causal)]``; gradients
    reach it (it is a captured tensor). Any pattern argument may be a
    :class:`flexna.PerHead` with one entry per head (``table.shape[0]``): head ``h``
    then indexes ``table[h]`` with its own pattern (all heads must give the same table
    shape). Row-major token order; extra tokens (index ``>= prod(shape)``) get no bias.
    Masked pairs may read any table entry (their score is discarded).

    Example::

        rpb = torch.zeros(4, *flexna.rpb_table_shape(7), requires_grad=True)
        out = flex_attention(q, k, v, score_mod=flexna.rel_pos_bias_score_mod(rpb, 64, 7),
                             block_mask=flexna.na_block_mask(64, 7))
    """
    if not isinstance(table, torch.Tensor) or table.dim() < 1:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"table must be a tensor [heads, *rpb_table_shape(...)], got {got}")
    patterns = head_patterns(shape, kernel_size, stride, dilation, is_causal, num_heads=table.shape[0])
    check_rpb(table, patterns, table.shape[0], "table")
    spec = MaskSpec.create(patterns, num_extra_q=num_extra_q, num_extra_kv=num_extra_kv)
    return spec_rpb_score_mod(table, spec, device)


def softcap_score_mod(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` (Gemma-2 style logit softcapping)."""
    if isinstance(cap, bool) or not isinstance(cap, int | float) or not math.isfinite(cap) or not cap > 0:
        raise ValueError(f"cap = {cap!r} is out of range: need a finite number > 0")

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcap


def distance_decay_score_mod(slopes: torch.Tensor, shape, *, num_extra_q: int = 0,
                             num_extra_kv: int = 0, device=None) -> ScoreMod:
    """ALiBi-style decay: ``score - slopes[h] * L1 distance`` between query and key coordinates.

    ``slopes``: ``[heads]`` (may require grad). Row-major order; pairs involving
    extra tokens are not penalised.
    """
    shape_p = NAPattern.create(shape, 1).shape  # type: ignore[arg-type]
    device = slopes.device if device is None else device
    if not isinstance(slopes, torch.Tensor) or slopes.dim() != 1:
        raise ValueError(f"slopes must be a 1-D tensor [heads], got {slopes!r}")
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, device=device) for n in shape_p],
                                        indexing="ij"), -1).reshape(-1, len(shape_p)).to(torch.int32)
    # one flat table per axis (no load at a constant index: FLASH's code generation lowers none)
    q_c = tuple(torch.cat([coords, coords.new_zeros(num_extra_q, len(shape_p))]).t().contiguous().unbind(0))
    k_c = tuple(torch.cat([coords, coords.new_zeros(num_extra_kv, len(shape_p))]).t().contiguous().unbind(0))
    n_tok = coords.shape[0]

    def distance_decay(score, b, h, q_idx, kv_idx):
        dist = None
        for a in range(len(shape_p)):
            d = (q_c[a][q_idx] - k_c[a][kv_idx]).abs()
            dist = d if dist is None else dist + d
        dist = torch.where((q_idx < n_tok) & (kv_idx < n_tok), dist, torch.zeros_like(dist))
        return score - slopes[h] * dist

    return distance_decay


def compose_score_mods(*mods: ScoreMod | None) -> ScoreMod | None:
    """One score_mod applying ``mods`` left to right (``None`` entries skipped)."""
    mods_t = tuple(m for m in mods if m is not None)
    if not mods_t:
        return None
    if len(mods_t) == 1:
        return mods_t[0]

    def composed(score, b, h, q_idx, kv_idx):
        for m in mods_t:
            score = m(score, b, h, q_idx, kv_idx)
        return score

    return composed
