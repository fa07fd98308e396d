"""Sliding tile attention (STA) against its authors' definition, on its whole parameter domain.

``sta_brute`` restates attention-gym's ``generate_sta_mask_mod_2d/3d`` (FastVideo's STA mask
for FlexAttention) for any axis count, straight on sequence indices of the tiled order:
tile id from the index, tile coordinates from the tile id, the window centre clamped in tile
units, text after the video tokens. It shares no code with flexna.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_block_masks_equal, dense_mask, expected_block_mask, permuted_mask
from hypothesis import given, settings
from hypothesis import strategies as st

import flexna
from flexna.blockmask import spec_block_mask
from flexna.reference import reference_mask, reference_sliding_tile_mask
from flexna.sliding_tile import sliding_tile_pattern, sta_block_mask, sta_mask_mod, sta_spec
from flexna.tables import build_tables


def sta_brute(canvas, kernel_tiles, tile, text_len=0, text_pad=0, kv_text=None,
              symmetric=False) -> np.ndarray:
    """Dense ``[Nq, Nkv]`` STA mask over tiled-order indices (video, then text).

    ``symmetric``: FastVideo's own Flex reference (``st_attn.generate_sta_mask``), which
    uses ``kernel // 2`` tiles on both sides instead of attention-gym's left/right split.
    """
    n = len(canvas)
    grid = [c // t for c, t in zip(canvas, tile, strict=True)]
    numel = math.prod(tile)
    vision = math.prod(canvas)
    kv_text = text_len + text_pad if kv_text is None else kv_text
    q = np.arange(vision + text_len + text_pad)[:, None]
    kv = np.arange(vision + kv_text)[None, :]

    def tile_coords(idx):
        tile_id = idx // numel
        out = []
        for a in range(n):
            out.append((tile_id // math.prod(grid[a + 1:])) % grid[a])
        return out

    qt, kt = tile_coords(q), tile_coords(kv)
    ok = np.ones((q.size, kv.size), dtype=bool)
    for a in range(n):
        k = kernel_tiles[a]
        if symmetric:
            centre = np.clip(qt[a], k // 2, (grid[a] - 1) - k // 2)
            if k // 2 > (grid[a] - 1) - k // 2:  # torch's clamp with min > max gives max
                centre = np.full_like(qt[a], (grid[a] - 1) - k // 2)
            ok &= np.abs(centre - kt[a]) <= k // 2
        else:
            left, right = k // 2, k // 2 + (k % 2 - 1)
            centre = np.clip(qt[a], left, (grid[a] - 1) - right)
            ok &= (kt[a] >= centre - left) & (kt[a] <= centre + right)
    vision_mask = (q < vision) & (kv < vision)
    to_text = (q < vision) & (kv >= vision) & (kv < vision + text_len)
    text_to_all = (q >= vision) & (kv < vision + text_len)
    return (vision_mask & ok) | to_text | text_to_all


@st.composite
def sta_configs(draw, max_tokens: int = 700):
    n = draw(st.integers(1, 3))
    while True:
        tile = tuple(draw(st.integers(1, 4)) for _ in range(n))
        grid = tuple(draw(st.integers(1, 6)) for _ in range(n))
        if math.prod(tile) * math.prod(grid) <= max_tokens:
            break
    window = tuple(draw(st.integers(1, g)) for g in grid)
    shape = tuple(t * g for t, g in zip(tile, grid, strict=True))
    text = draw(st.sampled_from([0, 0, 1, 5, 17]))
    pad = draw(st.sampled_from([0, 0, 3]))
    return shape, tile, window, text, pad


@settings(max_examples=120, deadline=None)
@given(sta_configs())
def test_sta_mask_mod_equals_the_authors_definition(cfg) -> None:
    shape, tile, window, text, pad = cfg
    want = torch.from_numpy(sta_brute(shape, window, tile, text, pad, kv_text=text))
    got = dense_mask(sta_mask_mod(shape, tile, window, text_length=text, text_padding=pad,
                                  device="cpu"), *want.shape)
    assert torch.equal(got, want)
    # the row-major reference (independent statement) re-expressed in the tiled order
    ref = permuted_mask(reference_sliding_tile_mask(shape, tile, window), shape, tile, tile)
    n = math.prod(shape)
    assert torch.equal(want[:n, :n], ref)


@settings(max_examples=60, deadline=None)
@given(sta_configs(max_tokens=400), st.sampled_from([None, 1, 2]))
def test_sta_block_mask_equals_create_block_mask(cfg, tiles_per_block) -> None:
    shape, tile, window, text, pad = cfg
    per_tile = math.prod(tile)
    block = None if tiles_per_block is None else per_tile * tiles_per_block
    got = sta_block_mask(shape, tile, window, text_length=text, text_padding=pad, block_size=block,
                         device="cpu")
    dense = torch.from_numpy(sta_brute(shape, window, tile, text, pad, kv_text=text))
    b = sta_spec(shape, tile, window, block_size=block).q_block  # default: one tile (128 if 1 token)
    assert_block_masks_equal(got, expected_block_mask(dense, (b, b)), f"{cfg} block {b}")


@pytest.mark.parametrize("tile,window", [((2, 3), (3, 1)), ((4, 4), (5, 3)), ((1, 2), (2, 3))])
def test_odd_windows_are_gna_with_stride_tile(tile, window) -> None:
    """Odd windows (or 1-token tiles): STA equals GNA with kernel = window * tile, stride = tile."""
    shape = (12, 12) if tile != (4, 4) else (20, 12)
    p = sliding_tile_pattern(shape, tile, window)
    assert p.equals_gna
    gna = reference_mask(shape, p.kernel_size, p.stride)
    assert torch.equal(reference_sliding_tile_mask(shape, tile, window), gna)


@pytest.mark.parametrize("shape,tile,window", [((16,), (4,), (2,)), ((12, 12), (2, 3), (2, 3)),
                                               ((8, 8, 8), (2, 2, 2), (3, 3, 2))])
def test_even_windows_are_not_gna(shape, tile, window) -> None:
    """An even window (tile > 1, not the whole axis) is tile-aligned: GNA's is half a tile off."""
    p = sliding_tile_pattern(shape, tile, window)
    assert not p.equals_gna
    gna = reference_mask(shape, p.kernel_size, p.stride)
    sta = reference_sliding_tile_mask(shape, tile, window)
    assert not torch.equal(sta, gna)
    assert torch.equal(sta.sum(1), gna.sum(1))  # same key count per query, other keys


def test_fastvideo_symmetric_reference_is_the_next_odd_window() -> None:
    """FastVideo's own Flex reference uses ``k // 2`` tiles each side: an even k there is the
    odd window k + 1 here (capped at the grid); odd windows agree."""
    shape, tile = (6, 20), (1, 2)
    for kt in range(1, 7):
        for kw in range(1, 11):
            fv = sta_brute(shape, (kt, kw), tile, symmetric=True)
            mine = sta_brute(shape, (min(kt + 1 - kt % 2, 6), min(kw + 1 - kw % 2, 10)), tile)
            assert np.array_equal(fv, mine), (kt, kw)


def test_sta_per_head_windows() -> None:
    shape, tile = (8, 12), (2, 3)
    windows = [(1, 1), (2, 3), (4, 4), (3, 2)]
    spec = sta_spec(shape, tile, flexna.PerHead(windows), text_length=4)
    mm = build_tables(spec, "cpu").mask_mod()
    q = torch.arange(spec.q_len)[:, None]
    kv = torch.arange(spec.kv_len)[None, :]
    for h, w in enumerate(windows):
        want = torch.from_numpy(sta_brute(shape, w, tile, 4))
        assert torch.equal(mm(torch.tensor(0), torch.tensor(h), q, kv), want), h
    bm = spec_block_mask(spec, "cpu")
    assert bm.kv_num_blocks.shape[1] == len(windows)


def test_sta_blocks_are_full_or_empty() -> None:
    """On one-tile blocks STA has no partial video block (it is exactly block-sparse)."""
    bm = sta_block_mask((12, 16, 16), (3, 4, 4), (2, 3, 2), device="cpu")
    assert int(bm.kv_num_blocks.sum()) == 0
    assert int(bm.full_kv_num_blocks.sum()) == 4 * 4 * 4 * 2 * 3 * 2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sta_attention_matches_reference() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    from flexna.reference import reference_attention

    shape, tile, window, text = (4, 8, 8), (2, 4, 4), (2, 1, 2), 5
    bm = sta_block_mask(shape, tile, window, text_length=text, device="cpu")
    n = math.prod(shape) + text
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=bm)
    want, _ = reference_attention(q, k, v, torch.from_numpy(sta_brute(shape, window, tile, text)))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(shape=(12, 10), tile=(4, 4), window=1), r"tile\[axis 1\] = 4 .*divisor of shape\[axis 1\] = 10"),
    (dict(shape=(12, 12), tile=(4, 4), window=(1, 4)), r"window\[axis 1\] = 4 .*1 <= window <= .* = 3"),
    (dict(shape=(12, 12), tile=0, window=1), r"tile\[axis 0\] = 0"),
    (dict(shape=(12, 12), tile=4, window=(0, 1)), r"window\[axis 0\] = 0"),
])
def test_sta_bad_input(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        sliding_tile_pattern(**kwargs)


def test_sta_bad_text_and_head() -> None:
    with pytest.raises(ValueError, match="text_length must be an int >= 0"):
        sta_spec((8, 8), 2, 1, text_length=-1)
    with pytest.raises(ValueError, match=r"head 1: window\[axis 0\] = 9"):
        sta_spec((8, 8), 2, flexna.PerHead([1, (9, 1)]))


def test_sta_catalogue_entries(tmp_path) -> None:
    import json

    from flexna.tools.catalogue import CatalogueError, load_entry

    entry = load_entry("hunyuan-sta")
    assert isinstance(entry.pattern, flexna.SlidingTilePattern)
    assert entry.pattern.window == (3, 3, 3) and entry.pattern.tile == (6, 8, 8)
    base = {"name": "x", "description": "d", "source": "s", "rule": "sliding_tile", "shape": [8, 8],
            "tile": [2, 2], "window": [2, 5], "heads": 1, "head_dim": 8}
    for change, field in (({"rule": "spiral"}, "rule"), ({"window": [2, 5]}, "window"),
                          ({"tile": [3, 2]}, "tile")):
        (tmp_path / "x.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(CatalogueError) as err:
            load_entry("x", tmp_path)
        assert err.value.field == field, err.value
    bad = dict(base)
    del bad["window"]
    (tmp_path / "x.json").write_text(json.dumps(bad))
    with pytest.raises(CatalogueError, match="'window': missing"):
        load_entry("x", tmp_path)


def test_sta_render_draws_the_tile_aligned_window() -> None:
    from flexna.tools.render import axis_flags, block_stats

    p = sliding_tile_pattern((16, 16), (4, 4), (2, 3))
    rows = axis_flags(p, 0, 9)["attended"]  # tile 2, window 2 tiles: tiles 1..2
    assert rows.nonzero()[0].tolist() == list(range(4, 12))
    stats = block_stats(p, (4, 4), (4, 4))
    assert stats.partial == 0 and stats.full == 16 * 2 * 3


@pytest.mark.parametrize("name", ["sta-2d-even", "hunyuan-sta"])
def test_show_draws_sta_in_its_own_tiles(tmp_path, name) -> None:
    """``flexna show`` draws an STA entry in STA's tiled order (blocks of one tile, all full or
    empty), byte for byte the catalogue's committed picture (it once fell back to row-major)."""
    from importlib.resources import files

    from flexna.tools.cli import main

    out = tmp_path / f"{name}.png"
    assert main(["show", name, "--out", str(out)]) == 0
    committed = files("flexna.tools.masks") / f"{name}.png"  # the catalogue as installed
    assert out.read_bytes() == committed.read_bytes()
