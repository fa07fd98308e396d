"""Test-side restatements of flexna's documented conventions (no flexna code used).

Everything here is written from the documentation alone, so that tests compare the
library against an independent statement:

* tiled token order: "tiles in row-major order over the tile grid, row-major inside a
  tile, pad at the end of each axis" (README / ``flexna.layout``);
* BlockMask contents: a BlockMask is read back into dense per-block boolean maps.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

EAGER_FLEX_MSG = "flex_attention called without torch.compile"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rowmajor_index(coord: Sequence[int], shape: Sequence[int]) -> int:
    idx = 0
    for c, length in zip(coord, shape, strict=True):
        idx = idx * length + c
    return idx


def tiled_order(shape: Sequence[int], tile: Sequence[int] | None) -> np.ndarray:
    """Row-major token index held at each position of the tiled order, -1 for padding.

    Written literally from the definition with itertools.product (row-major loops).
    ``tile=None`` is plain row-major order.
    """
    shape = tuple(shape)
    if tile is None:
        return np.arange(math.prod(shape), dtype=np.int64)
    grid = [ceil_div(length, t) for length, t in zip(shape, tile, strict=True)]
    out = []
    for g in itertools.product(*(range(n) for n in grid)):
        for o in itertools.product(*(range(t) for t in tile)):
            coord = tuple(gi * ti + oi for gi, ti, oi in zip(g, tile, o, strict=True))
            inside = all(c < length for c, length in zip(coord, shape, strict=True))
            out.append(rowmajor_index(coord, shape) if inside else -1)
    return np.asarray(out, dtype=np.int64)


def permuted_mask(ref: torch.Tensor, shape, q_tile=None, kv_tile=None) -> torch.Tensor:
    """Row-major dense mask ``ref`` re-expressed in the (q_tile, kv_tile) orders."""
    qi = torch.from_numpy(tiled_order(shape, q_tile))
    ki = torch.from_numpy(tiled_order(shape, kv_tile))
    m = ref[qi.clamp_min(0)][:, ki.clamp_min(0)]
    return m & (qi >= 0)[:, None] & (ki >= 0)[None, :]


def dense_mask(mask_mod, q_len: int, kv_len: int, device="cpu") -> torch.Tensor:
    """torch's own create_mask, [q_len, kv_len] bool on the CPU."""
    return create_mask(mask_mod, None, None, q_len, kv_len, device=device)[0, 0].cpu()


def lookup_mask_mod(dense: torch.Tensor):
    """A mask_mod reading a dense bool table (to feed torch's create_block_mask)."""

    def mod(b, h, q_idx, kv_idx):
        return dense[q_idx, kv_idx]

    return mod


def expected_block_mask(dense: torch.Tensor, block_size: tuple[int, int]) -> BlockMask:
    """torch's create_block_mask over a dense expected mask."""
    dense = dense.to("cpu")
    return create_block_mask(lookup_mask_mod(dense), None, None, dense.shape[0], dense.shape[1],
                             device="cpu", BLOCK_SIZE=block_size)


def blocks_to_map(num: torch.Tensor, idx: torch.Tensor, cols: int) -> torch.Tensor:
    """BlockMask (counts ``[1,1,R]``, indices ``[1,1,R,C]``) -> dense bool ``[R, cols]``.

    Checks that the first ``num[r]`` indices of each row are distinct and in range.
    """
    num = num[0, 0].to("cpu", torch.int64)
    idx = idx[0, 0].to("cpu", torch.int64)
    rows = num.shape[0]
    assert idx.shape[0] == rows
    assert bool((num >= 0).all()) and bool((num <= idx.shape[1]).all())
    used = torch.arange(idx.shape[1])[None, :] < num[:, None]
    r = torch.arange(rows)[:, None].expand_as(idx)[used]
    c = idx[used]
    assert bool(((c >= 0) & (c < cols)).all()), "block index out of range"
    out = torch.zeros(rows, cols, dtype=torch.bool)
    out[r, c] = True
    assert torch.equal(out.sum(1), num), "duplicate block indices in a row"
    return out


def block_maps(bm: BlockMask) -> dict[str, torch.Tensor]:
    """Dense block maps of a BlockMask: partial/full, kv-major and q-major (transposed)."""
    nq, nkv = bm.kv_num_blocks.shape[-1], bm.q_num_blocks.shape[-1]
    return {
        "kv_partial": blocks_to_map(bm.kv_num_blocks, bm.kv_indices, nkv),
        "kv_full": blocks_to_map(bm.full_kv_num_blocks, bm.full_kv_indices, nkv),
        "q_partial": blocks_to_map(bm.q_num_blocks, bm.q_indices, nq).t(),
        "q_full": blocks_to_map(bm.full_q_num_blocks, bm.full_q_indices, nq).t(),
    }


def assert_block_masks_equal(got: BlockMask, want: BlockMask, context: str = "") -> None:
    assert tuple(got.seq_lengths) == tuple(want.seq_lengths), context
    assert tuple(got.BLOCK_SIZE) == tuple(want.BLOCK_SIZE), context
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        g, w = getattr(got, name), getattr(want, name)
        assert g is not None, f"{context}: {name} is None"
        assert tuple(g.shape) == tuple(w.shape), f"{context}: {name} shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype, f"{context}: {name} dtype {g.dtype} != {w.dtype}"
        # FlexAttention's kernels index these tensors as dense row-major arrays: a transposed
        # view (right values, wrong strides) gives wrong dK/dV in compiled backward on CUDA
        assert g.is_contiguous(), f"{context}: {name} is not contiguous (strides {g.stride()})"
    gm, wm = block_maps(got), block_maps(want)
    for name in gm:
        diff = (gm[name] != wm[name]).nonzero().tolist()
        assert not diff, f"{context}: {name} differs at (q_block, kv_block) {diff[:8]} ({len(diff)} total)"
    # the transposed (q-major) maps must describe the same blocks as the kv-major ones
    assert torch.equal(gm["kv_partial"], gm["q_partial"]), context
    assert torch.equal(gm["kv_full"], gm["q_full"]), context


def axis_ok(x: int, y: int, length: int, k: int, s: int, d: int, causal: bool) -> bool:
    """The per-axis rule of docs/SEMANTICS.md, scalar Python (used where dense masks are too big)."""
    if x % d != y % d:
        return False
    g = x % d
    xq, yq = x // d, y // d
    lg = ceil_div(length - g, d)
    if causal:
        leader = min((xq // s) * s + s - 1, lg - 1)
        return yq <= xq and leader - yq < k
    left = k // 2
    right = k // 2 + (k % 2) - 1
    leader = min((xq // s) * s + s // 2, lg - 1)
    c = min(max(leader, left), lg - 1 - right)
    return c - left <= yq <= c + right


@contextlib.contextmanager
def assert_compiled():
    """Fail if FlexAttention runs unfused (eager) inside the block.

    torch warns once per process when flex_attention runs without torch.compile
    (e.g. after dynamo gave up recompiling); forget that it warned, then make the
    warning an error.
    """
    from torch.nn.attention import flex_attention as fa

    shown = getattr(fa, "_WARNINGS_SHOWN", None)
    if shown is not None:
        shown.discard("flex_attention_performance")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=EAGER_FLEX_MSG)
        yield


@contextlib.contextmanager
def eager_flex_ok():
    """Allow torch's 'called without torch.compile' warning (tests that run eager on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EAGER_FLEX_MSG)
        yield


def region_order(shape: Sequence[int], region: Sequence[tuple[int, int]],
                 tile: Sequence[int] | None) -> np.ndarray:
    """Row-major index in the whole layout of each position of a sub-box's tiled order.

    The sub-box ``region`` (per axis ``(start, stop)``) is ordered as a layout of its own
    (:func:`tiled_order`); -1 marks padding.
    """
    sub = tuple(stop - start for start, stop in region)
    local = tiled_order(sub, tile)
    out = np.full(local.shape, -1, dtype=np.int64)
    for pos, idx in enumerate(local):
        if idx < 0:
            continue
        coord = np.unravel_index(idx, sub)
        out[pos] = rowmajor_index([c + s for c, (s, _) in zip(coord, region, strict=True)], shape)
    return out
