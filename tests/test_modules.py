"""NeighborhoodAttention{1,2,3}D: NATTEN state_dict compatibility, rpb checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

import flexna
from flexna.functional import EagerFallbackWarning
from flexna.reference import reference_mask
from tests.ext_reference import attention64, rpb_dense
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
    with torch.no_grad():
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


def test_module_per_head_gqa_and_extra_kv():
    torch.manual_seed(2)
    m = flexna.NeighborhoodAttention2D(64, 4, flexna.PerHead([3, 3, 5, 5]),
                                       dilation=flexna.PerHead([1, 2, 1, 1]), num_kv_heads=2)
    assert m.qkv.out_features == (4 + 2 * 2) * 16
    x = torch.randn(1, 10, 11, 64)
    ak, av = torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16)
    xx = x.clone().requires_grad_()
    with pytest.warns(EagerFallbackWarning):
        out = m(xx, additional_keys=ak, additional_values=av)
    assert out.shape == x.shape
    out.sum().backward()
    assert m.qkv.weight.grad is not None


def test_module_errors():
    with pytest.raises(ValueError, match="attn_drop"):
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_module_cuda_backward():
    m = flexna.NeighborhoodAttention3D(128, 4, (3, 5, 5), rel_pos_bias=True).cuda()
    x = torch.randn(1, 4, 12, 12, 128, device="cuda", requires_grad=True)
    m(x).sum().backward()
    assert torch.isfinite(m.rpb.grad).all() and m.rpb.grad.abs().sum() > 0
