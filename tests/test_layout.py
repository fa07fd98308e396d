"""tile_tokens / untile_tokens / tiled_length vs the documented tiled order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import ceil_div, tiled_order
from hypothesis import given, settings
from hypothesis import strategies as st

import flexna


@st.composite
def layouts(draw, max_tokens=800):
    ndim = draw(st.integers(1, 3))
    shape, budget = [], max_tokens
    for _ in range(ndim):
        length = draw(st.integers(1, max(1, min(23, budget))))
        shape.append(length)
        budget = max(1, budget // length)
    tile = tuple(draw(st.integers(1, 6)) for _ in shape)
    rest = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    batch = draw(st.integers(1, 2))
    return tuple(shape), tile, rest, batch


@settings(max_examples=150, deadline=None)
@given(layouts(), st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64]))
def test_tile_places_tokens_at_documented_positions(layout, dtype):
    shape, tile, rest, batch = layout
    n = math.prod(shape)
    # every entry unique and nonzero, so that a misplaced or padded value is visible
    x = (torch.arange(batch * n * math.prod(rest)) + 1).reshape(batch, *shape, *rest).to(dtype)
    t = flexna.tile_tokens(x, shape, tile)
    order = torch.from_numpy(tiled_order(shape, tile))
    assert t.shape == (batch, len(order), *rest)
    assert t.dtype == dtype
    flat = x.reshape(batch, n, *rest)
    real = order >= 0
    assert torch.equal(t[:, real], flat[:, order[real]])
    assert (t[:, ~real] == 0).all(), "padding must be zeros"
    assert flexna.tiled_length(shape, tile) == len(order)
    back = flexna.untile_tokens(t, shape, tile)
    assert back.shape == x.shape
    assert torch.equal(back, x)


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_untile_then_tile_on_real_positions(layout):
    shape, tile, rest, batch = layout
    length = flexna.tiled_length(shape, tile)
    y = torch.randn(batch, length, *rest)
    x = flexna.untile_tokens(y, shape, tile)
    assert x.shape == (batch, *shape, *rest)
    order = torch.from_numpy(tiled_order(shape, tile))
    real = order >= 0
    z = flexna.tile_tokens(x, shape, tile)
    assert torch.equal(z[:, real], y[:, real])
    assert (z[:, ~real] == 0).all()


@settings(max_examples=50, deadline=None)
@given(layouts())
def test_tiled_length_formula(layout):
    shape, tile, _, _ = layout
    assert flexna.tiled_length(shape, tile) == math.prod(
        ceil_div(length, t) * t for length, t in zip(shape, tile, strict=True))
    assert flexna.tiled_length(shape, None) == math.prod(shape)
    assert flexna.tiled_length(shape, 1) == math.prod(shape)


def test_scalar_tile_broadcasts():
    x = torch.randn(2, 5, 7, 3)
    assert torch.equal(flexna.tile_tokens(x, (5, 7), 2), flexna.tile_tokens(x, (5, 7), (2, 2)))
    assert flexna.tiled_length((5, 7), 2) == 6 * 8


def test_unit_tile_is_plain_reshape():
    x = torch.randn(2, 4, 5, 6, 3, 8)
    t = flexna.tile_tokens(x, (4, 5, 6), (1, 1, 1))
    assert torch.equal(t, x.reshape(2, 120, 3, 8))


def test_non_contiguous_input():
    base = torch.randn(2, 3, 9, 10)  # [B, heads, H, W] -> view as [B, H, W, heads]
    x = base.permute(0, 2, 3, 1)
    assert not x.is_contiguous()
    t = flexna.tile_tokens(x, (9, 10), (4, 3))
    order = torch.from_numpy(tiled_order((9, 10), (4, 3)))
    real = order >= 0
    assert torch.equal(t[:, real], x.reshape(2, 90, 3)[:, order[real]])
    assert torch.equal(flexna.untile_tokens(t, (9, 10), (4, 3)), x)


def test_gradients_flow_through_tiling():
    x = torch.randn(1, 5, 6, 2, requires_grad=True)
    t = flexna.tile_tokens(x, (5, 6), (2, 4))
    w = torch.randn_like(t)
    (t * w).sum().backward()
    order = torch.from_numpy(tiled_order((5, 6), (2, 4)))
    real = order >= 0
    want = torch.zeros(1, 30, 2)
    want[:, order[real]] = w[:, real]
    assert torch.equal(x.grad.reshape(1, 30, 2), want)


@pytest.mark.parametrize(
    "x_shape,shape,tile",
    [
        ((2, 7, 3), (8,), 2),            # spatial length differs
        ((2, 8), (8, 1), (2, 1)),        # missing axis
        ((8,), (8,), 2),                 # no batch axis
        ((2, 4, 5, 3), (5, 4), (2, 2)),  # axes swapped
    ],
)
def test_tile_tokens_rejects_wrong_shapes(x_shape, shape, tile):
    with pytest.raises(ValueError, match=r"x must be shaped \[batch"):
        flexna.tile_tokens(torch.zeros(x_shape), shape, tile)


@pytest.mark.parametrize(
    "x_shape,shape,tile",
    [
        ((2, 9, 3), (8,), 2),      # tiled length is 8
        ((2, 7), (7,), 2),         # tiled length is 8, got 7 (unpadded)
        ((10,), (8,), 2),
        ((1, 20, 2), (5, 4), (2, 2)),  # tiled length is 6 * 4 = 24 (padding included)
    ],
)
def test_untile_tokens_rejects_wrong_lengths(x_shape, shape, tile):
    expected = flexna.tiled_length(shape, tile)
    with pytest.raises(ValueError, match=rf"x must be shaped \[batch, {expected}"):
        flexna.untile_tokens(torch.zeros(x_shape), shape, tile)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_round_trip_on_cuda():
    x = torch.randn(2, 7, 9, 3, device="cuda")
    t = flexna.tile_tokens(x, (7, 9), (2, 4))
    assert t.device == x.device
    assert torch.equal(flexna.untile_tokens(t, (7, 9), (2, 4)), x)
    order = torch.from_numpy(np.asarray(tiled_order((7, 9), (2, 4))))
    real = order >= 0
    assert torch.equal(t[:, real.cuda()].cpu(), x.reshape(2, 63, 3)[:, order[real].cuda()].cpu())
