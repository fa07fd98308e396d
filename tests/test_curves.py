"""Hilbert and Morton token orders: the curves themselves, and masks / BlockMasks in them.

The curves are checked against independent statements (a textbook 2-D Hilbert ``xy2d``, a
per-point bit interleave) and their defining properties (a permutation for any size;
Hilbert steps of length one and Morton cubes on power-of-two cubes; compact blocks). The
masks are compared with ``reference_mask`` permuted into the order, the BlockMasks with
torch's ``create_block_mask`` over that dense mask.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_block_masks_equal, dense_mask, expected_block_mask
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import configs

import flexna
from flexna.blockmask import spec_block_mask
from flexna.curves import curve_order, hilbert_index, morton_index
from flexna.reference import reference_mask


def xy2d(side: int, x: int, y: int) -> int:
    """The textbook 2-D Hilbert index (Wikipedia's ``xy2d``), one point at a time."""
    d, s = 0, side // 2
    while s > 0:
        rx, ry = int(x & s > 0), int(y & s > 0)
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:
            if rx == 1:
                x, y = side - 1 - x, side - 1 - y
            x, y = y, x
        s //= 2
    return d


def coords_of(shape, order):
    return np.stack(np.unravel_index(order, shape), axis=1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=2, max_size=3), st.sampled_from(["hilbert", "morton"]))
def test_curve_order_is_a_permutation(shape, curve) -> None:
    shape = tuple(shape) if len(shape) == 2 else tuple(min(v, 20) for v in shape)
    order = curve_order(shape, curve)
    assert np.array_equal(np.sort(order), np.arange(math.prod(shape)))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_hilbert_2d_is_the_textbook_curve(bits) -> None:
    side = 1 << bits
    grid = np.stack(np.unravel_index(np.arange(side * side), (side, side)), axis=1)
    ours = hilbert_index(grid, bits)
    textbook = np.array([xy2d(side, int(x), int(y)) for x, y in grid])
    swapped = np.array([xy2d(side, int(y), int(x)) for x, y in grid])
    assert np.array_equal(ours, textbook) or np.array_equal(ours, swapped)


@pytest.mark.parametrize("shape", [(2, 2), (16, 16), (32, 32), (2, 2, 2), (8, 8, 8), (16, 16, 16)])
def test_hilbert_steps_are_unit_on_power_of_two_cubes(shape) -> None:
    c = coords_of(shape, curve_order(shape, "hilbert"))
    assert (np.abs(np.diff(c, axis=0)).sum(1) == 1).all()
    assert (c[0] == 0).all()


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
def test_morton_runs_are_cubes(shape) -> None:
    n = len(shape)
    c = coords_of(shape, curve_order(shape, "morton"))
    for level in (1, 2):
        run = 2 ** (n * level)
        boxes = c.reshape(-1, run, n)
        assert ((boxes.max(1) - boxes.min(1)) == 2**level - 1).all()
    # and the order is the bit interleave, written per point
    def interleave(p):
        out = 0
        for bit in reversed(range(4)):
            for v in p:
                out = (out << 1) | ((int(v) >> bit) & 1)
        return out
    grid = np.stack(np.unravel_index(np.arange(math.prod(shape)), shape), axis=1)
    assert np.array_equal(morton_index(grid, 4), [interleave(p) for p in grid])


@pytest.mark.parametrize("shape", [(30, 48), (12, 20, 28), (45, 17)])
def test_curves_keep_blocks_compact_for_any_size(shape) -> None:
    """64-token blocks of either curve stay compact (small bounding boxes) where row-major's
    span whole rows; Hilbert's steps are nearly all unit steps."""
    n = len(shape)
    for curve in ("hilbert", "morton"):
        c = coords_of(shape, curve_order(shape, curve))
        usable = len(c) // 64 * 64
        boxes = c[:usable].reshape(-1, 64, n)
        volume = (boxes.max(1) - boxes.min(1) + 1).prod(1)
        assert np.median(volume) <= 4 * 64, (curve, np.median(volume))
    c = coords_of(shape, curve_order(shape, "hilbert"))
    assert (np.abs(np.diff(c, axis=0)).sum(1) == 1).mean() > 0.9


def _curve_mask(cfg, curve) -> torch.Tensor:
    order = torch.from_numpy(np.array(curve_order(cfg.shape, curve)))
    return reference_mask(*cfg.args())[order][:, order]


@settings(max_examples=60, deadline=None)
@given(configs(ndims=(2, 3), max_tokens=500), st.sampled_from(["hilbert", "morton"]),
       st.sampled_from([None, 16, 32, 64]))
def test_mask_and_block_mask_in_curve_order(cfg, curve, block) -> None:
    want = _curve_mask(cfg, curve)
    mm = flexna.na_mask_mod(*cfg.args(), curve=curve, device="cpu")
    assert torch.equal(dense_mask(mm, *want.shape), want)
    bm = flexna.na_block_mask(*cfg.args(), curve=curve, block_size=block, device="cpu")
    b = 128 if block is None else block
    assert_block_masks_equal(bm, expected_block_mask(want, (b, b)), f"{cfg} {curve} {block}")


def test_curve_order_with_extra_tokens_and_per_head_patterns() -> None:
    shape = (12, 10)
    patterns = [flexna.NAPattern.create(shape, k) for k in (3, 5, (7, 3))]
    spec = flexna.MaskSpec.create(patterns, q_curve="hilbert", kv_curve="morton", block_size=16,
                                  num_extra_kv=5, num_extra_q=3)
    bm = spec_block_mask(spec, "cpu")
    qo = torch.from_numpy(np.array(curve_order(shape, "hilbert")))
    ko = torch.from_numpy(np.array(curve_order(shape, "morton")))
    n = math.prod(shape)
    for h, p in enumerate(patterns):
        want = torch.zeros(n + 3, n + 5, dtype=torch.bool)
        want[:n, :n] = reference_mask(shape, p.kernel_size)[qo][:, ko]
        want[:, n:] = True
        want[n:, :n] = True
        q = torch.arange(n + 3)[:, None]
        kv = torch.arange(n + 5)[None, :]
        assert torch.equal(bm.mask_mod(torch.tensor(0), torch.tensor(h), q, kv), want), h
        one = flexna.MaskSpec.create(p, q_curve="hilbert", kv_curve="morton", block_size=16,
                                     num_extra_kv=5, num_extra_q=3)
        assert_block_masks_equal(spec_block_mask(one, "cpu"), expected_block_mask(want, (16, 16)), str(h))


def test_curve_order_moves_tensors() -> None:
    order = flexna.CurveOrder.create((5, 6, 7), "hilbert")
    x = torch.randn(2, 5, 6, 7, 3, 4)
    t = order.to_tokens(x)
    rows = torch.from_numpy(np.array(curve_order((5, 6, 7), "hilbert")))
    assert torch.equal(t, x.reshape(2, 210, 3, 4)[:, rows])
    assert torch.equal(order.from_tokens(t), x)
    assert torch.equal(order.from_heads_first(order.heads_first(x)), x)


def test_analyze_and_compare_orders() -> None:
    p = flexna.NAPattern.create((32, 32), 9)
    rows = flexna.compare_orders(p, block_size=64)
    assert [r.curve for r in rows] == [None, None, "hilbert", "morton"]
    for r in rows[2:]:
        mm = flexna.na_mask_mod(p.shape, 9, curve=r.curve, device="cpu")
        want = create_counts(mm, 1024, 64)
        assert (r.full_blocks, r.partial_blocks) == want
        assert "order" in r.summary()


def create_counts(mm, n: int, block: int) -> tuple[int, int]:
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(mm, None, None, n, n, device="cpu", BLOCK_SIZE=block)
    return int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum())


@pytest.mark.parametrize("kwargs,match", [
    (dict(q_curve="peano"), r"q_curve = 'peano' is not a known curve: use one of hilbert, morton"),
    (dict(kv_curve=3), r"kv_curve = 3 is not a known curve"),
    (dict(q_curve="hilbert", q_tile=(2, 2)), r"q_curve = 'hilbert' .*cannot be combined with q_tile"),
    (dict(kv_curve="morton", q_region=((0, 4), (0, 4))), r"kv_curve = 'morton' .*regions"),
])
def test_curve_bad_input(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        flexna.MaskSpec.create(flexna.NAPattern.create((8, 8), 3), **kwargs)


def test_curve_needs_two_axes() -> None:
    with pytest.raises(ValueError, match=r"q_curve = 'hilbert' needs a layout of 2 or 3 axes"):
        flexna.MaskSpec.create(flexna.NAPattern.create((64,), 3), q_curve="hilbert")
    with pytest.raises(ValueError, match="needs a layout of 2 or 3 axes"):
        flexna.CurveOrder.create((64,), "morton")
