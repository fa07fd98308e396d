"""NeighborhoodAttention{1,2,3}D: NATTEN state_dict compatibility, rpb checkpoints, errors."""

from __future__ import annotations

import math

import pytest
import torch

import flexna
from flexna.functional import EagerFallbackWarning
from flexna.reference import reference_mask
from tests.ext_reference import attention64, per_head_mask_and_bias, rpb_dense
from tests.helpers import assert_compiled, eager_flex_ok
from tests.natten_peer import natten_available

needs_natten = pytest.mark.skipif(not natten_available(), reason="NATTEN not installed")


def run(module, x):
    """Forward with x requiring grad: CPU runs the dense differentiable path (no compile)."""
    x = x.clone().requires_grad_()
    with pytest.warns(EagerFallbackWarning):
        return module(x)


@needs_natten
@pytest.mark.parametrize("cls,shape,kw", [
    ("NeighborhoodAttention1D", (20,), {"kernel_size": 5, "dilation": 2, "is_causal": True}),
    ("NeighborhoodAttention2D", (9, 12), {"kernel_size": (3, 5), "stride": (1, 2), "dilation": (2, 1)}),
    ("NeighborhoodAttention3D", (4, 6, 5), {"kernel_size": (2, 3, 3)}),
])
def test_loads_natten_state_dict(cls, shape, kw):
    import natten

    torch.manual_seed(0)
    theirs = getattr(natten, cls)(64, 4, **kw).eval()
    ours = getattr(flexna, cls)(64, 4, **kw).eval()
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    x = torch.randn(2, *shape, 64)
    with torch.no_grad(), eager_flex_ok():  # NATTEN's CPU Flex backend runs Flex eagerly
        want = theirs(x)
    torch.testing.assert_close(run(ours, x), want, atol=1e-5, rtol=1e-5)


def test_rpb_checkpoint_matches_float64_reference():
    torch.manual_seed(1)
    shape, heads, dim, kern, dil = (10, 9), 2, 32, (3, 5), (2, 1)
    m = flexna.NeighborhoodAttention2D(dim, heads, kern, dilation=dil, rel_pos_bias=True)
    assert m.rpb.shape == (heads, 5, 9)  # NAT/DiNAT: [heads, 2k-1, 2k-1]
    state = {k: torch.randn_like(v) * 0.3 for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    x = torch.randn(2, *shape, dim, dtype=torch.float64)
    out = run(m, x.float())
    # independent float64 forward: x @ qkv, masked softmax with bias, proj
    qkv = (x @ state["qkv.weight"].double().t() + state["qkv.bias"].double()).reshape(2, 90, 3, heads, 16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    bias = rpb_dense(state["rpb"].double(), shape, kern, (1, 1), dil, (False, False))
    att = attention64(q, k, v, reference_mask(shape, kern, dilation=dil), bias)
    att = att.transpose(1, 2).reshape(2, *shape, dim)
    ref = att @ state["proj.weight"].double().t() + state["proj.bias"].double()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert m.rpb.grad is not None and m.rpb.grad.abs().sum() > 0


def module_reference(state, x, heads, kv_heads, per_head, ak=None, av=None):
    """Independent float64 forward of a NATTEN-style module from its state_dict: qkv Linear
    (NATTEN's [3, heads, head_dim] split; with GQA [q heads | k heads | v heads]), masked
    softmax with per-head patterns, rpb (if in state) and extra keys/values, proj Linear."""
    sd = {k: v.double() for k, v in state.items()}
    batch, *shape, dim = x.shape
    d = dim // heads
    n = math.prod(shape)
    qkv = x.double().reshape(batch, n, dim) @ sd["qkv.weight"].t()
    if "qkv.bias" in sd:
        qkv = qkv + sd["qkv.bias"]
    if kv_heads == heads:
        qkv = qkv.reshape(batch, n, 3, heads, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q = qkv[..., :heads * d].reshape(batch, n, heads, d).transpose(1, 2)
        k = qkv[..., heads * d:(heads + kv_heads) * d].reshape(batch, n, kv_heads, d).transpose(1, 2)
        v = qkv[..., (heads + kv_heads) * d:].reshape(batch, n, kv_heads, d).transpose(1, 2)
    mask, bias = per_head_mask_and_bias(sd.get("rpb"), tuple(shape), per_head)
    m = 0 if ak is None else ak.shape[1]
    if m:
        k = torch.cat([k, ak.double().transpose(1, 2)], 2)
        v = torch.cat([v, av.double().transpose(1, 2)], 2)
        mask = torch.cat([mask, torch.ones(heads, n, m, dtype=torch.bool)], -1)
        if bias is not None:
            bias = torch.cat([bias, torch.zeros(heads, n, m, dtype=bias.dtype)], -1)
    rep = heads // kv_heads
    att = attention64(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask, bias)
    att = att.transpose(1, 2).reshape(batch, *shape, dim)
    return att @ sd["proj.weight"].t() + sd["proj.bias"]


def test_module_per_head_gqa_and_extra_kv():
    torch.manual_seed(2)
    kern, dil = flexna.PerHead([3, 3, 5, 5]), flexna.PerHead([1, 2, 1, 1])
    m = flexna.NeighborhoodAttention2D(64, 4, kern, dilation=dil, num_kv_heads=2)
    assert m.qkv.out_features == (4 + 2 * 2) * 16
    state = {k: torch.randn_like(v) * 0.3 for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    x = torch.randn(1, 10, 11, 64)
    ak, av = torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)
    xx = x.clone().requires_grad_()
    with pytest.warns(EagerFallbackWarning):
        out = m(xx, additional_keys=ak, additional_values=av)
    per_head = [{"kernel_size": kk, "dilation": dd} for kk, dd in zip(kern.values, dil.values, strict=True)]
    ref = module_reference(state, x, 4, 2, per_head, ak, av)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    out.sum().backward()
    assert m.qkv.weight.grad is not None and m.qkv.weight.grad.abs().sum() > 0


def test_module_per_head_rpb_dinat_vs_float64():
    """DiNAT-style heads (half local, half dilated) sharing one rpb table shape: forward and
    the gradients of every parameter, rpb included, vs an independent float64 forward."""
    torch.manual_seed(4)
    dil = flexna.PerHead([1, 1, (2, 1), (3, 2)])
    m = flexna.NeighborhoodAttention2D(32, 4, (3, 5), dilation=dil, rel_pos_bias=True)
    assert m.rpb.shape == (4, 5, 9)
    assert set(m.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rpb"}
    state = {k: torch.randn_like(v) * 0.3 for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    x = torch.randn(2, 9, 11, 32)
    with pytest.warns(EagerFallbackWarning):
        out = m(x)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in state.items()}
    ref = module_reference(leaves, x, 4, 4, [{"kernel_size": (3, 5), "dilation": d} for d in dil.values])
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    params = dict(m.named_parameters())
    for name, leaf in leaves.items():
        torch.testing.assert_close(params[name].grad.double(), leaf.grad.double(), atol=2e-3, rtol=1e-4,
                                   msg=lambda text, name=name: f"{name}: {text}")
    assert m.rpb.grad.abs().sum() > 0


def test_module_proj_drop():
    """proj_drop: dropout on the projection output in training (NATTEN's only dropout), identity in eval."""
    torch.manual_seed(5)
    p = 0.4
    m = flexna.NeighborhoodAttention1D(32, 2, 5, proj_drop=p)
    x = torch.randn(4, 50, 32)
    with torch.no_grad():
        want = m.eval()(x)
        m.train()
        torch.manual_seed(6)
        got = m(x)
        torch.manual_seed(6)
        again = m(x)
        torch.manual_seed(7)
        other = m(x)
    dropped = got == 0
    assert 0.3 < dropped.float().mean() < 0.5
    torch.testing.assert_close(got[~dropped], want[~dropped] / (1 - p), atol=1e-5, rtol=1e-5)
    assert torch.equal(got, again) and not torch.equal(got, other)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), want)


def test_module_errors():
    with pytest.raises(ValueError, match=r"attn_drop=0.1: .*NATTEN >= 0.20's modules have no attn_drop "
                                         r"either.*proj_drop"):
        flexna.NeighborhoodAttention2D(64, 4, 3, attn_drop=0.1)
    with pytest.raises(ValueError, match="kernel_size: PerHead has 2 entries"):
        flexna.NeighborhoodAttention2D(64, 4, flexna.PerHead([3, 5]))
    with pytest.raises(ValueError, match="num_kv_heads"):
        flexna.NeighborhoodAttention2D(64, 4, 3, num_kv_heads=3)
    with pytest.raises(ValueError, match="kernel_size must have one entry per layout axis"):
        flexna.NeighborhoodAttention2D(64, 4, (3, 3, 3))
    m = flexna.NeighborhoodAttention1D(32, 2, 3)
    with pytest.raises(ValueError, match="embed dim"):
        m(torch.randn(1, 10, 16))


def test_module_compiled_cpu_inference():
    torch.manual_seed(3)
    m = flexna.NeighborhoodAttention2D(64, 4, 3, rel_pos_bias=True).eval()
    x = torch.randn(1, 8, 10, 64)
    with torch.no_grad():
        fast = m(x)
    torch.testing.assert_close(fast, run(m, x).detach(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- GPU (`python -m pytest -q -m gpu`)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def natten_style_state(embed_dim, heads, kv_heads=None, table=None, seed=0):
    """A state_dict laid out like NATTEN's modules (qkv Linear [3 * C, C] as [3, heads,
    head_dim] rows, proj Linear [C, C]; NAT/DiNAT ``rpb`` [heads, *table]); taken from a real
    NATTEN module when NATTEN is installed (random init), written by hand otherwise."""
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    qkv_out = (heads + 2 * kv_heads) * (embed_dim // heads)
    state = None
    if natten_available() and kv_heads == heads:
        import natten

        theirs = natten.NeighborhoodAttention1D(embed_dim, heads, 3)  # keys do not depend on it
        state = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in state.items()} == {
            "qkv.weight": (qkv_out, embed_dim), "qkv.bias": (qkv_out,),
            "proj.weight": (embed_dim, embed_dim), "proj.bias": (embed_dim,)}
    if state is None:
        state = {"qkv.weight": torch.empty(qkv_out, embed_dim), "qkv.bias": torch.empty(qkv_out),
                 "proj.weight": torch.empty(embed_dim, embed_dim), "proj.bias": torch.empty(embed_dim)}
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in state.items()}  # not all-similar
    if table is not None:
        state["rpb"] = torch.randn(heads, *table, generator=g) * 0.3
    return state


def check_module_cuda(module, state, x, per_head, kv_heads=None, ak=None, av=None):
    """Load ``state`` into ``module`` on CUDA; forward + backward (x and every parameter)
    vs the float64 reference of ``module_reference``."""
    heads = module.num_heads
    module.load_state_dict(state)
    module = module.cuda()
    xc = x.cuda().requires_grad_()
    torch.compiler.reset()
    with assert_compiled():
        out = module(xc, *(t.cuda() for t in (ak, av) if t is not None))
    leaves = {k: v.double().requires_grad_() for k, v in state.items()}
    x_ = x.double().requires_grad_()
    ref = module_reference(leaves, x_, heads, kv_heads or heads, per_head, ak, av)
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), atol=1e-4, rtol=1e-4)
    g = torch.randn_like(ref)
    out.backward(g.float().cuda())
    ref.backward(g)
    params = dict(module.named_parameters())
    for name, got, want in [("x", xc.grad, x_.grad), *((k, params[k].grad, v.grad) for k, v in leaves.items())]:
        torch.testing.assert_close(got.cpu().double(), want, atol=2e-3, rtol=1e-3,
                                   msg=lambda text, name=name: f"gradient of {name}: {text}")


@gpu
@needs_cuda
@pytest.mark.parametrize("cls,shape,kw", [  # the CPU tests above cover 1-D/2-D/3-D vs NATTEN
    ("NeighborhoodAttention2D", (9, 12), {"kernel_size": (3, 5), "stride": (1, 2), "dilation": (2, 1)}),
])
def test_gpu_module_loads_natten_state_dict(cls, shape, kw):
    torch.manual_seed(10)
    module = getattr(flexna, cls)(32, 2, **kw)
    x = torch.randn(2, *shape, 32)
    check_module_cuda(module, natten_style_state(32, 2), x, [kw, kw])


@gpu
@needs_cuda
def test_gpu_module_dinat_rpb_per_head():
    """A DiNAT-style checkpoint (rpb [heads, 5, 9]) with per-head dilation, on CUDA."""
    torch.manual_seed(11)
    dil = flexna.PerHead([1, 1, (2, 1), (3, 2)])
    module = flexna.NeighborhoodAttention2D(64, 4, (3, 5), dilation=dil, rel_pos_bias=True)
    state = natten_style_state(64, 4, table=(5, 9))
    check_module_cuda(module, state, torch.randn(1, 10, 12, 64),
                      [{"kernel_size": (3, 5), "dilation": d} for d in dil.values])


@gpu
@needs_cuda
def test_gpu_module_gqa_extra_kv():
    torch.manual_seed(12)
    module = flexna.NeighborhoodAttention2D(64, 4, 5, num_kv_heads=2)
    state = natten_style_state(64, 4, kv_heads=2)
    check_module_cuda(module, state, torch.randn(1, 9, 11, 64), [{"kernel_size": 5}] * 4, kv_heads=2,
                      ak=torch.randn(1, 3, 2, 16), av=torch.randn(1, 3, 2, 16))
