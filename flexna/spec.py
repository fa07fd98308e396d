"""``MaskSpec``: everything a neighborhood mask depends on, validated once, hashable.

A spec is the only input of every later stage (tables and mask_mod, block maps, score_mods,
the BlockMask and its cache key). It holds

* the **pattern** of each sample: one :class:`~flexna.pattern.NAPattern` for all heads, or
  one per query head (:class:`~flexna.pattern.PerHead`);
* **packed samples** (variable resolution): several layouts one after another in one
  sequence, each padded to a whole number of blocks, attending only within themselves;
* the **token orders** of queries and keys (row-major, tiled by ``q_tile``/``kv_tile``, or
  along a space-filling curve, ``q_curve``/``kv_curve``: ``"hilbert"`` or ``"morton"``);
* the **regions** of the layout the queries and keys come from (one shard against its keys
  plus halo), each in its own order;
* **extra tokens**: ``num_extra_kv`` keys every query attends and ``num_extra_q`` queries
  attending every real key, appended after the layout's (padded) tokens;
* the **block sizes** of the BlockMask.

The sequence a spec describes, on each side: the samples' tokens in their orders (a sample
padded to a multiple of the block when packed), then the extra tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from flexna.geometry import Region, region_shape
from flexna.layout import CurveOrder, TokenLayout, as_curve, as_region, as_tile
from flexna.pattern import MAX_TOKENS, NAPattern, as_int_tuple

# Tokens per BlockMask block when a side is row-major (FlexAttention's default block).
DEFAULT_BLOCK = 128

# Largest BlockMask (estimated bytes, MaskSpec.estimated_bytes) flexna builds unless told otherwise.
DEFAULT_MASK_LIMIT = 8 * 2**30
_MASK_LIMIT: dict[str, int | None] = {"bytes": DEFAULT_MASK_LIMIT}


def set_mask_limit(max_bytes: int | None) -> int | None:
    """Set the largest BlockMask flexna builds, in bytes (default 8 GiB; ``None``: no limit);
    returns the previous limit (to restore it). A call whose mask would exceed it raises
    ``ValueError`` before anything is built or compiled. The estimate
    (:meth:`MaskSpec.estimated_bytes`) counts the BlockMask's index tensors and mask tables,
    about ``16 x heads x query blocks x key blocks`` bytes (``heads``: 1, or the query heads
    with per-head patterns; packed samples add up), a little above what is allocated."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes < 0):
        raise ValueError(f"max_bytes must be an int >= 0 or None (no limit), got {max_bytes!r}")
    previous = _MASK_LIMIT["bytes"]
    _MASK_LIMIT["bytes"] = max_bytes
    return previous


def mask_limit() -> int | None:
    """The largest BlockMask flexna builds, in bytes (``None``: no limit); see :func:`set_mask_limit`."""
    return _MASK_LIMIT["bytes"]


def check_mask_limit(spec: MaskSpec) -> None:
    """``ValueError`` if ``spec``'s BlockMask would exceed :func:`mask_limit` (before building it)."""
    limit, need = _MASK_LIMIT["bytes"], spec.estimated_bytes()
    if limit is None or need <= limit:
        return
    if spec.pad_samples:
        what = f"shapes: {len(spec.samples)} packed samples, {spec.q_len} tokens"
    else:
        what = f"layout {spec.samples[0][0].shape}, {spec.q_len} x {spec.kv_len} tokens"
    raise ValueError(
        f"the BlockMask would take about {need / 2**30:.3g} GiB ({need} bytes estimated: {what}, "
        f"{spec.heads} pattern(s) x {spec.num_q_blocks} x {spec.num_kv_blocks} blocks), more than the "
        f"mask limit of {limit} bytes ({limit / 2**30:.3g} GiB); allowed: at most the limit. Use a "
        "smaller layout, fewer packed samples or per-head patterns, or raise the limit with "
        "flexna.set_mask_limit(max_bytes) (None: no limit)")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` is torch's default device."""
    return torch.empty(0).device if device is None else torch.device(device)


@dataclass(frozen=True)
class TensorMeta:
    """What validation needs of a tensor argument (its shape, dtype, device, grad flag), so that
    arguments can be checked from a call's constant signature (:mod:`flexna.plan`)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool = False

    @classmethod
    def of(cls, name: str, signature: tuple | None) -> TensorMeta | None:
        """From :func:`flexna.plan.tensor_signature`; ``TypeError`` naming ``name`` if it was not
        a tensor."""
        if signature is None:
            return None
        if signature[0] == "not a tensor":
            raise TypeError(f"{name} must be a torch.Tensor, got {signature[1]}")
        shape, dtype, device, grad = signature
        return cls(torch.Size(shape), getattr(torch, dtype.removeprefix("torch.")), torch.device(device), grad)

    def dim(self) -> int:
        return len(self.shape)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def as_count(name: str, value: object) -> int:
    """A non-negative int (bools and other types rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def resolve_block_sizes(
    block_size: int | Sequence[int] | None,
    q_tile: tuple[int, ...],
    kv_tile: tuple[int, ...],
) -> tuple[int, int]:
    """(q, kv) block sizes in tokens; ``None`` means each side's tile token count, or 128."""
    defaults = [math.prod(t) if math.prod(t) > 1 else DEFAULT_BLOCK for t in (q_tile, kv_tile)]
    if block_size is None:
        return defaults[0], defaults[1]
    if isinstance(block_size, Sequence) and not isinstance(block_size, str) and len(block_size) != 2:
        raise ValueError(f"block_size must have 2 entries (q, kv) or be one int, got "
                         f"{len(block_size)} entries: {tuple(block_size)!r}")
    sizes = as_int_tuple("block_size", block_size, 2)
    for side, size, tile in zip(("q", "kv"), sizes, (q_tile, kv_tile), strict=True):
        per_tile = math.prod(tile)
        if size < 1 or size % per_tile:
            need = ("need >= 1" if per_tile == 1 else f"need a positive multiple of the {side} "
                    f"tile's token count {per_tile} (tile {tile})")
            raise ValueError(f"block_size for {side} = {size} is out of range: {need}")
    return sizes[0], sizes[1]


@dataclass(frozen=True)
class MaskSpec:
    """A validated, hashable description of one mask (see the module docstring).

    Build it with :meth:`create`; the fields are normalised (tuples of ints) so equal specs
    compare and hash equal.
    """

    samples: tuple[tuple[NAPattern, ...], ...]  # [sample][head]: 1 head entry = all heads
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    q_block: int
    kv_block: int
    q_region: Region | None = None
    kv_region: Region | None = None
    num_extra_q: int = 0
    num_extra_kv: int = 0
    pad_samples: bool = False  # each sample padded to whole blocks (packed sequences)
    q_curve: str | None = None  # a space-filling curve order instead of the tiled one
    kv_curve: str | None = None

    @classmethod
    def create(
        cls,
        patterns: NAPattern | Sequence[NAPattern],
        *,
        samples: Sequence[Sequence[NAPattern]] | None = None,
        q_tile: int | Sequence[int] | None = None,
        kv_tile: int | Sequence[int] | None = None,
        block_size: int | Sequence[int] | None = None,
        q_region: Sequence[Sequence[int]] | None = None,
        kv_region: Sequence[Sequence[int]] | None = None,
        num_extra_q: int = 0,
        num_extra_kv: int = 0,
        q_curve: str | None = None,
        kv_curve: str | None = None,
    ) -> MaskSpec:
        """Validate a spec: ``ValueError`` naming the argument, its value and the allowed range.

        ``patterns``: one pattern, or one per query head (all on one layout). ``samples``
        (instead of ``patterns``): packed sequences, each entry the patterns of one sample
        (same axis count and head count for all); each sample is padded to whole blocks and
        ``block_size`` must then be one size for both sides. ``q_curve`` / ``kv_curve``:
        ``"hilbert"`` or ``"morton"`` order on that side (2-3 axes; not with a tile, a region
        or packed samples).
        """
        packed = samples is not None
        if packed:
            groups = tuple(tuple(s) for s in samples)  # type: ignore[union-attr]
        else:
            groups = ((patterns,) if isinstance(patterns, NAPattern) else tuple(patterns),)
        if not groups or not all(groups):
            raise ValueError("a mask needs at least one sample with at least one pattern")
        for i, group in enumerate(groups):
            for p in group:
                if not isinstance(p, NAPattern):
                    raise TypeError(f"patterns must be flexna.NAPattern, got {type(p).__name__}")
            if len({p.shape for p in group}) != 1:
                raise ValueError(f"sample {i}: per-head patterns must share one layout, got "
                                 f"{sorted({p.shape for p in group})}")
        if len({len(g[0].shape) for g in groups}) != 1:
            raise ValueError(f"packed samples must all have the same number of axes, got "
                             f"{[g[0].shape for g in groups]}")
        if len({len(g) for g in groups}) != 1:
            raise ValueError("packed samples must all have the same number of head patterns")
        shape = groups[0][0].shape
        rules = [p for g in groups for p in g if not p.separable]
        if rules and len({p for g in groups for p in g}) > 1:
            raise ValueError("a non-separable rule needs one pattern for all heads and samples")
        if rules and (q_curve is not None or kv_curve is not None):
            raise ValueError(f"{rules[0].__class__.__name__} is not separable per axis: it runs in "
                             "row-major or tiled orders, not along a curve (q_curve/kv_curve)")
        if packed and (q_region is not None or kv_region is not None):
            raise ValueError("q_region/kv_region select part of one layout; they cannot be "
                             "combined with packed samples")
        if packed and (num_extra_q or num_extra_kv):
            raise ValueError("extra tokens (num_extra_q/num_extra_kv) cannot be combined with "
                             "packed samples: every sample would attend them")
        curves = (as_curve("q_curve", q_curve), as_curve("kv_curve", kv_curve))
        for side, curve, tile in (("q", curves[0], q_tile), ("kv", curves[1], kv_tile)):
            if curve is None:
                continue
            if len(shape) < 2:
                raise ValueError(f"{side}_curve = {curve!r} needs a layout of 2 or 3 axes, got {shape}")
            if tile is not None or packed or q_region is not None or kv_region is not None:
                raise ValueError(f"{side}_curve = {curve!r} orders the whole layout: it cannot be "
                                 f"combined with {side}_tile, regions or packed samples")
        q_reg = as_region("q_region", q_region, shape)
        kv_reg = as_region("kv_region", kv_region, shape)
        q_t = as_tile("q_tile", q_tile, region_shape(q_reg) if q_reg else shape)
        kv_t = as_tile("kv_tile", kv_tile, region_shape(kv_reg) if kv_reg else shape)
        q_block, kv_block = resolve_block_sizes(block_size, q_t, kv_t)
        if packed and q_block != kv_block:
            raise ValueError(f"block_size = {block_size!r}: packed samples are padded to whole "
                             "blocks, so queries and keys need one block size")
        spec = cls(groups, q_t, kv_t, q_block, kv_block, q_reg, kv_reg,
                   as_count("num_extra_q", num_extra_q), as_count("num_extra_kv", num_extra_kv),
                   packed, *curves)
        spec._check_lengths()
        return spec

    def _check_lengths(self) -> None:
        """``ValueError`` naming what makes a side's sequence longer than int32 indices allow."""
        for side, length, layout, name, extra in (
                ("query", self.q_len, self.q_layout_len, "num_extra_q (additional queries)", self.num_extra_q),
                ("key", self.kv_len, self.kv_layout_len, "num_extra_kv (additional keys)", self.num_extra_kv)):
            if length <= MAX_TOKENS:
                continue
            if extra and layout <= MAX_TOKENS:
                raise ValueError(f"{name} = {extra} is out of range: with the layout's {layout} tokens "
                                 f"(padding included) the {side} sequence would have {length}, more than "
                                 f"int32 indices allow; need {name.split()[0]} <= {MAX_TOKENS - layout}")
            what = (f"shapes: {len(self.samples)} packed samples padded to {self.q_block}-token blocks"
                    if self.pad_samples else f"layout {self.samples[0][0].shape} in its token order")
            plus = f", plus {extra} extra" if extra else ""
            raise ValueError(f"the {side} sequence has {length} tokens ({what}{plus}), more than int32 "
                             f"indices allow: need at most {MAX_TOKENS}")

    # ------------------------------------------------------------------ structure
    @property
    def ndim(self) -> int:
        return len(self.samples[0][0].shape)

    @property
    def heads(self) -> int:
        """Patterns per sample: 1 (shared by all heads) or the number of query heads."""
        return len(self.samples[0])

    @property
    def pattern(self) -> NAPattern:
        """The pattern of a single-sample, single-pattern spec."""
        if len(self.samples) != 1 or self.heads != 1:
            raise ValueError("this mask has several samples or per-head patterns")
        return self.samples[0][0]

    def q_order(self, sample: int = 0) -> TokenLayout | CurveOrder:
        """The query token order of ``sample`` (over its region when one is given)."""
        p = self.samples[sample][0]
        if self.q_curve is not None:
            return CurveOrder(p.shape, self.q_curve)
        return TokenLayout(region_shape(self.q_region) if self.q_region else p.shape, self.q_tile)

    def kv_order(self, sample: int = 0) -> TokenLayout | CurveOrder:
        p = self.samples[sample][0]
        if self.kv_curve is not None:
            return CurveOrder(p.shape, self.kv_curve)
        return TokenLayout(region_shape(self.kv_region) if self.kv_region else p.shape, self.kv_tile)

    def _segment(self, length: int, block: int) -> int:
        return -(-length // block) * block if self.pad_samples else length

    @cached_property
    def q_offsets(self) -> tuple[int, ...]:
        """Start of each sample's queries in the sequence, then the layout part's end."""
        return _running(self._segment(self.q_order(i).length, self.q_block) for i in range(len(self.samples)))

    @cached_property
    def kv_offsets(self) -> tuple[int, ...]:
        return _running(self._segment(self.kv_order(i).length, self.kv_block)
                        for i in range(len(self.samples)))

    @property
    def q_layout_len(self) -> int:
        """Queries before the extra ones (samples, their padding included)."""
        return self.q_offsets[-1]

    @property
    def kv_layout_len(self) -> int:
        return self.kv_offsets[-1]

    @property
    def q_len(self) -> int:
        return self.q_layout_len + self.num_extra_q

    @property
    def kv_len(self) -> int:
        return self.kv_layout_len + self.num_extra_kv

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.q_block)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.kv_block)

    def estimated_bytes(self) -> int:
        """Bytes a BlockMask of this spec holds (index tensors and mask tables), before building."""
        rows, cols = self.num_q_blocks, self.num_kv_blocks
        index = 4 * self.heads * 2 * (rows * cols + rows + cols * rows + cols)
        tables = 4 * self.heads * (2 * self.ndim + 2) * (self.q_len + self.kv_len)
        return index + tables


def _running(lengths: object) -> tuple[int, ...]:
    out = [0]
    for n in lengths:  # type: ignore[attr-defined]
        out.append(out[-1] + n)
    return tuple(out)
