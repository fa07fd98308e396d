"""Attention outputs vs the float64 brute-force reference.

(a) eager ``flex_attention`` with ``na_block_mask`` (row-major and tiled orders, padded
    positions poisoned) over hypothesis configurations;
(b) the functional API, compiled FlexAttention on the CPU (a handful of shapes, each
    compiled once; fp32 / bf16 / fp16);
(c) the CPU eager fallbacks (``return_lse=True``, gradients): EagerFallbackWarning,
    outputs, lse and q/k/v gradients vs a float64 autograd reference;
(d) the same numerics on CUDA (compiled), skipped without a GPU.

Note: eager FlexAttention evaluates the mask_mod on every pair and ignores the BlockMask's
block lists; only compiled runs (b, d) exercise the block sparsity itself (the block
lists are checked exactly in test_block_mask.py).
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from helpers import EAGER_FLEX_MSG, assert_compiled, permuted_mask, tiled_order
from hypothesis import given, settings
from strategies import Config, TiledConfig, tiled_configs
from torch.nn.attention.flex_attention import flex_attention

import flexna
from flexna.functional import EagerFallbackWarning
from flexna.reference import reference_attention, reference_mask

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

# torch's inductor uses torch.jit.script_method internally while compiling (torch's own warning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

KEY_POISON = 1.0e4
VALUE_POISON = 1.0e6

# tolerances vs the float64 reference (inputs already rounded to the dtype)
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2.5e-2, "rtol": 2e-2},
}


@pytest.fixture
def fresh_compile():
    """Each compiled test starts with empty dynamo caches.

    All ``torch.compile(flex_attention)`` wrappers share one code object, and dynamo
    stops compiling it after ``recompile_limit`` variants per process (torch then runs it
    eagerly; flexna raises its own limit for its calls, see
    test_functional_keeps_compiling_after_eight_shapes). Resetting
    keeps every compiled test really compiled; ``assert_compiled`` double-checks.
    """
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _qkv(batch, heads, n_q, n_kv, dim, dim_v=None, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    dim_v = dim if dim_v is None else dim_v
    q = torch.randn(batch, heads, n_q, dim, generator=g)
    k = torch.randn(batch, heads, n_kv, dim, generator=g)
    v = torch.randn(batch, heads, n_kv, dim_v, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _spatial_qkv(batch, shape, heads, dim, dtype=torch.float32, device="cpu", seed=0, kv_heads=None):
    """[B, *shape, H, D] tensors (NATTEN layout)."""
    g = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(batch, *shape, heads, dim, generator=g)
    k = torch.randn(batch, *shape, kv_heads, dim, generator=g)
    v = torch.randn(batch, *shape, kv_heads, dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _to_bhnd(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(t.shape[0], n, t.shape[-2], t.shape[-1]).transpose(1, 2)


def _functional_reference(q, k, v, cfg: Config, scale=None):
    """float64 reference for NATTEN-layout tensors: (out [B, *shape, H, Dv], lse [B, *shape, H])."""
    n = cfg.num_tokens
    mask = reference_mask(*cfg.args())
    qb, kb, vb = (_to_bhnd(t, n) for t in (q, k, v))
    if kb.shape[1] != qb.shape[1]:  # GQA: repeat key/value heads
        rep = qb.shape[1] // kb.shape[1]
        kb, vb = kb.repeat_interleave(rep, 1), vb.repeat_interleave(rep, 1)
    out, lse = reference_attention(qb, kb, vb, mask, scale)
    out = out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
    lse = lse.transpose(1, 2).reshape(q.shape[:-1])
    return out, lse


def _assert_close(got, want, dtype, what=""):
    torch.testing.assert_close(got.detach().cpu().double(), want.cpu().double(), **TOL[dtype],
                               msg=lambda m: f"{what}: {m}")


# ============================================================================================
# (a) eager flex_attention with na_block_mask, over hypothesis configurations


def _run_tiled_eager(tc: TiledConfig, batch=1, heads=2, dim=16, dim_v=16, poison=True):
    """Tile q/k/v, run eager Flex with the tiled BlockMask, return tiled out / lse + inputs."""
    cfg = tc.cfg
    n = cfg.num_tokens
    q, k, v = _qkv(batch, heads, n, n, dim, dim_v, seed=n)
    q_tile = tc.q_tile or (1,) * cfg.ndim
    kv_tile = tc.kv_tile or (1,) * cfg.ndim

    def tile(t, tl):
        # [B, H, N, D] -> [B, *shape, H, D] -> tiled [B, Nt, H, D] -> [B, H, Nt, D]
        x = t.transpose(1, 2).reshape(batch, *cfg.shape, heads, t.shape[-1])
        return flexna.tile_tokens(x, cfg.shape, tl).transpose(1, 2)

    qt, kt, vt = tile(q, q_tile), tile(k, kv_tile), tile(v, kv_tile)
    kv_pad = torch.from_numpy(tiled_order(cfg.shape, tc.kv_tile) < 0)
    q_pad = torch.from_numpy(tiled_order(cfg.shape, tc.q_tile) < 0)
    if poison:  # padded keys / values / queries hold huge finite values
        kt[:, :, kv_pad] = KEY_POISON
        vt[:, :, kv_pad] = VALUE_POISON
        qt[:, :, q_pad] = KEY_POISON
    bm = flexna.na_block_mask(**cfg.kwargs(), q_tile=tc.q_tile, kv_tile=tc.kv_tile,
                              block_size=tc.block_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EAGER_FLEX_MSG)
        out, lse = _flex_with_lse(qt, kt, vt, block_mask=bm)
    return (q, k, v), out, lse, q_pad


def _flex_with_lse(*args, **kwargs):
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return flex_attention(*args, return_lse=True, **kwargs)
    out, aux = flex_attention(*args, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse


def _untile(out, cfg, tile, heads):
    x = flexna.untile_tokens(out.transpose(1, 2), cfg.shape, tile or (1,) * cfg.ndim)
    return x.reshape(x.shape[0], cfg.num_tokens, heads, out.shape[-1]).transpose(1, 2)


@settings(max_examples=60, deadline=None)
@given(tiled_configs(max_tokens=900, max_padded=1500))
def test_eager_flex_tiled_orders_vs_reference(tc):
    (q, k, v), out_t, lse_t, q_pad = _run_tiled_eager(tc)
    cfg = tc.cfg
    want, want_lse = reference_attention(q, k, v, reference_mask(*cfg.args()))
    got = _untile(out_t, cfg, tc.q_tile, 2)
    got_lse = _untile(lse_t[..., None], cfg, tc.q_tile, 2)[..., 0]
    _assert_close(got, want, torch.float32, f"out {tc}")
    _assert_close(got_lse, want_lse, torch.float32, f"lse {tc}")
    # padded query rows attend nothing: output 0, lse -inf
    assert (out_t[:, :, q_pad] == 0).all()
    assert torch.isneginf(lse_t[:, :, q_pad]).all()


@settings(max_examples=15, deadline=None)
@given(tiled_configs(max_tokens=500, max_padded=900, block_sizes=False))
def test_eager_flex_poisoned_padding_changes_nothing(tc):
    """The same run with and without poisoned padding gives identical outputs."""
    _, out_a, lse_a, _ = _run_tiled_eager(tc, poison=True)
    _, out_b, lse_b, _ = _run_tiled_eager(tc, poison=False)
    assert torch.equal(out_a, out_b)
    assert torch.equal(lse_a, lse_b)


def test_eager_flex_gqa_and_value_dim():
    """enable_gqa (heads sharing key/value heads) and a value dim != query dim."""
    cfg = Config((9, 11), (3, 5), (2, 1), (2, 1), (False, True))
    n = cfg.num_tokens
    q, _, _ = _qkv(2, 4, n, n, 16)
    _, k, v = _qkv(2, 2, n, n, 16, 8, seed=1)
    bm = flexna.na_block_mask(**cfg.kwargs(), block_size=32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EAGER_FLEX_MSG)
        out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True, scale=0.3)
    want, _ = reference_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                  reference_mask(*cfg.args()), scale=0.3)
    assert out.shape == (2, 4, n, 8)
    _assert_close(out, want, torch.float32)


# ============================================================================================
# (b) functional API, compiled FlexAttention on the CPU. Few configurations: each one
# compiles (seconds on CPU). Lengths are not multiples of 128 (ragged last block).

FUNCTIONAL_CASES = [
    # (fn, config, dtype)
    pytest.param(flexna.na1d, Config((300,), (13,), (4,), (3,), (True,)), torch.float32, id="1d-fp32"),
    pytest.param(flexna.na2d, Config((23, 17), (7, 5), (2, 5), (1, 2), (False, True)), torch.float32,
                 id="2d-fp32"),
    pytest.param(flexna.na2d, Config((23, 17), (7, 5), (2, 5), (1, 2), (False, True)), torch.bfloat16,
                 id="2d-bf16"),
    pytest.param(flexna.na2d, Config((23, 17), (7, 5), (2, 5), (1, 2), (False, True)), torch.float16,
                 id="2d-fp16"),
    pytest.param(flexna.na3d, Config((6, 9, 10), (3, 4, 5), (1, 2, 5), (2, 1, 2), (False, False, True)),
                 torch.float32, id="3d-fp32"),
]


@pytest.mark.parametrize("fn,cfg,dtype", FUNCTIONAL_CASES)
def test_functional_compiled_cpu(fresh_compile, fn, cfg, dtype):
    q, k, v = _spatial_qkv(2, cfg.shape, 2, 16, dtype=dtype)
    with assert_compiled():
        out = fn(q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal)
    assert out.shape == q.shape and out.dtype == dtype
    want, _ = _functional_reference(q, k, v, cfg)
    _assert_close(out, want, dtype, str(cfg))
    # same call again: cached BlockMask and compiled kernel, same result
    with assert_compiled():
        again = fn(q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal)
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "cfg,q_tile,kv_tile,block,dtype",
    [
        pytest.param(Config((13, 22), (5, 7), (1, 3), (2, 1), (False, False)), (2, 4), (3, 5), (64, 45),
                     torch.float32, id="2d-tiles-padded"),
        pytest.param(Config((5, 9, 12), (3, 3, 4), (3, 1, 2), (1, 3, 2), (True, False, False)), (2, 3, 4),
                     (1, 4, 4), None, torch.bfloat16, id="3d-tiles-causal"),
    ],
)
def test_compiled_flex_tiled_cpu(fresh_compile, cfg, q_tile, kv_tile, block, dtype):
    """Compiled Flex with a tiled BlockMask (block sparsity in use), padding poisoned."""
    _check_compiled_tiled(cfg, q_tile, kv_tile, block, dtype, "cpu")


def _check_compiled_tiled(cfg, q_tile, kv_tile, block, dtype, device, batch=2, heads=2, dim=16):
    tc = TiledConfig(cfg, q_tile, kv_tile, block)
    q, k, v = _spatial_qkv(batch, cfg.shape, heads, dim, dtype=dtype, device=device)
    qt = flexna.tile_tokens(q, cfg.shape, q_tile).transpose(1, 2)
    kt = flexna.tile_tokens(k, cfg.shape, kv_tile).transpose(1, 2).clone()
    vt = flexna.tile_tokens(v, cfg.shape, kv_tile).transpose(1, 2).clone()
    kv_pad = torch.from_numpy(tiled_order(cfg.shape, kv_tile) < 0).to(device)
    kt[:, :, kv_pad] = KEY_POISON
    vt[:, :, kv_pad] = VALUE_POISON if dtype != torch.float16 else 6.0e4
    bm = flexna.na_block_mask(**cfg.kwargs(), q_tile=q_tile, kv_tile=kv_tile, block_size=block,
                              device=device)
    assert (tc.q_len, tc.kv_len) == tuple(bm.seq_lengths)
    fn = torch.compile(flex_attention, dynamic=False)
    with assert_compiled():
        out = fn(qt, kt, vt, block_mask=bm)
    got = flexna.untile_tokens(out.transpose(1, 2), cfg.shape, q_tile)
    want, _ = _functional_reference(q, k, v, cfg)
    _assert_close(got, want, dtype, f"{cfg} q_tile={q_tile} kv_tile={kv_tile}")
    q_pad = torch.from_numpy(tiled_order(cfg.shape, q_tile) < 0).to(device)
    assert (out[:, :, q_pad] == 0).all()
    # the mask in this order is the permuted reference (BlockMask read back densely)
    dense = bm.to_dense()  # block-level, [1, 1, nq_blocks, nkv_blocks]
    ref = permuted_mask(reference_mask(*cfg.args()), cfg.shape, q_tile, kv_tile)
    bq, bkv = bm.BLOCK_SIZE
    pad_q, pad_kv = -ref.shape[0] % bq, -ref.shape[1] % bkv
    ref_blocks = torch.nn.functional.pad(ref, (0, pad_kv, 0, pad_q)).reshape(
        dense.shape[-2], bq, dense.shape[-1], bkv).any(3).any(1)
    assert torch.equal(dense[0, 0].cpu().bool(), ref_blocks)


RECOMPILE_SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    import flexna
    warnings.filterwarnings("error", message="flex_attention called without torch.compile")
    for length in range(8, 17):  # nine layouts, as a model with several resolutions would see
        q = torch.randn(1, length, 1, 16)
        flexna.na1d(q, q, q, 3)
    print("ok")
    """
)


def test_functional_keeps_compiling_after_eight_shapes():
    """Regression: with torch's default recompile_limit (8), a ninth layout must still run
    compiled, not silently as unfused eager flex_attention (fresh process, default config)."""
    env = dict(os.environ)
    env.pop("TORCH_LOGS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", RECOMPILE_SCRIPT], capture_output=True, text=True,
                         timeout=900, env=env, cwd=root)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ============================================================================================
# (c) CPU eager fallbacks: return_lse and gradients


FALLBACK_CASES = [
    pytest.param(Config((29,), (6,), (3,), (2,), (False,)), id="1d"),
    pytest.param(Config((7, 10), (3, 4), (1, 4), (2, 1), (True, False)), id="2d"),
    pytest.param(Config((4, 5, 6), (2, 3, 3), (2, 1, 3), (1, 1, 2), (False, True, False)), id="3d"),
]


@pytest.mark.parametrize("cfg", FALLBACK_CASES)
def test_cpu_return_lse_falls_back_with_warning(cfg):
    q, k, v = _spatial_qkv(2, cfg.shape, 3, 8)
    with pytest.warns(EagerFallbackWarning, match="return_lse=True"):
        out, lse = flexna.neighborhood_attention(q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation,
                                                 cfg.is_causal, scale=0.4, return_lse=True)
    want, want_lse = _functional_reference(q, k, v, cfg, scale=0.4)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert lse.dtype == torch.float32
    _assert_close(out, want, torch.float32, "out")
    _assert_close(lse, want_lse, torch.float32, "lse")


def test_cpu_return_lse_emits_only_flexna_warning():
    """Regression: the fallback must not use torch's deprecated ``return_lse`` argument
    (torch >= 2.9 emits a FutureWarning for it; ``return_aux=AuxRequest(lse=True)``)."""
    from torch.nn.attention import flex_attention as fa

    shown = getattr(fa, "_WARNINGS_SHOWN", set())
    shown.discard("deprecated_return_lse")  # torch warns once per process
    q, k, v = _spatial_qkv(1, (12,), 1, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flexna.na1d(q, k, v, 3, return_lse=True)
    others = [str(w.message)[:120] for w in caught if not issubclass(w.category, EagerFallbackWarning)]
    assert not others, others


def _autograd_reference(q, k, v, cfg, grad_out, scale=None):
    """q/k/v gradients of float64 dense masked attention via torch autograd."""
    n = cfg.num_tokens
    mask = reference_mask(*cfg.args())
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
    qb, kb, vb = (_to_bhnd(t, n) for t in leaves)
    if kb.shape[1] != qb.shape[1]:
        rep = qb.shape[1] // kb.shape[1]
        kb, vb = kb.repeat_interleave(rep, 1), vb.repeat_interleave(rep, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (qb @ kb.transpose(-2, -1)) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = (probs @ vb).transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
    out.backward(grad_out.cpu().double())
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("cfg", FALLBACK_CASES)
@pytest.mark.parametrize("kv_heads", [3, 1], ids=["mha", "mqa"])
def test_cpu_gradients_fall_back_and_match_autograd(cfg, kv_heads):
    q, k, v = _spatial_qkv(2, cfg.shape, 3, 8, kv_heads=kv_heads)
    for t in (q, k, v):
        t.requires_grad_(True)
    with pytest.warns(EagerFallbackWarning, match="gradients are required"):
        out = flexna.neighborhood_attention(q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation,
                                            cfg.is_causal)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    want_out, want_grads = _autograd_reference(q, k, v, cfg, grad_out)
    _assert_close(out, want_out, torch.float32, "out")
    for name, t, g in zip("qkv", (q, k, v), want_grads, strict=True):
        assert t.grad is not None and t.grad.shape == t.shape
        torch.testing.assert_close(t.grad.double(), g, atol=5e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"d{name}: {m}")


def test_cpu_no_grad_mode_runs_compiled(fresh_compile):
    """requires_grad tensors under torch.no_grad() need no gradients: compiled, no fallback
    (pytest turns an EagerFallbackWarning into an error)."""
    cfg = Config((29,), (6,), (3,), (2,), (False,))
    q, k, v = _spatial_qkv(1, cfg.shape, 2, 16)
    for t in (q, k, v):
        t.requires_grad_(True)
    with torch.no_grad(), assert_compiled():
        out = flexna.na1d(q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal)
    assert not out.requires_grad
    want, _ = _functional_reference(q, k, v, cfg)
    _assert_close(out, want, torch.float32)


# ============================================================================================
# (d) CUDA: same numerics, compiled


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("fn,cfg", [
    pytest.param(flexna.na1d, Config((1000,), (33,), (8,), (3,), (True,)), id="1d-1000"),
    pytest.param(flexna.na2d, Config((37, 29), (9, 7), (3, 7), (2, 1), (False, False)), id="2d-37x29"),
    pytest.param(flexna.na3d, Config((9, 13, 11), (3, 5, 4), (1, 5, 2), (2, 1, 2), (False, True, False)),
                 id="3d-9x13x11"),
])
@pytest.mark.usefixtures("fresh_compile")
@pytest.mark.gpu
@requires_cuda
def test_gpu_functional_compiled(fn, cfg, dtype):
    q, k, v = _spatial_qkv(2, cfg.shape, 2, 64, dtype=dtype, device="cuda")
    with assert_compiled():
        out = fn(q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal)
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == q.shape
    want, _ = _functional_reference(q, k, v, cfg)
    _assert_close(out, want, dtype, f"{cfg} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.usefixtures("fresh_compile")
@pytest.mark.gpu
@requires_cuda
def test_gpu_functional_lse_and_gradients(dtype):
    cfg = Config((21, 30), (5, 6), (1, 3), (3, 2), (True, False))
    q, k, v = _spatial_qkv(1, cfg.shape, 4, 32, dtype=dtype, device="cuda", kv_heads=2)
    with assert_compiled():
        out, lse = flexna.na2d(q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal,
                               return_lse=True)
    want, want_lse = _functional_reference(q, k, v, cfg)
    _assert_close(out, want, dtype, "out")
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=2e-2 if dtype != torch.float32 else 1e-4,
                               rtol=1e-3)
    for t in (q, k, v):
        t.requires_grad_(True)
    with assert_compiled():
        out = flexna.na2d(q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    _, want_grads = _autograd_reference(q, k, v, cfg, grad_out)
    tol = {"atol": 1e-3, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 6e-2, "rtol": 5e-2}
    for name, t, g in zip("qkv", (q, k, v), want_grads, strict=True):
        torch.testing.assert_close(t.grad.cpu().double(), g, **tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize(
    "cfg,q_tile",
    [
        pytest.param(Config((630,), (5,), (1,), (1,), (False,)), None, id="1d"),
        pytest.param(Config((21, 30), (5, 6), (1, 3), (3, 2), (True, False)), None, id="2d-causal-dilated"),
        pytest.param(Config((12, 16, 16), (3, 5, 6), (1, 2, 3), (2, 1, 2), (False, False, True)), (2, 4, 4),
                     id="3d-tiled"),
    ],
)
@pytest.mark.usefixtures("fresh_compile")
@pytest.mark.gpu
@requires_cuda
def test_gpu_backward_block_mask_equals_create_block_mask(cfg, q_tile):
    """Compiled Flex forward + backward with na_block_mask(device='cuda') equals the same run
    with torch's create_block_mask over the same mask_mod (dQ, dK, dV included)."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_tile = q_tile or (1,) * cfg.ndim
    n = flexna.tiled_length(cfg.shape, q_tile)
    kwargs = dict(cfg.kwargs(), q_tile=q_tile, kv_tile=q_tile, device="cuda")
    ours = flexna.na_block_mask(**kwargs, block_size=128)
    theirs = create_block_mask(flexna.na_mask_mod(**kwargs), None, None, n, n, device="cuda",
                               BLOCK_SIZE=128)
    fn = torch.compile(flex_attention, dynamic=False)
    q, k, v = _qkv(1, 2, n, n, 32, device="cuda")
    grad_out = _qkv(1, 2, n, n, 32, device="cuda", seed=1)[0]
    grads = []
    for bm in (ours, theirs):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with assert_compiled():
            out = fn(*leaves, block_mask=bm)
        out.backward(grad_out)
        grads.append([out.detach()] + [t.grad for t in leaves])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "cfg,q_tile,kv_tile,block,dtype",
    [
        pytest.param(Config((37, 45), (9, 12), (3, 4), (1, 2), (False, True)), (4, 8), (8, 8), (128, 128),
                     torch.float16, id="2d-tiles-fp16"),
        # 64-token tiles, two per 128-token block (GPU Flex kernels need blocks that are multiples
        # of their BLOCK_M / BLOCK_N, 128 x 64 by default, so one 64-token tile per block fails)
        pytest.param(Config((10, 24, 17), (5, 7, 5), (5, 1, 2), (2, 1, 3), (True, False, False)), (2, 4, 8),
                     (2, 4, 8), (128, 128), torch.bfloat16, id="3d-tiles-bf16"),
        pytest.param(Config((1000,), (63,), (1,), (2,), (False,)), None, None, (128, 64), torch.float32,
                     id="1d-rowmajor-fp32"),
    ],
)
@pytest.mark.usefixtures("fresh_compile")
@pytest.mark.gpu
@requires_cuda
def test_gpu_compiled_flex_tiled(cfg, q_tile, kv_tile, block, dtype):
    q_tile = q_tile or (1,) * cfg.ndim
    kv_tile = kv_tile or (1,) * cfg.ndim
    _check_compiled_tiled(cfg, q_tile, kv_tile, block, dtype, "cuda", heads=2, dim=64)


@pytest.mark.gpu
@requires_cuda
@settings(max_examples=40, deadline=None)
@given(tiled_configs(max_tokens=1000, max_padded=1500))
def test_gpu_mask_mod_and_block_mask_equal_cpu_and_reference(tc):
    from helpers import assert_block_masks_equal, dense_mask, expected_block_mask

    cfg = tc.cfg
    ref = permuted_mask(reference_mask(*cfg.args()), cfg.shape, tc.q_tile, tc.kv_tile)
    mm = flexna.na_mask_mod(**cfg.kwargs(), q_tile=tc.q_tile, kv_tile=tc.kv_tile, device="cuda")
    assert torch.equal(dense_mask(mm, tc.q_len, tc.kv_len, device="cuda"), ref)
    bm_gpu = flexna.na_block_mask(**cfg.kwargs(), q_tile=tc.q_tile, kv_tile=tc.kv_tile,
                                  block_size=tc.block_size, device="cuda")
    assert bm_gpu.kv_indices.device.type == "cuda"
    bm_cpu = flexna.na_block_mask(**cfg.kwargs(), q_tile=tc.q_tile, kv_tile=tc.kv_tile,
                                  block_size=tc.block_size, device="cpu")
    assert_block_masks_equal(bm_gpu, bm_cpu, repr(tc))
    assert_block_masks_equal(bm_gpu, expected_block_mask(ref, tuple(bm_cpu.BLOCK_SIZE)), repr(tc))
    assert torch.equal(dense_mask(bm_gpu.mask_mod, tc.q_len, tc.kv_len, device="cuda"), ref)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("tile", [None, (2, 8, 8)], ids=["row-major", "tiled"])
def test_gpu_budget_block_mask_build_time(tile):
    shape, kernel = (30, 48, 80), (18, 24, 24)
    cpu = flexna.na_block_mask(shape, kernel, q_tile=tile, kv_tile=tile, device="cpu")
    flexna.na_block_mask(shape, kernel, q_tile=tile, kv_tile=tile, device="cuda")  # warm-up
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        bm = flexna.na_block_mask(shape, kernel, q_tile=tile, kv_tile=tile, device="cuda")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    order = "tiled" if tile else "row-major"
    print(f"\n3-D budget BlockMask build on {torch.cuda.get_device_name()} ({order}): "
          f"median {statistics.median(times) * 1e3:.2f} ms over 5")
    from helpers import assert_block_masks_equal

    assert_block_masks_equal(bm, cpu, "budget case cuda vs cpu")
    if tile:
        assert int(bm.full_kv_num_blocks.sum()) == 24768 and int(bm.kv_num_blocks.sum()) == 124128
    assert math.isfinite(statistics.median(times))


@pytest.mark.gpu
@requires_cuda
def test_gpu_functional_uses_block_sparsity_budget_case(fresh_compile):
    """The 3-D budget layout end to end on the GPU: spot rows vs the reference rule."""
    from helpers import axis_ok

    shape, kernel = (30, 48, 80), (18, 24, 24)
    n = math.prod(shape)
    q, k, v = _spatial_qkv(1, shape, 1, 64, dtype=torch.bfloat16, device="cuda")
    with assert_compiled():
        out = flexna.na3d(q, k, v, kernel)
    coords = [(0, 0, 0), (29, 47, 79), (15, 24, 40), (3, 40, 7), (29, 0, 79)]
    qf, kf, vf = (t.reshape(n, 64).double().cpu() for t in (q, k, v))
    for c in coords:
        keys = [i for i in range(n) if all(
            axis_ok(c[a], (i // math.prod(shape[a + 1:])) % shape[a], shape[a], kernel[a], 1, 1, False)
            for a in range(3))]
        idx = torch.tensor(keys)
        row = sum(c[a] * math.prod(shape[a + 1:]) for a in range(3))
        p = ((qf[row] @ kf[idx].T) / 8.0).softmax(-1)
        want = p @ vf[idx]
        got = out.reshape(n, 64)[row].double().cpu()
        torch.testing.assert_close(got, want, atol=2.5e-2, rtol=2e-2)

