"""A tiny dependency-free PNG codec for RGB pictures (zlib + struct + NumPy).

:func:`encode_png` / :func:`write_png` write 8-bit RGB images (colour type 2,
no interlace). Each scanline uses the *Up* filter when it helps (rows that
repeat the row above become zeros), which keeps flat-colour pictures small.
:func:`decode_png` reads back exactly what this module writes (and any
8-bit RGB, non-interlaced PNG); it exists for tests and round trips, not as a
general-purpose reader.
"""

from __future__ import annotations

import struct
import zlib
from os import PathLike

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be shaped [height, width, 3], got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    return np.ascontiguousarray(image)


def encode_png(image: np.ndarray, level: int = 9) -> bytes:
    """PNG bytes of an RGB ``uint8`` array ``[height, width, 3]``."""
    image = _check_rgb(image)
    height, width, _ = image.shape
    rows = image.reshape(height, width * 3)
    # filter 2 (Up) stores row - previous row (mod 256); use it where it yields more zeros
    up = rows.copy()
    up[1:] -= rows[:-1]
    use_up = (up == 0).sum(axis=1) > (rows == 0).sum(axis=1)
    use_up[0] = False
    filtered = np.where(use_up[:, None], up, rows)
    raw = np.concatenate([use_up.astype(np.uint8)[:, None] * 2, filtered], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _chunk(b"IEND", b""))


def write_png(path: str | PathLike, image: np.ndarray) -> int:
    """Write an RGB ``uint8`` array ``[height, width, 3]`` as a PNG file; returns its size in bytes."""
    data = encode_png(image)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def _unfilter(raw: np.ndarray, height: int, stride: int, bpp: int) -> np.ndarray:
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind = raw[y, 0]
        line = raw[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) & 255
        elif kind in (1, 3, 4):  # Sub, Average, Paeth depend on the left pixel: go byte by byte
            cur = np.zeros(stride, dtype=np.int32)
            for i in range(stride):
                a = int(cur[i - bpp]) if i >= bpp else 0
                b = int(prev[i])
                c = int(prev[i - bpp]) if i >= bpp else 0
                if kind == 1:
                    pred = a
                elif kind == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (int(line[i]) + pred) & 255
        else:
            raise ValueError(f"PNG row {y} has unknown filter type {kind}")
        out[y] = cur
        prev = cur
    return out


def decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB non-interlaced PNG to a ``uint8`` array ``[height, width, 3]``."""
    if data[:8] != SIGNATURE:
        raise ValueError("not a PNG file (bad signature)")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"PNG chunk {kind!r} has a bad CRC")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError("PNG has no IHDR chunk")
    width, height, depth, colour, _, _, interlace = header
    if (depth, colour, interlace) != (8, 2, 0):
        raise ValueError(f"only 8-bit RGB non-interlaced PNGs are supported, got depth {depth}, "
                         f"colour type {colour}, interlace {interlace}")
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    raw = raw.reshape(height, 1 + width * 3)
    return _unfilter(raw, height, width * 3, 3).reshape(height, width, 3)


def read_png(path: str | PathLike) -> np.ndarray:
    """Read a PNG file written by :func:`write_png` (see :func:`decode_png`)."""
    with open(path, "rb") as f:
        return decode_png(f.read())
