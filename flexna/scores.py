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
tokens index the (shared) table with their own layout's coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flexna.masks import _resolve_device
from flexna.pattern import NAPattern

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rpb_table_shape(kernel_size, stride=1, is_causal=False, ndim: int | None = None) -> tuple[int, ...]:
    """Per-axis RPB table lengths ``(R_1, ..., R_n)`` (see the module docstring)."""
    from flexna.pattern import as_bool_tuple, as_int_tuple

    if ndim is None:
        ndim = 1 if isinstance(kernel_size, int) else len(kernel_size)
    ks = as_int_tuple("kernel_size", kernel_size, ndim)
    ss = as_int_tuple("stride", stride, ndim)
    cs = as_bool_tuple("is_causal", is_causal, ndim)
    return tuple(k if c else 2 * k - 1 + s - 1 for k, s, c in zip(ks, ss, cs, strict=True))


def _rpb_offsets(pattern: NAPattern) -> tuple[int, ...]:
    return tuple(k - 1 if c else (k - 1) + (s - 1 - s // 2) for k, s, c in
                 zip(pattern.kernel_size, pattern.stride, pattern.is_causal, strict=True))


def rpb_token_tables(pattern: NAPattern, num_extra_q: int = 0, num_extra_kv: int = 0,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(q_base [Nq], kv_base [Nkv])``: flat table index = ``q_base[q] + kv_base[kv]``."""
    device = _resolve_device(device)
    sizes = rpb_table_shape(pattern.kernel_size, pattern.stride, pattern.is_causal, pattern.ndim)
    offsets = _rpb_offsets(pattern)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, device=device) for n in pattern.shape],
                                        indexing="ij"), -1).reshape(-1, pattern.ndim)
    q_base = torch.zeros(coords.shape[0], dtype=torch.int64, device=device)
    kv_base = torch.zeros_like(q_base)
    step = 1
    for a in reversed(range(pattern.ndim)):
        g = coords[:, a] // pattern.dilation[a]
        q_base += (offsets[a] - g) * step
        kv_base += g * step
        step *= sizes[a]
    q_base = torch.cat([q_base, q_base.new_zeros(num_extra_q)]).to(torch.int32)
    kv_base = torch.cat([kv_base, kv_base.new_zeros(num_extra_kv)]).to(torch.int32)
    return q_base, kv_base


def _table_shape_of(pattern: NAPattern) -> tuple[int, ...]:
    return rpb_table_shape(pattern.kernel_size, pattern.stride, pattern.is_causal, pattern.ndim)


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


def check_rpb(table: torch.Tensor, patterns: NAPattern | Sequence[NAPattern], num_heads: int,
              name: str = "rel_pos_bias", device: torch.device | None = None) -> None:
    """``ValueError`` unless ``table`` is a floating tensor ``[num_heads, *table shape]``
    (on ``device``, when given: the query's).

    ``patterns``: one pattern for all heads, or one per head (:class:`flexna.PerHead`),
    whose table shapes must agree.
    """
    patterns = (patterns,) if isinstance(patterns, NAPattern) else tuple(patterns)
    sizes = common_table_shape([_table_shape_of(p) for p in patterns], name)
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != (num_heads, *sizes):
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
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


def rel_pos_bias_score_mod(table: torch.Tensor, shape, kernel_size, stride=1, dilation=1,
                           is_causal=False, *, num_extra_q: int = 0, num_extra_kv: int = 0,
                           device: torch.device | str | None = None) -> ScoreMod:
    """``score_mod`` adding ``table[h, idx_1, ..., idx_n]`` (see module docstring) to each score.

    ``table``: ``[heads, *rpb_table_shape(kernel_size, stride, is_causal)]``; gradients
    reach it (it is a captured tensor). Any pattern argument may be a
    :class:`flexna.PerHead` with one entry per head (``table.shape[0]``): head ``h``
    then indexes ``table[h]`` with its own pattern (all heads must give the same table
    shape). Row-major token order; extra tokens (index ``>= prod(shape)``) get no bias.
    Masked pairs may read any table entry (their score is discarded).
    """
    from flexna.extended import head_patterns

    if not isinstance(table, torch.Tensor) or table.dim() < 1:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"table must be a tensor [heads, *rpb_table_shape(...)], got {got}")
    patterns = head_patterns(shape, kernel_size, stride, dilation, is_causal, num_heads=table.shape[0])
    check_rpb(table, patterns, table.shape[0], "table")
    return _rpb_score_mod(table, patterns, num_extra_q, num_extra_kv,
                          table.device if device is None else device)


def _token_bases(patterns: Sequence[NAPattern], num_extra_q: int, num_extra_kv: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_base, kv_base)``: ``[N + extra]`` for one pattern, ``[H, N + extra]`` per head."""
    distinct = list(dict.fromkeys(patterns))
    bases = {p: rpb_token_tables(p, num_extra_q, num_extra_kv, device) for p in distinct}
    if len(distinct) == 1:
        return bases[distinct[0]]
    return (torch.stack([bases[p][0] for p in patterns]), torch.stack([bases[p][1] for p in patterns]))


def _rpb_score_mod(table: torch.Tensor, patterns: NAPattern | Sequence[NAPattern], num_extra_q: int,
                   num_extra_kv: int, device) -> ScoreMod:
    patterns = (patterns,) if isinstance(patterns, NAPattern) else tuple(patterns)
    q_base, kv_base = _token_bases(patterns, num_extra_q, num_extra_kv, device)
    return _bias_score_mod(table, q_base, kv_base, patterns[0].num_tokens,
                           bool(num_extra_q or num_extra_kv))


def _bias_score_mod(table: torch.Tensor, q_base: torch.Tensor, kv_base: torch.Tensor,
                    n_tok: int | None, has_extra: bool) -> ScoreMod:
    """score + ``table[h].flatten()[q_base[(h,) q] + kv_base[(h,) kv]]`` (0 for extra tokens)."""
    flat = table.reshape(table.shape[0], -1)
    top = flat.shape[1] - 1
    per_head = q_base.dim() == 2

    def rpb_score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                      kv_idx: torch.Tensor) -> torch.Tensor:
        idx = q_base[h, q_idx] + kv_base[h, kv_idx] if per_head else q_base[q_idx] + kv_base[kv_idx]
        bias = flat[h, idx.clamp(0, top)]
        if has_extra:
            bias = torch.where((q_idx < n_tok) & (kv_idx < n_tok), bias, torch.zeros_like(bias))
        return score + bias

    return rpb_score_mod


def _packed_rpb_score_mod(table: torch.Tensor, patterns: Sequence[NAPattern], block: int,
                          device) -> ScoreMod:
    """Bias over a packed sequence (each sample padded to a multiple of ``block``): each
    sample's tokens index ``table`` with their own layout's coordinates."""
    q_parts, kv_parts = [], []
    for p in patterns:
        q_base, kv_base = rpb_token_tables(p, 0, 0, device)
        pad = -(-p.num_tokens // block) * block - p.num_tokens
        q_parts.append(torch.nn.functional.pad(q_base, (0, pad)))
        kv_parts.append(torch.nn.functional.pad(kv_base, (0, pad)))
    return _bias_score_mod(table, torch.cat(q_parts), torch.cat(kv_parts), None, False)


def softcap_score_mod(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` (Gemma-2 style logit softcapping)."""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap!r}")

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcap


def distance_decay_score_mod(slopes: torch.Tensor, shape, *, num_extra_q: int = 0,
                             num_extra_kv: int = 0, device=None) -> ScoreMod:
    """ALiBi-style decay: ``score - slopes[h] * L1 distance`` between query and key coordinates.

    ``slopes``: ``[heads]`` (may require grad). Row-major order; pairs involving
    extra tokens are not penalised.
    """
    shape_p = NAPattern.create(shape, 1).shape
    device = slopes.device if device is None else device
    if not isinstance(slopes, torch.Tensor) or slopes.dim() != 1:
        raise ValueError(f"slopes must be a 1-D tensor [heads], got {slopes!r}")
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, device=device) for n in shape_p],
                                        indexing="ij"), -1).reshape(-1, len(shape_p)).to(torch.int32)
    q_c = torch.cat([coords, coords.new_zeros(num_extra_q, len(shape_p))]).t().contiguous()
    k_c = torch.cat([coords, coords.new_zeros(num_extra_kv, len(shape_p))]).t().contiguous()
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
