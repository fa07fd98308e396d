"""na_mask_mod evaluated by torch's create_mask vs the brute-force reference.

Tiled orders are checked against the reference re-expressed in the tiled order by
tests/helpers.py, which builds the order from its documented definition (tiles in
row-major order over the tile grid, row-major inside a tile, padding at the end of each
axis), not from flexna.geometry.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import axis_ok, dense_mask, permuted_mask, tiled_order
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import configs, tiled_configs, tiles

import flexna
from flexna.geometry import ordered_coords
from flexna.layout import as_tile
from flexna.pattern import NAPattern
from flexna.reference import reference_mask
from flexna.spec import MaskSpec
from flexna.tables import build_tables
from flexna.tables import pattern_fields as fused_fields


@settings(max_examples=200, deadline=None)
@given(configs())
def test_row_major_equals_reference(cfg):
    mm = flexna.na_mask_mod(**cfg.kwargs(), device="cpu")
    got = dense_mask(mm, cfg.num_tokens, cfg.num_tokens)
    want = reference_mask(*cfg.args())
    bad = (got != want).nonzero().tolist()
    assert not bad, f"{cfg}: {len(bad)} mismatching (q, kv) pairs, first {bad[:8]}"


@settings(max_examples=200, deadline=None)
@given(tiled_configs(block_sizes=False))
def test_tiled_orders_equal_permuted_reference(tc):
    cfg = tc.cfg
    mm = flexna.na_mask_mod(**cfg.kwargs(), q_tile=tc.q_tile, kv_tile=tc.kv_tile)
    got = dense_mask(mm, tc.q_len, tc.kv_len)
    want = permuted_mask(reference_mask(*cfg.args()), cfg.shape, tc.q_tile, tc.kv_tile)
    bad = (got != want).nonzero().tolist()
    assert not bad, f"{tc}: {len(bad)} mismatching (q, kv) positions, first {bad[:8]}"
    # padded tokens never attend and are never attended
    q_pad = torch.from_numpy(tiled_order(cfg.shape, tc.q_tile) < 0)
    kv_pad = torch.from_numpy(tiled_order(cfg.shape, tc.kv_tile) < 0)
    assert not got[q_pad].any()
    assert not got[:, kv_pad].any()
    # every real query still attends something (its own token at least, by the rule)
    assert got[~q_pad].any(dim=1).all()


def test_tiled_example_by_hand():
    """Layout (3, 5), tile (2, 2): the order written out by hand."""
    # grid 2 x 3 tiles; padded layout 4 x 6; '-' marks padding.
    expected = [
        (0, 0), (0, 1), (1, 0), (1, 1),      # tile (0, 0)
        (0, 2), (0, 3), (1, 2), (1, 3),      # tile (0, 1)
        (0, 4), None, (1, 4), None,          # tile (0, 2): column 5 is padding
        (2, 0), (2, 1), None, None,          # tile (1, 0): row 3 is padding
        (2, 2), (2, 3), None, None,
        (2, 4), None, None, None,
    ]
    want = [-1 if c is None else c[0] * 5 + c[1] for c in expected]
    assert tiled_order((3, 5), (2, 2)).tolist() == want
    assert flexna.tiled_length((3, 5), (2, 2)) == len(want)
    # and the mask_mod in that order: query (1, 1) at tiled position 3, kernel 3 x 3
    mm = flexna.na_mask_mod((3, 5), 3, q_tile=(2, 2), kv_tile=(2, 2))
    got = dense_mask(mm, 24, 24)
    attended = {expected[p] for p in got[3].nonzero().flatten().tolist()}
    assert attended == {(y0, y1) for y0 in range(3) for y1 in range(3)}
    # query (2, 4) (position 20): centre clamps to (1, 3)
    attended = {expected[p] for p in got[20].nonzero().flatten().tolist()}
    assert attended == {(y0, y1) for y0 in range(3) for y1 in range(2, 5)}


@settings(max_examples=100, deadline=None)
@given(configs(max_tokens=800), st.data())
def test_ordered_coords_matches_documented_order(cfg, data):
    tile = data.draw(tiles(cfg.shape, allow_none=False))
    coords = ordered_coords(cfg.shape, tile)
    order = tiled_order(cfg.shape, tile)
    assert coords.shape == (len(order), cfg.ndim)
    unr = np.stack(np.unravel_index(np.clip(order, 0, None), cfg.shape), axis=1)
    want = np.where(order[:, None] >= 0, unr, -1)
    assert np.array_equal(coords.numpy(), want)


@settings(max_examples=60, deadline=None)
@given(configs(max_tokens=600))
def test_scalar_arguments_broadcast(cfg):
    """A scalar for a tuple parameter means that value on every axis."""
    k = min(3, *cfg.shape)
    mm = flexna.na_mask_mod(cfg.shape, k, 1, 1, True)
    n = cfg.num_tokens
    want = reference_mask(cfg.shape, (k,) * cfg.ndim, (1,) * cfg.ndim, (1,) * cfg.ndim,
                          (True,) * cfg.ndim)
    assert torch.equal(dense_mask(mm, n, n), want)


def test_mask_mod_with_batch_and_heads():
    """The mask is the same for every batch / head index (create_mask with B, H)."""
    from torch.nn.attention.flex_attention import create_mask

    mm = flexna.na_mask_mod((6, 7), (3, 4), (1, 2), (2, 1), (False, True))
    got = create_mask(mm, 2, 3, 42, 42, device="cpu")
    want = reference_mask((6, 7), (3, 4), (1, 2), (2, 1), (False, True))
    assert got.shape == (2, 3, 42, 42)
    assert torch.equal(got, want.expand(2, 3, 42, 42))


@pytest.mark.parametrize(
    "length,kernel,stride,dilation,causal",
    [
        (2**20, 300, 7, 2048, False),   # d * L = 2**31: tables need int64
        (2**20, 511, 511, 2047, True),
        (2**20 + 3, 5, 2, 2048, False),
        (2**20, 7, 3, 2047, False),      # d * L just below 2**31 - 1: int32 tables
    ],
)
def test_large_dilation_times_length(length, kernel, stride, dilation, causal):
    """Index tables where dilation * length reaches int32's limit: spot checks vs the rule."""
    mm = flexna.na_mask_mod(length, kernel, stride, dilation, causal, device="cpu")
    rng = random.Random(length + kernel)
    qs, ks = [], []
    for _ in range(3000):
        x = rng.randrange(length)
        if rng.random() < 0.7:  # keys near the query's window, same residue mostly
            y = x + dilation * rng.randint(-kernel - 2, kernel + 2) + (rng.random() < 0.1)
            y = min(max(y, 0), length - 1)
        else:
            y = rng.randrange(length)
        qs.append(x)
        ks.append(y)
    # the last tokens and first tokens, where windows clamp
    for x in (0, 1, length - 1, length - 2, length - dilation, dilation):
        for j in range(-kernel - 1, kernel + 2):
            y = x + j * dilation
            if 0 <= y < length:
                qs.append(x)
                ks.append(y)
    q_idx = torch.tensor(qs)
    kv_idx = torch.tensor(ks)
    zero = torch.zeros((), dtype=torch.long)
    got = mm(zero, zero, q_idx, kv_idx).tolist()
    want = [axis_ok(x, y, length, kernel, stride, dilation, causal) for x, y in zip(qs, ks, strict=True)]
    bad = [(x, y, g) for x, y, g, w in zip(qs, ks, got, want, strict=True) if g != w]
    assert not bad, f"{len(bad)} mismatches, first (q, kv, got) {bad[:5]}"
    assert any(want) and not all(want)


@settings(max_examples=150, deadline=None)
@given(tiled_configs(block_sizes=False))
def test_packed_and_per_axis_forms_equal_permuted_reference(tc):
    """Both mask forms (all axes packed into one int32, and one test per axis) vs the rule."""
    cfg = tc.cfg
    pattern = NAPattern.create(*cfg.args())
    q_tile = as_tile("q_tile", tc.q_tile, pattern.shape)
    kv_tile = as_tile("kv_tile", tc.kv_tile, pattern.shape)
    tables = build_tables(MaskSpec.create(pattern, q_tile=q_tile, kv_tile=kv_tile), "cpu")
    assert (tables.fused is not None) == (cfg.ndim >= 2)  # small layouts always fit
    want = permuted_mask(reference_mask(*cfg.args()), cfg.shape, tc.q_tile, tc.kv_tile)
    for packed in [False] + ([True] if cfg.ndim >= 2 else []):
        got = dense_mask(tables.mask_mod(fused=packed), tc.q_len, tc.kv_len)
        bad = (got != want).nonzero().tolist()
        assert not bad, f"{tc} packed={packed}: {len(bad)} mismatching pairs, first {bad[:8]}"


def test_packed_fields_width_limit():
    """Fields hold [-1, d * L] below a guard bit; packing stops where 31 bits don't suffice."""
    # d * L + 1 = 511 -> 9 bits + guard = 10 per axis
    assert fused_fields(NAPattern.create((510, 510), 3)) == ((10, 0), (10, 10))
    # 512 + 1 = 513 -> 10 bits + guard; 3 + 1 = 4 -> 3 bits + guard
    assert fused_fields(NAPattern.create((512, 3), 3)) == ((4, 0), (11, 4))
    # 10 + 10 + 11 = 31 bits fit; 10 + 10 + 12 = 32 do not
    assert fused_fields(NAPattern.create((510, 510, 1022), 3)) == ((21, 11, 0), (10, 10, 11))
    assert fused_fields(NAPattern.create((510, 510, 1024), 3)) is None
    assert fused_fields(NAPattern.create((62, 60, 60), 3, 1, (16, 8, 8))) == ((20, 10, 0), (11, 10, 10))
    assert fused_fields(NAPattern.create((4096,), 3)) is None  # 1-D: nothing to pack
    # without packing the per-axis form is used, and asking for packing is a clear error
    tables = build_tables(MaskSpec.create(NAPattern.create((510, 510, 1024), 3)), "meta")
    assert tables.fused is None
    with pytest.raises(ValueError, match="fused=True"):
        tables.mask_mod(fused=True)


@pytest.mark.parametrize("shape,dilation,tile", [
    ((510, 510), (1, 1), (3, 7)),         # fields exactly at their widest values
    ((255, 3), (2, 1), (4, 1)),           # dilation shift: d * L + 1 = 511
    ((62, 60, 60), (16, 8, 8), None),     # 31 bits in all: the sign bit stays clear
    ((100, 60, 340), (3, 1, 3), (3, 5, 7)),
])
def test_packed_matches_per_axis_at_field_limits(shape, dilation, tile):
    """Spot checks (near windows, padding, random) where the packed fields are fullest."""
    pattern = NAPattern.create(shape, 3, 1, dilation, (False, True) + (False,) * (len(shape) - 2))
    t = as_tile("tile", tile, pattern.shape)
    tables = build_tables(MaskSpec.create(pattern, q_tile=t, kv_tile=t), "cpu")
    assert tables.fused is not None
    gen = torch.Generator().manual_seed(0)
    n = tables.q_len
    q = torch.randint(0, n, (200_000,), generator=gen)
    near = (q + torch.randint(-3000, 3000, q.shape, generator=gen)).clamp(0, n - 1)
    far = torch.randint(0, n, q.shape, generator=gen)
    for kv in (q, near, far, torch.full_like(q, n - 1), torch.zeros_like(q)):
        packed = tables.mask_mod(fused=True)(0, 0, q, kv)
        per_axis = tables.mask_mod(fused=False)(0, 0, q, kv)
        assert torch.equal(packed, per_axis)
    assert tables.mask_mod(fused=True)(0, 0, q, q).float().mean() > 0.5  # real tokens attend themselves
