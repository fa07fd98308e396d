"""na_block_mask (analytic) vs torch's create_block_mask over the brute-force mask.

The expected BlockMask is built by torch itself (``create_block_mask``) from a
mask_mod that looks up ``reference_mask`` re-expressed in the tiled orders by
tests/helpers.py (written from the documented order, not from flexna). flexna's
block sets must equal torch's exactly: same full blocks, same partial blocks,
per query-block row and per key-block column (the transposed q_* tensors), with the
same shapes and seq_lengths.
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
from helpers import (
    assert_block_masks_equal,
    block_maps,
    dense_mask,
    expected_block_mask,
    permuted_mask,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import Config, TiledConfig, configs, tiled_configs

import flexna
from flexna.reference import reference_mask


def _default_block(tile) -> int:
    # documented default: 128 for a row-major side, the tile's token count for a tiled side
    return 128 if tile is None or math.prod(tile) == 1 else math.prod(tile)


def _check(tc: TiledConfig) -> None:
    cfg = tc.cfg
    ref = permuted_mask(reference_mask(*cfg.args()), cfg.shape, tc.q_tile, tc.kv_tile)
    assert ref.shape == (tc.q_len, tc.kv_len)
    got = flexna.na_block_mask(**cfg.kwargs(), q_tile=tc.q_tile, kv_tile=tc.kv_tile,
                               block_size=tc.block_size, device="cpu")
    bs = tc.block_size or (_default_block(tc.q_tile), _default_block(tc.kv_tile))
    want = expected_block_mask(ref, bs)
    assert_block_masks_equal(got, want, context=repr(tc))
    # the BlockMask's own mask_mod is the pattern in these orders
    assert torch.equal(dense_mask(got.mask_mod, tc.q_len, tc.kv_len), ref), repr(tc)


@settings(max_examples=250, deadline=None)
@given(tiled_configs())
def test_block_mask_equals_create_block_mask(tc):
    _check(tc)


@settings(max_examples=80, deadline=None)
@given(configs(max_tokens=600), st.data())
def test_row_major_any_block_size(cfg, data):
    """Row-major orders accept any block size, including 1 and sizes above N."""
    n = cfg.num_tokens
    bq = data.draw(st.one_of(st.integers(1, n + 3), st.sampled_from([1, 2, 16, 128, 129])))
    bkv = data.draw(st.one_of(st.integers(1, n + 3), st.sampled_from([1, 3, 64, 128, 200])))
    bq = max(bq, -(-n // 300))
    bkv = max(bkv, -(-n // 300))
    _check(TiledConfig(cfg, None, None, (bq, bkv)))


@pytest.mark.parametrize(
    "tc",
    [
        # 2-D, stride == kernel == tile: every block full or empty
        TiledConfig(
            Config((16, 24), (4, 8), (4, 8), (1, 1), (False, False)),
            (4, 8), (4, 8), None),
        # padding on both axes, different q / kv tiles, causal axis
        TiledConfig(
            Config((13, 11), (5, 4), (2, 3), (1, 2), (True, False)),
            (3, 2), (2, 5), (12, 20)),
        # 3-D dilated with blocks that straddle tile-grid rows
        TiledConfig(
            Config((7, 9, 10), (3, 2, 5), (1, 2, 5), (2, 3, 1),
                                             (False, True, False)),
            (2, 2, 3), (3, 1, 2), (36, 18)),
        # single token
        TiledConfig(Config((1,), (1,), (1,), (1,), (True,)),
                    (3,), None, None),
        # length 1 axes among others
        TiledConfig(Config((1, 37, 1), (1, 6, 1), (1, 3, 1), (1, 5, 1),
                                                     (False, False, True)), (1, 4, 2), (2, 3, 1),
                    (8, 30)),
    ],
    ids=["blocked2d", "padded-causal", "dilated3d", "single", "unit-axes"],
)
def test_block_mask_examples(tc):
    _check(tc)


def test_default_block_sizes():
    bm = flexna.na_block_mask((10, 30), (3, 5))
    assert tuple(bm.BLOCK_SIZE) == (128, 128)
    bm = flexna.na_block_mask((10, 30), (3, 5), q_tile=(2, 4), kv_tile=(5, 1))
    assert tuple(bm.BLOCK_SIZE) == (8, 5)
    assert tuple(bm.seq_lengths) == (10 * 32, 10 * 30)
    bm = flexna.na_block_mask((10, 30), (3, 5), q_tile=(2, 4), block_size=16)
    assert tuple(bm.BLOCK_SIZE) == (16, 16)


def test_block_mask_tensors_on_requested_device():
    bm = flexna.na_block_mask((6, 7), 3, q_tile=2, kv_tile=(3, 1), device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        t = getattr(bm, name)
        assert t.device.type == "cpu" and t.dtype == torch.int32, name


# ----------------------------------------------------------------------------------------------
# The 3-D budget case of the README: 30 x 48 x 80 tokens (115,200), kernel 18 x 24 x 24.

BUDGET_SHAPE = (30, 48, 80)
BUDGET_KERNEL = (18, 24, 24)
BUDGET_TILE = (2, 8, 8)


def _median_build_ms(**kwargs) -> float:
    flexna.na_block_mask(BUDGET_SHAPE, BUDGET_KERNEL, **kwargs)  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        flexna.na_block_mask(BUDGET_SHAPE, BUDGET_KERNEL, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@pytest.mark.parametrize("tile", [None, BUDGET_TILE], ids=["row-major", "tiled"])
def test_budget_build_time(tile):
    ms = _median_build_ms(q_tile=tile, kv_tile=tile, device="cpu")
    assert ms < 50.0, f"3-D budget BlockMask build took {ms:.1f} ms (median of 5), budget 50 ms"


def test_budget_block_counts():
    bm = flexna.na_block_mask(BUDGET_SHAPE, BUDGET_KERNEL, q_tile=BUDGET_TILE, kv_tile=BUDGET_TILE)
    assert tuple(bm.BLOCK_SIZE) == (128, 128)
    assert tuple(bm.seq_lengths) == (115200, 115200)
    assert int(bm.full_kv_num_blocks.sum()) == 24768
    assert int(bm.kv_num_blocks.sum()) == 124128
    # transposed views hold the same number of blocks
    assert int(bm.full_q_num_blocks.sum()) == 24768
    assert int(bm.q_num_blocks.sum()) == 124128


def test_budget_block_sets_independent():
    """Block sets of the budget case from a per-axis independent computation.

    With tile (2, 8, 8) and 128-token blocks every block is one tile, so a block pair is
    full / partial iff per axis the query tile's windows fully cover / touch the key
    tile (the pattern is a product over axes). The per-axis tables come from the scalar
    rule in tests/helpers.py, not from flexna.
    """
    from helpers import axis_ok

    per_axis_full, per_axis_any = [], []
    for length, k, t in zip(BUDGET_SHAPE, BUDGET_KERNEL, BUDGET_TILE, strict=True):
        ok = torch.tensor([[axis_ok(x, y, length, k, 1, 1, False) for y in range(length)]
                           for x in range(length)])
        nt = length // t
        tiles_ok = ok.reshape(nt, t, nt, t)
        per_axis_full.append(tiles_ok.all(dim=(1, 3)))
        per_axis_any.append(tiles_ok.any(dim=(1, 3)))
    full = per_axis_full[0][:, None, None, :, None, None] & per_axis_full[1][None, :, None, None, :, None] \
        & per_axis_full[2][None, None, :, None, None, :]
    anyb = per_axis_any[0][:, None, None, :, None, None] & per_axis_any[1][None, :, None, None, :, None] \
        & per_axis_any[2][None, None, :, None, None, :]
    nblocks = math.prod(n // t for n, t in zip(BUDGET_SHAPE, BUDGET_TILE, strict=True))
    full = full.reshape(nblocks, nblocks)
    partial = anyb.reshape(nblocks, nblocks) & ~full
    bm = flexna.na_block_mask(BUDGET_SHAPE, BUDGET_KERNEL, q_tile=BUDGET_TILE, kv_tile=BUDGET_TILE)
    maps = block_maps(bm)
    assert torch.equal(maps["kv_full"], full)
    assert torch.equal(maps["kv_partial"], partial)
    assert int(full.sum()) == 24768 and int(partial.sum()) == 124128


# ----------------------------------------------------------------------------------------------
# Sub-box regions (a shard's queries against its keys plus halo)

@st.composite
def region_configs(draw):
    tc = draw(tiled_configs(max_tokens=700, block_sizes=False))
    shape = tc.cfg.shape

    def region():
        out = []
        for length in shape:
            start = draw(st.integers(0, length - 1))
            out.append((start, draw(st.integers(start + 1, length))))
        return tuple(out)

    q_region, kv_region = region(), region()
    block = draw(st.sampled_from([None, (8, 16), (128, 128)]))
    if block is not None:  # multiples of the tile token counts
        block = tuple(b * (1 if t is None else math.prod(t))
                      for b, t in zip(block, (tc.q_tile, tc.kv_tile), strict=True))
    return tc, q_region, kv_region, block


@settings(max_examples=150, deadline=None)
@given(region_configs())
def test_region_block_mask_equals_create_block_mask(rc):
    from helpers import region_order

    tc, q_region, kv_region, block = rc
    cfg = tc.cfg
    ref = reference_mask(*cfg.args())
    qi = torch.from_numpy(region_order(cfg.shape, q_region, tc.q_tile))
    ki = torch.from_numpy(region_order(cfg.shape, kv_region, tc.kv_tile))
    want_dense = ref[qi.clamp_min(0)][:, ki.clamp_min(0)] & (qi >= 0)[:, None] & (ki >= 0)[None, :]
    got = flexna.na_block_mask(**cfg.kwargs(), q_tile=tc.q_tile, kv_tile=tc.kv_tile,
                               block_size=block, q_region=q_region, kv_region=kv_region,
                               device="cpu")
    bs = block or (_default_block(tc.q_tile), _default_block(tc.kv_tile))
    context = f"{tc!r} q_region={q_region} kv_region={kv_region} block={block}"
    assert_block_masks_equal(got, expected_block_mask(want_dense, bs), context=context)
    assert torch.equal(dense_mask(got.mask_mod, *want_dense.shape), want_dense), context


@pytest.mark.parametrize("region, message", [
    (((0, 5),), r"one \(start, stop\) pair per axis \(2\)"),
    (((0, 5), (3, 3)), r"q_region\[axis 1\] = \(3, 3\) is out of range: need 0 <= start < stop <= 12"),
    (((-1, 5), (0, 12)), r"q_region\[axis 0\] = \(-1, 5\)"),
    (((0, 11), (0, 12)), r"q_region\[axis 0\] = \(0, 11\) is out of range: need 0 <= start < stop <= 10"),
    ((1, 2), "one \\(start, stop\\) pair per axis"),
])
def test_region_validation(region, message):
    with pytest.raises(ValueError, match=message):
        flexna.na_block_mask((10, 12), 3, q_region=region)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.integers(0, 2**31))
def test_ordered_indices_gpu_and_cpu_algorithms_agree(k, rows, cols, density, seed):
    """The GPU (scatter, no sync) and CPU (nonzero) index builders give BlockMask's layout:
    per row the True columns in increasing order first; checked against a Python loop."""
    from flexna.blockmask import ordered_by_scatter, ordered_indices

    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(k, rows, cols, generator=g) < density
    for counts, idx in (ordered_indices(maps), ordered_by_scatter(maps)):
        assert counts.dtype == idx.dtype == torch.int32 and idx.is_contiguous()
        for a in range(k):
            for r in range(rows):
                want = [c for c in range(cols) if maps[a, r, c]]
                assert int(counts[a, r]) == len(want)
                assert idx[a, r, :len(want)].tolist() == want
