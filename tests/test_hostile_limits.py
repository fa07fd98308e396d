"""Limits stated up front (issue 13, items 5 and 6).

Token counts past int32 indices (extra tokens, packed totals) and BlockMasks past the mask limit
raise a ValueError naming the argument, value and range at once (nothing built or compiled);
``tiles="auto"`` keeps the sequence length of a shape whatever the pattern.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import torch

import flexna
from flexna.analysis import choose_tiles, search_tiles
from flexna.spec import DEFAULT_MASK_LIMIT, MaskSpec

INT32_MAX = 2**31 - 1


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if a BlockMask or the kernel is reached: the limits must be checked before."""
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("built or ran before the limits were checked")

    monkeypatch.setattr(flexna.blockmask, "spec_maps", fail)
    monkeypatch.setattr(flexna.functional, "run_flex", fail)


@pytest.fixture
def limit() -> Iterator[None]:
    """Restore the mask limit after a test that changes it."""
    previous = flexna.mask_limit()
    yield
    flexna.set_mask_limit(previous)


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def test_extra_tokens_within_int32(no_build: None) -> None:
    p = flexna.NAPattern.create((64, 64), 3)
    with pytest.raises(ValueError, match=rf"num_extra_kv .* = {2**31} is out of range: .* need "
                                         rf"num_extra_kv <= {INT32_MAX - 4096}"):
        MaskSpec.create(p, num_extra_kv=2**31)
    with pytest.raises(ValueError, match=rf"num_extra_q .* need num_extra_q <= {INT32_MAX - 4096}"):
        flexna.extended_na_block_mask((64, 64), 3, num_extra_q=INT32_MAX - 4095)
    MaskSpec.create(p, num_extra_kv=INT32_MAX - 4096)  # the bound itself is allowed (spec only)
    q = meta(1, 2**20, 1, 16)
    extra = meta(1, 2**31, 1, 16)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"num_extra_kv .* is out of range"):
        flexna.na1d(q, q, q, 3, additional_keys=extra, additional_values=extra)
    assert time.monotonic() - start < 5


def test_packed_totals_within_int32(no_build: None) -> None:
    shapes = [(46340, 46340)] * 2  # each fits int32, together they do not
    assert math.prod(shapes[0]) <= INT32_MAX < 2 * math.prod(shapes[0])
    for call in (lambda: flexna.packed_length(shapes),
                 lambda: flexna.packed_block_mask(shapes, 3),
                 lambda: flexna.pack_tokens([meta(1, *s, 1, 4) for s in shapes], shapes)):
        with pytest.raises(ValueError, match=rf"shapes: 2 (packed )?samples .* int32 .* at most {INT32_MAX}"):
            call()


def test_huge_layout_fails_fast_with_the_limit(no_build: None) -> None:
    """(46340, 46340) passes the int32 check; its BlockMask (petabytes) is refused at once."""
    q = meta(1, 46340, 46340, 1, 16)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"BlockMask would take about .* layout \(46340, 46340\).* mask "
                                         rf"limit of {DEFAULT_MASK_LIMIT} bytes .*set_mask_limit"):
        flexna.na2d(q, q, q, 3)
    with pytest.raises(ValueError, match="mask limit"):
        flexna.na_block_mask((46340, 46340), 3)
    assert time.monotonic() - start < 5


def test_mask_limit_can_be_lowered_and_raised(limit: None) -> None:
    spec = MaskSpec.create(flexna.NAPattern.create((32, 32), 5))
    need = spec.estimated_bytes()
    assert flexna.set_mask_limit(need - 1) == DEFAULT_MASK_LIMIT
    with pytest.raises(ValueError, match=rf"\({need} bytes estimated: layout \(32, 32\).* limit of {need - 1}"):
        flexna.na_block_mask((32, 32), 5)
    x = torch.randn(1, 32, 32, 1, 8)
    flexna.clear_cache()  # a plan or mask an earlier test made would skip the check
    flexna.plan.clear_traced_plans()
    with pytest.raises(ValueError, match="mask limit"):
        flexna.na2d(x, x, x, 5, tiles=None)
    assert flexna.set_mask_limit(need) == need - 1
    flexna.na_block_mask((32, 32), 5)  # exactly the limit is allowed
    flexna.set_mask_limit(None)
    assert flexna.mask_limit() is None
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_bytes must be an int >= 0 or None"):
            flexna.set_mask_limit(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape,kernel,tiles", [((64, 64), 7, None), ((48, 40), 5, (8, 16)),
                                                 ((16, 16, 8), 3, None)])
def test_estimate_covers_the_built_mask(shape: tuple, kernel: int, tiles: tuple | None) -> None:
    """The estimate is at least the BlockMask's index tensors (measured on the built mask) and
    at most twice them plus the tables' 4-byte entries."""
    spec = MaskSpec.create(flexna.NAPattern.create(shape, kernel), q_tile=tiles, kv_tile=tiles)
    bm = flexna.na_block_mask(shape, kernel, q_tile=tiles, kv_tile=tiles)
    index = sum(t.numel() * t.element_size() for t in (
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.q_num_blocks,
        bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices) if t is not None)
    tokens = bm.seq_lengths[0] + bm.seq_lengths[1]
    assert index <= spec.estimated_bytes() <= 2 * index + 4 * (2 * len(shape) + 2) * tokens


def _auto_lengths(shape: tuple[int, ...], kernels: list[tuple[int, ...]]) -> set[tuple[int, int]]:
    """(query, key) sequence lengths the functional API runs ``shape`` in under tiles='auto',
    read from the BlockMask it hands to the kernel."""
    seen = set()
    x = torch.randn(1, *shape, 1, 8)

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        lengths = tuple(args[2].seq_lengths)  # type: ignore[attr-defined]
        assert q.shape[2] == lengths[0]
        seen.add(lengths)
        return torch.zeros(*q.shape[:3], 8)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flexna.functional, "run_flex", spy)
        for k in kernels:
            flexna.na2d(x, x, x, k) if len(shape) == 2 else flexna.na3d(x, x, x, k)
    return seen


def test_auto_tiles_keep_the_padded_length() -> None:
    """24 x 40 with kernels (1,1), (1,3), (3,1): one sequence length (the tile search used to pick
    (2, 64), (32, 4) or row-major, three lengths, three graphs)."""
    kernels = [(1, 1), (1, 3), (3, 1)]
    assert _auto_lengths((24, 40), kernels) == {(960, 960)}
    assert {search_tiles(flexna.NAPattern.create((24, 40), k), top=1)[0].q_tile for k in kernels} \
        >= {(2, 64), (32, 4)}  # with padding allowed the best tiles differ per pattern
    # a layout tiles divide: auto does tile for some patterns, and the length stays the layout's
    assert choose_tiles(flexna.NAPattern.create((64, 64), (3, 1))) is not None
    assert _auto_lengths((64, 64), [(1, 1), (3, 1), (3, 3), (13, 13)]) == {(4096, 4096)}
    assert _auto_lengths((8, 16, 16), [(1, 1, 1), (3, 5, 5), (1, 1, 9)]) == {(2048, 2048)}


def test_auto_tiles_run_a_shape_at_two_lengths_at_most() -> None:
    """A layout auto_shape pads (30 x 32 -> 32 x 32) runs under tiles='auto' at its own length
    (row-major or tiles dividing it) or the padded one, never a third, whatever the pattern;
    the padded length is taken where its tiles pay (stride 8 windows: 16 x 8 tiles, rows 30
    and 31 padding)."""
    from flexna.analysis import auto_shape

    assert auto_shape((30, 32)) == (32, 32)
    lengths = _auto_lengths((30, 32), [(1, 1), (3, 3), (7, 7), (8, 8), (15, 8), (13, 13)])
    assert lengths == {(960, 960), (1024, 1024)}
    # the strided window: the padded tiles (16 x 8 tiles do not divide 30 rows), exact
    x = torch.randn(1, 30, 32, 1, 8)
    want = flexna.na2d(x, x, x, 8, stride=8, tiles=None)
    got = flexna.na2d(x, x, x, 8, stride=8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert choose_tiles(flexna.NAPattern.create((30, 32), 8, 8), padding="auto") == ((16, 8), (16, 8))
