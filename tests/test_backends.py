"""Kernel backends: the choice between Triton and FLASH, its errors, and FLASH-safe masks.

CPU: how ``backend=`` resolves (with FLASH's availability stubbed), the errors, and that every
mask_mod / score_mod flexna emits uses only operations torch 2.11's CuTe DSL code generation
lowers (traced with make_fx, checked against an allow-list). GPU (skipped without CUDA and
flash-attn-4): every feature on FLASH against the float64 reference, and FLASH vs Triton.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import flexna
from flexna import backends
from flexna.pattern import NAPattern
from flexna.reference import reference_attention, reference_mask
from flexna.scores import spec_rpb_score_mod
from flexna.spec import MaskSpec
from flexna.tables import build_tables

aten = torch.ops.aten

# ops of torch 2.11's CuteDSLOpOverrides (dumped on the H200: benchmarks/results/
# flash-backend-NVIDIA-H200-2026-12-02.md) that flexna's mods need, as aten overloads; min/max
# and clamp are left out on purpose (the rpb clamp did not lower), as are constant-index loads
ALLOWED = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.abs.default, aten.tanh.default, aten.exp.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_xor.Tensor, aten.bitwise_not.default,
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
    aten.where.self, aten.index.Tensor, aten.scalar_tensor.default, aten.zeros_like.default,
    aten._to_copy.default, aten.remainder.Scalar, aten.remainder.Tensor,
}


def flash_violations(fn, score: bool) -> list[str]:
    """Operations of ``fn`` (a mask_mod, or a score_mod when ``score``) FLASH cannot lower."""
    idx = functools.partial(torch.zeros, 1, dtype=torch.int32)
    args = ((torch.zeros(1),) if score else ()) + (idx(), idx(), idx(), idx())
    graph = make_fx(fn)(*args).graph
    bad = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target not in ALLOWED:
            bad.append(f"op {node.target}")
        if node.op == "get_attr":  # a captured tensor: only ever a table read at a traced index
            for user in node.users:
                index_args = user.args[1] if user.target is aten.index.Tensor else []
                if (user.target is not aten.index.Tensor or user.args[0] is not node
                        or any(getattr(i, "op", "get_attr") == "get_attr" for i in index_args)):
                    bad.append(f"captured tensor {node.target} used by {user.target}, not as a table "
                               "read at a traced index")
    return bad


P2 = NAPattern.create((16, 16), 5)
SPECS = {
    "1d": MaskSpec.create(NAPattern.create(300, 17, 4, 2, True)),
    "2d-fused": MaskSpec.create(P2),
    "2d-tiled": MaskSpec.create(P2, q_tile=(4, 8), kv_tile=(8, 4)),
    "3d": MaskSpec.create(NAPattern.create((6, 8, 10), (3, 5, 4), (1, 2, 3), (2, 1, 1), (True, False, False))),
    "per-head": MaskSpec.create([P2, NAPattern.create((16, 16), 5, 1, 2)]),
    "extra": MaskSpec.create(P2, num_extra_q=3, num_extra_kv=5),
    "packed": MaskSpec.create((), samples=[(P2,), (NAPattern.create((10, 12), 5),)], block_size=128),
    "regions": MaskSpec.create(P2, q_region=((0, 8), (0, 16)), kv_region=((0, 12), (0, 16))),
    "sta-text": flexna.sta_spec((6, 16, 16), (2, 8, 8), (1, 2, 2), text_length=5),
    "sta-even": flexna.sta_spec((16, 16), (4, 4), (2, 2)),
    "hilbert": MaskSpec.create(P2, q_curve="hilbert", kv_curve="morton"),
}


def _radial_specs() -> dict[str, MaskSpec]:
    from flexna.radial import radial_pattern, radial_window_pattern

    return {"radial": MaskSpec.create(radial_pattern(8, 64, model="wan", block_size=64), num_extra_kv=4),
            "radial-window": MaskSpec.create(radial_window_pattern((6, 8, 8), 3))}


SPECS.update(_radial_specs())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-axis"])
@pytest.mark.parametrize("name", list(SPECS))
def test_mask_mods_are_flash_safe(name, fused):
    spec = SPECS[name]
    tables = build_tables(spec, "cpu", fused=fused)
    assert flash_violations(tables.mask_mod(), score=False) == []


@pytest.mark.parametrize("name", ["2d-fused", "per-head", "extra", "packed", "2d-tiled"])
def test_rpb_score_mods_are_flash_safe(name):
    spec = SPECS[name]
    p = spec.samples[0][0]
    table = torch.randn(2, *flexna.rpb_table_shape(p.kernel_size, p.stride, p.is_causal, p.ndim))
    assert flash_violations(spec_rpb_score_mod(table, spec, "cpu"), score=True) == []


def test_library_score_mods_are_flash_safe():
    mods = [flexna.softcap_score_mod(20.0),
            flexna.distance_decay_score_mod(torch.rand(2), (6, 7), num_extra_kv=2),
            flexna.compose_score_mods(flexna.softcap_score_mod(5.0), flexna.softcap_score_mod(9.0))]
    from flexna.integrations.diffusers import _text_padding_score_mod

    mods.append(_text_padding_score_mod(torch.ones(2, 5, dtype=torch.bool), 10))
    for mod in mods:
        assert flash_violations(mod, score=True) == []


def test_the_check_fails_on_what_flash_rejects():
    """The allow-list check can fail: a clamp, a min/max and a constant-index load are caught."""
    table = torch.arange(10)
    guard = torch.tensor(3)

    def clamped(b, h, q, kv):
        return table[(q - kv).clamp(0, 9)] > 0

    def const_load(b, h, q, kv):
        return (q & guard) == guard

    def select(b, h, q, kv):
        return table.view(2, 5)[1][q] > kv

    for fn in (clamped, const_load, select):
        assert flash_violations(fn, score=False), fn.__name__


# ------------------------------------------------------------------ how backend= resolves


@pytest.fixture
def flash_here(monkeypatch):
    """FLASH "available" on a stub Hopper device (only the choice is exercised, nothing runs)."""
    monkeypatch.setattr(backends, "flash_unavailable", lambda device: None)
    return torch.device("cuda")


def test_auto_picks_flash_for_large_forward_calls(flash_here, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    big = backends.FLASH_MIN_BLOCK_PAIRS
    assert backends.resolve_backend("auto", flash_here, grads=False, block_pairs=big) == "flash"
    assert backends.resolve_backend("auto", flash_here, grads=False, block_pairs=big - 1) == "triton"
    train = backends.FLASH_MIN_BLOCK_PAIRS_TRAINING
    resolve = functools.partial(backends.resolve_backend, "auto", flash_here, grads=True)
    assert resolve(block_pairs=train, partial_share=0.4) == "flash"
    assert resolve(block_pairs=train, partial_share=0.6) == "triton"
    assert backends.resolve_backend("auto", flash_here, grads=True, block_pairs=train - 1) == "triton"
    assert backends.resolve_backend("auto", flash_here, grads=True, captured_grads=True,
                                    block_pairs=10 * train) == "triton"
    assert backends.resolve_backend("triton", flash_here, grads=False, block_pairs=10 * big) == "triton"
    assert backends.resolve_backend("flash", flash_here, grads=True, block_pairs=1) == "flash"
    assert backends.block_sizes("flash", flash_here) == (128, 128)
    assert backends.kernel_options("flash", flash_here) == {"BACKEND": "FLASH"}


@pytest.mark.parametrize("q_block,kv_block", [(16, 16), (32, 64), (64, 32), (96, 48), (384, 48), (128, 16)])
def test_triton_tiles_divide_small_blocks(q_block, kv_block):
    """Every kernel tile divides its BlockMask side, and the backward's loops nest (N1 % M1, M2 % N2)."""
    o = backends.triton_block_options(q_block, kv_block)
    assert o["fwd_BLOCK_M"] >= 16 and q_block % o["fwd_BLOCK_M"] == 0 and kv_block % o["fwd_BLOCK_N"] == 0
    assert q_block % o["bwd_BLOCK_M1"] == 0 and kv_block % o["bwd_BLOCK_N1"] == 0
    assert q_block % o["bwd_BLOCK_M2"] == 0 and kv_block % o["bwd_BLOCK_N2"] == 0
    assert o["bwd_BLOCK_N1"] % o["bwd_BLOCK_M1"] == 0 and o["bwd_BLOCK_M2"] % o["bwd_BLOCK_N2"] == 0
    assert all(v & (v - 1) == 0 for v in o.values())  # powers of two


def test_triton_tiles_for_blocks_they_cannot_divide(flash_here, monkeypatch):
    assert backends.triton_block_options(128, 256) == {}  # the kernels' own tiles divide them
    with pytest.raises(ValueError, match=r"block_size = \(15, 128\) is out of range on CUDA"):
        backends.triton_block_options(15, 128)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(flexna.flex, "cuda_kernel_options", lambda device: {})
    # "auto" with a BlockMask FLASH cannot run keeps Triton; "flash" says why
    opts = backends.kernel_options("auto", flash_here, block_size=(64, 64))
    assert "BACKEND" not in opts and opts["fwd_BLOCK_M"] == 64
    assert backends.kernel_options("auto", flash_here, block_size=(128, 128)) == {"BACKEND": "FLASH"}
    with pytest.raises(backends.BackendError, match=r"block_size = \(64, 64\)"):
        backends.kernel_options("flash", flash_here, block_size=(64, 64))


def test_blackwell_flash_blocks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert backends.block_sizes("flash", torch.device("cuda")) == (256, 128)
    assert backends.block_sizes("triton", torch.device("cuda")) == (128, 128)


def test_flash_with_deterministic_backward_is_an_error(flash_here):
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(backends.BackendError, match="deterministic"):
            backends.resolve_backend("flash", flash_here, grads=True)
        assert backends.resolve_backend("flash", flash_here, grads=False) == "flash"
        assert backends.resolve_backend("auto", flash_here, grads=True, block_pairs=10**9) == "triton"
    finally:
        torch.use_deterministic_algorithms(False)


def test_plans_pick_the_backend_auto_promises(flash_here, monkeypatch):
    """Through the public API's plan (nothing runs): large forward -> FLASH; a trainable rpb or a
    3-D NA call with gradients (most blocks partial) -> Triton; explicit FLASH with a trainable
    rpb is an error naming it."""
    from flexna import plan as plans
    from flexna.functional import _options

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(flexna.flex, "cuda_kernel_options", lambda device: {})

    def chosen(shape, kernel, heads, grad_q=False, rpb=None, backend="auto"):
        q = ((1, *shape, heads, 64), "torch.float16", "cuda:0", grad_q)
        r = None if rpb is None else ((heads, *rpb), "torch.float32", "cuda:0", True)
        sig = ("na", q, q, q, None, None, None, r, _options(None, False, None, backend), kernel, 1, 1,
               False, "auto", None, True)
        return plans.build(sig).backend

    assert chosen((256, 256), (17, 17), 8) == "flash"
    assert chosen((16, 16), (5, 5), 1) == "triton"  # small: FLASH's fixed cost does not pay
    assert chosen((256, 256), (17, 17), 8, rpb=(33, 33)) == "triton"
    assert chosen((16, 48, 48), (9, 9, 9), 24, grad_q=True) == "triton"  # mostly partial blocks
    with pytest.raises(flexna.BackendError, match="rel_pos_bias"):
        chosen((256, 256), (17, 17), 8, rpb=(33, 33), backend="flash")


def test_flash_where_it_cannot_run_says_why():
    q = torch.randn(1, 8, 8, 2, 16)
    with pytest.raises(flexna.BackendError, match="CUDA GPUs only"):
        flexna.na2d(q, q, q, 3, backend="flash")
    with pytest.raises(ValueError, match="backend = 'fast' is not one of"):
        flexna.na2d(q, q, q, 3, backend="fast")
    with pytest.raises(ValueError, match="backend = 1 is not one of"):
        flexna.NeighborhoodAttention2D(8, 2, 3, backend=1)  # type: ignore[arg-type]
    assert flexna.kernel_options("auto", "cpu") == {}
    assert "cpu" in flexna.flash_unavailable(torch.device("cpu"))


def test_cpu_runs_every_backend_request_but_flash():
    q = torch.randn(1, 8, 8, 2, 16)
    want = flexna.na2d(q, q, q, 3)
    for backend in ("auto", "triton"):
        assert torch.equal(flexna.na2d(q, q, q, 3, backend=backend), want)


# ------------------------------------------------------------------ FLASH on the GPU

NO_FLASH = backends.flash_unavailable(torch.device("cuda")) if torch.cuda.is_available() else "no CUDA"
requires_flash = pytest.mark.skipif(NO_FLASH is not None, reason=f"FLASH unavailable: {NO_FLASH}")
TOL = {"atol": 2e-2, "rtol": 2e-2}


def _qkv(batch, shape, heads, dim, kv_heads=None, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(batch, *shape, heads, dim, generator=g)
    k, v = (torch.randn(batch, *shape, kv_heads, dim, generator=g) for _ in range(2))
    return tuple(t.to("cuda", dtype) for t in (q, k, v))


def _reference(q, k, v, mask, extra_k=None, extra_v=None):
    """float64 attention of NATTEN-layout tensors under a [N, N (+M)] mask."""
    b, heads = q.shape[0], q.shape[-2]
    seq = [t.reshape(b, -1, t.shape[-2], t.shape[-1]).transpose(1, 2).double().cpu() for t in (q, k, v)]
    if extra_k is not None:
        seq[1] = torch.cat([seq[1], extra_k.transpose(1, 2).double().cpu()], 2)
        seq[2] = torch.cat([seq[2], extra_v.transpose(1, 2).double().cpu()], 2)
    rep = heads // seq[1].shape[1]
    keys, values = (t.repeat_interleave(rep, 1) for t in seq[1:])
    out, _ = reference_attention(seq[0], keys, values, mask)
    return out.transpose(1, 2).reshape(q.shape)


CASES = [
    pytest.param((4096,), 255, 1, 1, False, None, id="1d"),
    pytest.param((48, 40), 13, 1, 2, False, None, id="2d-dilated"),
    pytest.param((48, 48), 16, 8, 1, (True, False), None, id="2d-strided-causal-tiled"),
    pytest.param((8, 24, 24), (5, 9, 7), 1, 1, False, "auto", id="3d-auto"),
]


@pytest.mark.gpu
@requires_flash
@pytest.mark.parametrize("shape,kernel,stride,dilation,causal,tiles", CASES)
def test_flash_forward_equals_reference(shape, kernel, stride, dilation, causal, tiles):
    q, k, v = _qkv(1, shape, 4, 64, kv_heads=2)
    mask = reference_mask(shape, kernel, stride, dilation, causal)
    t = tiles if tiles is not None else ((8, 16) if len(shape) == 2 else None)
    out = flexna.neighborhood_attention(q, k, v, kernel, stride, dilation, causal, tiles=t, backend="flash")
    torch.testing.assert_close(out.double().cpu(), _reference(q, k, v, mask), **TOL)


@pytest.mark.gpu
@requires_flash
def test_flash_extra_tokens_per_head_and_rpb():
    shape = (32, 32)
    q, k, v = _qkv(1, shape, 4, 64)
    ek, ev = (torch.randn(1, 7, 4, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    mask = torch.cat([reference_mask(shape, 7), torch.ones(1024, 7, dtype=torch.bool)], 1)
    out = flexna.na2d(q, k, v, 7, additional_keys=ek, additional_values=ev, backend="flash")
    torch.testing.assert_close(out.double().cpu(), _reference(q, k, v, mask, ek, ev), **TOL)
    dil = flexna.PerHead([1, 2, 3, 4])
    out = flexna.na2d(q, k, v, 5, dilation=dil, backend="flash")
    masks = torch.stack([reference_mask(shape, 5, 1, d) for d in (1, 2, 3, 4)])[None]
    torch.testing.assert_close(out.double().cpu(), _reference(q, k, v, masks), **TOL)
    rpb = torch.randn(4, *flexna.rpb_table_shape((7, 7)), device="cuda")
    for tiles in (None, (8, 16)):
        got = flexna.na2d(q, k, v, 7, rel_pos_bias=rpb, tiles=tiles, backend="flash")
        want = flexna.na2d(q, k, v, 7, rel_pos_bias=rpb, tiles=tiles, backend="triton")
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.gpu
@requires_flash
def test_flash_packed_and_module():
    shapes = [(20, 24), (16, 40)]
    n = flexna.packed_length(shapes)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, 64, generator=g).to("cuda", torch.float16) for _ in range(3))
    got = flexna.packed_neighborhood_attention(q, k, v, shapes, 5, backend="flash")
    want = flexna.packed_neighborhood_attention(q, k, v, shapes, 5, backend="triton")
    torch.testing.assert_close(got, want, **TOL)
    layer = flexna.NeighborhoodAttention2D(128, 2, 7, backend="flash").to("cuda", torch.float16)
    x = torch.randn(1, 32, 32, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        got = layer(x)
        layer.backend = "triton"
        torch.testing.assert_close(got, layer(x), **TOL)


@pytest.mark.gpu
@requires_flash
def test_flash_backward_equals_reference():
    shape = (32, 40)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, shape, 2, 64))
    out = flexna.na2d(q, k, v, 9, 1, 2, backend="flash")
    grad = torch.randn_like(out)
    out.backward(grad)
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    qs, ks, vs = (t.reshape(1, -1, 2, 64).transpose(1, 2) for t in leaves)
    scores = (qs @ ks.transpose(-2, -1) / 8.0).masked_fill(~reference_mask(shape, 9, 1, 2), float("-inf"))
    want = (scores.softmax(-1) @ vs).transpose(1, 2).reshape(q.shape)  # float64, differentiable
    want.backward(grad.double().cpu())
    for name, t, ref in zip("qkv", (q, k, v), leaves, strict=True):
        torch.testing.assert_close(t.grad.double().cpu(), ref.grad, atol=5e-2, rtol=5e-2,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.gpu
@requires_flash
def test_verify_runs_the_flash_differential():
    import io

    buf = io.StringIO()
    from flexna.tools.verify import run_verify

    assert run_verify(n=6, device="cuda", max_tokens=512, out=buf), buf.getvalue()
    assert "FLASH-vs-Triton differential: on" in buf.getvalue()


def test_verify_differential_builds_each_rules_own_mask():
    """The FLASH differential of ``flexna verify`` runs the config's own rule (NA, STA, radial)
    rebuilt for FLASH's blocks (it once ran plain NA for every rule); on the CPU: its BlockMask's
    dense expansion equals the reference mask of the config."""
    import random

    from torch.nn.attention.flex_attention import create_mask

    from flexna.tools.verify import Check, _expand_blocks, _maps, expected_mask, random_config

    rng, kinds = random.Random(0), set()
    for index in range(40):
        cfg = random_config(rng, index, 512, cuda=True)
        want = expected_mask(cfg)[0]
        try:
            bm = Check(cfg, torch.device("cpu"), False, lambda *a, **k: None, 0.0)._masks((128, 128))[1]
        except ValueError:
            continue  # tiles that do not divide 128: the differential skips them too
        kinds.add(cfg.rule if cfg.radial is None else "radial")
        nq, nkv = want.shape
        assert tuple(bm.seq_lengths) == (nq, nkv), index
        partial, full, problem = _maps(bm, -(-nq // 128), -(-nkv // 128))
        assert problem is None
        inner = create_mask(bm.mask_mod, 1, 1, nq, nkv, device="cpu")[0, 0]
        dense = _expand_blocks(full, 128, 128, nq, nkv) | (_expand_blocks(partial, 128, 128, nq, nkv) & inner)
        assert torch.equal(dense, want), (index, cfg)
    assert {"sliding_tile", "radial"} <= kinds, kinds


@pytest.mark.gpu
@requires_flash
def test_flash_library_score_mods_equal_reference():
    """distance_decay_score_mod and softcap_score_mod, composed, on FLASH: float64 attention with
    the decay and cap written out from their definitions (L1 distance of coordinates)."""
    shape, heads, kernel, cap = (24, 20), 4, 7, 5.0
    q, k, v = _qkv(1, shape, heads, 64, seed=5)
    slopes = torch.tensor([0.05, 0.1, 0.2, 0.4], device="cuda")
    mod = flexna.compose_score_mods(flexna.distance_decay_score_mod(slopes, shape),
                                    flexna.softcap_score_mod(cap))
    for tiles in (None, "auto"):  # a user score_mod sees row-major indices: auto keeps that order
        out = flexna.neighborhood_attention(q, k, v, kernel, score_mod=mod, tiles=tiles, backend="flash")
        coords = torch.cartesian_prod(*(torch.arange(n) for n in shape)).double()
        dist = (coords[:, None, :] - coords[None, :, :]).abs().sum(-1)
        qs, ks, vs = (t.reshape(1, -1, heads, 64).transpose(1, 2).double().cpu() for t in (q, k, v))
        scores = qs @ ks.transpose(-2, -1) / 8.0 - slopes.double().cpu()[None, :, None, None] * dist
        scores = (cap * torch.tanh(scores / cap)).masked_fill(~reference_mask(shape, kernel), float("-inf"))
        want = (scores.softmax(-1) @ vs).transpose(1, 2).reshape(q.shape)
        torch.testing.assert_close(out.double().cpu(), want, **TOL, msg=lambda m, t=tiles: f"tiles {t}: {m}")
