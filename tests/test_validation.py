"""Every invalid argument is a ValueError naming the argument (and the axis where relevant).

Each entry-point is exercised: NAPattern.create, na_mask_mod, na_block_mask,
tile_tokens / untile_tokens / tiled_length and the functional API. Checks happen before
any attention runs (no compile is triggered here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flexna
from flexna import NAPattern

# (shape, kernel_size, extra kwargs, message regex)
PATTERN_ERRORS = [
    pytest.param((8,), 0, {}, r"kernel_size\[axis 0\] = 0 is out of range.*1 <= kernel_size", id="kernel0"),
    pytest.param((8, 8), (3, -1), {}, r"kernel_size\[axis 1\] = -1 is out of range", id="kernel-neg"),
    pytest.param((8, 8), (3, 9), {}, r"kernel_size\[axis 1\] = 9 is out of range.*8 // 1 = 8", id="kernel>L"),
    pytest.param((9, 8), (5, 3), {"dilation": (2, 1)},
                 r"kernel_size\[axis 0\] = 5 is out of range.*9 // 2 = 4", id="kernel*dil>L"),
    pytest.param((8,), 3, {"stride": 4}, r"stride\[axis 0\] = 4 is out of range.*stride <= kernel_size = 3",
                 id="stride>kernel"),
    pytest.param((8, 8), 3, {"stride": (1, 0)}, r"stride\[axis 1\] = 0 is out of range", id="stride0"),
    pytest.param((8, 8, 8), 3, {"stride": (1, 1, -2)}, r"stride\[axis 2\] = -2", id="stride-neg"),
    pytest.param((8,), 3, {"dilation": 0}, r"dilation\[axis 0\] = 0 is out of range.*dilation >= 1",
                 id="dilation0"),
    pytest.param((8, 8), 3, {"dilation": (1, -1)}, r"dilation\[axis 1\] = -1", id="dilation-neg"),
    # wrong tuple lengths
    pytest.param((8, 8), (3, 3, 3), {}, r"kernel_size must have one entry per layout axis \(2\)",
                 id="kernel-len"),
    pytest.param((8, 8), 3, {"stride": (1,)}, r"stride must have one entry per layout axis \(2\)",
                 id="stride-len"),
    pytest.param((8, 8), 3, {"dilation": (1, 1, 1)}, r"dilation must have one entry per layout axis",
                 id="dilation-len"),
    pytest.param((8, 8), 3, {"is_causal": (True,)}, r"is_causal must have one entry per layout axis",
                 id="causal-len"),
    pytest.param((8,), (), {}, r"kernel_size must have one entry per layout axis", id="kernel-empty"),
    # non-integers
    pytest.param((8,), 3.0, {}, r"kernel_size must be an int", id="kernel-float"),
    pytest.param((8,), "3", {}, r"kernel_size must be an int", id="kernel-str"),
    pytest.param((8,), None, {}, r"kernel_size must be an int", id="kernel-None"),
    pytest.param((8, 8), (3, 2.5), {}, r"kernel_size\[axis 1\] must be an int, got 2.5",
                 id="kernel-item-float"),
    pytest.param((8, 8), (3, "2"), {}, r"kernel_size\[axis 1\] must be an int", id="kernel-item-str"),
    pytest.param((8,), 3, {"stride": 1.0}, r"stride must be an int", id="stride-float"),
    pytest.param((8,), 3, {"dilation": "1"}, r"dilation must be an int", id="dilation-str"),
    pytest.param((8, 8), 3, {"dilation": (1, 1.0)}, r"dilation\[axis 1\] must be an int", id="dilation-item"),
    # bools where ints are expected, and ints where bools are expected
    pytest.param((8,), True, {}, r"kernel_size must be an int", id="kernel-bool"),
    pytest.param((8, 8), (3, True), {}, r"kernel_size\[axis 1\] must be an int, got True",
                 id="kernel-item-bool"),
    pytest.param((8,), 3, {"stride": True}, r"stride must be an int", id="stride-bool"),
    pytest.param((8, 8), 3, {"dilation": (False, 1)}, r"dilation\[axis 0\] must be an int",
                 id="dilation-item-bool"),
    pytest.param((8,), 3, {"is_causal": 1}, r"is_causal must be a bool", id="causal-int"),
    pytest.param((8,), 3, {"is_causal": "yes"}, r"is_causal must be a bool", id="causal-str"),
    pytest.param((8, 8), 3, {"is_causal": (True, 0)}, r"is_causal\[axis 1\] must be a bool",
                 id="causal-item-int"),
    # layouts
    pytest.param((0,), 1, {}, r"shape\[axis 0\] = 0 is out of range", id="length0"),
    pytest.param((4, 0, 4), 1, {}, r"shape\[axis 1\] = 0 is out of range", id="length0-axis1"),
    pytest.param((4, -3), 1, {}, r"shape\[axis 1\] = -3", id="length-neg"),
    pytest.param((), 1, {}, r"shape must have 1 to 3 axes, got 0", id="shape-empty"),
    pytest.param((2, 2, 2, 2), 1, {}, r"shape must have 1 to 3 axes, got 4", id="4-axes"),
    pytest.param((2.0, 2), 1, {}, r"shape\[axis 0\] must be an int", id="shape-float"),
    pytest.param((True, 2), 1, {}, r"shape\[axis 0\] must be an int", id="shape-bool"),
    pytest.param("88", 1, {}, r"shape must be a sequence", id="shape-str"),
    pytest.param(None, 1, {}, r"shape must be a sequence", id="shape-None"),
    pytest.param((2**16, 2**15), 1, {}, r"shape = \(65536, 32768\) has 2147483648 tokens",
                 id="too-many-tokens"),
    pytest.param((2**11, 2**10, 2**10), 1, {}, r"shape .* tokens, more than int32", id="too-many-3d"),
]


def _all_entry_points():
    """Callables taking the pattern arguments, all of which must validate identically."""
    return {
        "NAPattern.create": NAPattern.create,
        "na_mask_mod": flexna.na_mask_mod,
        "na_block_mask": flexna.na_block_mask,
    }


@pytest.mark.parametrize("entry", list(_all_entry_points()))
@pytest.mark.parametrize("shape,kernel,kwargs,match", PATTERN_ERRORS)
def test_pattern_errors(entry, shape, kernel, kwargs, match):
    fn = _all_entry_points()[entry]
    with pytest.raises(ValueError, match=match):
        fn(shape, kernel, **kwargs)


def test_max_tokens_boundary_is_accepted():
    """2**31 - 1 tokens is allowed (NAPattern only; no tensors are made)."""
    p = NAPattern.create((2**31 - 1,), 1)
    assert p.num_tokens == 2**31 - 1


def test_numpy_integers_are_ints():
    p = NAPattern.create((np.int64(9), 8), (np.int32(3), 3), dilation=np.int64(2))
    assert p.kernel_size == (3, 3) and p.dilation == (2, 2) and p.shape == (9, 8)


def test_kernel_one_is_accepted():
    p = NAPattern.create((5, 4), 1)
    assert p.density() == 1 / 20


# ---------------------------------------------------------------------------------------
# tiles and block sizes

TILE_ERRORS = [
    pytest.param({"q_tile": 0}, r"q_tile\[axis 0\] = 0 is out of range", id="q_tile0"),
    pytest.param({"kv_tile": (2, -1)}, r"kv_tile\[axis 1\] = -1 is out of range", id="kv_tile-neg"),
    pytest.param({"q_tile": (2, 2, 2)}, r"q_tile must have one entry per layout axis \(2\)", id="q_tile-len"),
    pytest.param({"kv_tile": 2.0}, r"kv_tile must be an int", id="kv_tile-float"),
    pytest.param({"q_tile": (2, True)}, r"q_tile\[axis 1\] must be an int", id="q_tile-bool"),
    pytest.param({"q_tile": "22"}, r"q_tile must be an int", id="q_tile-str"),
]


@pytest.mark.parametrize("entry", ["na_mask_mod", "na_block_mask"])
@pytest.mark.parametrize("kwargs,match", TILE_ERRORS)
def test_tile_errors(entry, kwargs, match):
    fn = getattr(flexna, entry)
    with pytest.raises(ValueError, match=match):
        fn((8, 8), 3, **kwargs)


def test_tile_padding_beyond_int32():
    with pytest.raises(ValueError, match=r"q_tile = \(1, 2\) pads layout \(65536, 32767\) to 2147483648"):
        flexna.na_mask_mod((2**16, 2**15 - 1), 1, q_tile=(1, 2))
    with pytest.raises(ValueError, match=r"kv_tile = .* more than int32"):
        flexna.na_block_mask((2**16, 2**15 - 1), 1, kv_tile=(1, 2))


BLOCK_ERRORS = [
    pytest.param({"q_tile": 2, "block_size": 6},
                 r"block_size for q = 6 .* multiple of the q tile's token count 4",
                 id="q-not-multiple"),
    pytest.param({"kv_tile": (2, 3), "block_size": (4, 8)},
                 r"block_size for kv = 8 .* multiple of the kv tile's token count 6", id="kv-not-multiple"),
    pytest.param({"block_size": 0}, r"block_size for q = 0 is out of range", id="zero"),
    pytest.param({"block_size": (16, -16)}, r"block_size for kv = -16 is out of range", id="negative"),
    pytest.param({"block_size": (16, 16, 16)}, r"block_size must have .*got 3 entries", id="three"),
    pytest.param({"block_size": 16.0}, r"block_size must be an int", id="float"),
    pytest.param({"block_size": True}, r"block_size must be an int", id="bool"),
    pytest.param({"block_size": (16, False)}, r"block_size\[axis 1\] must be an int", id="bool-item"),
]


@pytest.mark.parametrize("kwargs,match", BLOCK_ERRORS)
def test_block_size_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flexna.na_block_mask((8, 8), 3, **kwargs)


# ---------------------------------------------------------------------------------------
# tile_tokens / untile_tokens / tiled_length

@pytest.mark.parametrize(
    "call,match",
    [
        pytest.param(lambda: flexna.tile_tokens(torch.zeros(1, 8, 2), (8,), 0), r"tile\[axis 0\] = 0",
                     id="tile0"),
        pytest.param(lambda: flexna.tile_tokens(torch.zeros(1, 8, 2), (8,), (2, 2)),
                     r"tile must have one entry per layout axis \(1\)", id="tile-len"),
        pytest.param(lambda: flexna.tile_tokens(torch.zeros(1, 8, 2), (8,), 2.0), r"tile must be an int",
                     id="tile-float"),
        pytest.param(lambda: flexna.tile_tokens(torch.zeros(1, 8, 2), (0,), 2), r"shape\[axis 0\] = 0",
                     id="shape0"),
        pytest.param(lambda: flexna.tile_tokens(torch.zeros(1, 2, 2, 2, 2, 2), (2, 2, 2, 2), 1),
                     r"shape must have 1 to 3 axes", id="4-axes"),
        pytest.param(lambda: flexna.tile_tokens(torch.zeros(1, 8, 2), (7,), 2), r"x must be shaped \[batch, 7",
                     id="x-shape"),
        pytest.param(lambda: flexna.untile_tokens(torch.zeros(1, 8, 2), (8,), (True,)),
                     r"tile\[axis 0\] must be an int", id="untile-tile-bool"),
        pytest.param(lambda: flexna.untile_tokens(torch.zeros(1, 8, 2), (), 1), r"shape must have 1 to 3 axes",
                     id="untile-shape-empty"),
        pytest.param(lambda: flexna.untile_tokens(torch.zeros(1, 9, 2), (8,), 2),
                     r"x must be shaped \[batch, 8",
                     id="untile-length"),
        pytest.param(lambda: flexna.tiled_length((8,), -1), r"tile\[axis 0\] = -1", id="tl-tile-neg"),
        pytest.param(lambda: flexna.tiled_length((8, 0), 1), r"shape\[axis 1\] = 0", id="tl-shape0"),
        pytest.param(lambda: flexna.tiled_length((2**16, 2**15 - 1), (1, 2)),
                     r"tile = \(1, 2\) pads layout .* more than int32", id="tl-overflow"),
    ],
)
def test_layout_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------
# functional API (validation happens before compiling: these run no attention)

def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


Q1 = _t(1, 8, 2, 16)


@pytest.mark.parametrize(
    "call,match",
    [
        pytest.param(lambda: flexna.neighborhood_attention(_t(8, 2, 16), _t(8, 2, 16), _t(8, 2, 16), 3),
                     r"query must be shaped \[batch, \*spatial, heads, head_dim\] with 1 to 3 spatial axes, "
                     r"got 3 dims", id="no-spatial"),
        pytest.param(lambda: flexna.neighborhood_attention(*(_t(1, 2, 2, 2, 2, 2, 8),) * 3, 1),
                     r"with 1 to 3 spatial axes, got 7 dims", id="4-spatial"),
        pytest.param(lambda: flexna.na2d(Q1, Q1, Q1, 3), r"query must have 2 spatial axes .* for na2d",
                     id="na2d-1d"),
        pytest.param(lambda: flexna.na1d(*(_t(1, 4, 4, 2, 8),) * 3, 3),
                     r"query must have 1 spatial axes .* na1d",
                     id="na1d-2d"),
        pytest.param(lambda: flexna.na3d(*(_t(1, 4, 4, 2, 8),) * 3, 3),
                     r"query must have 3 spatial axes .* na3d",
                     id="na3d-2d"),
        pytest.param(lambda: flexna.na1d(Q1, _t(1, 9, 2, 16), Q1, 3),
                     r"key shape \(1, 9, 2, 16\) must equal query",
                     id="k-len"),
        pytest.param(lambda: flexna.na1d(Q1, _t(1, 8, 2, 8), Q1, 3), r"key shape .* must equal query",
                     id="k-dim"),
        pytest.param(lambda: flexna.na1d(Q1, _t(2, 8, 2, 16), Q1, 3), r"key shape .* must equal query",
                     id="k-batch"),
        pytest.param(lambda: flexna.na1d(Q1, Q1, _t(1, 8, 3, 16), 3),
                     r"value shape \(1, 8, 3, 16\) must match key shape",
                     id="v-heads"),
        pytest.param(lambda: flexna.na1d(Q1, Q1, _t(1, 7, 2, 16), 3), r"value shape .* must match key shape",
                     id="v-len"),
        pytest.param(lambda: flexna.na1d(_t(1, 8, 4, 16), _t(1, 8, 3, 16), _t(1, 8, 3, 16), 3),
                     r"key has 3 heads, query 4: the number of key/value heads must divide", id="gqa-heads"),
        pytest.param(lambda: flexna.na1d(*(Q1.double(),) * 3, 3), r"query dtype torch.float64 is not supported",
                     id="float64"),
        pytest.param(lambda: flexna.na1d(*(Q1.long(),) * 3, 3), r"query dtype torch.int64 is not supported",
                     id="int64"),
        pytest.param(lambda: flexna.na1d(Q1, Q1, Q1.int(), 3), r"value dtype torch.int32 is not supported",
                     id="v-int32"),
        pytest.param(lambda: flexna.na1d(Q1, Q1.half(), Q1, 3), r"query, key and value must share a dtype",
                     id="mixed-half"),
        pytest.param(lambda: flexna.na1d(Q1, Q1, Q1.bfloat16(), 3), r"must share a dtype.*bfloat16",
                     id="mixed-bf16"),
        pytest.param(lambda: flexna.na1d(Q1, Q1, Q1, 9), r"kernel_size\[axis 0\] = 9 is out of range",
                     id="kernel"),
        pytest.param(lambda: flexna.na1d(Q1, Q1, Q1, 3, stride=4), r"stride\[axis 0\] = 4", id="stride"),
        pytest.param(lambda: flexna.na1d(Q1, Q1, Q1, 3, dilation=3), r"kernel_size\[axis 0\] = 3 .* 8 // 3 = 2",
                     id="dilation"),
        pytest.param(lambda: flexna.na1d(Q1, Q1, Q1, (3, 3)),
                     r"kernel_size must have one entry per layout axis",
                     id="kernel-len"),
        pytest.param(lambda: flexna.na1d(Q1, Q1, Q1, 3, is_causal=1), r"is_causal must be a bool",
                     id="causal-int"),
        pytest.param(lambda: flexna.na2d(*(_t(1, 4, 6, 2, 8),) * 3, (3, 3), is_causal=(True, "no")),
                     r"is_causal\[axis 1\] must be a bool", id="causal-item"),
        pytest.param(lambda: flexna.na1d(*(_t(0, 8, 2, 16),) * 3, 3), r"empty tensors are not supported",
                     id="empty-batch"),
        pytest.param(lambda: flexna.na1d(*(_t(1, 8, 2, 0),) * 3, 3), r"empty tensors are not supported",
                     id="empty-dim"),
    ],
)
def test_functional_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_functional_rejects_non_tensors():
    with pytest.raises(TypeError, match=r"query must be a torch\.Tensor"):
        flexna.na1d(Q1.numpy(), Q1, Q1, 3)
    with pytest.raises(TypeError, match=r"value must be a torch\.Tensor"):
        flexna.na1d(Q1, Q1, [1.0], 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_functional_rejects_mixed_devices():
    with pytest.raises(ValueError, match="query, key and value must be on one device"):
        flexna.na1d(Q1, Q1.cuda(), Q1, 3)
