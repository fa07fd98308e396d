"""Context-parallel neighborhood attention: one layout sharded along an axis across ranks.

Each rank of a ``torch.distributed`` process group holds a slab of ``q``/``k``/``v``
(NATTEN layout ``[batch, *spatial, heads, dim]``): consecutive rows of one spatial
axis (the *shard axis*, by default axis 0, e.g. video time). Neighborhood attention
only reaches a bounded distance along that axis, so a rank needs the keys/values of its
own slab plus a *halo*: the rows just beyond its borders that its queries' windows
reach. The halo is derived exactly from :func:`flexna.geometry.axis_window_bounds`
(any kernel, stride, dilation; causal axes need no right halo), and is fetched from
whichever ranks own those rows (more than the adjacent one when shards are thinner
than the halo) with point-to-point sends, never an all-gather of the sequence.

The local call is one fused FlexAttention call: "my queries x (left halo + my keys +
right halo)" with an analytic BlockMask of the *global* pattern restricted to those two
sub-boxes (``q_region`` / ``kv_region`` of :func:`flexna.blockmask.pattern_block_mask`),
so the result equals single-process :func:`flexna.neighborhood_attention` on the
gathered tensors. The halo exchange is an autograd function: its backward sends the
halo rows' dK/dV back to their owners, who add them to their own, so training works
with FlexAttention's own backward for the attention part.

With ``overlap=True`` the exchange runs asynchronously while the *interior* queries
(whose windows stay inside the own slab) attend the own keys; the border queries then
attend the assembled keys. Softmax is per query, so the union of these calls is exact.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import BlockMask

from flexna.backends import BACKENDS, Backend, backend_options, check_backend
from flexna.blockmask import spec_block_mask
from flexna.flex import run_flex
from flexna.functional import (
    SUPPORTED_DTYPES,
    Tiles,
    as_constant,
    check_finite_inputs,
    check_options,
    check_tensors,
    choose_backend,
    resolve_tiles,
)
from flexna.geometry import Region, axis_window_bounds
from flexna.layout import TokenLayout
from flexna.pattern import MAX_AXES, MAX_TOKENS, BoolOrTuple, IntOrTuple, NAPattern, _is_int
from flexna.spec import MaskSpec

# [start, stop) along the shard axis, in global coordinates
Rows = tuple[int, int]
# (peer rank in the group, start, stop): rows moved between this rank and ``peer``
Transfer = tuple[int, int, int]


def split_sizes(length: int, world_size: int) -> tuple[int, ...]:
    """Default shard sizes of an axis of ``length`` over ``world_size`` ranks.

    Like ``torch.tensor_split``: the first ``length % world_size`` ranks get one row more.
    """
    if not _is_int(length) or not _is_int(world_size) or world_size < 1 or length < world_size:
        raise ValueError(f"cannot split length {length!r} over {world_size!r} ranks: need "
                         "1 <= world_size <= length (every shard needs at least one row)")
    base, extra = divmod(length, world_size)
    return tuple(base + (r < extra) for r in range(world_size))


def shard(x: torch.Tensor, rank: int, world_size: int, axis: int = 0,
          shard_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Rank ``rank``'s slab of a global ``[batch, *spatial, ...]`` tensor along spatial ``axis``
    (default split: :func:`split_sizes`). A view; ``.contiguous()`` it if you keep it."""
    length = x.shape[1 + axis]
    sizes = split_sizes(length, world_size) if shard_sizes is None else tuple(shard_sizes)
    start = sum(sizes[:rank])
    return x.narrow(1 + axis, start, sizes[rank])


@dataclass(frozen=True)
class HaloPlan:
    """Which rows of the shard axis one rank needs, sends and receives.

    Derived from the global pattern and the shard sizes only, so every rank computes
    every other rank's plan identically and the sends match the receives.
    """

    rank: int
    offsets: tuple[int, ...]  # rank r owns rows [offsets[r], offsets[r + 1])
    keys: Rows  # key rows this rank's queries need, own slab included (own + halos)
    recv: tuple[Transfer, ...]  # halo pieces received, in row order (left of own, then right)
    send: tuple[Transfer, ...]  # pieces of the own slab other ranks need
    interior: Rows  # query rows whose keys all lie in the own slab (start == stop: none)
    left_border: Rows  # query rows before the interior, and the key rows they need
    left_border_keys: Rows
    right_border: Rows  # query rows after the interior, and the key rows they need
    right_border_keys: Rows

    @property
    def own(self) -> Rows:
        return self.offsets[self.rank], self.offsets[self.rank + 1]

    def halo_rows(self) -> tuple[int, int]:
        """(left, right) halo widths in rows."""
        return self.own[0] - self.keys[0], self.keys[1] - self.own[1]


def halo_plan(pattern: NAPattern, axis: int, shard_sizes: Sequence[int], rank: int) -> HaloPlan:
    """The :class:`HaloPlan` of ``rank`` for ``pattern`` sharded by ``shard_sizes`` on ``axis``."""
    return _halo_plan(pattern, axis, tuple(shard_sizes), rank)


@functools.lru_cache(maxsize=256)
def _halo_plan(pattern: NAPattern, axis: int, sizes: tuple[int, ...], rank: int) -> HaloPlan:
    lo, hi = axis_window_bounds(pattern.shape[axis], pattern.kernel_size[axis], pattern.stride[axis],
                                pattern.dilation[axis], pattern.is_causal[axis])
    lo_l, hi_l = lo.tolist(), hi.tolist()
    offsets = (0, *itertools.accumulate(sizes))

    def key_rows(start: int, stop: int, keep_own: bool) -> Rows:
        """Smallest row range holding every key of queries [start, stop) (and those rows)."""
        if start == stop:
            return start, start
        first, last = min(lo_l[start:stop]), max(hi_l[start:stop]) + 1
        return (min(first, start), max(last, stop)) if keep_own else (first, last)

    needs = [key_rows(offsets[r], offsets[r + 1], True) for r in range(len(sizes))]
    a, b = offsets[rank], offsets[rank + 1]
    ka, kb = needs[rank]
    recv = tuple((j, max(ka, offsets[j]), min(kb, offsets[j + 1])) for j in range(len(sizes))
                 if j != rank and max(ka, offsets[j]) < min(kb, offsets[j + 1]))
    send = tuple((j, max(needs[j][0], a), min(needs[j][1], b)) for j in range(len(sizes))
                 if j != rank and max(needs[j][0], a) < min(needs[j][1], b))
    # interior: the longest run of queries whose keys lie inside [a, b)
    best, run_start = (a, a), a
    for x in range(a, b + 1):
        if x == b or not (lo_l[x] >= a and hi_l[x] < b):
            if x - run_start > best[1] - best[0]:
                best = (run_start, x)
            run_start = x + 1
    (ia, ib) = best if best[1] > best[0] else (a, a)
    return HaloPlan(rank=rank, offsets=offsets, keys=(ka, kb), recv=recv, send=send,
                    interior=(ia, ib), left_border=(a, ia), left_border_keys=key_rows(a, ia, False),
                    right_border=(ib, b), right_border_keys=key_rows(ib, b, False))


# --------------------------------------------------------------------------- communication


def _peer(group: dist.ProcessGroup | None, rank_in_group: int) -> int:
    """Global rank of ``rank_in_group`` (P2POp takes global ranks)."""
    return rank_in_group if group is None else dist.get_global_rank(group, rank_in_group)


def _pack(tensors: Sequence[torch.Tensor], dim: int, start: int, length: int) -> torch.Tensor:
    """Rows [start, start + length) of each tensor along ``dim``, flattened into one buffer."""
    return torch.cat([t.narrow(dim, start, length).reshape(-1) for t in tensors])


def _unpack(buf: torch.Tensor, like: Sequence[torch.Tensor], dim: int, length: int) -> list[torch.Tensor]:
    """Inverse of :func:`_pack`: tensors shaped like ``like`` with ``length`` rows on ``dim``."""
    shapes = [(*t.shape[:dim], length, *t.shape[dim + 1:]) for t in like]
    pieces = buf.split([math.prod(s) for s in shapes])
    return [p.view(s) for p, s in zip(pieces, shapes, strict=True)]


def _packed_numel(like: Sequence[torch.Tensor], dim: int, length: int) -> int:
    return sum(t.numel() // t.shape[dim] * length for t in like)


def _start_p2p(outgoing: list[tuple[int, torch.Tensor]], incoming: list[tuple[int, torch.Tensor]],
               group: dist.ProcessGroup | None) -> list[Any]:
    """Post all sends and receives as one batch; returns the works to wait on."""
    ops = [dist.P2POp(dist.isend, buf, _peer(group, peer), group) for peer, buf in outgoing]
    ops += [dist.P2POp(dist.irecv, buf, _peer(group, peer), group) for peer, buf in incoming]
    return dist.batch_isend_irecv(ops) if ops else []


class PendingHalo:
    """A halo exchange in flight: the own rows others need are sent, the halo rows posted
    for receipt. :meth:`wait` returns the received pieces (one list of tensors per piece)."""

    def __init__(self, plan: HaloPlan, tensors: Sequence[torch.Tensor], dim: int,
                 group: dist.ProcessGroup | None) -> None:
        self.plan, self.dim, self.group = plan, dim, group
        own0 = plan.own[0]
        like = [t.detach() for t in tensors]
        self._like = like
        self._send = [(peer, _pack(like, dim, start - own0, stop - start))
                      for peer, start, stop in plan.send]
        self._recv = [(peer, torch.empty(_packed_numel(like, dim, stop - start), dtype=like[0].dtype,
                                         device=like[0].device))
                      for peer, start, stop in plan.recv]
        self._works = _start_p2p(self._send, self._recv, group)

    def wait(self) -> list[list[torch.Tensor]]:
        for work in self._works:
            work.wait()
        self._works = []
        self._send = []  # the sends are done: release their buffers
        return [_unpack(buf, self._like, self.dim, stop - start)
                for (_, buf), (_, start, stop) in zip(self._recv, self.plan.recv, strict=True)]


class _HaloAssemble(torch.autograd.Function):
    """``[left halo, own, right halo]`` along the shard axis for each tensor (k, v).

    Forward waits for a :class:`PendingHalo` started on the same tensors. Backward sends
    each halo piece's gradient back to the rank that owns those rows and adds the
    gradients it receives for its own rows (one row may be in several ranks' halos).
    """

    @staticmethod
    def forward(ctx: Any, pending: PendingHalo, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plan, dim = pending.plan, pending.dim
        ctx.plan, ctx.dim, ctx.group = plan, dim, pending.group
        received = pending.wait()
        rank = plan.rank
        left = [p for (peer, _, _), p in zip(plan.recv, received, strict=True) if peer < rank]
        right = [p for (peer, _, _), p in zip(plan.recv, received, strict=True) if peer > rank]
        return tuple(torch.cat([*(p[i] for p in left), t, *(p[i] for p in right)], dim)
                     for i, t in enumerate(tensors))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        plan, dim = ctx.plan, ctx.dim
        k0, (own0, own1) = plan.keys[0], plan.own
        grads = tuple(g.contiguous() for g in grads)
        outgoing = [(peer, _pack(grads, dim, start - k0, stop - start)) for peer, start, stop in plan.recv]
        incoming = [(peer, torch.empty(_packed_numel(grads, dim, stop - start), dtype=grads[0].dtype,
                                       device=grads[0].device)) for peer, start, stop in plan.send]
        works = _start_p2p(outgoing, incoming, ctx.group)
        own = [g.narrow(dim, own0 - k0, own1 - own0).clone(memory_format=torch.contiguous_format)
               for g in grads]
        for work in works:
            work.wait()
        for (_, buf), (_, start, stop) in zip(incoming, plan.send, strict=True):
            for acc, piece in zip(own, _unpack(buf, grads, dim, stop - start), strict=True):
                acc.narrow(dim, start - own0, stop - start).add_(piece)
        return (None, *own)


# --------------------------------------------------------------------------- local attention


def _rows_region(shape: tuple[int, ...], axis: int, rows: Rows) -> Region:
    return tuple(rows if a == axis else (0, length) for a, length in enumerate(shape))


def region_block_mask(pattern: NAPattern, q_region: Region, kv_region: Region,
                      q_tile: tuple[int, ...], kv_tile: tuple[int, ...], device: torch.device,
                      block_size: tuple[int, int] | None = None) -> BlockMask:
    """Analytic BlockMask of ``pattern`` for queries of ``q_region`` x keys of ``kv_region``
    (each in its own, optionally tiled, order), from flexna's cache."""
    return spec_block_mask(_region_spec(pattern, q_region, kv_region, q_tile, kv_tile, block_size), device)


def _region_spec(pattern: NAPattern, q_region: Region, kv_region: Region, q_tile: tuple[int, ...],
                 kv_tile: tuple[int, ...], block_size: tuple[int, int] | None) -> MaskSpec:
    return MaskSpec.create(pattern, q_tile=q_tile, kv_tile=kv_tile, q_region=q_region, kv_region=kv_region,
                           block_size=block_size)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: NAPattern, axis: int,
            q_rows: Rows, kv_rows: Rows, tiles: tuple[tuple[int, ...], tuple[int, ...]] | None,
            scale: float | None, backend: str = "auto") -> torch.Tensor:
    """One fused Flex call: queries of rows ``q_rows`` (tensor ``q``) x keys of ``kv_rows``,
    each box in its own token order (row-major, or tiled by ``tiles = (q_tile, kv_tile)``)."""
    n = pattern.ndim
    q_tile, kv_tile = ((1,) * n, (1,) * n) if tiles is None else tiles
    q_layout = TokenLayout(tuple(q.shape[1:1 + n]), q_tile)
    kv_layout = TokenLayout(tuple(k.shape[1:1 + n]), kv_tile)
    q_region = _rows_region(pattern.shape, axis, q_rows)
    kv_region = _rows_region(pattern.shape, axis, kv_rows)
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    spec, chosen = choose_backend(
        lambda block, _chosen: _region_spec(pattern, q_region, kv_region, q_tile, kv_tile, block),
        backend, q.device, grads, q.shape[0], q.shape[-2])
    mask = spec_block_mask(spec, q.device)
    kwargs: dict[str, Any] = {"enable_gqa": True} if k.shape[-2] != q.shape[-2] else {}
    if options := backend_options(chosen, q.device, (spec.q_block, spec.kv_block)):
        kwargs["kernel_options"] = options
    out = run_flex(q_layout.heads_first(q), kv_layout.heads_first(k), kv_layout.heads_first(v), mask,
                   scale, False, **kwargs)
    return q_layout.from_heads_first(out)


# --------------------------------------------------------------------------- public API


def _check_axis(axis: object, spatial: int, shape: tuple[int, ...]) -> int:
    if not _is_int(axis) or not -spatial <= int(axis) < spatial:  # type: ignore[call-overload]
        raise ValueError(f"axis = {axis!r} is out of range: need an int with -{spatial} <= axis < "
                         f"{spatial} (a spatial axis of query {shape})")
    return int(axis) % spatial  # type: ignore[call-overload]


def _group_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: the default torch.distributed process group is not initialised; "
                         "call torch.distributed.init_process_group first (e.g. launch with torchrun)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of "
                         "the given process group")
    return rank, dist.get_world_size(group)


def _check_sizes(shard_sizes: object, world: int, rank: int, local: int, axis: int) -> tuple[int, ...]:
    if isinstance(shard_sizes, (str, bytes)) or not isinstance(shard_sizes, Sequence):
        raise ValueError(f"shard_sizes must be a sequence of {world} ints (one per rank), got "
                         f"{shard_sizes!r}")
    if len(shard_sizes) != world or not all(_is_int(s) for s in shard_sizes):
        raise ValueError(f"shard_sizes must have one int per rank of the group ({world}), got "
                         f"{tuple(shard_sizes)!r}")
    sizes = tuple(int(s) for s in shard_sizes)
    for r, s in enumerate(sizes):
        if s < 1:
            raise ValueError(f"shard_sizes[rank {r}] = {s} is out of range: every rank needs a shard "
                             f"of at least 1 row along axis {axis} (use fewer ranks)")
    if sizes[rank] != local:
        raise ValueError(f"shard_sizes[rank {rank}] = {sizes[rank]} does not match this rank's "
                         f"query, which has {local} rows along axis {axis}")
    return sizes


# ------------------------------------------------------------ the ranks agree on the call

# what the ranks compare before any halo moves (one small all-gather per call)
FINGERPRINT_FIELDS = ("kernel_size", "stride", "dilation", "is_causal", "dtype", "axis", "shard_sizes",
                      "tiles", "overlap", "scale", "backend")
_SHOWN = MAX_AXES  # values of a field shown in messages (longer ones are compared by hash only)
_MESSAGE_BYTES = 240  # a rank's own error message, passed to its peers
_SHAPE_SLOTS = MAX_AXES + 3


@dataclass(frozen=True)
class _LocalCall:
    """One rank's validated arguments: what it can know before talking to its peers."""

    axis: int
    sizes: tuple[int, ...] | None  # None: gather the shard sizes
    fields: dict[str, tuple]  # FINGERPRINT_FIELDS -> a tuple of ints, or of other hashable values
    pattern: NAPattern | None  # the global pattern when the shard sizes are known
    order: tuple[tuple[int, ...], tuple[int, ...]] | None


def _stable_hash(value: object) -> int:
    """A hash equal on every process (``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:7], "little")


def _check_local(query: Any, key: Any, value: Any, kernel_size: object, stride: object, dilation: object,
                 is_causal: object, scale: object, axis: object, overlap: object, backend: object = "auto"
                 ) -> tuple[int, dict[str, tuple]]:
    """Everything a rank can check without a process group: tensors, axis, options, the pattern
    arguments (against a provisional shard-axis length). Returns the axis and the fingerprint."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    spatial = query.dim() - 3
    if not 1 <= spatial <= MAX_AXES:
        raise ValueError(f"query must be shaped [batch, *spatial, heads, head_dim] with 1 to {MAX_AXES} "
                         f"spatial axes, got {query.dim()} dims: {tuple(query.shape)}")
    ax = _check_axis(axis, spatial, tuple(query.shape))
    if query.shape[1 + ax] == 0:
        raise ValueError(f"query has a shard of size 0 along axis {ax}: every rank needs at least "
                         "1 row (use fewer ranks)")
    check_tensors(query, key, value, None)
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap must be a bool, got {overlap!r}")
    check_options(scale)
    shape = list(query.shape[1:1 + spatial])
    others = math.prod(shape) // shape[ax]
    shape[ax] = max(shape[ax], MAX_TOKENS // others)  # the global length is not known yet
    p = NAPattern.create(tuple(shape), kernel_size, stride, dilation, is_causal)  # type: ignore[arg-type]
    fields = {"kernel_size": p.kernel_size, "stride": p.stride, "dilation": p.dilation,
              "is_causal": tuple(int(c) for c in p.is_causal), "dtype": (SUPPORTED_DTYPES.index(query.dtype),),
              "axis": (ax,), "overlap": (int(overlap),),
              "scale": (repr(None if scale is None else float(scale)),),  # type: ignore[arg-type]
              "backend": (BACKENDS.index(check_backend(backend)),)}
    return ax, fields


def _plan_local(query: torch.Tensor, kernel_size: object, stride: object, dilation: object, is_causal: object,
                axis: int, shard_sizes: object, tiles: Tiles, rank: int, world: int,
                fields: dict[str, tuple]) -> _LocalCall:
    """The checks that need this rank's place in the group (shard sizes; with them the global
    pattern and tiles)."""
    fields = {**fields, "tiles": (repr(as_constant(tiles)),)}
    if shard_sizes is None:
        return _LocalCall(axis, None, {**fields, "shard_sizes": (-1,)}, None, None)
    sizes = _check_sizes(shard_sizes, world, rank, query.shape[1 + axis], axis)
    pattern = _global_pattern(query, axis, sizes, kernel_size, stride, dilation, is_causal)
    order = resolve_tiles(tiles, (pattern,), False, padding=False)  # tiles dividing the layout
    return _LocalCall(axis, sizes, {**fields, "shard_sizes": sizes}, pattern, order)


def _global_pattern(query: torch.Tensor, axis: int, sizes: tuple[int, ...], kernel_size: object,
                    stride: object, dilation: object, is_causal: object) -> NAPattern:
    """The pattern over the gathered layout (the local one, the shard axis ``sum(sizes)`` long)."""
    shape = list(query.shape[1:query.dim() - 2])
    shape[axis] = sum(sizes)
    return NAPattern.create(tuple(shape), kernel_size, stride, dilation, is_causal)  # type: ignore[arg-type]


def _validate(query: Any, key: Any, value: Any, kernel_size: object, stride: object, dilation: object,
              is_causal: object, scale: object, group: dist.ProcessGroup | None, axis: object,
              shard_sizes: object, overlap: object, tiles: Tiles, check_finite: object = False,
              backend: object = "auto") -> tuple[_LocalCall | None, BaseException | None]:
    """This rank's own checks, before any collective: its call, or the error it will raise (after
    telling its peers, so that they raise too rather than wait in the halo exchange)."""
    try:
        ax, fields = _check_local(query, key, value, kernel_size, stride, dilation, is_causal, scale, axis,
                                  overlap, backend)
        check_finite_inputs(check_finite, (("query", query), ("key", key), ("value", value)))
    except (ValueError, TypeError) as exc:
        try:
            _group_rank(group)
        except ValueError:
            raise exc from None  # no process group: nobody to tell
        return None, exc
    rank, world = _group_rank(group)
    try:
        return _plan_local(query, kernel_size, stride, dilation, is_causal, ax, shard_sizes, tiles, rank,
                           world, fields), None
    except (ValueError, TypeError) as exc:
        return None, exc


def _encode(error: BaseException | None, tensors: Sequence[object], fields: dict[str, tuple]) -> list[int]:
    """This rank's fingerprint as ints: error flag and message, q/k/v shapes, then per field a hash,
    a length and up to ``_SHOWN`` values (for messages)."""
    text = b"" if error is None else str(error).encode()[:_MESSAGE_BYTES]
    out = [int(error is not None), len(text), *text, *[0] * (_MESSAGE_BYTES - len(text))]
    for t in tensors:
        shape = list(t.shape) if isinstance(t, torch.Tensor) and t.dim() <= _SHAPE_SLOTS else []
        out += [len(shape), *shape, *[0] * (_SHAPE_SLOTS - len(shape))]
    for name in FINGERPRINT_FIELDS:
        value = fields.get(name, ())
        shown = list(value) if len(value) <= _SHOWN and all(_is_int(v) for v in value) else []
        out += [_stable_hash(value), len(shown), *shown, *[0] * (_SHOWN - len(shown))]
    return out


def _exchange(mine: list[int], group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """All-gather every rank's fingerprint: ``[world, len]`` int64 on the CPU."""
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor(mine, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(gathered, t, group=group)
    return torch.stack(gathered).cpu()


def _decode_shapes(row: list[int]) -> list[tuple[int, ...]]:
    """The q/k/v shapes of a fingerprint row."""
    at, shapes = 2 + _MESSAGE_BYTES, []
    for _ in range(3):
        n = row[at]
        shapes.append(tuple(row[at + 1:at + 1 + n]))
        at += 1 + _SHAPE_SLOTS
    return shapes


def _field(row: list[int], index: int) -> tuple[int, str]:
    """(hash, value as shown in messages, or "") of field ``index`` of a fingerprint row."""
    at = 2 + _MESSAGE_BYTES + 3 * (1 + _SHAPE_SLOTS) + index * (2 + _SHOWN)
    values = tuple(row[at + 2:at + 2 + row[at + 1]])
    name = FINGERPRINT_FIELDS[index]
    if not values:
        return row[at], ""
    if name == "dtype":
        return row[at], str(SUPPORTED_DTYPES[values[0]])
    if name == "is_causal":
        return row[at], str(tuple(bool(v) for v in values))
    if name == "overlap":
        return row[at], str(bool(values[0]))
    return row[at], str(values[0] if name == "axis" else values)


def _agree(rows: torch.Tensor, axis: int, error: BaseException | None) -> tuple[int, ...]:
    """Raise on every rank if a rank rejected its arguments or the ranks' calls differ (the same
    ValueError everywhere, but a rank's own error on that rank); returns the shard sizes."""
    table = rows.tolist()
    for r, row in enumerate(table):
        if row[0]:
            if error is not None:
                raise error
            text = bytes(row[2:2 + row[1]]).decode(errors="replace")
            raise ValueError(f"sharded_neighborhood_attention: rank {r} rejected its arguments ({text}); "
                             "every rank raises")
    for i, name in enumerate(FINGERPRINT_FIELDS):
        for r, row in enumerate(table[1:], 1):
            (h0, v0), (h, v) = _field(table[0], i), _field(row, i)
            if h != h0:
                shown = f": {v} on rank {r}, {v0} on rank 0" if v and v0 else f" between rank 0 and rank {r}"
                raise ValueError(f"sharded_neighborhood_attention: {name} differs across ranks{shown}; every "
                                 "rank must pass the same arguments (only its own slab of q/k/v differs)")
    shapes = [_decode_shapes(row) for row in table]
    dim = 1 + axis
    for r, s in enumerate(shapes):
        if any(a[:dim] + a[dim + 1:] != b[:dim] + b[dim + 1:] for a, b in zip(s, shapes[0], strict=True)) \
                or any(t[dim] != s[0][dim] for t in s):
            raise ValueError(f"query/key/value shapes differ across ranks beyond the shard axis: rank 0 "
                             f"has {shapes[0]}, rank {r} {s} (q, k, v shapes: batch, heads, head dims and "
                             "the other axes must match)")
    return tuple(s[0][dim] for s in shapes)


def sharded_neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: float | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    axis: int = 0,
    shard_sizes: Sequence[int] | None = None,
    overlap: bool = False,
    tiles: Tiles = "auto",
    backend: Backend = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """Neighborhood attention over a layout sharded along spatial ``axis`` across ``group``.

    ``query``/``key``/``value``: this rank's slab ``[batch, *local_spatial, heads, dim]``
    (key/value may have fewer heads: GQA). Rank ``r`` of the group holds rows
    ``[sum(shard_sizes[:r]), sum(shard_sizes[:r + 1]))`` of the global layout along
    ``axis``; the global layout is the local one with that axis' length replaced by
    ``sum(shard_sizes)``. Pattern parameters refer to the global layout.
    ``shard_sizes``: the row count of every rank; ``None`` takes them from the shapes in the
    fingerprint all-gather below. ``overlap``: exchange the halo while the
    interior queries are computed. ``tiles``: the token order of the local calls, as in
    :func:`flexna.neighborhood_attention` (``"auto"``: the tiles flexna picks for the global
    pattern, or row-major; ``None``: row-major; a tile or a ``(q_tile, kv_tile)`` pair of
    128-token tiles), applied to each local box (query slab, key slab plus halo).
    ``backend``: the CUDA kernels of the local calls, as in :func:`flexna.neighborhood_attention`.
    ``check_finite=True``: a rank whose q/k/v hold a NaN or an infinity rejects its arguments
    (every rank raises, below; a host sync, off by default).

    Returns this rank's output slab ``[batch, *local_spatial, heads, value_dim]``, equal to
    the matching rows of ``flexna.neighborhood_attention`` on the gathered tensors, with
    gradients flowing back to every rank's q/k/v. Every rank must call it with the same
    arguments (except its own tensors). Each rank validates its own arguments before any
    communication; then one small all-gather (every call) compares a fingerprint of the call
    (kernel_size, stride, dilation, is_causal, dtype, axis, shard_sizes, tiles, overlap, scale,
    and the q/k/v shapes: batch, heads, head dims, the other axes) and, when ``shard_sizes`` is
    ``None``, gives the shard sizes. If a rank's arguments are invalid or the ranks' calls
    differ, every rank raises a ``ValueError`` (the invalid rank its own error, naming the
    argument; its peers one naming that rank), before any halo moves.
    """
    call, error = _validate(query, key, value, kernel_size, stride, dilation, is_causal, scale, group, axis,
                            shard_sizes, overlap, tiles, check_finite, backend)
    rank, world = _group_rank(group)
    mine = _encode(error, (query, key, value), {} if call is None else call.fields)
    fingerprints = _exchange(mine, group, world)
    sizes = _agree(fingerprints, 0 if call is None else call.axis, error)
    assert call is not None  # _agree raised otherwise
    axis, dim = call.axis, 1 + call.axis
    pattern = call.pattern or _global_pattern(query, axis, sizes, kernel_size, stride, dilation, is_causal)
    order = call.order or resolve_tiles(tiles, (pattern,), False, padding=False)
    plan = halo_plan(pattern, axis, sizes, rank)

    own = plan.own
    pending = PendingHalo(plan, (key, value), dim, group)
    attend = functools.partial(_attend, pattern=pattern, axis=axis, tiles=order, scale=scale,
                               backend=backend)
    # one call without overlap, or when there is nothing to overlap: no interior, or no border.
    # (The assembled keys must feed the graph on every rank: their backward is a collective.)
    if not overlap or plan.interior[0] == plan.interior[1] or plan.interior == own:
        k_ext, v_ext = _HaloAssemble.apply(pending, key, value)
        return attend(query, k_ext, v_ext, q_rows=own, kv_rows=plan.keys)

    # interior queries against the own keys while the halo is in flight
    ia, ib = plan.interior
    inner = attend(query.narrow(dim, ia - own[0], ib - ia), key, value, q_rows=(ia, ib), kv_rows=own)
    k_ext, v_ext = _HaloAssemble.apply(pending, key, value)
    parts: list[torch.Tensor | None] = []
    for rows, keys in ((plan.left_border, plan.left_border_keys), (plan.right_border, plan.right_border_keys)):
        if rows[0] == rows[1]:
            parts.append(None)
            continue
        q_part = query.narrow(dim, rows[0] - own[0], rows[1] - rows[0])
        k_part, v_part = (t.narrow(dim, keys[0] - plan.keys[0], keys[1] - keys[0]) for t in (k_ext, v_ext))
        parts.append(attend(q_part, k_part, v_part, q_rows=rows, kv_rows=keys))
    return torch.cat([p for p in (parts[0], inner, parts[1]) if p is not None], dim)


def halo_bytes(pattern: NAPattern, axis: int, shard_sizes: Sequence[int], batch: int, kv_heads: int,
               head_dim: int, value_dim: int | None = None, element_size: int = 2) -> list[int]:
    """Bytes of K and V each rank receives per forward call (the same amount of dK/dV goes
    back in the backward), e.g. to compare with ring attention's ``(P - 1) / P`` of all K, V."""
    value_dim = head_dim if value_dim is None else value_dim
    row = math.prod(pattern.shape) // pattern.shape[axis] * batch * kv_heads * (head_dim + value_dim)
    return [sum(stop - start for _, start, stop in halo_plan(pattern, axis, shard_sizes, r).recv)
            * row * element_size for r in range(len(shard_sizes))]
