"""Hypothesis strategies drawing whole neighborhood-attention configurations.

A configuration is 1 to 3 axes; per axis a length (1..40, primes and 1 favoured), a
dilation (usually 1, sometimes 2..4, lengths not divisible by it included), a kernel
in 1..length // dilation (``kernel == length // dilation`` favoured), a stride in
1..kernel (1 and kernel favoured) and a causal flag. ``N = prod(shape)`` is kept small
(<= ``max_tokens``) so dense N x N masks are cheap. Tiles are 1..5 per axis (padding
included) and block sizes are multiples of the tile token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import strategies as st

PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
MAX_LEN = {1: 40, 2: 40, 3: 14}


@dataclass(frozen=True)
class Config:
    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    def args(self) -> tuple:
        return (self.shape, self.kernel_size, self.stride, self.dilation, self.is_causal)

    def kwargs(self) -> dict:
        return {"shape": self.shape, "kernel_size": self.kernel_size, "stride": self.stride,
                "dilation": self.dilation, "is_causal": self.is_causal}

    def kwargs_no_shape(self) -> dict:
        """Pattern keywords of the functional API (the shape comes from the tensors)."""
        return {k: v for k, v in self.kwargs().items() if k != "shape"}


@dataclass(frozen=True)
class TiledConfig:
    cfg: Config
    q_tile: tuple[int, ...] | None
    kv_tile: tuple[int, ...] | None
    block_size: tuple[int, int] | None  # None: flexna's default

    def padded_len(self, tile) -> int:
        if tile is None:
            return self.cfg.num_tokens
        return math.prod(-(-n // t) * t for n, t in zip(self.cfg.shape, tile, strict=True))

    @property
    def q_len(self) -> int:
        return self.padded_len(self.q_tile)

    @property
    def kv_len(self) -> int:
        return self.padded_len(self.kv_tile)


def _length(max_len: int, min_len: int):
    favoured = [v for v in (1, *PRIMES) if min_len <= v <= max_len] or [min_len]
    return st.one_of(st.sampled_from(favoured), st.integers(min_len, max_len))


@st.composite
def axis_params(draw, length: int, min_kernel: int = 1, causal=None):
    """(kernel, stride, dilation, causal) valid for one axis of ``length``."""
    d_max = max(1, min(4, length // min_kernel))
    dilation = draw(st.one_of(st.just(1), st.integers(1, d_max)))
    k_max = length // dilation
    kernel = draw(st.one_of(st.just(k_max), st.integers(min_kernel, k_max)))
    stride = draw(st.one_of(st.just(1), st.just(kernel), st.integers(1, kernel)))
    is_causal = draw(st.booleans()) if causal is None else causal
    return kernel, stride, dilation, is_causal


@st.composite
def configs(draw, ndims=(1, 2, 3), max_tokens: int = 1500, min_len: int = 1, min_kernel: int = 1,
            causal=None, unit_stride: bool = False, unit_dilation: bool = False):
    """A whole valid configuration (``causal``: None = drawn per axis, or a fixed bool)."""
    ndim = draw(st.sampled_from(ndims))
    lengths, budget = [], max_tokens
    for a in range(ndim):
        # leave room for the remaining axes at their minimum length
        room = budget // (min_len ** (ndim - a - 1))
        cap = max(min_len, min(MAX_LEN[ndim], room))
        length = draw(_length(cap, min_len))
        lengths.append(length)
        budget //= length
    order = draw(st.permutations(range(ndim)))
    shape = tuple(lengths[i] for i in order)
    params = []
    for length in shape:
        k, s, d, c = draw(axis_params(length, min_kernel, causal))
        if unit_stride:
            s = 1
        if unit_dilation:
            d = 1
        params.append((k, s, d, c))
    kernel, stride, dilation, is_causal = (tuple(p[i] for p in params) for i in range(4))
    return Config(shape, kernel, stride, dilation, is_causal)


@st.composite
def tiles(draw, shape: tuple[int, ...], max_tile: int = 5, allow_none: bool = True):
    if allow_none and draw(st.booleans()):
        return None
    return tuple(draw(st.integers(1, max_tile)) for _ in shape)


@st.composite
def tiled_configs(draw, max_tokens: int = 1000, max_padded: int = 2500, block_sizes: bool = True,
                  **config_kwargs):
    """A configuration, a q tile and a kv tile (each possibly None = row-major), block sizes."""
    cfg = draw(configs(max_tokens=max_tokens, **config_kwargs))
    q_tile = draw(tiles(cfg.shape))
    kv_tile = draw(tiles(cfg.shape))
    tc = TiledConfig(cfg, q_tile, kv_tile, None)
    if max(tc.q_len, tc.kv_len) > max_padded:  # rare: shrink the tiles to row-major
        q_tile = kv_tile = None
        tc = TiledConfig(cfg, None, None, None)
    if block_sizes:
        tc = TiledConfig(cfg, q_tile, kv_tile, draw(block_size_for(tc)))
    return tc


@st.composite
def block_size_for(draw, tc: TiledConfig):
    """None (default) or a (q, kv) pair of multiples of the tile token counts.

    Includes small blocks, blocks not dividing the sequence and blocks larger than it.
    """
    if draw(st.integers(0, 4)) == 0:
        return None
    sizes = []
    for tile, length in ((tc.q_tile, tc.q_len), (tc.kv_tile, tc.kv_len)):
        per_tile = 1 if tile is None else math.prod(tile)
        max_mult = max(1, -(-length // per_tile))
        mult = draw(st.one_of(
            st.integers(1, min(4, max_mult)),
            st.integers(1, max_mult + 1),
            st.sampled_from([m for m in (7, 16, 32, 128) if m <= max_mult + 1] or [1]),
        ))
        # keep the number of blocks per side moderate (block maps are dense)
        mult = max(mult, -(-length // (per_tile * 400)))
        sizes.append(per_tile * mult)
    return (sizes[0], sizes[1])
