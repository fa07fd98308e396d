"""Pictures of a neighborhood pattern, as RGB NumPy arrays (PNG via :mod:`flexna.tools.png`).

:func:`render_pattern` composes two panels under a title:

* **neighborhood** — one query's keys drawn on the token layout: a strip for
  1-D (plus an enlarged zoom around the query when the strip is pooled), the
  grid for 2-D, and the frames along axis 0 side by side for 3-D (wrapping
  into rows). Colours: the query, the other queries of its stride group
  (they share its window), the keys it attends, all other tokens. Dilation
  shows as gaps between attended keys, stride as the group.
* **block mask** — one pixel block per (query block, key block) of the
  analytic :func:`flexna.na_block_mask`: full, partial or empty, with a red
  tick at the query's block row. With an adaptive selection (a catalogue entry's
  ``adaptive`` object) it is the BlockMask of :func:`flexna.adaptive_block_mask`
  on seeded synthetic ``q``/``k`` (:func:`flexna.adaptive.local_qk`): the window's
  (guaranteed) blocks in the usual colours, the blocks the selection adds beyond
  them in greens, and a caption saying the selection is data-dependent and how it
  was drawn.

Big layouts are pooled so that pictures stay small: a pooled pixel shows the
highest-priority category among its tokens (query > group > attended >
other) or blocks (added full > added partial > full > partial > empty).
Pooling is exact per axis: a rectangle of tokens holds e.g. an attended key
iff every axis range holds an attended coordinate, because the pattern is a
product over axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import flexna
from flexna.adaptive import local_qk
from flexna.geometry import tile_grid
from flexna.layout import as_tile
from flexna.pattern import NAPattern
from flexna.tools.blockmaps import block_maps
from flexna.tools.catalogue import AdaptiveSelection

Colour = tuple[int, int, int]
BACKGROUND: Colour = (255, 255, 255)
TEXT: Colour = (40, 40, 40)
# neighborhood panel, by category 0..3
OTHER: Colour = (222, 222, 222)
ATTENDED: Colour = (66, 146, 198)
GROUP: Colour = (254, 196, 79)
QUERY: Colour = (215, 25, 28)
TOKEN_COLOURS = np.array([OTHER, ATTENDED, GROUP, QUERY], dtype=np.uint8)
# block-mask panel, by category 0..4: empty, the window's partial / full blocks, and the
# blocks an adaptive selection adds beyond the window, partial / full
EMPTY: Colour = (238, 238, 238)
PARTIAL: Colour = (253, 141, 60)
FULL: Colour = (8, 81, 156)
ADDED_PARTIAL: Colour = (161, 217, 155)
ADDED_FULL: Colour = (35, 139, 69)
BLOCK_COLOURS = np.array([EMPTY, PARTIAL, FULL, ADDED_PARTIAL, ADDED_FULL], dtype=np.uint8)

GAP = 16  # pixels between panels

# ---------------------------------------------------------------------------------------------
# A 5x7 bitmap font: 7 rows of 5 pixels per glyph ('#' on). Lower case prints as upper case.
_GLYPHS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": "..... ..... ..... ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    ";": "..... .##.. .##.. ..... .##.. ..#.. .#...",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "×": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "'": "..#.. ..#.. .#... ..... ..... ..... .....",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
}
_FONT = {ch: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool)
         for ch, rows in _GLYPHS.items()}
_UNKNOWN = np.ones((7, 5), dtype=bool)


def text_image(text: str, colour: Colour = TEXT, scale: int = 1) -> np.ndarray:
    """One line of text as an RGB array on the background colour (6 x 9 px per char at scale 1)."""
    width = max(1, 6 * len(text) - 1)
    bits = np.zeros((9, width), dtype=bool)
    for i, ch in enumerate(text):
        if ch == "x" and _is_times(text, i):
            ch = "×"
        glyph = _FONT.get(ch, _FONT.get(ch.upper(), _UNKNOWN))
        bits[1:8, 6 * i:6 * i + 5] = glyph
    if scale > 1:
        bits = bits.repeat(scale, axis=0).repeat(scale, axis=1)
    img = np.empty((*bits.shape, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    img[bits] = colour
    return img


def _is_times(text: str, i: int) -> bool:
    """Is the ``x`` at ``text[i]`` a dimension separator ("56x56", "TxF")?"""
    before = text[i - 1] if i > 0 else ""
    after = text[i + 1] if i + 1 < len(text) else ""
    return before.isdigit() or after.isdigit() or (before in ("T", "F") and after in ("T", "F")
                                                   and before != "" and after != "")


# ---------------------------------------------------------------------------------------------
# Composition: stack arrays with gaps and remember where each part went.

def _blank(height: int, width: int) -> np.ndarray:
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    return img


def vstack(parts: Sequence[np.ndarray], gap: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Stack top to bottom, left aligned; returns the image and each part's (row, col) offset."""
    width = max(p.shape[1] for p in parts)
    height = sum(p.shape[0] for p in parts) + gap * (len(parts) - 1)
    out, offsets, y = _blank(height, width), [], 0
    for p in parts:
        out[y:y + p.shape[0], :p.shape[1]] = p
        offsets.append((y, 0))
        y += p.shape[0] + gap
    return out, offsets


def hstack(parts: Sequence[np.ndarray], gap: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Stack left to right, top aligned; returns the image and each part's (row, col) offset."""
    height = max(p.shape[0] for p in parts)
    width = sum(p.shape[1] for p in parts) + gap * (len(parts) - 1)
    out, offsets, x = _blank(height, width), [], 0
    for p in parts:
        out[:p.shape[0], x:x + p.shape[1]] = p
        offsets.append((0, x))
        x += p.shape[1] + gap
    return out, offsets


def pad(img: np.ndarray, margin: int) -> np.ndarray:
    out = _blank(img.shape[0] + 2 * margin, img.shape[1] + 2 * margin)
    out[margin:margin + img.shape[0], margin:margin + img.shape[1]] = img
    return out


def legend(items: Sequence[tuple[Colour, str]]) -> np.ndarray:
    """A row of colour swatches with labels."""
    parts = []
    for colour, label in items:
        swatch = _blank(9, 9)
        swatch[1:8, 0:7] = colour
        parts.append(hstack([swatch, text_image(label)], gap=3)[0])
    return hstack(parts, gap=12)[0]


def _cells(categories: np.ndarray, colours: np.ndarray, cell: int, lines: bool) -> np.ndarray:
    """Category grid ``[rows, cols]`` -> RGB image with ``cell`` x ``cell`` px per entry."""
    img = colours[categories]
    if cell > 1:
        img = img.repeat(cell, axis=0).repeat(cell, axis=1)
    if lines and cell >= 5:  # 1-px separators between cells
        img[cell - 1::cell, :] = BACKGROUND
        img[:, cell - 1::cell] = BACKGROUND
    return img


def _pool_any(flags: np.ndarray, factor: int) -> np.ndarray:
    """Per-chunk ``any`` over a 1-D bool array (chunks of ``factor``, the last one shorter)."""
    if factor == 1:
        return flags
    out_len = -(-flags.size // factor)
    padded = np.zeros(out_len * factor, dtype=bool)
    padded[:flags.size] = flags
    return np.asarray(padded.reshape(out_len, factor).any(axis=1))


def _pool_max(grid: np.ndarray, factor: int) -> np.ndarray:
    """Max-pool a 2-D category grid by ``factor`` on both axes."""
    if factor == 1:
        return grid
    rows, cols = (-(-n // factor) for n in grid.shape)
    padded = np.zeros((rows * factor, cols * factor), dtype=grid.dtype)
    padded[:grid.shape[0], :grid.shape[1]] = grid
    return padded.reshape(rows, factor, cols, factor).max(axis=(1, 3))


# ---------------------------------------------------------------------------------------------
# The neighborhood of one query.

def default_query(pattern: NAPattern) -> tuple[int, ...]:
    """The token in the middle of the layout."""
    return tuple(length // 2 for length in pattern.shape)


def check_query(pattern: NAPattern, query: Sequence[int] | None) -> tuple[int, ...]:
    """Validate a query coordinate (``None``: the middle token)."""
    if query is None:
        return default_query(pattern)
    query = tuple(int(q) for q in query)
    if len(query) != pattern.ndim:
        raise ValueError(f"query must have one coordinate per layout axis ({pattern.ndim}), "
                         f"got {len(query)}: {query}")
    for axis, (q, length) in enumerate(zip(query, pattern.shape, strict=True)):
        if not 0 <= q < length:
            raise ValueError(f"query[axis {axis}] = {q} is out of range: need 0 <= query < {length}")
    return query


def axis_flags(pattern: NAPattern, axis: int, x: int) -> dict[str, np.ndarray]:
    """Per-coordinate flags on one axis for query coordinate ``x``: bool arrays of the axis length.

    ``query`` (y == x), ``group`` (same dilation group and stride group as x, i.e. the
    same window leader) and ``attended`` (x attends y on this axis).
    """
    length, s, d = pattern.shape[axis], pattern.stride[axis], pattern.dilation[axis]
    lo, hi = pattern.envelope_bounds(axis)  # the rule's window (a subclass's own, e.g. STA's)
    y = np.arange(length)
    same = y % d == x % d
    return {
        "query": y == x,
        "group": same & ((y // d) // s == (x // d) // s),
        "attended": same & (y >= int(lo[x])) & (y <= int(hi[x])),
    }


def neighborhood_categories(
    pattern: NAPattern, query: Sequence[int], factors: Sequence[int] | None = None,
    crop: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Category per (pooled) token: 3 query, 2 stride group, 1 attended, 0 other.

    ``crop`` restricts each axis to ``[start, stop)``; ``factors`` pools each axis.
    Returns an int array with one axis per layout axis.
    """
    n = pattern.ndim
    factors = factors or (1,) * n
    if not pattern.separable:
        return _rule_categories(pattern, query, factors, crop)
    pooled = []
    for a in range(n):
        flags = axis_flags(pattern, a, query[a])
        if crop is not None:
            flags = {key: v[crop[a][0]:crop[a][1]] for key, v in flags.items()}
        pooled.append({key: _pool_any(v, factors[a]) for key, v in flags.items()})

    def product(key: str) -> np.ndarray:
        out = np.ones((1,) * n, dtype=bool)
        for a in range(n):
            view = [1] * n
            view[a] = -1
            out = out & pooled[a][key].reshape(view)
        return out

    cat = np.where(product("attended"), 1, 0)
    cat = np.where(product("group"), 2, cat)
    return np.where(product("query"), 3, cat).astype(np.intp)


def _rule_categories(pattern: NAPattern, query: Sequence[int], factors: Sequence[int],
                     crop: Sequence[tuple[int, int]] | None) -> np.ndarray:
    """:func:`neighborhood_categories` of a non-separable rule: its element check against every
    token (query 3, attended 1; no stride group), cropped, pooled to the most important."""
    n = pattern.ndim
    coords = np.indices(pattern.shape).reshape(n, -1)
    inside = np.ones(coords.shape[1], dtype=bool)
    for a in range(n):
        lo, hi = pattern.envelope_bounds(a)
        inside &= (lo[query[a]] <= coords[a]) & (coords[a] <= hi[query[a]])
    q = tuple(np.full(coords.shape[1], c) for c in query)
    attended = inside & np.asarray(pattern.element_check(q, tuple(coords)), dtype=bool)
    cat = np.where(attended, 1, 0).reshape(pattern.shape)
    cat[tuple(query)] = 3
    if crop is not None:
        cat = cat[tuple(slice(lo, hi) for lo, hi in crop)]
    for a, f in enumerate(factors):
        if f > 1:
            pad = [(0, 0)] * n
            pad[a] = (0, -cat.shape[a] % f)
            cat = np.pad(cat, pad)
            cat = cat.reshape(*cat.shape[:a], -1, f, *cat.shape[a + 1:]).max(axis=a + 1)
    return cat.astype(np.intp)


@dataclass
class Panel:
    """A picture plus where tokens landed: ``token_box(coord)`` -> (row0, col0, row1, col1) or None."""

    image: np.ndarray
    boxes: list = field(default_factory=list)  # (origin row, origin col, cell, factors, crop, layout)

    def token_box(self, coord: Sequence[int]) -> tuple[int, int, int, int] | None:
        """Pixel rectangle ``[row0, row1) x [col0, col1)`` of a token's first appearance."""
        for oy, ox, cell, factors, crop, kind in self.boxes:
            inside = all(lo <= c < hi for c, (lo, hi) in zip(coord, crop, strict=True))
            if not inside:
                continue
            rel = [(c - lo) // f for c, (lo, _), f in zip(coord, crop, factors, strict=True)]
            if kind == "strip":
                c = rel[0]
                return oy, ox + c * cell, oy + STRIP_HEIGHT, ox + (c + 1) * cell
            if kind == "frame":
                r, c = rel[-2], rel[-1]
            else:
                r, c = rel[0], rel[1]
            return oy + r * cell, ox + c * cell, oy + (r + 1) * cell, ox + (c + 1) * cell
        return None

    def shifted(self, dy: int, dx: int) -> list:
        return [(oy + dy, ox + dx, *rest) for oy, ox, *rest in self.boxes]


STRIP_HEIGHT = 32  # pixels of a 1-D strip


def _strip(cat: np.ndarray, cell: int) -> np.ndarray:
    row = _cells(cat[None, :], TOKEN_COLOURS, 1, False)
    img = row.repeat(cell, axis=1).repeat(STRIP_HEIGHT, axis=0)
    if cell >= 5:
        img[:, cell - 1::cell] = BACKGROUND
    return img


def neighborhood_panel(pattern: NAPattern, query: Sequence[int], max_side: int = 1024) -> Panel:
    """The query's neighborhood drawn on the layout (see the module docstring)."""
    n = pattern.ndim
    shape = pattern.shape
    full_crop = [(0, length) for length in shape]
    if n == 1:
        length = shape[0]
        factor = max(1, -(-length // max_side))
        cell = max(1, min(16, max_side // length)) if factor == 1 else 1
        cat = neighborhood_categories(pattern, query, (factor,))
        strip = _strip(cat, cell)
        caption = (f"all {length} tokens" + (f", {factor} per pixel" if factor > 1 else "")
                   + f"; query at {query[0]}")
        parts = [text_image(caption), strip]
        boxes: list[tuple] = []
        if cell < 8:  # enlarged view around the query
            zoom_len = min(length, max_side // 8)
            start = min(max(0, query[0] - zoom_len // 2), length - zoom_len)
            crop = [(start, start + zoom_len)]
            zcat = neighborhood_categories(pattern, query, (1,), crop)
            parts += [text_image(f"zoom: tokens {start}..{start + zoom_len - 1}"), _strip(zcat, 8)]
            img, offs = vstack(parts, gap=4)
            boxes.append((offs[3][0], offs[3][1], 8, (1,), crop, "strip"))
        else:
            img, offs = vstack(parts, gap=4)
        boxes.append((offs[1][0], offs[1][1], cell, (factor,), full_crop, "strip"))
        return Panel(img, boxes)
    if n == 2:
        side = max(shape)
        target = min(512, max_side)
        factor = max(1, -(-side // target))
        cell = max(1, min(16, target // side)) if factor == 1 else 1
        cat = neighborhood_categories(pattern, query, (factor, factor))
        img = _cells(cat, TOKEN_COLOURS, cell, lines=True)
        caption = f"{shape[0]}×{shape[1]} tokens" + (f", {factor}×{factor} per pixel"
                                                      if factor > 1 else "")
        out, offs = vstack([text_image(caption), img], gap=4)
        return Panel(out, [(offs[1][0], offs[1][1], cell, (factor, factor), full_crop, "grid")])
    # 3-D: the frames along axis 0, left to right, wrapping into rows
    frames, rows_, cols_ = shape
    side = max(rows_, cols_)
    target = 160
    factor = max(1, -(-side // target))
    cell = max(1, min(16, target // side)) if factor == 1 else 1
    cat = neighborhood_categories(pattern, query, (1, factor, factor))
    frame_imgs = []
    for t in range(frames):
        tile = _cells(cat[t], TOKEN_COLOURS, cell, lines=True)
        label = text_image(f"{t} (query)", QUERY) if t == query[0] else text_image(f"{t}")
        frame_imgs.append(vstack([label, tile], gap=2)[0])
    fw = frame_imgs[0].shape[1]
    per_row = max(1, (max_side + 8) // (fw + 8))
    rows = []
    offsets = []
    for r0 in range(0, frames, per_row):
        row_img, row_offs = hstack(frame_imgs[r0:r0 + per_row], gap=8)
        rows.append(row_img)
        offsets.append(row_offs)
    caption = (f"{frames} frames of {rows_}×{cols_} tokens (axis 0 left to right)"
               + (f", {factor}×{factor} per pixel" if factor > 1 else ""))
    grid_img, row_pos = vstack(rows, gap=8)
    out, offs = vstack([text_image(caption), grid_img], gap=4)
    boxes = []
    header = 9 + 2  # frame number line + gap
    for r, row_offs in enumerate(offsets):
        for i, (_, x0) in enumerate(row_offs):
            t = r * per_row + i
            crop = [(t, t + 1), (0, rows_), (0, cols_)]
            boxes.append((offs[1][0] + row_pos[r][0] + header, x0, cell, (1, factor, factor),
                          crop, "frame"))
    return Panel(out, boxes)


# ---------------------------------------------------------------------------------------------
# The block mask.

@dataclass(frozen=True)
class BlockStats:
    """Block map of a pattern's BlockMask: ``categories`` [q blocks, kv blocks], 0/1/2 = empty/partial/full;
    with ``adaptive``, 3/4 = partial/full blocks the selection adds beyond the window (1/2 are then
    the window's blocks, full or partial as the adaptive BlockMask lists them)."""

    categories: np.ndarray
    q_block: int
    kv_block: int
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    curve: str | None = None  # both sides in a space-filling curve order
    adaptive: AdaptiveSelection | None = None  # the selection drawn on top of the window
    head_dim: int | None = None  # of the synthetic q/k the selection was drawn from

    @property
    def full(self) -> int:
        return int(np.isin(self.categories, (2, 4)).sum())

    @property
    def partial(self) -> int:
        return int(np.isin(self.categories, (1, 3)).sum())

    @property
    def window(self) -> int:
        """Blocks of the spec's own (analytic, guaranteed) BlockMask."""
        return int(np.isin(self.categories, (1, 2)).sum())

    @property
    def added_full(self) -> int:
        return int((self.categories == 4).sum())

    @property
    def added_partial(self) -> int:
        return int((self.categories == 3).sum())

    @property
    def total(self) -> int:
        return int(self.categories.size)

    @property
    def empty(self) -> int:
        return self.total - self.full - self.partial

    @property
    def computed_fraction(self) -> float:
        """Fraction of blocks a block-sparse kernel computes (full + partial)."""
        return (self.full + self.partial) / self.total

    def describe(self, adaptive: bool = True) -> str:
        """One line: order, blocks and counts (and, unless ``adaptive=False``, the selection's)."""
        order = ("row-major" if math.prod(self.q_tile) == math.prod(self.kv_tile) == 1
                 else f"tiles q {_fmt(self.q_tile)} / kv {_fmt(self.kv_tile)}")
        if self.curve is not None:
            order = f"{self.curve} order"
        q_blocks, kv_blocks = self.categories.shape
        text = (f"{order}, blocks {self.q_block}x{self.kv_block} tokens: {q_blocks} q by {kv_blocks} "
                f"kv = {self.total}; full {self.full}, partial {self.partial}, empty {self.empty} "
                f"({100 * self.computed_fraction:.2f}% computed, block-sparse limit "
                f"{1 / self.computed_fraction:.2f}x)")
        if adaptive and self.adaptive is not None:
            text += f"; {self.adaptive_line()}"
        return text

    def adaptive_line(self) -> str:
        """What the adaptive selection added, and that it is one seeded draw of data-dependent blocks."""
        assert self.adaptive is not None
        return (f"adaptive {self.adaptive.describe()} added {self.added_full + self.added_partial} "
                f"blocks (full {self.added_full}, partial {self.added_partial}) to the window's "
                f"{self.window}; data-dependent: drawn from synthetic local q/k "
                f"(flexna.adaptive.local_qk, seed {self.adaptive.seed}, head_dim {self.head_dim})")


def _fmt(t: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in t)


def block_stats(
    pattern: NAPattern,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
    block_size: int | Sequence[int] | None = None,
    curve: str | None = None,
    adaptive: AdaptiveSelection | None = None,
    head_dim: int = 64,
) -> BlockStats:
    """Full / partial / empty blocks of the pattern's analytic BlockMask (built on CPU), in the
    tiled orders or (``curve``) a Hilbert / Morton order on both sides.

    With ``adaptive``: the blocks of :func:`flexna.adaptive_block_mask` with that selection on
    ``q, k = flexna.adaptive.local_qk(spec, 1, head_dim, seed=adaptive.seed)``, those of the
    window (the analytic BlockMask) told apart from those the selection adds.
    """
    q_t = as_tile("q_tile", q_tile, pattern.shape)
    kv_t = as_tile("kv_tile", kv_tile, pattern.shape)
    spec = flexna.MaskSpec.create(pattern, q_tile=q_tile and q_t, kv_tile=kv_tile and kv_t,
                                  block_size=block_size, q_curve=curve, kv_curve=curve)
    bm = flexna.spec_block_mask(spec, "cpu")
    partial, full = (m[0, 0] for m in block_maps(bm))
    window = partial | full
    if adaptive is not None:
        q, k = local_qk(spec, 1, head_dim, seed=adaptive.seed)
        partial, full = (m[0, 0] for m in block_maps(flexna.adaptive_block_mask(q, k, spec,
                                                                                **adaptive.kwargs())))
    # a block listed as both counts as full; 3 / 4: outside the window (added by the selection)
    cat = torch.where(full, 2, partial.to(torch.uint8)) + 2 * ((partial | full) & ~window).to(torch.uint8)
    q_block, kv_block = bm.BLOCK_SIZE
    return BlockStats(cat.numpy().astype(np.intp), int(q_block), int(kv_block), q_t, kv_t, curve, adaptive,
                      head_dim if adaptive is not None else None)


def token_position(coord: Sequence[int], shape: Sequence[int], tile: Sequence[int]) -> int:
    """Index of a layout coordinate in the tiled token order (row-major when tile is all ones)."""
    grid = tile_grid(tuple(shape), tuple(tile))
    t_idx = int(np.ravel_multi_index([c // t for c, t in zip(coord, tile, strict=True)], grid))
    o_idx = int(np.ravel_multi_index([c % t for c, t in zip(coord, tile, strict=True)], tuple(tile)))
    return t_idx * math.prod(tile) + o_idx


def block_panel(stats: BlockStats, query_row: int | None = None, max_side: int = 1024) -> Panel:
    """The block map as an image: one pixel block per (q block, kv block), query row ticked."""
    side = max(stats.categories.shape)
    factor = max(1, -(-side // max_side))
    cell = max(1, min(16, 512 // side)) if factor == 1 else 1
    cat = _pool_max(stats.categories, factor)
    img = _cells(cat, BLOCK_COLOURS, cell, lines=True)
    tick = _blank(img.shape[0], 4)
    if query_row is not None:
        r = query_row // factor
        lo = max(0, min(r * cell - 1, img.shape[0] - max(cell, 3)))
        tick[lo:lo + max(cell, 3), :3] = QUERY
    body = hstack([tick, img], gap=1)[0]
    caption = f"block mask: {cat.shape[0]} q blocks (down) × {cat.shape[1]} kv blocks (across)"
    if factor > 1:
        caption += f", {factor}×{factor} blocks per pixel"
    out, _ = vstack([text_image(caption), body], gap=4)
    return Panel(out)


# ---------------------------------------------------------------------------------------------
# Both panels together.

@dataclass
class Rendering:
    image: np.ndarray
    query: tuple[int, ...]
    stats: BlockStats
    panel: Panel  # the neighborhood panel, boxes in the composed image's pixel coordinates

    def token_box(self, coord: Sequence[int]) -> tuple[int, int, int, int] | None:
        return self.panel.token_box(coord)


def render_pattern(
    pattern: NAPattern,
    query: Sequence[int] | None = None,
    q_tile: Sequence[int] | None = None,
    kv_tile: Sequence[int] | None = None,
    block_size: int | Sequence[int] | None = None,
    title: str | None = None,
    stats: BlockStats | None = None,
) -> Rendering:
    """Title, the query's neighborhood and the block mask, composed into one RGB image."""
    query = check_query(pattern, query)
    if stats is None:
        stats = block_stats(pattern, q_tile, kv_tile, block_size)
    hood = neighborhood_panel(pattern, query)
    if stats.curve is not None:  # the query's position along the curve
        flat = int(np.ravel_multi_index(tuple(query), pattern.shape))
        order = flexna.CurveOrder.create(pattern.shape, stats.curve).order()
        position = int(np.flatnonzero(order == flat)[0])
    else:
        position = token_position(query, pattern.shape, stats.q_tile)
    row = position // stats.q_block
    blocks = block_panel(stats, row)
    adaptive = stats.adaptive is not None
    hood_img = vstack([hood.image, legend([(QUERY, f"query {tuple(query)}"),
                                           (GROUP, "its stride group"),
                                           (ATTENDED, "window keys (guaranteed)" if adaptive
                                            else "attended keys"),
                                           (OTHER, "not in the window" if adaptive
                                            else "not attended")])], gap=8)[0]
    if adaptive:
        window_full, window_partial = stats.full - stats.added_full, stats.partial - stats.added_partial
        block_parts = [legend([(FULL, f"window full {window_full}"),
                               (PARTIAL, f"window partial {window_partial}"),
                               (ADDED_FULL, f"added full {stats.added_full}"),
                               (ADDED_PARTIAL, f"added partial {stats.added_partial}")]),
                       legend([(EMPTY, f"empty {stats.empty}"), (QUERY, "query's row")])]
    else:
        block_parts = [legend([(FULL, f"full {stats.full}"), (PARTIAL, f"partial {stats.partial}"),
                               (EMPTY, f"empty {stats.empty}"), (QUERY, "query's row")])]
    block_img = vstack([blocks.image, vstack(block_parts, gap=4)[0]], gap=8)[0]
    wide = hood_img.shape[1] > 1.5 * hood_img.shape[0]
    body, offs = (vstack if wide else hstack)([hood_img, block_img], gap=2 * GAP)
    lines = [text_image(title or str(pattern), scale=2)]
    if title is not None:
        lines.append(text_image(str(pattern)))
    lines.append(text_image(_summary_line(pattern, stats)))
    if stats.adaptive is not None:
        assert stats.head_dim is not None
        lines.append(text_image(f"green: blocks adaptive_block_mask({stats.adaptive.describe()}) adds beyond "
                                "the window. The selection is data-dependent:", ADDED_FULL))
        lines.append(text_image("this is one draw, from synthetic local q/k (flexna.adaptive.local_qk, "
                                f"seed {stats.adaptive.seed}, head_dim {stats.head_dim}, one head)",
                                ADDED_FULL))
    head = vstack(lines, gap=6)[0]
    image, top = vstack([head, body], gap=GAP)
    image = pad(image, GAP)
    dy, dx = top[1][0] + offs[0][0] + GAP, top[1][1] + offs[0][1] + GAP
    hood.boxes = hood.shifted(dy, dx)
    _ring(image, hood.token_box(query))
    return Rendering(image, tuple(query), stats, hood)


def _ring(image: np.ndarray, box: tuple[int, int, int, int] | None, size: int = 6) -> None:
    """Outline a small query cell with a red square (2 px line, 3 px away) so it stays visible."""
    if box is None:
        return
    r0, c0, r1, c1 = box
    if min(r1 - r0, c1 - c0) >= size:
        return
    t0, l0 = max(0, r0 - 5), max(0, c0 - 5)
    t1, l1 = min(image.shape[0], r1 + 5), min(image.shape[1], c1 + 5)
    for rows, cols in (((t0, t0 + 2), (l0, l1)), ((t1 - 2, t1), (l0, l1)),
                       ((t0, t1), (l0, l0 + 2)), ((t0, t1), (l1 - 2, l1))):
        image[rows[0]:rows[1], cols[0]:cols[1]] = QUERY


def _summary_line(pattern: NAPattern, stats: BlockStats) -> str:
    window = "window " if stats.adaptive is not None else ""
    return (f"{pattern.num_tokens} tokens, {window}density {pattern.density():.4g}, FLOP-wise limit "
            f"{pattern.flop_limit():.2f}x; {stats.describe(adaptive=False)}")
