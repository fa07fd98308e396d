"""Block-sparsity analysis of a pattern and the choice of tiles.

A fused Flex kernel visits every non-empty (query block, key block) pair:
full blocks at the price of a dense block, partial blocks at that price plus
the mask_mod's per-element cost. The cost model is therefore

    cost = (q_block * kv_block / 128**2) * (full + alpha * partial)

in units of one dense 128 x 128 block, with ``alpha`` the relative price of a
partial block, per kernel backend (:data:`PARTIAL_COST`). Dense attention costs
``(N / 128)**2`` such units, so ``predicted_speedup = dense / cost`` (over dense
Flex on the same backend). Each backend also has its own block sizes
(:func:`flexna.backends.block_sizes`: FLASH on Blackwell runs 256-token query
blocks), so the tile search ranks candidates for the backend a call will use.

For tiled orders with one tile per block the block counts factorise over
axes (:func:`flexna.blocksparsity.axis_tile_tables`), so a search over
thousands of tile pairs costs milliseconds.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from flexna.blocksparsity import axis_tile_tables, block_as_tile, spec_maps
from flexna.geometry import padded_shape
from flexna.layout import TokenLayout
from flexna.pattern import NAPattern, fmt_dims
from flexna.spec import DEFAULT_BLOCK, MaskSpec, resolve_block_sizes

# Relative price of a partial block (a full block's price plus the mask_mod's) per backend
# and axis count, fit to the same-run fp16 and bf16 kernels of the NA rows (partial blocks)
# against the GNA rows (all full) of benchmarks/results/flash-backend-NVIDIA-H200-2026-12-02.md:
# Triton 1.18-1.21 (2-D), 1.21-1.25 (3-D); FLASH 1.26-1.41 (2-D), 1.34-1.38 (3-D). 1-D rows are
# host-bound there, so 1-D takes the 2-D price.
PARTIAL_COST: dict[str, dict[int, float]] = {
    "triton": {1: 1.2, 2: 1.2, 3: 1.23},
    "flash": {1: 1.33, 2: 1.33, 3: 1.36},
}


def _check_cost_backend(backend: object) -> str:
    """``backend`` if the cost model prices it: one kernel backend (this pure stage does not
    import :mod:`flexna.backends`, which reaches FlexAttention)."""
    if not isinstance(backend, str) or backend not in PARTIAL_COST:
        raise ValueError(f"backend = {backend!r} is out of range: the cost model prices 'triton' or "
                         "'flash' (resolve 'auto' first with flexna.backends.resolve_backend)")
    return backend


def partial_cost(ndim: int, backend: str = "triton") -> float:
    """Relative price ``alpha`` of a partial block on ``backend`` (``"triton"`` or ``"flash"``)."""
    return PARTIAL_COST[_check_cost_backend(backend)][min(max(ndim, 1), 3)]


@dataclass(frozen=True)
class Analysis:
    """Block counts and predicted cost of one pattern in one (q order, kv order)."""

    pattern: NAPattern
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    q_block: int
    kv_block: int
    full_blocks: int
    partial_blocks: int
    total_blocks: int
    curve: str | None = None  # a space-filling curve order (both sides) instead of tiles
    backend: str = "triton"  # the kernel backend whose cost model prices the blocks

    @property
    def density(self) -> float:
        return self.pattern.density()

    @property
    def flop_limit(self) -> float:
        return self.pattern.flop_limit()

    @property
    def empty_blocks(self) -> int:
        return self.total_blocks - self.full_blocks - self.partial_blocks

    @property
    def cost(self) -> float:
        """Predicted kernel cost in dense 128 x 128 block units."""
        scale = self.q_block * self.kv_block / DEFAULT_BLOCK**2
        return scale * (self.full_blocks + partial_cost(self.pattern.ndim, self.backend) * self.partial_blocks)

    @property
    def predicted_speedup(self) -> float:
        """Predicted speed-up of the kernel over dense (unmasked) Flex attention on its backend."""
        dense = (self.pattern.num_tokens / DEFAULT_BLOCK) ** 2
        return dense / max(self.cost, 1e-9)

    def summary(self) -> str:
        tiles = ("row-major" if math.prod(self.q_tile) == 1 and math.prod(self.kv_tile) == 1
                 else f"q tile {fmt_dims(self.q_tile)}, kv tile {fmt_dims(self.kv_tile)}")
        if self.curve is not None:
            tiles = f"{self.curve} order"
        return (f"{tiles}, blocks {self.q_block}x{self.kv_block}: {self.full_blocks} full, "
                f"{self.partial_blocks} partial, {self.empty_blocks} empty; predicted "
                f"{self.predicted_speedup:.2f}x over dense Flex on {self.backend} (FLOP-wise limit "
                f"{self.flop_limit:.2f}x)")


def analyze(
    pattern: NAPattern,
    q_tile: int | Sequence[int] | None = None,
    kv_tile: int | Sequence[int] | None = None,
    block_size: int | Sequence[int] | None = None,
    curve: str | None = None,
    backend: str = "triton",
) -> Analysis:
    """Density, FLOP-wise limit, block counts and predicted speed-up of ``pattern``.

    ``curve``: ``"hilbert"`` or ``"morton"`` order on both sides instead of tiles (the same
    cost model; block counts from the per-token block maps). ``backend``: the kernel backend
    whose cost model prices the blocks (``"triton"`` or ``"flash"``); pass its block sizes as
    ``block_size`` where they differ (``flexna.backends.block_sizes("flash", device)`` on
    Blackwell).

    Example::

        a = flexna.analyze(NAPattern.create((256, 256), 80, 16), (8, 16), (8, 16), backend="flash")
        print(a.summary())  # 25600 full blocks, 0 partial; predicted speed-up over dense
    """
    _check_cost_backend(backend)
    spec = MaskSpec.create(pattern, q_tile=q_tile, kv_tile=kv_tile, block_size=block_size,
                           q_curve=curve, kv_curve=curve)
    if curve is not None:
        partial, full_map = spec_maps(spec)
        return Analysis(pattern, spec.q_tile, spec.kv_tile, spec.q_block, spec.kv_block,
                        int(full_map.sum()), int(partial.sum()), partial[0].size, curve, backend)
    one_box = [block_as_tile(pattern.shape, t if pattern.ndim > 1 else (b,), b // math.prod(t) if
                             pattern.ndim > 1 else 1)
               for t, b in ((spec.q_tile, spec.q_block), (spec.kv_tile, spec.kv_block))]
    if one_box[0] is not None and one_box[1] is not None and pattern.separable:  # counts factorise
        some, full, total = _factorised_counts(pattern, one_box[0], one_box[1], {})
        return Analysis(pattern, spec.q_tile, spec.kv_tile, spec.q_block, spec.kv_block, full,
                        some - full, total, backend=backend)
    partial, full_map = spec_maps(spec)  # cached: the functional API's mask reuses them
    return Analysis(pattern, spec.q_tile, spec.kv_tile, spec.q_block, spec.kv_block,
                    int(full_map.sum()), int(partial.sum()), partial[0].size, backend=backend)


def compare_orders(pattern: NAPattern, block_size: int = DEFAULT_BLOCK) -> list[Analysis]:
    """Block counts and predicted cost of ``pattern`` in each token order, at one block size:
    row-major, the best tiled order of :func:`search_tiles` (one tile per block), and, for
    2-3 axes, the Hilbert and Morton curves."""
    out = [analyze(pattern, block_size=block_size)]
    if pattern.ndim > 1:
        out += search_tiles(pattern, q_tokens=(block_size,), kv_tokens=(block_size,), top=1)
        out += [analyze(pattern, block_size=block_size, curve=c) for c in ("hilbert", "morton")]
    return out


def _factorised_counts(pattern: NAPattern, q_tile: tuple[int, ...], kv_tile: tuple[int, ...],
                       memo: dict[tuple[int, int, int], tuple[int, int, int, int]]) -> tuple[int, int, int]:
    """(blocks with some pair, full blocks, all blocks) when every block is one tile: products
    over axes of the per-axis tile tables' counts (``memo`` keeps them across calls)."""
    counts = []
    for a in range(pattern.ndim):
        key = (a, q_tile[a], kv_tile[a])
        if key not in memo:
            some, every = axis_tile_tables(pattern, a, q_tile[a], kv_tile[a])
            memo[key] = (int(some.sum()), int(every.sum()), some.shape[0], some.shape[1])
        counts.append(memo[key])
    return (math.prod(c[0] for c in counts), math.prod(c[1] for c in counts),
            math.prod(c[2] * c[3] for c in counts))


# Most padding per axis ``tiles="auto"`` adds (:func:`auto_shape`): 30 -> 32, 45 -> 48 pad;
# 24, 28, 56 stay (their next power-of-two multiple would add 14-33%).
AUTO_PAD = 1 / 8


def auto_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The padded layout ``tiles="auto"`` tiles ``shape`` in: per axis, the next multiple of
    the largest power of two (at most one block) that adds at most :data:`AUTO_PAD` of the
    axis. A function of the shape alone, so the two sequence lengths a shape can run at under
    ``tiles="auto"`` (its own and this one's) never depend on the pattern (each compiles once),
    while axes such as HunyuanVideo's 30 frames still take 4- or 8-frame tiles (30 -> 32; the
    FLASH kernel predicted 8.5% and measured 9-10% faster than with the best tiles dividing 30,
    benchmarks/results/flash-backend-NVIDIA-H200-2026-12-02.md)."""
    out = []
    for length in shape:
        padded, p = length, 2
        while p <= DEFAULT_BLOCK:
            multiple = -(-length // p) * p  # nondecreasing in p: the passing p are a prefix
            if multiple - length > AUTO_PAD * length:
                break
            padded, p = multiple, 2 * p
        out.append(padded)
    return tuple(out)


def _padding_targets(shape: tuple[int, ...], padding: bool | str) -> set[tuple[int, ...]] | None:
    """The padded shapes a tile may give for a ``padding`` mode (``None``: any)."""
    if padding is True:
        return None
    if padding is False:
        return {shape}
    if isinstance(padding, str) and padding == "auto":
        return {shape, auto_shape(shape)}
    raise ValueError(f"padding = {padding!r} is out of range: need True, False or 'auto'")


def _tile_shapes(shape: tuple[int, ...], tokens: int,
                 targets: set[tuple[int, ...]] | None) -> list[tuple[int, ...]]:
    """Power-of-two tiles with ``tokens`` tokens that waste at most half of any axis and give
    one of the padded shapes ``targets`` (:func:`_padding_targets`; ``None``: any)."""
    n = len(shape)
    powers = [2**i for i in range(int(math.log2(tokens)) + 1)]
    out = []
    for tile in itertools.product(powers, repeat=n):
        if math.prod(tile) != tokens:
            continue
        if targets is not None and padded_shape(shape, tile) not in targets:
            continue
        if all(t <= max(1, 2 * length) for t, length in zip(tile, shape, strict=True)):
            out.append(tile)
    return out


def search_tiles(
    pattern: NAPattern,
    q_tokens: Sequence[int] | None = None,
    kv_tokens: Sequence[int] | None = None,
    top: int = 5,
    same_tile: bool = False,
    padding: bool | str = True,
    backend: str = "triton",
) -> list[Analysis]:
    """Tile pairs (one tile per block) ranked by predicted cost, best first.

    Candidates are power-of-two tiles with ``q_tokens`` / ``kv_tokens`` tokens
    (the kernel's block sizes). Ties go to fewer partial blocks, so a
    perfectly block-sparse arrangement (0 partial blocks) is found whenever
    one exists among the candidates at minimal cost. Padding is accounted for:
    tiles that pad the layout add blocks. ``same_tile``: only pairs with one
    tile for queries and keys (one token order for a whole model). ``padding=False``: only
    tiles that divide the layout (the tiled sequence is as long as the row-major one);
    ``padding="auto"`` (what ``tiles="auto"`` ranks): those and the tiles that pad the layout
    to exactly :func:`auto_shape`, queries and keys alike (two sequence lengths per shape at
    most, whatever the pattern). A rule
    that is not separable per axis has no per-axis counts: its candidates are one tile for both
    sides, each counted exactly from its block maps (seconds on video-sized layouts).

    ``backend``: the kernel backend the tiles are for (``"triton"`` or ``"flash"``): its cost
    model ranks them, and its block sizes are the default candidates (Triton: 128-token query
    tiles and 128- or 64-token key tiles; FLASH: 128 x 128; pass
    ``q_tokens=(256,), kv_tokens=(128,)`` for FLASH on Blackwell, whose query blocks are 256).

    Example::

        best = flexna.search_tiles(NAPattern.create((30, 48, 80), (18, 24, 24)), backend="flash", top=1)[0]
        best.q_tile, best.kv_tile  # (8, 4, 4), (4, 8, 4)
    """
    _check_cost_backend(backend)
    if q_tokens is None:
        q_tokens = (DEFAULT_BLOCK,)
    if kv_tokens is None:  # FLASH's key blocks are 128 tokens; Triton also runs 64
        kv_tokens = (DEFAULT_BLOCK,) if backend == "flash" else (DEFAULT_BLOCK, DEFAULT_BLOCK // 2)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top = {top!r} is out of range: need an int >= 1")
    targets = _padding_targets(pattern.shape, padding)  # validates padding
    memo: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}
    results = []
    for qn, kn in itertools.product(q_tokens, kv_tokens):
        for q_tile in _tile_shapes(pattern.shape, qn, targets):
            for kv_tile in _tile_shapes(pattern.shape, kn, targets):
                if (same_tile or not pattern.separable) and kv_tile != q_tile:
                    continue
                if padding == "auto" and (padded_shape(pattern.shape, q_tile)
                                          != padded_shape(pattern.shape, kv_tile)):
                    continue  # one length for queries and keys
                if not pattern.separable:
                    results.append(analyze(pattern, q_tile, kv_tile, (qn, kn), backend=backend))
                    continue
                some, full, total = _factorised_counts(pattern, q_tile, kv_tile, memo)
                results.append(Analysis(pattern, q_tile, kv_tile, qn, kn, full, some - full, total,
                                        backend=backend))
    results.sort(key=lambda r: (round(r.cost, 6), r.partial_blocks,
                                math.prod(padded_shape(pattern.shape, r.q_tile))))
    return results[:top]


def best_tiles(pattern: NAPattern) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (q_tile, kv_tile) of the best predicted arrangement for ``pattern``."""
    best = search_tiles(pattern, top=1)[0]
    return best.q_tile, best.kv_tile


# Tiled order must beat row-major by this much in predicted kernel cost to be chosen: it
# costs a permute in and out (~6% of the kernel on the 2-D 256x256 row, measured on H200).
TILED_MARGIN = 0.85


def choose_tiles(pattern: NAPattern, same_tile: bool = False, padding: bool | str = False,
                 backend: str = "triton", block_size: Sequence[int] | None = None
                 ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Tiles (q, kv) flexna runs ``pattern`` in, or ``None`` for row-major order.

    Tiles of one block each (``block_size``, ``(q, kv)`` tokens; ``None``: 128 x 128, the
    kernels' block on Hopper) from :func:`search_tiles`, ranked by ``backend``'s cost model
    (``"triton"`` or ``"flash"``; the functional API passes the backend and blocks a call runs
    on), chosen when their predicted cost is below ``TILED_MARGIN`` x row-major's (1-D layouts
    are always row-major: a 1-D tile is a block already). Only tiles that divide the
    layout are candidates (``padding=False``): the sequence then has the layout's token
    count whatever the pattern, so ``tiles="auto"`` never changes the tensor shapes of a
    call when only the pattern changes (no recompilation); layouts no 128-token
    power-of-two tile divides (e.g. 24 x 40, 56 x 56) always run row-major under
    ``"auto"`` (pass explicit tiles to tile them with padding). ``padding="auto"`` (what
    ``tiles="auto"`` uses) also ranks the tiles that pad the layout to exactly
    :func:`auto_shape` (at most 1/8 more per axis: 30 x 48 x 80 -> 32 x 48 x 80), so a shape
    runs at one of two sequence lengths whatever the pattern (HunyuanVideo's NA window takes
    8 x 4 x 4 / 4 x 8 x 4 tiles at 32 frames, its GNA window 2 x 8 x 8 tiles at 30).
    ``padding=True`` also ranks
    tiles that pad the layout (for callers that fix their tiles once per model and shape, such
    as the diffusers integration: on Wan's 21 x 45 x 80 grid no 128-token tile divides, and
    padded tiles are predicted 3.7x faster than row-major for its GNA windows). Cached per
    pattern, backend and blocks.

    Example::

        flexna.choose_tiles(NAPattern.create((256, 256), 80))  # ((8, 16), (16, 8))
    """
    _check_cost_backend(backend)
    ones = (1,) * pattern.ndim
    return _choose_tiles(pattern, same_tile, padding, backend, resolve_block_sizes(block_size, ones, ones))


@functools.lru_cache(maxsize=256)
def _choose_tiles(pattern: NAPattern, same_tile: bool, padding: bool | str, backend: str,
                  blocks: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if pattern.ndim == 1 or pattern.num_tokens <= max(blocks):
        return None
    best = search_tiles(pattern, q_tokens=(blocks[0],), kv_tokens=(blocks[1],), top=1,
                        same_tile=same_tile, padding=padding, backend=backend)
    row_major = analyze(pattern, block_size=blocks, backend=backend)
    if not best or best[0].cost >= TILED_MARGIN * row_major.cost:
        return None
    return best[0].q_tile, best[0].kv_tile


def choose_layout(shape: Sequence[int], kernel_size: int | Sequence[int], stride: int | Sequence[int] = 1,
                  dilation: int | Sequence[int] = 1, is_causal: bool | Sequence[bool] = False) -> TokenLayout:
    """The token order (one tile for queries and keys) a model should keep for this pattern.

    Use it to stay tiled across layers: ``layout.to_tokens`` once at the input, attention
    layers with ``layout=layout``, ``layout.from_tokens`` once at the output.
    """
    pattern = NAPattern.create(shape, kernel_size, stride, dilation, is_causal)
    tiles = choose_tiles(pattern, same_tile=True)
    return TokenLayout.create(pattern.shape, None if tiles is None else tiles[0])


__all__ = [
    "PARTIAL_COST",
    "Analysis",
    "analyze",
    "best_tiles",
    "choose_layout",
    "choose_tiles",
    "compare_orders",
    "partial_cost",
    "search_tiles",
]

