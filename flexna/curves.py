"""Space-filling curves over token layouts: Hilbert and Morton (Z-order) indices, in NumPy.

A curve visits every cell of the cube ``[0, 2**bits)**n``; the layout's tokens are
ordered by their index on the curve of the smallest cube that holds the layout, and the
cells outside the layout are skipped. So any shape works (not only powers of two), the
sequence has exactly the layout's tokens (no padding), and on a power-of-two cube the
order is the curve itself: Morton's aligned runs of ``2**(n*j)`` positions are cubes, and
Hilbert's consecutive positions are neighbours (one step along one axis).

Pure index math, no torch: :class:`flexna.layout.CurveOrder` turns it into a token order.
"""

from __future__ import annotations

import functools
import math

import numpy as np

CURVES = ("hilbert", "morton")


def _cube_bits(shape: tuple[int, ...]) -> int:
    """Bits per axis of the smallest power-of-two cube holding ``shape``."""
    return max(1, max(int(length - 1).bit_length() for length in shape))


def morton_index(coords: np.ndarray, bits: int) -> np.ndarray:
    """Z-order index of integer ``coords`` ``[N, n]`` (each in ``[0, 2**bits)``): the bits of
    the coordinates interleaved, most significant level first, axis 0 first within a level."""
    n = coords.shape[1]
    out = np.zeros(coords.shape[0], dtype=np.int64)
    for level in reversed(range(bits)):
        for a in range(n):
            out = (out << 1) | ((coords[:, a] >> level) & 1)
    return out


def hilbert_index(coords: np.ndarray, bits: int) -> np.ndarray:
    """Hilbert index of integer ``coords`` ``[N, n]`` (each in ``[0, 2**bits)``), any ``n``.

    Skilling's method ("Programming the Hilbert curve", 2004): the axes are turned into the
    curve's "transposed" index by undoing the per-level rotations and reflections, Gray
    decoding it, and the transposed bits are interleaved like a Morton index.
    """
    x = [coords[:, a].astype(np.int64).copy() for a in range(coords.shape[1])]
    n = len(x)
    q = 1 << (bits - 1)
    while q > 1:  # inverse undo of the excess work
        p = q - 1
        for i in range(n):
            high = (x[i] & q) != 0
            t = (x[0] ^ x[i]) & p
            x0 = np.where(high, x[0] ^ p, x[0] ^ t)
            if i:
                x[i] = np.where(high, x[i], x[i] ^ t)
            x[0] = x0
        q >>= 1
    for i in range(1, n):  # Gray encode
        x[i] ^= x[i - 1]
    t = np.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t ^= np.where((x[n - 1] & q) != 0, q - 1, 0)
        q >>= 1
    for i in range(n):
        x[i] ^= t
    return morton_index(np.stack(x, axis=1), bits)


def curve_index(curve: str, coords: np.ndarray, bits: int) -> np.ndarray:
    """Index of ``coords`` on ``curve`` (``"hilbert"`` or ``"morton"``)."""
    if curve == "hilbert":
        return hilbert_index(coords, bits)
    if curve == "morton":
        return morton_index(coords, bits)
    raise ValueError(f"curve = {curve!r} is not a known curve: use one of {', '.join(CURVES)}")


def curve_order(shape: tuple[int, ...], curve: str) -> np.ndarray:
    """Row-major token index at each position of the curve order, ``[prod(shape)]`` int64
    (a permutation; read-only, cached)."""
    return _curve_order(tuple(int(v) for v in shape), str(curve))


@functools.lru_cache(maxsize=32)
def _curve_order(shape: tuple[int, ...], curve: str) -> np.ndarray:
    total = math.prod(shape)
    coords = np.stack(np.unravel_index(np.arange(total, dtype=np.int64), shape), axis=1)
    order = np.argsort(curve_index(curve, coords, _cube_bits(shape)), kind="stable")
    order.flags.writeable = False
    return order
