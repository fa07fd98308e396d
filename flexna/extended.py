"""Neighborhood masks with per-head patterns and additional (extra) tokens.

Two extensions of the row-major pattern, in one ``mask_mod`` / ``BlockMask``:

* **Per-head patterns**: wrap any pattern parameter in :class:`PerHead` to give
  one value per query head (``kernel_size=PerHead([7, 7, 13, 13])``). The
  mask_mod indexes per-head tables by ``h``; the BlockMask has a head
  dimension ``[1, H, ...]``.
* **Additional tokens**: ``num_extra_kv`` key/value tokens appended after the
  layout's ``N`` tokens (kv index ``>= N``) are attended by every query, and
  ``num_extra_q`` query rows appended after the layout's queries (q index
  ``>= N``) attend every key (layout and extra). The latter is the joint
  attention of video models whose text tokens see everything.

The BlockMask is built from :func:`flexna.blocksparsity.block_maps` of each
distinct pattern and extended by the extra rows / columns; the only blocks
that need an element-wise look are the (few) blocks straddling the layout end
``N``. It equals ``create_block_mask`` of the same mask_mod.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

from flexna.blockmask import assemble_block_mask, resolve_block_sizes
from flexna.blocksparsity import block_maps
from flexna.masks import MaskMod, MaskTables, _resolve_device, build_tables
from flexna.pattern import NAPattern, as_shape


class PerHead:
    """One value of a pattern parameter per query head.

    Each entry is what the parameter normally takes (a scalar or a per-axis
    tuple): ``PerHead([7, 7, (13, 5), (13, 5)])`` for 4 heads. Its length must
    equal the number of query heads.
    """

    __slots__ = ("values",)

    def __init__(self, values: Sequence) -> None:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"PerHead needs a non-empty sequence of per-head values, got {values!r}")
        self.values = tuple(tuple(v) if isinstance(v, list) else v for v in values)

    def __len__(self) -> int:
        return len(self.values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerHead) and other.values == self.values

    def __hash__(self) -> int:
        return hash(("PerHead", self.values))

    def __repr__(self) -> str:
        return f"PerHead({list(self.values)!r})"


def head_patterns(shape, kernel_size, stride=1, dilation=1, is_causal=False,
                  num_heads: int | None = None) -> tuple[NAPattern, ...]:
    """Validated patterns: one per query head if any argument is :class:`PerHead`, else one.

    ``ValueError`` names the argument (and head) when a :class:`PerHead` has the
    wrong length or a head's values are out of range.
    """
    args = {"kernel_size": kernel_size, "stride": stride, "dilation": dilation,
            "is_causal": is_causal}
    per_head = {k: v for k, v in args.items() if isinstance(v, PerHead)}
    if not per_head:
        return (NAPattern.create(shape, kernel_size, stride, dilation, is_causal),)
    lengths = {k: len(v) for k, v in per_head.items()}
    if num_heads is None:
        num_heads = next(iter(lengths.values()))
    for name, length in lengths.items():
        if length != num_heads:
            raise ValueError(
                f"{name}: PerHead has {length} entries, need one per query head ({num_heads})"
            )
    out = []
    for h in range(num_heads):
        vals = {k: (v.values[h] if isinstance(v, PerHead) else v) for k, v in args.items()}
        try:
            out.append(NAPattern.create(shape, **vals))
        except ValueError as err:
            raise ValueError(f"head {h}: {err}") from None
    return tuple(out)


@dataclass(frozen=True, eq=False)
class ExtendedTables:
    """Lookup tables of per-head patterns plus extra tokens (row-major order)."""

    patterns: tuple[NAPattern, ...]
    num_extra_q: int
    num_extra_kv: int
    q_lo: tuple[torch.Tensor, ...]  # per axis, [H_p, Nq]
    q_hi: tuple[torch.Tensor, ...]
    kv_pos: tuple[torch.Tensor, ...]  # per axis, [H_p, Nkv]

    @property
    def num_tokens(self) -> int:
        return self.patterns[0].num_tokens

    @property
    def q_len(self) -> int:
        return self.num_tokens + self.num_extra_q

    @property
    def kv_len(self) -> int:
        return self.num_tokens + self.num_extra_kv

    def mask_mod(self) -> MaskMod:
        n_tok, extra_q, extra_kv = self.num_tokens, self.num_extra_q, self.num_extra_kv
        per_head = len(self.patterns) > 1
        if per_head:
            q_lo, q_hi, kv_pos = self.q_lo, self.q_hi, self.kv_pos
        else:
            q_lo, q_hi, kv_pos = ([t[0] for t in ts] for ts in (self.q_lo, self.q_hi, self.kv_pos))

        def na_extended_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                             kv_idx: torch.Tensor) -> torch.Tensor:
            ok = None
            for lo, hi, pos in zip(q_lo, q_hi, kv_pos, strict=True):
                if per_head:
                    y = pos[h, kv_idx]
                    axis_ok = (lo[h, q_idx] <= y) & (y <= hi[h, q_idx])
                else:
                    y = pos[kv_idx]
                    axis_ok = (lo[q_idx] <= y) & (y <= hi[q_idx])
                ok = axis_ok if ok is None else ok & axis_ok
            if extra_kv:
                ok = ok | (kv_idx >= n_tok)
            if extra_q:
                ok = ok | (q_idx >= n_tok)
            return ok

        return na_extended_mask


def _pad(t: torch.Tensor, extra: int, value: int) -> torch.Tensor:
    if not extra:
        return t
    return torch.cat([t, torch.full((extra,), value, dtype=t.dtype, device=t.device)])


def _check_extra(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def build_extended_tables(patterns: tuple[NAPattern, ...], num_extra_q: int, num_extra_kv: int,
                          device: torch.device) -> ExtendedTables:
    tile = (1,) * patterns[0].ndim
    per = [build_tables(p, tile, tile, device, packed=False) for p in patterns]
    n = patterns[0].ndim

    def stack(get, extra, value):
        return tuple(torch.stack([_pad(get(t)[a], extra, value) for t in per]) for a in range(n))

    return ExtendedTables(
        patterns, num_extra_q, num_extra_kv,
        stack(lambda t: t.q_lo, num_extra_q, 1),
        stack(lambda t: t.q_hi, num_extra_q, 0),
        stack(lambda t: t.kv_pos, num_extra_kv, -1),
    )


def _all_attend(tables: MaskTables, q0: int, q1: int, k0: int, k1: int) -> bool:
    """Every layout query in [q0, q1) attends every layout key in [k0, k1)."""
    ok = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=tables.q_lo[0].device)
    for lo, hi, pos in zip(tables.q_lo, tables.q_hi, tables.kv_pos, strict=True):
        y = pos[k0:k1][None, :]
        ok &= (lo[q0:q1, None] <= y) & (y <= hi[q0:q1, None])
    return bool(ok.all())


def extended_block_maps(pattern: NAPattern, num_extra_q: int, num_extra_kv: int,
                        q_block: int, kv_block: int, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` block maps of one pattern with extra query rows / key columns."""
    tile = (1,) * pattern.ndim
    p0, f0 = block_maps(pattern, tile, tile, q_block, kv_block, device)
    if not num_extra_q and not num_extra_kv:
        return p0, f0
    n = pattern.num_tokens
    nq, nk = n + num_extra_q, n + num_extra_kv
    rows, cols = -(-nq // q_block), -(-nk // kv_block)
    some = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    full = torch.zeros_like(some)
    some[: p0.shape[0], : p0.shape[1]] = p0
    full[: p0.shape[0], : p0.shape[1]] = f0
    qs = torch.arange(rows, device=device) * q_block
    ks = torch.arange(cols, device=device) * kv_block
    q_complete, k_complete = qs + q_block <= nq, ks + kv_block <= nk
    q_extra = torch.clamp(qs + q_block, max=nq) > n  # block holds extra tokens
    k_extra = torch.clamp(ks + kv_block, max=nk) > n
    q_layout, k_layout = qs < n, ks < n
    some |= k_extra[None, :]  # every query (layout or extra) attends the extra keys
    some |= q_extra[:, None]
    # full: both blocks complete and the layout x layout sub-rectangle (if any) all attends
    complete = q_complete[:, None] & k_complete[None, :]
    no_layout_rect = ~q_layout[:, None] | ~k_layout[None, :]
    full |= complete & no_layout_rect
    tables = build_tables(pattern, tile, tile, device, packed=False)
    straddle = complete & ~no_layout_rect & (q_extra[:, None] | k_extra[None, :])
    straddle[: p0.shape[0], : p0.shape[1]] &= p0 | f0
    for i, j in straddle.nonzero().tolist():
        q0, k0 = i * q_block, j * kv_block
        if _all_attend(tables, q0, min(q0 + q_block, n), k0, min(k0 + kv_block, n)):
            full[i, j] = True
    return some & ~full, full


def patterns_block_mask(patterns: tuple[NAPattern, ...], num_extra_q: int, num_extra_kv: int,
                        q_block: int, kv_block: int, device: torch.device) -> BlockMask:
    """BlockMask of validated (per-head) patterns with extra tokens."""
    tables = build_extended_tables(patterns, num_extra_q, num_extra_kv, device)
    maps: dict[NAPattern, tuple[torch.Tensor, torch.Tensor]] = {}
    for p in patterns:
        if p not in maps:
            maps[p] = extended_block_maps(p, num_extra_q, num_extra_kv, q_block, kv_block, device)
    partial = torch.stack([maps[p][0] for p in patterns])
    full = torch.stack([maps[p][1] for p in patterns])
    return assemble_block_mask(partial, full, (tables.q_len, tables.kv_len), (q_block, kv_block),
                               tables.mask_mod())


def extended_na_mask_mod(shape, kernel_size, stride=1, dilation=1, is_causal=False, *,
                         num_heads: int | None = None, num_extra_q: int = 0, num_extra_kv: int = 0,
                         device: torch.device | str | None = None) -> MaskMod:
    """``mask_mod`` of row-major neighborhood attention with per-head patterns and extra tokens.

    Any of ``kernel_size``/``stride``/``dilation``/``is_causal`` may be a
    :class:`PerHead` (then ``h`` selects the pattern; ``num_heads`` defaults to
    its length). Extra keys are kv indices ``N .. N + num_extra_kv - 1`` (attended
    by every query); extra queries are q indices ``N .. N + num_extra_q - 1``
    (attending every key). ``N = prod(shape)``.
    """
    as_shape("shape", shape)
    patterns = head_patterns(shape, kernel_size, stride, dilation, is_causal, num_heads)
    tables = build_extended_tables(patterns, _check_extra("num_extra_q", num_extra_q),
                                   _check_extra("num_extra_kv", num_extra_kv), _resolve_device(device))
    return tables.mask_mod()


def extended_na_block_mask(shape, kernel_size, stride=1, dilation=1, is_causal=False, *,
                           num_heads: int | None = None, num_extra_q: int = 0, num_extra_kv: int = 0,
                           block_size: int | Sequence[int] | None = None,
                           device: torch.device | str | None = None) -> BlockMask:
    """Analytic BlockMask of :func:`extended_na_mask_mod` (same arguments; ``block_size``
    an int or ``(q, kv)`` pair, default 128). Per-head patterns give a BlockMask of
    shape ``[1, H, ...]``; otherwise ``[1, 1, ...]`` (broadcast over heads). Equals
    ``create_block_mask(mask_mod, None, H, N + num_extra_q, N + num_extra_kv)``.
    """
    as_shape("shape", shape)
    patterns = head_patterns(shape, kernel_size, stride, dilation, is_causal, num_heads)
    ones = (1,) * patterns[0].ndim
    q_block, kv_block = resolve_block_sizes(block_size, ones, ones)
    return patterns_block_mask(patterns, _check_extra("num_extra_q", num_extra_q),
                               _check_extra("num_extra_kv", num_extra_kv), q_block, kv_block,
                               _resolve_device(device))

