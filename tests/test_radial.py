"""Radial attention against its authors' construction, and the 3-D-window variant against a
brute-force statement of its definition; mask_mod and BlockMask (exact full / partial blocks)."""

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
from flexna.radial import radial_pattern, radial_window_pattern
from flexna.reference import reference_attention, reference_radial_mask
from flexna.tables import build_tables


def window_brute(shape, radius, min_radius, dense_frames, sink) -> torch.Tensor:
    """The 3-D-window rule over all pairs, per frame pair (no flexna code)."""
    f, *spatial = shape
    coords = np.stack(np.unravel_index(np.arange(math.prod(shape)), shape), axis=1)
    d = np.abs(coords[:, None, 0] - coords[None, :, 0])
    ok = np.ones(d.shape, dtype=bool)
    for a in range(len(spatial)):
        r = np.empty(d.shape, dtype=np.int64)
        for dist in range(f):
            halvings = max(0, int(dist).bit_length() - int(dense_frames).bit_length())
            r[d == dist] = max(radius[a] // 2**halvings, min_radius[a])
        ok &= np.abs(coords[:, None, a + 1] - coords[None, :, a + 1]) <= r
    if sink:
        ok |= coords[None, :, 0] == 0
    return torch.from_numpy(ok)


@st.composite
def radial_configs(draw):
    frames = draw(st.integers(1, 12))
    tokens = draw(st.integers(1, max(1, 700 // frames)))
    model = draw(st.sampled_from(["hunyuan", "wan"]))
    decay = draw(st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0]))
    threshold = draw(st.sampled_from([1, 2, 3, 5, 8, 16, 128]))
    return frames, tokens, model, decay, threshold


@settings(max_examples=80, deadline=None)
@given(radial_configs(), st.sampled_from([8, 16, 32, 64, 128]), st.booleans())
def test_radial_equals_the_authors_construction(cfg, block, tiled) -> None:
    frames, tokens, model, decay, threshold = cfg
    p = radial_pattern(frames, tokens, model=model, decay_factor=decay, block_size=threshold)
    ref = reference_radial_mask(frames, tokens, model, decay, threshold)
    assert p.density() == pytest.approx(ref.double().mean().item())
    tile = (2, 4) if tiled and frames > 1 and tokens > 3 else None
    spec = flexna.MaskSpec.create(p, q_tile=tile, kv_tile=tile, block_size=block)
    want = permuted_mask(ref, p.shape, tile, tile)
    assert torch.equal(dense_mask(build_tables(spec, "cpu").mask_mod(), *want.shape), want)
    blocks = (spec.q_block, spec.kv_block)
    assert_block_masks_equal(spec_block_mask(spec, "cpu"), expected_block_mask(want, blocks),
                             f"{cfg} block {block} tile {tile}")


@st.composite
def window_configs(draw):
    n = draw(st.integers(2, 3))
    frames = draw(st.integers(1, 9))
    spatial = tuple(draw(st.integers(1, 9 if n == 3 else 40)) for _ in range(n - 1))
    radius = tuple(draw(st.integers(0, 2 * s)) for s in spatial)
    low = tuple(draw(st.integers(0, r)) for r in radius)
    return (frames, *spatial), radius, low, draw(st.integers(0, 4)), draw(st.booleans())


@settings(max_examples=80, deadline=None)
@given(window_configs(), st.sampled_from([4, 16, 64]))
def test_radial_window_variant(cfg, block) -> None:
    shape, radius, low, dense, sink = cfg
    p = radial_window_pattern(shape, radius, min_radius=low, dense_frames=dense, sink=sink)
    want = window_brute(shape, radius, low, dense, sink)
    assert p.density() == pytest.approx(want.double().mean().item())
    spec = flexna.MaskSpec.create(p, block_size=block)
    assert torch.equal(dense_mask(build_tables(spec, "cpu").mask_mod(), *want.shape), want)
    assert_block_masks_equal(spec_block_mask(spec, "cpu"), expected_block_mask(want, (block, block)), str(cfg))


def test_radial_with_text_tokens_and_attention() -> None:
    """The authors' use: text rows and columns dense (extra queries and keys)."""
    frames, tokens, text = 6, 20, 7
    p = radial_pattern(frames, tokens, model="wan", block_size=4)
    spec = flexna.MaskSpec.create(p, block_size=16, num_extra_q=text, num_extra_kv=text)
    n = frames * tokens
    want = torch.ones(n + text, n + text, dtype=torch.bool)
    want[:n, :n] = reference_radial_mask(frames, tokens, "wan", 1.0, 4)
    bm = spec_block_mask(spec, "cpu")
    assert_block_masks_equal(bm, expected_block_mask(want, (16, 16)))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n + text, 8, generator=g) for _ in range(3))
    import warnings

    from torch.nn.attention.flex_attention import flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=bm)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, want)[0], atol=1e-5, rtol=1e-5)


def test_radial_bands_shrink_and_give_full_blocks() -> None:
    """Widths halve as the distance doubles; the BlockMask has full blocks far off the
    diagonal (the exact box test, not the envelope/core bound)."""
    p = radial_pattern(16, 256, model="hunyuan", block_size=32)
    widths = [r[0] for r in p.radius]
    assert widths == [256, 256, 128, 64, 32]
    assert p.split == (1, 1, 1, 2, 4)
    bm = spec_block_mask(flexna.MaskSpec.create(p, block_size=64), "cpu")
    full = bm.full_kv_num_blocks.sum().item()
    ref = reference_radial_mask(16, 256, "hunyuan", 1.0, 32)
    want = expected_block_mask(ref, (64, 64))
    assert full == want.full_kv_num_blocks.sum().item() > 16 * 4 * 3


@pytest.mark.parametrize("call,match", [
    (lambda: radial_pattern(0, 8), "num_frames must be an int >= 1, got 0"),
    (lambda: radial_pattern(4, 8, model="cog"), "model = 'cog' is not supported"),
    (lambda: radial_pattern(4, 8, decay_factor=0), "decay_factor must be a finite number > 0"),
    (lambda: radial_window_pattern((4, 8, 8), (3, -1)), r"radius\[axis 1\] = -1"),
    (lambda: radial_window_pattern((4, 8, 8), 3, min_radius=4), r"min_radius\[axis 0\] = 4 .* radius = 3"),
    (lambda: radial_window_pattern((16,), 3), "frames, \\*spatial"),
])
def test_radial_bad_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_radial_refuses_curve_orders() -> None:
    with pytest.raises(ValueError, match="not separable per axis"):
        flexna.MaskSpec.create(radial_pattern(4, 16), q_curve="hilbert")


def test_reference_window_mask_agrees_with_the_test_brute_force() -> None:
    from flexna.reference import reference_radial_window_mask

    for cfg in [((5, 4, 6), (2, 3), (0, 1), 1, False), ((9, 7), (5,), (1,), 0, True),
                ((4, 3, 3), (0, 2), (0, 0), 3, True)]:
        assert torch.equal(reference_radial_window_mask(*cfg), window_brute(*cfg))


def test_radial_catalogue_entries_and_pictures(tmp_path) -> None:
    import json

    from flexna.tools.catalogue import CatalogueError, load_entry
    from flexna.tools.render import neighborhood_categories

    entry = load_entry("wan-radial")
    assert entry.pattern.sink and entry.pattern.shape == (21, 1560)
    window = load_entry("video-radial-window").pattern
    cat = neighborhood_categories(window, (8, 16, 16))
    want = reference_radial_window_mask_row(window, (8, 16, 16))
    assert np.array_equal(cat >= 1, want) and cat[8, 16, 16] == 3  # attended keys, the query
    base = {"name": "x", "description": "d", "source": "s", "rule": "radial", "shape": [4, 16],
            "model": "wan", "decay_factor": 1.0, "block_size": 8, "heads": 1, "head_dim": 8}
    for change, field in (({"model": 3}, "model"), ({"decay_factor": "1"}, "decay_factor"),
                          ({"shape": [4, 4, 4]}, "shape"), ({"model": "cog"}, "model")):
        (tmp_path / "x.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(CatalogueError) as err:
            load_entry("x", tmp_path)
        assert err.value.field == field, err.value


def reference_radial_window_mask_row(pattern, query) -> np.ndarray:
    from flexna.reference import reference_radial_window_mask

    radius = pattern.radius[0]
    low = pattern.radius[-1]
    mask = reference_radial_window_mask(pattern.shape, radius, low, 1, pattern.sink)
    row = int(np.ravel_multi_index(query, pattern.shape))
    return mask[row].numpy().reshape(pattern.shape)


def test_hand_built_radial_rule_with_growing_widths() -> None:
    """A RadialPattern built by hand whose widths grow with the distance on two spatial axes
    (the box test's general branch): mask_mod and BlockMask against the element rule."""
    from flexna.radial import RadialPattern

    base = flexna.NAPattern.create((6, 5, 7), (6, 5, 7))
    p = RadialPattern(base.shape, base.kernel_size, base.stride, base.dilation, base.is_causal,
                      radius=((0, 1), (2, 0), (1, 3), (4, 6)), split=(1, 1, 2, 3), sink=True)
    coords = np.stack(np.unravel_index(np.arange(210), p.shape), axis=1)
    d = np.abs(coords[:, None, 0] - coords[None, :, 0])
    group = np.vectorize(lambda v: int(v).bit_length())(d)
    rad = np.array(p.radius)[group]
    keep = d % np.array(p.split)[group] == 0
    want = keep & (np.abs(coords[:, None, 1:] - coords[None, :, 1:]) <= rad).all(-1)
    want = torch.from_numpy(want | (coords[None, :, 0] == 0))
    for tile, block in ((None, 8), ((2, 2, 2), 16), ((1, 5, 7), 35)):
        spec = flexna.MaskSpec.create(p, q_tile=tile, kv_tile=tile, block_size=block)
        ordered = permuted_mask(want, p.shape, tile, tile)
        assert torch.equal(dense_mask(build_tables(spec, "cpu").mask_mod(), *ordered.shape), ordered)
        assert_block_masks_equal(spec_block_mask(spec, "cpu"), expected_block_mask(ordered, (block, block)),
                                 str(tile))
