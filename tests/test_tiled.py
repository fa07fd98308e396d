"""Tiled order end to end: the functional API's ``tiles=``, TokenLayout, choose_tiles/choose_layout
and tiled_neighborhood_attention, vs the float64 brute-force reference.

Expected outputs come from flexna.reference (dense mask by the documented rule) and
tests/ext_reference.py (float64 softmax attention, rpb bias written from the README's
index rule); token orders from tests/helpers.tiled_order (written from the documented order).
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from ext_reference import attention64, rpb_dense
from helpers import axis_ok, permuted_mask, tiled_order
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import Config, configs

import flexna
from flexna.analysis import choose_tiles, search_tiles
from flexna.functional import EagerFallbackWarning
from flexna.pattern import NAPattern
from flexna.reference import reference_mask
from flexna.tools.catalogue import load_entry

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

HAS_CUDA = torch.cuda.is_available()


def _reference(q, k, v, cfg: Config, rpb=None, scale=None):
    """[B, *shape, H, D] float64 reference output and lse ([B, *shape, H])."""
    b, heads, d = q.shape[0], q.shape[-2], q.shape[-1]
    t = [x.reshape(b, -1, heads, x.shape[-1]).transpose(1, 2) for x in (q, k, v)]
    mask = reference_mask(*cfg.args())
    bias = None if rpb is None else rpb_dense(rpb, cfg.shape, cfg.kernel_size, cfg.stride,
                                              cfg.dilation, cfg.is_causal)
    out = attention64(*t, mask, bias, scale)
    s = (t[0].double() @ t[1].double().transpose(-2, -1)) * (scale or d ** -0.5)
    if bias is not None:
        s = s + bias.double()
    lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    return (out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1]),
            lse.transpose(1, 2).reshape(q.shape[:-1]))


def _tile_128(shape: tuple[int, ...], draw) -> tuple[int, ...]:
    """A power-of-two tile of 128 tokens (the functional API's block)."""
    n = len(shape)
    options = [t for t in _powers(n)
               if all(ti <= 2 * max(1, length) for ti, length in zip(t, shape, strict=True))]
    return draw(st.sampled_from(options or [_powers(n)[0]]))


def _powers(n: int) -> list[tuple[int, ...]]:
    p = [2 ** i for i in range(8)]
    if n == 1:
        return [(128,)]
    if n == 2:
        return [(a, 128 // a) for a in p]
    return [(a, b, 128 // (a * b)) for a in p for b in p if 128 % (a * b) == 0]


@settings(max_examples=25, deadline=None)
@given(configs(ndims=(2, 3), max_tokens=500), st.data())
def test_functional_tiles_match_reference(cfg: Config, data) -> None:
    """na*d(tiles=...) in tiled order equals the reference for any pattern and 128-token tiles."""
    q_tile = _tile_128(cfg.shape, data.draw)
    kv_tile = data.draw(st.one_of(st.just(q_tile), st.just(_tile_128(cfg.shape, data.draw))))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, *cfg.shape, 2, 8, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerFallbackWarning)
        out, lse = flexna.neighborhood_attention(q, k, v, **cfg.kwargs_no_shape(),
                                                 return_lse=True, tiles=(q_tile, kv_tile))
    want, want_lse = _reference(q, k, v, cfg)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[finite], want_lse[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiles", ["auto", None, (8, 16), ((8, 16), (16, 8))],
                         ids=["auto", "row-major", "one-tile", "pair"])
def test_functional_tiles_compiled_cpu(tiles) -> None:
    """Compiled (no-grad) CPU run for each ``tiles`` form, with rpb, vs the reference."""
    cfg = Config((20, 36), (7, 9), (1, 2), (2, 1), (False, True))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, *cfg.shape, 2, 16, generator=g) for _ in range(3))
    rpb = torch.randn(2, *flexna.rpb_table_shape(cfg.kernel_size, cfg.stride, cfg.is_causal), generator=g)
    out = flexna.na2d(q, k, v, **cfg.kwargs_no_shape(), rel_pos_bias=rpb, tiles=tiles)
    want, _ = _reference(q, k, v, cfg, rpb)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_functional_tiles_gradients_cpu() -> None:
    """Gradients through the tiled path (permutes included) vs float64 autograd."""
    cfg = Config((12, 20), (5, 7), (1, 1), (1, 2), (True, False))
    g = torch.Generator().manual_seed(2)
    base = [torch.randn(1, *cfg.shape, 2, 8, generator=g) for _ in range(3)]
    rpb0 = torch.randn(2, *flexna.rpb_table_shape(cfg.kernel_size, cfg.stride, cfg.is_causal), generator=g)
    grad = torch.randn(1, *cfg.shape, 2, 8, generator=g)
    q, k, v = (t.clone().requires_grad_() for t in base)
    rpb = rpb0.clone().requires_grad_()
    with pytest.warns(EagerFallbackWarning):
        out = flexna.na2d(q, k, v, **cfg.kwargs_no_shape(), rel_pos_bias=rpb, tiles=(8, 16))
    out.backward(grad)
    qr, kr, vr = (t.double().requires_grad_() for t in base)
    rpbr = rpb0.double().requires_grad_()
    want, _ = _reference(qr, kr, vr, cfg, rpbr)
    want.backward(grad.double())
    for got, ref in ((q, qr), (k, kr), (v, vr), (rpb, rpbr)):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


def test_tiled_neighborhood_attention_stays_in_order() -> None:
    """A two-layer 'model' in tiled order: permute once in, once out; padding attends nothing."""
    shape, tile = (11, 13), (4, 32)  # pads both axes
    layout = flexna.TokenLayout.create(shape, tile)
    assert layout.length == 12 * 32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *shape, 2, 8, generator=g)
    xt = layout.to_tokens(x)
    order = torch.from_numpy(tiled_order(shape, tile))
    assert torch.equal(xt[:, order >= 0], x.reshape(2, -1, 2, 8)[:, order[order >= 0]])
    assert not xt[:, order < 0].any()
    cfg = Config(shape, (5, 3), (1, 1), (2, 1), (False, False))
    h1 = flexna.tiled_neighborhood_attention(xt, xt, xt, layout, **cfg.kwargs_no_shape())
    assert not h1[:, order < 0].any(), "padded queries attend nothing: output 0"
    h2 = flexna.tiled_neighborhood_attention(h1, h1, h1, layout, **cfg.kwargs_no_shape())
    want1, _ = _reference(x, x, x, cfg)
    want2, _ = _reference(want1, want1, want1, cfg)
    torch.testing.assert_close(layout.from_tokens(h2).double(), want2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_token_layout_heads_first_is_one_copy(deterministic) -> None:
    """Eagerly a row gather into heads-last memory (a heads-first view of it), in deterministic
    mode too (its backward is a gather, no index_add). Same values, zero padding."""
    torch.use_deterministic_algorithms(deterministic)
    try:
        _check_heads_first()
    finally:
        torch.use_deterministic_algorithms(False)


def _check_heads_first() -> None:
    for shape, tile in (((5, 7), (2, 4)), ((4, 6, 8), (2, 2, 4)), ((9,), (4,)), ((3, 5), (1, 1))):
        layout = flexna.TokenLayout.create(shape, tile)
        x = torch.randn(2, *shape, 3, 4)
        hf = layout.heads_first(x)
        assert hf.transpose(1, 2).is_contiguous() and hf.shape == (2, 3, layout.length, 4)
        order = torch.from_numpy(tiled_order(shape, tile))
        want = torch.zeros(2, 3, layout.length, 4)
        want[:, :, order >= 0] = x.reshape(2, -1, 3, 4).transpose(1, 2)[:, :, order[order >= 0]]
        assert torch.equal(hf, want)
        assert torch.equal(layout.from_heads_first(hf), x)


def test_choose_tiles_finds_block_sparse_arrangements() -> None:
    """Strided rows: the chosen tiles have zero partial blocks (counted by the search's own model,
    checked against the built BlockMask)."""
    for name in ("flux-gna", "hunyuan-gna"):
        p = load_entry(name).pattern
        q_tile, kv_tile = choose_tiles(p)
        bm = flexna.na_block_mask(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                  q_tile=q_tile, kv_tile=kv_tile)
        assert int(bm.kv_num_blocks.sum()) == 0, name
        assert int(bm.full_kv_num_blocks.sum()) > 0, name
    assert choose_tiles(load_entry("long-1d").pattern) is None  # 1-D: a block is a tile already
    layout = flexna.choose_layout((256, 256), 80, 16)
    assert math.prod(layout.tile) == 128 and layout.tile == choose_tiles(NAPattern.create((256, 256), 80, 16),
                                                                        same_tile=True)[0]


def test_search_same_tile_only_pairs_equal_tiles() -> None:
    p = NAPattern.create((64, 64), 9)
    assert all(r.q_tile == r.kv_tile for r in search_tiles(p, top=20, same_tile=True))


@pytest.mark.parametrize("kwargs, message", [
    (dict(tiles="tiled"), "tiles must be 'auto', None, a tile or a \\(q_tile, kv_tile\\) pair"),
    (dict(tiles=(4, 4)), r"q_tile \(4, 4\) holds 16 tokens"),
    (dict(tiles=(8, 16, 1)), "q_tile"),
])
def test_tiles_validation(kwargs, message) -> None:
    x = torch.randn(1, 16, 16, 2, 8)
    kwargs = {"kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        flexna.na2d(x, x, x, **kwargs)


def test_tiles_combine_with_per_head_patterns_and_additional_tokens() -> None:
    """Tiled order with per-head patterns and extra keys/queries gives the row-major result
    (once refused; the row-major path is checked against the float64 reference elsewhere)."""
    torch.manual_seed(0)
    x = torch.randn(1, 16, 16, 2, 8)
    extra = torch.randn(1, 4, 2, 8)
    kw = dict(kernel_size=flexna.PerHead([3, 5]), additional_keys=extra, additional_values=extra,
              additional_queries=extra)
    with torch.no_grad():
        tiled = flexna.na2d(x, x, x, tiles=(8, 16), **kw)
        rows = flexna.na2d(x, x, x, tiles=None, **kw)
    for got, want in zip(tiled, rows, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tiled_attention_validation() -> None:
    layout = flexna.TokenLayout.create((10, 10), (8, 16))
    x = torch.randn(1, 100, 2, 8)
    with pytest.raises(ValueError, match=r"query must be shaped \[batch, 256, heads, dim\]"):
        flexna.tiled_neighborhood_attention(x, x, x, layout, 3)
    with pytest.raises(TypeError, match="TokenLayout"):
        flexna.tiled_neighborhood_attention(x, x, x, (10, 10), 3)


def test_auto_keeps_row_major_with_user_score_mod() -> None:
    """With a user score_mod, 'auto' stays row-major so the score_mod sees row-major indices."""
    shape = (32, 32)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + 0.05 * (q_idx - kv_idx).float()

    assert choose_tiles(NAPattern.create(shape, 8, 8)) is not None  # auto would tile otherwise
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, *shape, 2, 8, generator=g)
    out = flexna.na2d(x, x, x, 8, 8, score_mod=score_mod)
    t = x.reshape(1, -1, 2, 8).transpose(1, 2)
    idx = torch.arange(math.prod(shape), dtype=torch.float64)
    bias = 0.05 * (idx[:, None] - idx[None, :])
    want = attention64(t, t, t, reference_mask(shape, 8, 8, 1, False), bias)
    torch.testing.assert_close(out.double(), want.transpose(1, 2).reshape(out.shape), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_tiled_forward_backward(dtype) -> None:
    """CUDA: auto tiles (3-D), forward + backward incl. rpb gradients, vs float64 reference."""
    cfg = Config((8, 16, 24), (3, 5, 7), (1, 1, 2), (1, 2, 1), (True, False, False))
    assert choose_tiles(NAPattern.create(*cfg.args())) is not None
    g = torch.Generator().manual_seed(4)
    base = [torch.randn(1, *cfg.shape, 2, 32, generator=g).to(dtype) for _ in range(3)]
    rpb0 = torch.randn(2, *flexna.rpb_table_shape(cfg.kernel_size, cfg.stride, cfg.is_causal), generator=g)
    grad = torch.randn(1, *cfg.shape, 2, 32, generator=g).to(dtype)
    q, k, v = (t.cuda().requires_grad_() for t in base)
    rpb = rpb0.cuda().requires_grad_()
    out = flexna.na3d(q, k, v, **cfg.kwargs_no_shape(), rel_pos_bias=rpb)
    out.backward(grad.cuda())
    qr, kr, vr = (t.double().requires_grad_() for t in base)
    rpbr = rpb0.double().requires_grad_()
    want, _ = _reference(qr, kr, vr, cfg, rpbr)
    want.backward(grad.double())
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.float16 else {"atol": 8e-2, "rtol": 5e-2}
    torch.testing.assert_close(out.double().cpu(), want.detach(), **tol)
    for got, ref in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, **tol)
    torch.testing.assert_close(rpb.grad.double().cpu(), rpbr.grad, atol=0.3, rtol=5e-2)


def test_module_stays_in_layout() -> None:
    """NeighborhoodAttention2D(layout=...) on a tiled sequence equals the module on the grid
    (which itself is tested against the float64 reference in test_modules.py), with rpb and GQA."""
    torch.manual_seed(6)
    mod = flexna.NeighborhoodAttention2D(32, 4, kernel_size=5, dilation=(1, 2), rel_pos_bias=True,
                                         num_kv_heads=2).eval()
    layout = flexna.TokenLayout.create((12, 20), (8, 16))
    x = torch.randn(2, 12, 20, 32)
    with torch.no_grad():
        want = mod(x)
        got = layout.from_tokens(mod(layout.to_tokens(x), layout=layout))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"x must be \[batch, 512, 32\]"):
        mod(x, layout=layout)
    with pytest.raises(ValueError, match="layout has 3 axes"):
        mod(torch.randn(1, 8, 32), layout=flexna.TokenLayout.create((2, 2, 2), None))


@settings(max_examples=15, deadline=None)
@given(configs(ndims=(1, 2, 3), max_tokens=300), st.integers(1, 40), st.integers(0, 9), st.booleans(),
       st.data())
def test_joint_sequences_with_extra_tokens_last(cfg: Config, extra: int, more_keys: int, tiled: bool,
                                                data) -> None:
    """``num_extra_tokens``: the last M rows of one joint sequence are extra tokens (FLUX text):
    layout queries attend their neighborhood + every extra key (+ additional keys), extra queries
    attend every real key; padded positions are never attended (padded query rows see only the
    extra keys, as the docstring says). Against float64 attention under a
    mask built from the reference rule, in the layout's own order."""
    tile = _tile_128(cfg.shape, data.draw) if tiled and len(cfg.shape) > 1 else None
    layout = flexna.TokenLayout.create(cfg.shape, tile)
    n, length = math.prod(cfg.shape), layout.length
    g = torch.Generator().manual_seed(extra)
    x = torch.randn(1, length + extra, 2, 8, generator=g)
    order = torch.from_numpy(tiled_order(cfg.shape, tile))
    x[:, :length][:, order < 0] = 0  # padding rows hold zeros, as layout.to_tokens gives them
    ak = av = None
    if more_keys:
        ak, av = torch.randn(2, 1, more_keys, 2, 8, generator=g)
    out = flexna.tiled_neighborhood_attention(x, x, x, layout, **cfg.kwargs_no_shape(), num_extra_tokens=extra,
                                              additional_keys=ak, additional_values=av)
    assert out.shape == x.shape
    real = order >= 0
    pos = torch.where(real, order, 0)
    na = reference_mask(*cfg.args())  # [n, n] row-major
    mask = torch.zeros(length + extra, length + extra + more_keys, dtype=torch.bool)
    mask[:length, :length] = na[pos][:, pos] & real[:, None] & real[None, :]
    mask[:length, length:] = True  # layout queries (padded ones too, as documented): every extra key
    mask[length:, :length] = real[None, :]  # extra queries: every real layout key ...
    mask[length:, length:] = True  # ... and every extra / additional key
    keys = x if ak is None else torch.cat([x, ak], 1)
    values = x if av is None else torch.cat([x, av], 1)
    want = attention64(x.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), mask).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert n == int(real.sum())


def test_joint_sequence_validation() -> None:
    layout = flexna.TokenLayout.create((8, 16), (8, 16))
    x = torch.randn(1, 128 + 4, 2, 8)
    with pytest.raises(ValueError, match=r"\[batch, 132, heads, dim\] \(layout \(8, 16\) in tile \(8, 16\) "
                                         r"order, then 4 extra tokens\)"):
        flexna.tiled_neighborhood_attention(x[:, :-1], x[:, :-1], x[:, :-1], layout, 3, num_extra_tokens=4)
    with pytest.raises(ValueError, match=r"num_extra_tokens = -1 is out of range"):
        flexna.tiled_neighborhood_attention(x, x, x, layout, 3, num_extra_tokens=-1)


def _brute_cost(shape, k, s, q_tile, kv_tile, blocks, alpha) -> float:
    """Predicted cost of one tile pair from the definition: the dense mask (per-axis rule) in
    the tiled orders, each (q, kv) block counted full or partial, priced as the cost model says."""
    coords = list(itertools.product(*map(range, shape)))
    ref = torch.tensor([[all(axis_ok(x, y, n, k, s, 1, False) for x, y, n in zip(qc, kc, shape, strict=True))
                         for kc in coords] for qc in coords])
    m = permuted_mask(ref, shape, q_tile, kv_tile)
    bq, bk = blocks
    tiles = m.reshape(m.shape[0] // bq, bq, m.shape[1] // bk, bk).transpose(1, 2).flatten(2)
    full = int(tiles.all(-1).sum())
    partial = int(tiles.any(-1).sum()) - full
    return bq * bk / 128**2 * (full + alpha * partial)


@pytest.mark.parametrize("backend", ["triton", "flash"])
@pytest.mark.parametrize("blocks", [(128, 128), (256, 128)])  # Hopper; FLASH on Blackwell
def test_tile_search_ranks_for_the_backend_and_its_blocks(backend, blocks) -> None:
    """search_tiles / choose_tiles per backend: candidates hold the backend's block sizes, and
    the best one is the cheapest of all dividing tile pairs by a brute-force count."""
    shape, k, s = (32, 32), 7, 2
    p = NAPattern.create(shape, k, s)
    alpha = flexna.analysis.PARTIAL_COST[backend][2]
    ranked = search_tiles(p, q_tokens=(blocks[0],), kv_tokens=(blocks[1],), top=100, padding=False,
                          backend=backend)
    assert ranked and all(math.prod(r.q_tile) == blocks[0] and math.prod(r.kv_tile) == blocks[1]
                          and r.backend == backend for r in ranked)
    want = {(r.q_tile, r.kv_tile): _brute_cost(shape, k, s, r.q_tile, r.kv_tile, blocks, alpha)
            for r in ranked}
    for r in ranked:
        assert r.cost == pytest.approx(want[(r.q_tile, r.kv_tile)])
    assert ranked[0].cost == pytest.approx(min(want.values()))
    chosen = choose_tiles(p, backend=backend, block_size=blocks)
    assert chosen is None or (chosen == (ranked[0].q_tile, ranked[0].kv_tile))
    defaults = search_tiles(p, top=100, backend=backend)  # FLASH's key blocks are 128 tokens only
    assert {r.kv_block for r in defaults} == ({128} if backend == "flash" else {128, 64})


@pytest.mark.parametrize("fn", [lambda p, b: flexna.analyze(p, backend=b),
                                lambda p, b: search_tiles(p, backend=b),
                                lambda p, b: choose_tiles(p, backend=b)])
@pytest.mark.parametrize("bad", ["auto", "cuda", 3])
def test_cost_model_backend_validation(fn, bad) -> None:
    with pytest.raises(ValueError, match=f"backend = {bad!r} is out of range"):
        fn(NAPattern.create((32, 32), 7), bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=3))
def test_auto_shape_pads_little_and_keeps_every_divisor(shape):
    """auto_shape, from its definition: per axis at most 1/8 more, a multiple of every power of
    two up to one block that divides the axis, and the largest power-of-two multiple within
    1/8 (brute force over multiples)."""
    from flexna.analysis import auto_shape

    got = auto_shape(shape)
    for length, padded in zip(shape, got, strict=True):
        assert length <= padded <= length * 9 / 8
        for p in (2**i for i in range(8)):
            if length % p == 0:
                assert padded % p == 0
        within = [p for p in (2**i for i in range(8)) if -(-length // p) * p - length <= length / 8]
        assert padded == -(-length // max(within)) * max(within)


def test_auto_tiles_take_padding_where_it_pays():
    """HunyuanVideo's 30-frame NA window: tiles='auto' ranks tiles padding 30 -> 32 frames
    (predicted cheaper than every tile dividing 30: blocks counted by the spec, per backend),
    while its GNA window keeps the perfectly block-sparse 2 x 8 x 8 tiles at 30 frames."""
    from flexna.analysis import analyze

    na, gna = load_entry("hunyuan-na").pattern, load_entry("hunyuan-gna").pattern
    for backend in ("triton", "flash"):
        tiles = choose_tiles(na, padding="auto", backend=backend)
        assert tiles is not None and tiles[0][0] > 2, tiles  # 4 or 8 frames: padded
        padded = analyze(na, *tiles, backend=backend)
        for divisor in search_tiles(na, (128,), (128,), top=3, padding=False, backend=backend):
            assert padded.cost < divisor.cost
        assert choose_tiles(gna, padding="auto", backend=backend) == ((2, 8, 8), (2, 8, 8))
