"""Extensions: relative positional bias, additional tokens, GQA, per-head patterns, packing."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexna
from flexna.functional import EagerFallbackWarning, dense_flex_attention
from flexna.reference import reference_mask
from tests.ext_reference import attention64, rpb_dense

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def eager_flex(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def bhnd(x):  # [B, *spatial, H, D] -> [B, H, N, D]
    return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1]).transpose(1, 2)


def dense_blocks(num, idx):
    heads, rows = num.shape[1], num.shape[2]
    out = torch.zeros(heads, rows, idx.shape[-1], dtype=torch.bool)
    for h in range(heads):
        for r in range(rows):
            out[h, r, idx[0, h, r, : num[0, h, r]].long()] = True
    return out


def assert_same_block_mask(a, b):
    assert a.seq_lengths == b.seq_lengths and a.BLOCK_SIZE == b.BLOCK_SIZE
    for num, idx in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                     ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        da = dense_blocks(getattr(a, num), getattr(a, idx))
        db = dense_blocks(getattr(b, num), getattr(b, idx))
        assert torch.equal(da, db), num


def rand(*shape, grad=False):
    return torch.randn(*shape, requires_grad=grad)


# ---------------------------------------------------------------- 1. relative positional bias
@pytest.mark.parametrize("kernel,stride,dilation,causal", [
    ((3, 5), (1, 1), (2, 1), (False, False)),      # DiNAT, NAT table [H, 5, 9]
    ((4, 3), (2, 3), (1, 2), (False, True)),       # even kernel, strides, a causal axis
])
def test_rpb_forward_backward_vs_float64(kernel, stride, dilation, causal):
    torch.manual_seed(0)
    shape, heads = (9, 8), 2
    table_shape = flexna.rpb_table_shape(kernel, stride, causal)
    want = tuple(k if c else 2 * k + s - 2 for k, s, c in zip(kernel, stride, causal, strict=True))
    assert table_shape == want
    rpb = rand(heads, *table_shape, grad=True)
    q, k, v = (rand(2, *shape, heads, 8, grad=True) for _ in range(3))
    with pytest.warns(EagerFallbackWarning):
        out = flexna.na2d(q, k, v, kernel, stride, dilation, causal, rel_pos_bias=rpb)
    mask = reference_mask(shape, kernel, stride, dilation, causal)
    bias = rpb_dense(rpb, shape, kernel, stride, dilation, causal)
    ref = attention64(bhnd(q), bhnd(k), bhnd(v), mask, bias).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v, rpb), g.float())
    grads_ref = torch.autograd.grad(ref, (q, k, v, rpb), g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)
    assert grads[3].abs().sum() > 0


def test_rpb_table_covers_every_offset():
    """Every attended pair's index lies in the table; stride 1 fills NAT's whole [2k-1] range."""
    for length, k, s, d, c in [(20, 5, 1, 1, False), (21, 4, 3, 2, False), (17, 4, 2, 1, True),
                               (16, 6, 6, 1, False)]:
        mask = reference_mask((length,), k, s, d, c)
        x = torch.arange(length)
        rel = (x[None] // d - x[:, None] // d)[mask]
        off = k - 1 if c else (k - 1) + (s - 1 - s // 2)
        size = flexna.rpb_table_shape(k, s, c)[0]
        assert rel.min() + off >= 0 and rel.max() + off <= size - 1
        if s == 1 and not c:
            assert rel.min() + off == 0 and rel.max() + off == size - 1


def test_score_mod_composition_direct_flex():
    """rpb + distance decay + softcap through direct (eager) flex_attention and a BlockMask."""
    torch.manual_seed(1)
    shape, heads, kern = (7, 9), 3, (3, 5)
    rpb = torch.randn(heads, *flexna.rpb_table_shape(kern))
    slopes = torch.rand(heads)
    mod = flexna.compose_score_mods(
        flexna.rel_pos_bias_score_mod(rpb, shape, kern),
        flexna.distance_decay_score_mod(slopes, shape),
        flexna.softcap_score_mod(5.0),
    )
    q, k, v = (torch.randn(1, heads, 63, 16) for _ in range(3))
    bm = flexna.na_block_mask(shape, kern, device="cpu")
    out = eager_flex(q, k, v, score_mod=mod, block_mask=bm)
    c = torch.tensor([[i // 9, i % 9] for i in range(63)])
    dist = (c[:, None] - c[None]).abs().sum(-1)
    s = q.double() @ k.double().transpose(-2, -1) / 4 + rpb_dense(rpb, shape, kern, (1, 1), (1, 1),
                                                                   (False, False))
    s = s - slopes.double()[:, None, None] * dist
    s = 5.0 * torch.tanh(s / 5.0)
    s = s.masked_fill(~reference_mask(shape, kern), float("-inf"))
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 2. additional tokens
def union_mask(shape, kern, mq, mk, **kw):
    n = math.prod(shape)
    m = torch.ones(n + mq, n + mk, dtype=torch.bool)
    m[:n, :n] = reference_mask(shape, kern, **kw)
    return m


@pytest.mark.parametrize("mq,mk", [(0, 5), (7, 3), (4, 0)])
def test_additional_tokens_vs_reference(mq, mk):
    torch.manual_seed(2)
    shape, heads, kern = (6, 5, 4), 2, (3, 3, 2)
    q, k, v = (rand(2, *shape, heads, 8, grad=True) for _ in range(3))
    ak, av = (rand(2, mk, heads, 8, grad=True) for _ in range(2)) if mk else (None, None)
    aq = rand(2, mq, heads, 8, grad=True) if mq else None
    with pytest.warns(EagerFallbackWarning):
        res = flexna.na3d(q, k, v, kern, dilation=(2, 1, 1), additional_keys=ak, additional_values=av,
                          additional_queries=aq)
    out, extra = res if mq else (res, None)
    qq = torch.cat([bhnd(q), aq.transpose(1, 2)], 2) if mq else bhnd(q)
    kk = torch.cat([bhnd(k), ak.transpose(1, 2)], 2) if mk else bhnd(k)
    vv = torch.cat([bhnd(v), av.transpose(1, 2)], 2) if mk else bhnd(v)
    ref = attention64(qq, kk, vv, union_mask(shape, kern, mq, mk, dilation=(2, 1, 1))).transpose(1, 2)
    n = math.prod(shape)
    torch.testing.assert_close(out.double(), ref[:, :n].reshape(out.shape), atol=1e-5, rtol=1e-5)
    if mq:
        torch.testing.assert_close(extra.double(), ref[:, n:], atol=1e-5, rtol=1e-5)
    leaves = [t for t in (q, k, v, ak, av, aq) if t is not None]
    total = out.sum() + (extra.sum() if mq else 0)
    grads = torch.autograd.grad(total, leaves)
    grads_ref = torch.autograd.grad(ref.sum(), leaves)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape,kern,kw,mq,mk,block", [
    ((13, 11), 5, {}, 0, 37, (32, 16)),
    ((13, 11), 5, {"stride": 2, "dilation": (2, 1), "is_causal": (True, False)}, 50, 300, (32, 16)),
    ((16, 16), 3, {}, 128, 128, None),
    ((6, 5, 7), 3, {}, 20, 20, (32, 16)),
    ((30,), 7, {}, 5, 0, 16),
])
def test_extended_block_mask_equals_create_block_mask(shape, kern, kw, mq, mk, block):
    bm = flexna.extended_na_block_mask(shape, kern, num_extra_q=mq, num_extra_kv=mk,
                                       block_size=block, device="cpu", **kw)
    mm = flexna.extended_na_mask_mod(shape, kern, num_extra_q=mq, num_extra_kv=mk, device="cpu", **kw)
    ref = create_block_mask(mm, None, None, *bm.seq_lengths, device="cpu", BLOCK_SIZE=block or 128)
    assert_same_block_mask(bm, ref)
    dense = torch.nn.attention.flex_attention.create_mask(mm, None, None, *bm.seq_lengths, "cpu")[0, 0]
    assert torch.equal(dense, union_mask(shape, kern, mq, mk, **kw))


def test_additional_tokens_compiled_cpu_inference():
    """One compiled call: extra kv + extra q + GQA + rpb, no grad, vs float64."""
    torch.manual_seed(3)
    shape, kern = (10, 12), 3
    q = torch.randn(1, *shape, 4, 16)
    k, v = torch.randn(1, *shape, 2, 16), torch.randn(1, *shape, 2, 16)
    ak, av, aq = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 6, 4, 16)
    rpb = torch.randn(4, 5, 5)
    with torch.no_grad():
        out, extra = flexna.na2d(q, k, v, kern, additional_keys=ak, additional_values=av,
                                 additional_queries=aq, rel_pos_bias=rpb)
    n = 120
    bias = torch.zeros(4, n + 6, n + 9, dtype=torch.float64)
    bias[:, :n, :n] = rpb_dense(rpb, shape, (3, 3), (1, 1), (1, 1), (False, False))
    kk = torch.cat([bhnd(k), ak.transpose(1, 2)], 2).repeat_interleave(2, 1)
    vv = torch.cat([bhnd(v), av.transpose(1, 2)], 2).repeat_interleave(2, 1)
    ref = attention64(torch.cat([bhnd(q), aq.transpose(1, 2)], 2), kk, vv,
                      union_mask(shape, kern, 6, 9), bias).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref[:, :n].reshape(out.shape), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(extra.double(), ref[:, n:], atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- 3. GQA / MQA
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_forward_backward(kv_heads):
    torch.manual_seed(4)
    shape = (11, 7)
    q = rand(2, *shape, 4, 8, grad=True)
    k, v = (rand(2, *shape, kv_heads, 8, grad=True) for _ in range(2))
    with pytest.warns(EagerFallbackWarning):
        out = flexna.na2d(q, k, v, (3, 5), dilation=(2, 1))
    rep = 4 // kv_heads
    ref = attention64(bhnd(q), bhnd(k).repeat_interleave(rep, 1), bhnd(v).repeat_interleave(rep, 1),
                      reference_mask(shape, (3, 5), dilation=(2, 1))).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v)),
                    strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)
    # direct flex use: the BlockMask broadcasts over heads, flex's enable_gqa does the grouping
    with torch.no_grad():
        bm = flexna.na_block_mask(shape, (3, 5), dilation=(2, 1), device="cpu")
        direct = eager_flex(bhnd(q).detach(), bhnd(k).detach(), bhnd(v).detach(), block_mask=bm,
                            enable_gqa=True)
    torch.testing.assert_close(direct.transpose(1, 2).reshape(out.shape), out.detach())


# ---------------------------------------------------------------- 4. per-head patterns
def test_per_head_patterns():
    torch.manual_seed(5)
    shape = (12, 10)
    kern = flexna.PerHead([3, 5, (5, 3), 7])
    dil = flexna.PerHead([1, 2, 1, 1])
    q, k, v = (rand(1, *shape, 4, 8, grad=True) for _ in range(3))
    with pytest.warns(EagerFallbackWarning):
        out = flexna.na2d(q, k, v, kern, dilation=dil)
    masks = torch.stack([reference_mask(shape, kk, dilation=dd) for kk, dd in
                         zip(kern.values, dil.values, strict=True)])
    ref = attention64(bhnd(q), bhnd(k), bhnd(v), masks).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v)),
                    strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)
    bm = flexna.extended_na_block_mask(shape, kern, dilation=dil, num_extra_kv=9, block_size=16,
                                       device="cpu")
    assert bm.kv_num_blocks.shape[:2] == (1, 4)
    ref_bm = create_block_mask(bm.mask_mod, None, 4, *bm.seq_lengths, device="cpu", BLOCK_SIZE=16)
    assert_same_block_mask(bm, ref_bm)
    with torch.no_grad():  # direct flex use with the per-head BlockMask
        bm0 = flexna.extended_na_block_mask(shape, kern, dilation=dil, device="cpu")
        direct = eager_flex(bhnd(q).detach(), bhnd(k).detach(), bhnd(v).detach(), block_mask=bm0)
    torch.testing.assert_close(direct.transpose(1, 2).reshape(out.shape), out.detach())


# ---------------------------------------------------------------- 5. packing
def test_packing_roundtrip_and_attention():
    torch.manual_seed(6)
    shapes = [(9, 10), (5, 7), (20, 3)]
    xs = [torch.randn(2, *s, 3, 8) for s in shapes]
    packed = flexna.pack_tokens(xs, shapes, block_size=32)
    assert packed.shape == (2, flexna.packed_length(shapes, block_size=32), 3, 8) == (2, 96 + 64 + 64, 3, 8)
    for a, b in zip(flexna.unpack_tokens(packed, shapes, block_size=32), xs, strict=True):
        assert torch.equal(a, b)
    q, k, v = (flexna.pack_tokens([torch.randn(1, *s, 2, 8) for s in shapes], shapes, 32).requires_grad_()
               for _ in range(3))
    with pytest.warns(EagerFallbackWarning):
        out = flexna.packed_neighborhood_attention(q, k, v, shapes, 3, dilation=(1, 1), block_size=32)
    offs = 0
    for s, o in zip(shapes, flexna.unpack_tokens(out, shapes, 32), strict=True):
        n = math.prod(s)
        ref = attention64(*(t[:, offs:offs + n].transpose(1, 2) for t in (q, k, v)), reference_mask(s, 3))
        torch.testing.assert_close(o.reshape(1, n, 2, 8).double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
        offs += -(-n // 32) * 32
    assert out[:, 90:96].abs().max() == 0  # padding outputs are zero
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[:, 90:96].abs().max() == 0
    bm = flexna.packed_block_mask(shapes, 3, block_size=32, device="cpu")
    ref_bm = create_block_mask(bm.mask_mod, None, None, *bm.seq_lengths, device="cpu", BLOCK_SIZE=32)
    assert_same_block_mask(bm, ref_bm)
    with torch.no_grad():  # direct flex use
        direct = eager_flex(*(t.detach().transpose(1, 2) for t in (q, k, v)), block_mask=bm)
    torch.testing.assert_close(direct.transpose(1, 2), out.detach())


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs():
    x = torch.randn(1, 8, 8, 4, 8)
    with pytest.raises(ValueError, match="key has 3 heads"):
        flexna.na2d(x, torch.randn(1, 8, 8, 3, 8), torch.randn(1, 8, 8, 3, 8), 3)
    with pytest.raises(ValueError, match="additional_keys must be shaped"):
        flexna.na2d(x, x, x, 3, additional_keys=torch.randn(1, 5, 4, 16),
                    additional_values=torch.randn(1, 5, 4, 8))
    with pytest.raises(ValueError, match="additional_keys and additional_values"):
        flexna.na2d(x, x, x, 3, additional_keys=torch.randn(1, 5, 4, 8))
    with pytest.raises(ValueError, match="additional_values must be shaped"):
        flexna.na2d(x, x, x, 3, additional_keys=torch.randn(1, 5, 4, 8),
                    additional_values=torch.randn(1, 5, 2, 8))
    with pytest.raises(ValueError, match="additional_queries must be shaped"):
        flexna.na2d(x, x, x, 3, additional_queries=torch.randn(2, 5, 4, 8))
    with pytest.raises(ValueError, match=r"kernel_size: PerHead has 3 entries, need one per query head \(4\)"):
        flexna.na2d(x, x, x, flexna.PerHead([3, 3, 5]))
    with pytest.raises(ValueError, match="head 1: kernel_size"):
        flexna.na2d(x, x, x, flexna.PerHead([3, 9, 3, 3]))
    with pytest.raises(ValueError, match="rel_pos_bias must be a tensor shaped"):
        flexna.na2d(x, x, x, 3, rel_pos_bias=torch.zeros(4, 3, 3))
    with pytest.raises(ValueError, match="rel_pos_bias needs one pattern"):
        flexna.na2d(x, x, x, flexna.PerHead([3, 3, 5, 5]), rel_pos_bias=torch.zeros(4, 5, 5))
    shapes = [(9, 10), (5, 7)]
    bad = torch.randn(1, 200, 2, 8)
    with pytest.raises(ValueError, match="add up to 160 tokens"):
        flexna.packed_neighborhood_attention(bad, bad, bad, shapes, 3, block_size=32)
    with pytest.raises(ValueError, match=r"shapes\[1\] = \(5, 7\): kernel_size"):
        flexna.packed_block_mask(shapes, 7)
    with pytest.raises(ValueError, match="x must be shaped"):
        flexna.unpack_tokens(bad, shapes, 32)
    with pytest.raises(ValueError, match="num_extra_kv must be an int"):
        flexna.extended_na_block_mask((8, 8), 3, num_extra_kv=-1)


def test_dense_flex_matches_eager_flex():
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 2, 40, 8) for _ in range(3))
    bm = flexna.na_block_mask((40,), 5, is_causal=True, device="cpu")
    a, la = dense_flex_attention(q, k, v, block_mask=bm, return_lse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        b, lb = eager_flex(q, k, v, block_mask=bm, return_lse=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(la, lb)


# ---------------------------------------------------------------- GPU
@gpu
@needs_cuda
def test_everything_cuda_forward_backward():
    torch.manual_seed(8)
    dev = "cuda"
    shape = (12, 14)
    q = torch.randn(1, *shape, 4, 32, device=dev, requires_grad=True)
    k, v = (torch.randn(1, *shape, 2, 32, device=dev, requires_grad=True) for _ in range(2))
    ak, av = (torch.randn(1, 7, 2, 32, device=dev, requires_grad=True) for _ in range(2))
    rpb = torch.randn(4, 5, 9, device=dev, requires_grad=True)
    out = flexna.na2d(q, k, v, (3, 5), dilation=(2, 1), additional_keys=ak, additional_values=av,
                      rel_pos_bias=rpb)
    n = 168
    bias = torch.zeros(4, n, n + 7, dtype=torch.float64)
    bias[:, :, :n] = rpb_dense(rpb.cpu(), shape, (3, 5), (1, 1), (2, 1), (False, False))
    leaves = (q, k, v, ak, av, rpb)
    cpu = [t.detach().cpu().requires_grad_() for t in leaves]
    kk = torch.cat([bhnd(cpu[1]), cpu[3].transpose(1, 2)], 2).repeat_interleave(2, 1)
    vv = torch.cat([bhnd(cpu[2]), cpu[4].transpose(1, 2)], 2).repeat_interleave(2, 1)
    bias = torch.zeros(4, n, n + 7, dtype=torch.float64)
    bias[:, :, :n] = rpb_dense(cpu[5], shape, (3, 5), (1, 1), (2, 1), (False, False))
    ref = attention64(bhnd(cpu[0]), kk, vv, union_mask(shape, (3, 5), 0, 7, dilation=(2, 1)), bias)
    ref = ref.transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-3, rtol=2e-3)
    for a, b in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), cpu), strict=True):
        torch.testing.assert_close(a.double().cpu(), b.double(), atol=5e-3, rtol=5e-3)
    packed = flexna.pack_tokens([torch.randn(1, 9, 10, 2, 32, device=dev),
                                 torch.randn(1, 5, 7, 2, 32, device=dev)], [(9, 10), (5, 7)])
    res = flexna.packed_neighborhood_attention(packed, packed, packed, [(9, 10), (5, 7)], 3)
    assert torch.isfinite(res).all()
