"""Adaptive blocks (NABLA threshold / top-k) united with the analytic BlockMask, against a
brute-force construction written here: per-block loops in float64 for the pooling, NumPy
for the softmax / sort / cumulative sum, and the reference mask for the window."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import expected_block_mask, permuted_mask, tiled_order
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import configs

import flexna
from flexna.reference import reference_attention, reference_mask
from flexna.tools.blockmaps import block_maps


def brute(q, k, shape, args, tile, n_extra, block, threshold, top_k):
    """(expected dense mask [B, H, Nq, Nkv], selection [B, H, rows, cols])."""
    order = tiled_order(shape, tile)  # row-major index per position, -1 padding
    n_layout = order.size
    nq = n_layout + n_extra
    real = np.zeros(nq, dtype=bool)
    real[:n_layout] = order >= 0
    base = torch.zeros(nq, nq, dtype=torch.bool)
    base[:n_layout, :n_layout] = permuted_mask(reference_mask(shape, *args), shape, tile, tile)
    base[:, n_layout:] = True
    base[n_layout:, :n_layout] = torch.from_numpy(real[:n_layout])
    qn, kn = q.double().numpy(), k.double().numpy()
    b, h, _, d = qn.shape
    blocks = -(-nq // block)
    sel = np.zeros((b, h, blocks, blocks), dtype=bool)
    for bi in range(b):
        for hi in range(h):
            pq, pk = np.zeros((blocks, d)), np.zeros((blocks, d))
            has = np.zeros(blocks, dtype=bool)
            for r in range(blocks):
                idx = [i for i in range(r * block, min(nq, (r + 1) * block)) if real[i]]
                has[r] = bool(idx)
                if idx:
                    pq[r] = qn[bi, hi, idx].mean(0)
                    pk[r] = kn[bi, hi, idx].mean(0)
            scores = pq @ pk.T / math.sqrt(d)
            scores[:, ~has] = -np.inf
            for r in range(blocks):
                if not has[r]:
                    continue
                if top_k is not None:
                    keep = np.argsort(-scores[r], kind="stable")[:top_k]
                    sel[bi, hi, r, keep] = True
                else:
                    p = np.exp(scores[r] - scores[r].max())
                    p /= p.sum()
                    asc = np.argsort(p, kind="stable")
                    sel[bi, hi, r, asc[np.cumsum(p[asc]) >= 1 - threshold]] = True
            sel[bi, hi][:, ~has] = False
    tokens = torch.from_numpy(sel).repeat_interleave(block, 2).repeat_interleave(block, 3)[..., :nq, :nq]
    pairs = torch.from_numpy(real[:, None] & real[None, :])
    return base | (tokens & pairs), torch.from_numpy(sel)


@settings(max_examples=30, deadline=None)
@given(configs(ndims=(2, 3), max_tokens=300, causal=False), st.sampled_from([None, 2]),
       st.sampled_from([0, 5]), st.sampled_from([16, 32]),
       st.one_of(st.tuples(st.sampled_from([0.5, 0.8, 0.95]), st.none()),
                 st.tuples(st.none(), st.integers(1, 4))),
       st.integers(0, 1000))
def test_adaptive_block_mask_equals_brute_force(cfg, tile_side, n_extra, block, mode, seed) -> None:
    threshold, top_k = mode
    tile = None if tile_side is None else (tile_side,) * cfg.ndim
    pattern = flexna.NAPattern.create(*cfg.args())
    block = block if tile is None else math.prod(tile) * (block // math.prod(tile) or 1)
    spec = flexna.MaskSpec.create(pattern, q_tile=tile, kv_tile=tile, block_size=block,
                                  num_extra_q=n_extra, num_extra_kv=n_extra)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, spec.q_len, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, spec.kv_len, 8, generator=g, dtype=torch.float64)
    want, want_sel = brute(q, k, cfg.shape, cfg.args()[1:], tile, n_extra, block, threshold, top_k)
    sel = flexna.select_blocks(q, k, spec, threshold=threshold, top_k=top_k)
    assert torch.equal(sel, want_sel)
    bm = flexna.adaptive_block_mask(q, k, spec, threshold=threshold, top_k=top_k)
    partial, full = block_maps(bm)
    assert not (partial & full).any()
    nq = spec.q_len
    qq, kk = torch.arange(nq)[:, None], torch.arange(nq)[None, :]
    for bi in range(2):
        for hi in range(2):
            got = bm.mask_mod(torch.tensor(bi), torch.tensor(hi), qq, kk)
            assert torch.equal(got, want[bi, hi]), (bi, hi)
            cover = lambda m: m.repeat_interleave(block, 0).repeat_interleave(block, 1)[:nq, :nq]  # noqa: E731
            dense = cover(full[bi, hi]) | (cover(partial[bi, hi]) & got)
            assert torch.equal(dense, want[bi, hi])
            ref = block_maps(expected_block_mask(want[bi, hi], (block, block)))
            # every block with a pair is listed; full blocks are all-True blocks (blocks mixing
            # layout and extra tokens may be listed partial where every pair attends)
            assert torch.equal(partial[bi, hi] | full[bi, hi], ref[0][0, 0] | ref[1][0, 0])
            assert not (full[bi, hi] & ~ref[1][0, 0]).any()
            if n_extra == 0 and tile is None:
                assert torch.equal(full[bi, hi], ref[1][0, 0])


def test_adaptive_union_keeps_the_window_and_attention_matches() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    pattern = flexna.NAPattern.create((16, 16), 5)
    spec = flexna.MaskSpec.create(pattern, q_tile=(4, 4), kv_tile=(4, 4), num_extra_kv=3, num_extra_q=2)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, spec.q_len, 16, generator=g)
    k = torch.randn(1, 2, spec.kv_len, 16, generator=g)
    v = torch.randn(1, 2, spec.kv_len, 16, generator=g)
    bm = flexna.adaptive_block_mask(q, k, spec, top_k=2)
    qq, kk = torch.arange(spec.q_len)[:, None], torch.arange(spec.kv_len)[None, :]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=bm)
    for h in range(2):
        dense = bm.mask_mod(torch.tensor(0), torch.tensor(h), qq, kk)
        window = flexna.tables.build_tables(spec, "cpu").mask_mod()(torch.tensor(0), torch.tensor(h), qq, kk)
        assert not (window & ~dense).any(), "the union dropped a window pair"
        assert dense.sum() > window.sum()
        ref, _ = reference_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], dense)
        torch.testing.assert_close(out[:, h:h + 1].double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of threshold"),
    (dict(threshold=0.5, top_k=2), "exactly one of threshold"),
    (dict(threshold=0.0), r"threshold = 0.0 is out of range: need 0 < threshold <= 1"),
    (dict(top_k=0), r"top_k = 0 is out of range"),
])
def test_adaptive_bad_input(kwargs, match) -> None:
    spec = flexna.MaskSpec.create(flexna.NAPattern.create((8, 8), 3))
    q = torch.randn(1, 1, 64, 8)
    with pytest.raises(ValueError, match=match):
        flexna.adaptive_block_mask(q, q, spec, **kwargs)
    with pytest.raises(ValueError, match=r"q must be a \[batch, heads, 64, dim\] tensor"):
        flexna.adaptive_block_mask(q[:, :, :10], q, spec, top_k=1)


def test_extra_query_blocks_over_keys_padded_on_a_later_axis() -> None:
    """Regression: a key block whose padding lies on axis 1 only (its axis-0 positions are real)
    is not full for extra queries; it was, so text queries attended padded (zero) keys."""
    from helpers import assert_block_masks_equal
    from torch.nn.attention.flex_attention import create_block_mask

    from flexna.blockmask import spec_block_mask
    from flexna.tables import build_tables

    spec = flexna.MaskSpec.create(flexna.NAPattern.create((3, 3), 3), q_tile=(2, 2), kv_tile=(2, 2),
                                  num_extra_q=4, block_size=4)
    mm = build_tables(spec, "cpu").mask_mod()
    want = create_block_mask(mm, None, None, spec.q_len, spec.kv_len, device="cpu", BLOCK_SIZE=4)
    assert_block_masks_equal(spec_block_mask(spec, "cpu"), want)


def test_new_selections_do_not_recompile() -> None:
    """Each call makes a new BlockMask and mask_mod; compiled Flex takes them without a new graph
    (the selection is a tensor of the same shape)."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    spec = flexna.MaskSpec.create(flexna.NAPattern.create((16, 16), 5), q_tile=(4, 4), kv_tile=(4, 4))
    flex = torch.compile(flex_attention)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i in range(3):
            q, k, v = (torch.randn(1, 2, spec.q_len, 16, generator=g) for _ in range(3))
            flex(q, k, v, block_mask=flexna.adaptive_block_mask(q, k, spec, top_k=2 + i))
            if i == 0:
                before = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == before
