"""Sliding tile attention (STA, FastVideo) as a flexna pattern, from STA's own parameters.

STA cuts the layout into tiles of shape ``tile`` and lets every query tile attend the
``window`` whole key tiles around it (per axis, counted in tiles), the window sliding
inward at the borders; tokens run in the tiled order (tiles row-major over the tile grid,
row-major inside a tile), and text tokens follow the video tokens. The definition, per
axis, is :func:`flexna.geometry.tile_window_bounds`; it is the mask of attention-gym's
``generate_sta_mask_mod_2d/3d`` for every window, odd or even.

With an odd window on every axis STA *is* generalized neighborhood attention with
``kernel_size = window * tile`` and ``stride = tile``. With an even window it is not: GNA
centres its window on the stride group's leader (``floor(tile / 2)`` into the tile), so its
window starts half a tile off the tile grid, while STA's starts on it. So
:class:`SlidingTilePattern` keeps those GNA fields (they give the key count and the
density, which agree) and replaces only the per-axis windows; every stage of flexna reads
the windows through :meth:`~flexna.pattern.NAPattern.envelope_bounds` and takes it
unchanged (tables, mask_mod, analytic BlockMask, analysis, pictures).

Text tokens (HunyuanVideo's use): ``text_length`` keys after the video tokens that every
query attends, and text queries that attend every real key. FastVideo pads the text to
``text_max_len`` tokens; padded text keys are attended by nobody and padded text queries
attend every real key, so pass ``text_padding = text_max_len - text_length`` and give the
keys/values without their padded tail (``k[:, :, :video + text_length]``): the output is
the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask

from flexna.blockmask import build_block_mask
from flexna.geometry import tile_window_bounds
from flexna.pattern import NAPattern, PerHead, as_int_tuple, as_shape, fmt_dims
from flexna.spec import MaskSpec, as_count, resolve_device
from flexna.tables import MaskMod, build_tables

__all__ = ["SlidingTilePattern", "sliding_tile_pattern", "sta_block_mask", "sta_mask_mod", "sta_spec"]


@dataclass(frozen=True)
class SlidingTilePattern(NAPattern):
    """STA over a layout: ``tile`` tokens per tile and ``window`` tiles per window, per axis.

    Build it with :func:`sliding_tile_pattern` (validated). ``kernel_size`` is
    ``window * tile`` and ``stride`` is ``tile`` (as GNA's, which it equals for odd
    windows); the windows themselves are STA's tile-aligned ones.
    """

    tile: tuple[int, ...] = ()
    window: tuple[int, ...] = ()

    def envelope_bounds(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """STA's window on ``axis`` (exact per axis, so also the core)."""
        return tile_window_bounds(self.shape[axis], self.tile[axis], self.window[axis])

    def core_bounds(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        return self.envelope_bounds(axis)

    @property
    def equals_gna(self) -> bool:
        """Whether GNA (``kernel_size = window * tile``, ``stride = tile``) is the same pattern:
        true iff every axis has an odd window or a one-token tile (or spans the whole axis)."""
        return all(w % 2 or t == 1 or w * t == length
                   for w, t, length in zip(self.window, self.tile, self.shape, strict=True))

    def __str__(self) -> str:
        return (f"STA layout {fmt_dims(self.shape)}, tile {fmt_dims(self.tile)}, "
                f"window {fmt_dims(self.window)} tiles")


def sliding_tile_pattern(shape: int | Sequence[int], tile: int | Sequence[int],
                         window: int | Sequence[int]) -> SlidingTilePattern:
    """Validated STA pattern (a scalar applies to every axis).

    Needs, per axis, ``tile >= 1`` dividing ``shape`` (STA's tile grid has no partial tile)
    and ``1 <= window <= shape // tile`` (a window of at most every tile). A ``ValueError``
    names the argument, the axis, the value and the allowed range.
    """
    shape_t = as_shape("shape", shape)
    n = len(shape_t)
    tile_t = as_int_tuple("tile", tile, n)
    window_t = as_int_tuple("window", window, n)
    for a, (length, t, w) in enumerate(zip(shape_t, tile_t, window_t, strict=True)):
        if t < 1 or length % t:
            raise ValueError(f"tile[axis {a}] = {t} is out of range: need a divisor of "
                             f"shape[axis {a}] = {length} (STA tiles the layout exactly)")
        if not 1 <= w <= length // t:
            raise ValueError(f"window[axis {a}] = {w} is out of range: need 1 <= window <= "
                             f"shape // tile = {length} // {t} = {length // t} tiles")
    base = NAPattern.create(shape_t, tuple(w * t for w, t in zip(window_t, tile_t, strict=True)),
                            tile_t)
    return SlidingTilePattern(base.shape, base.kernel_size, base.stride, base.dilation,
                              base.is_causal, tile_t, window_t)


def sta_spec(
    shape: int | Sequence[int],
    tile: int | Sequence[int],
    window: int | Sequence[int] | PerHead,
    *,
    text_length: int = 0,
    text_padding: int = 0,
    block_size: int | Sequence[int] | None = None,
) -> MaskSpec:
    """The :class:`~flexna.MaskSpec` of STA in STA's token order (tiled by ``tile``).

    ``window`` may be a :class:`~flexna.PerHead` (one window per query head, as FastVideo's
    mask strategies give). Queries: the video tokens, then ``text_length + text_padding``
    text queries; keys: the video tokens, then ``text_length`` text keys (see the module
    docstring). ``block_size``: BlockMask block sizes (default one tile).
    """
    windows = window.values if isinstance(window, PerHead) else (window,)
    patterns = []
    for h, w in enumerate(windows):
        try:
            patterns.append(sliding_tile_pattern(shape, tile, w))
        except ValueError as err:
            raise ValueError(f"head {h}: {err}" if isinstance(window, PerHead) else str(err)) from None
    text = as_count("text_length", text_length)
    pad = as_count("text_padding", text_padding)
    tile_t = patterns[0].tile
    return MaskSpec.create(tuple(patterns), q_tile=tile_t, kv_tile=tile_t, block_size=block_size,
                           num_extra_q=text + pad, num_extra_kv=text)


def sta_mask_mod(shape: int | Sequence[int], tile: int | Sequence[int],
                 window: int | Sequence[int] | PerHead, *, text_length: int = 0, text_padding: int = 0,
                 device: torch.device | str | None = None) -> MaskMod:
    """FlexAttention ``mask_mod`` of STA (arguments as :func:`sta_spec`; q/kv indices in STA's
    tiled order, text after the video tokens).

    Example::

        mm = flexna.sta_mask_mod((30, 48, 80), (6, 8, 8), (3, 3, 3), text_length=256)
    """
    spec = sta_spec(shape, tile, window, text_length=text_length, text_padding=text_padding)
    return build_tables(spec, resolve_device(device)).mask_mod()


def sta_block_mask(shape: int | Sequence[int], tile: int | Sequence[int],
                   window: int | Sequence[int] | PerHead, *, text_length: int = 0, text_padding: int = 0,
                   block_size: int | Sequence[int] | None = None,
                   device: torch.device | str | None = None) -> BlockMask:
    """Analytic BlockMask of STA (arguments as :func:`sta_spec`): one block per tile by
    default, where every video block is full or empty (STA is exactly block-sparse on its
    tiles); equal to ``create_block_mask`` of :func:`sta_mask_mod`, block for block.

    Example::

        bm = flexna.sta_block_mask((30, 48, 80), (6, 8, 8), (3, 6, 10), text_length=256,
                                   block_size=384, device="cuda")
        out = flex_attention(q, k, v, block_mask=bm)   # q, k, v: tile_tokens(x, shape, tile) + text
    """
    spec = sta_spec(shape, tile, window, text_length=text_length, text_padding=text_padding,
                    block_size=block_size)
    return build_block_mask(spec, resolve_device(device))

