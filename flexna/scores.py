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
"""

from __future__ import annotations

from collections.abc import Callable

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


def check_rpb(table: torch.Tensor, pattern: NAPattern, num_heads: int) -> None:
    sizes = rpb_table_shape(pattern.kernel_size, pattern.stride, pattern.is_causal, pattern.ndim)
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != (num_heads, *sizes):
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(
            f"rel_pos_bias must be a tensor shaped [heads, *table] = {(num_heads, *sizes)} for "
            f"{pattern} with {num_heads} heads, got {got}"
        )


def rel_pos_bias_score_mod(table: torch.Tensor, shape, kernel_size, stride=1, dilation=1,
                           is_causal=False, *, num_extra_q: int = 0, num_extra_kv: int = 0,
                           device: torch.device | str | None = None) -> ScoreMod:
    """``score_mod`` adding ``table[h, idx_1, ..., idx_n]`` (see module docstring) to each score.

    ``table``: ``[heads, *rpb_table_shape(kernel_size, stride, is_causal)]``; gradients
    reach it (it is a captured tensor). Row-major token order; extra tokens
    (index ``>= prod(shape)``) get no bias. Masked pairs may read any table entry
    (their score is discarded).
    """
    pattern = NAPattern.create(shape, kernel_size, stride, dilation, is_causal)
    check_rpb(table, pattern, table.shape[0] if isinstance(table, torch.Tensor) and table.dim() else 0)
    return _rpb_score_mod(table, pattern, num_extra_q, num_extra_kv,
                          table.device if device is None else device)


def _rpb_score_mod(table: torch.Tensor, pattern: NAPattern, num_extra_q: int, num_extra_kv: int,
                   device) -> ScoreMod:
    q_base, kv_base = rpb_token_tables(pattern, num_extra_q, num_extra_kv, device)
    flat = table.reshape(table.shape[0], -1)
    top = flat.shape[1] - 1
    n_tok = pattern.num_tokens
    has_extra = bool(num_extra_q or num_extra_kv)

    def rpb_score_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                      kv_idx: torch.Tensor) -> torch.Tensor:
        idx = (q_base[q_idx] + kv_base[kv_idx]).clamp(0, top)
        bias = flat[h, idx]
        if has_extra:
            bias = torch.where((q_idx < n_tok) & (kv_idx < n_tok), bias, torch.zeros_like(bias))
        return score + bias

    return rpb_score_mod


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
