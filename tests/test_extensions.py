"""Extensions: relative positional bias, additional tokens, GQA, per-head patterns, packing."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexna
from flexna.functional import EagerFallbackWarning, dense_flex_attention
from flexna.reference import reference_mask
from tests.ext_reference import attention64, packed_mask_and_bias, per_head_mask_and_bias, rpb_dense
from tests.helpers import assert_compiled

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


# Attention tests run on the CPU (the dense differentiable fallback: EagerFallbackWarning)
# and on CUDA (compiled Flex forward + backward; `python -m pytest -q -m gpu`).
DEVICES = ["cpu", pytest.param("cuda", marks=[gpu, needs_cuda])]


def on_devices(cases, cuda_cases):
    """Parameters ``(*case, device)``: every case on the CPU, ``cuda_cases`` also on CUDA
    (each CUDA case compiles Flex forward + backward: a few seconds; keep the GPU suite short)."""
    out = []
    for case in cases:
        values = case if isinstance(case, tuple) else (case,)
        out.append(pytest.param(*values, "cpu"))
        if case in cuda_cases:
            out.append(pytest.param(*values, "cuda", marks=[gpu, needs_cuda]))
    return out
# vs the float64 reference: (forward atol, rtol), (gradient atol, rtol)
TOL = {
    ("cpu", torch.float32): ((1e-5, 1e-5), (1e-5, 1e-4)),
    ("cuda", torch.float32): ((1e-4, 1e-4), (1e-3, 1e-3)),
    ("cuda", torch.float16): ((4e-3, 4e-3), (2e-2, 2e-2)),
}


class Leaves:
    """Random leaf tensors on ``device``/``dtype`` plus float64 CPU copies of the same (rounded)
    values, for a float64 autograd reference of forward and backward."""

    def __init__(self, device="cpu", dtype=torch.float32):
        self.device, self.dtype = device, dtype
        self.dev: list[torch.Tensor] = []
        self.ref: list[torch.Tensor] = []

    def __call__(self, *shape):
        t = torch.randn(*shape).to(self.dtype)
        self.dev.append(t.to(self.device).requires_grad_())
        self.ref.append(t.double().requires_grad_())
        return self.dev[-1], self.ref[-1]

    def check(self, got: torch.Tensor, ref: torch.Tensor, nonzero_grads=()):
        """Compare forward and the gradients of every leaf (random output gradient)."""
        (fa, fr), (ga, gr) = TOL[(torch.device(self.device).type, self.dtype)]
        torch.testing.assert_close(got.detach().cpu().double(), ref.detach(), atol=fa, rtol=fr)
        g = torch.randn(ref.shape, dtype=torch.float64).to(self.dtype)
        grads = torch.autograd.grad(got, self.dev, g.to(self.device))
        grads_ref = torch.autograd.grad(ref, self.ref, g.double())
        for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
            torch.testing.assert_close(a.cpu().double(), b, atol=ga, rtol=gr,
                                       msg=lambda text, i=i: f"gradient of leaf {i}: {text}")
        for i in nonzero_grads:
            assert grads[i].abs().sum() > 0


@contextlib.contextmanager
def runs(device):
    """CPU: gradients need the dense fallback, which warns. CUDA: compiled Flex, fresh caches
    (no recompile limit across tests) and no silent eager fallback."""
    if device == "cpu":
        with pytest.warns(EagerFallbackWarning):
            yield
    else:
        torch.compiler.reset()
        with assert_compiled():
            yield


def cat_tokens(x, extra):
    """[B, *spatial, H, D] + optional [B, M, H, D] -> [B, H, N + M, D]."""
    return torch.cat([bhnd(x), extra.transpose(1, 2)], 2) if extra is not None else bhnd(x)


# ---------------------------------------------------------------- 1. relative positional bias
RPB_CASES = [
    ((3, 5), (1, 1), (2, 1), (False, False)),      # DiNAT, NAT table [H, 5, 9]
    ((4, 3), (2, 3), (1, 2), (False, True)),       # even kernel, strides, a causal axis
]


@pytest.mark.parametrize("kernel,stride,dilation,causal,device", on_devices(RPB_CASES, RPB_CASES[1:]))
def test_rpb_forward_backward_vs_float64(kernel, stride, dilation, causal, device):
    torch.manual_seed(0)
    shape, heads = (9, 8), 2
    table_shape = flexna.rpb_table_shape(kernel, stride, causal)
    want = tuple(k if c else 2 * k + s - 2 for k, s, c in zip(kernel, stride, causal, strict=True))
    assert table_shape == want
    leaves = Leaves(device)
    (q, q_), (k, k_), (v, v_) = (leaves(2, *shape, heads, 16) for _ in range(3))
    rpb, rpb_ = leaves(heads, *table_shape)
    with runs(device):
        out = flexna.na2d(q, k, v, kernel, stride, dilation, causal, rel_pos_bias=rpb)
    mask = reference_mask(shape, kernel, stride, dilation, causal)
    bias = rpb_dense(rpb_, shape, kernel, stride, dilation, causal)
    ref = attention64(bhnd(q_), bhnd(k_), bhnd(v_), mask, bias).transpose(1, 2).reshape(out.shape)
    leaves.check(out, ref, nonzero_grads=[3])


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


# per-head patterns with one table (DiNAT: half the heads local, half dilated)
def expand_heads(heads, **params):
    """One kwargs dict per head from pattern params that may be PerHead."""
    return [{k: (v.values[h] if isinstance(v, flexna.PerHead) else v) for k, v in params.items()}
            for h in range(heads)]


def extended_reference(q, k, v, mask, bias=None, ak=None, av=None, aq=None):
    """float64 attention over layout + additional tokens; mask/bias [H, N, N] of the layout;
    extra tokens attend / are attended by everything, with no bias. Returns [B, N + Mq, H, D]."""
    n = mask.shape[-1]
    mq = 0 if aq is None else aq.shape[1]
    mk = 0 if ak is None else ak.shape[1]
    full = torch.ones(mask.shape[0], n + mq, n + mk, dtype=torch.bool)
    full[:, :n, :n] = mask
    fb = torch.zeros(mask.shape[0], n + mq, n + mk, dtype=torch.float64)
    if bias is not None:
        fb[:, :n, :n] = bias
    qq, kk, vv = cat_tokens(q, aq), cat_tokens(k, ak), cat_tokens(v, av)
    rep = qq.shape[1] // kk.shape[1]
    ref = attention64(qq, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1), full, fb)
    return ref.transpose(1, 2)


def joined(out, extra):
    """Functional result(s) -> [B, N + Mq, H, D] like extended_reference."""
    main = out.reshape(out.shape[0], -1, out.shape[-2], out.shape[-1])
    return main if extra is None else torch.cat([main, extra], 1)


PER_HEAD_RPB = {
    "dinat-2d": ((10, 12), 4, 0, 0, {"kernel_size": (3, 5),
                                     "dilation": flexna.PerHead([1, 1, (2, 2), (3, 2)])}),
    "same-table-other-kernel-1d-extra": ((30,), 2, 3, 5, {"kernel_size": flexna.PerHead([3, 4]),
                                                          "stride": flexna.PerHead([3, 1]),
                                                          "dilation": flexna.PerHead([1, 2])}),
    "causal-stride-2d": ((9, 8), 2, 0, 4, {"kernel_size": 3, "stride": (2, 1), "is_causal": (True, False),
                                           "dilation": flexna.PerHead([1, (2, 2)])}),
}


@pytest.mark.parametrize("case,device", on_devices(list(PER_HEAD_RPB), ["dinat-2d"]))
def test_rpb_per_head_forward_backward_vs_float64(case, device):
    """Functional API: head h adds table[h] indexed with head h's own pattern; grads reach the
    table; direct flex use (rel_pos_bias_score_mod with PerHead + extended_na_block_mask) agrees."""
    torch.manual_seed(10)
    shape, heads, mq, mk, params = PER_HEAD_RPB[case]
    per_head = expand_heads(heads, **params)
    tables = {flexna.rpb_table_shape(kw["kernel_size"], kw.get("stride", 1), kw.get("is_causal", False),
                                     len(shape)) for kw in per_head}
    assert len(tables) == 1
    leaves = Leaves(device)
    (q, q_), (k, k_), (v, v_) = (leaves(2, *shape, heads, 16) for _ in range(3))
    table, table_ = leaves(heads, *tables.pop())
    ak, ak_ = leaves(2, mk, heads, 16) if mk else (None, None)
    av, av_ = leaves(2, mk, heads, 16) if mk else (None, None)
    aq, aq_ = leaves(2, mq, heads, 16) if mq else (None, None)
    with runs(device):
        res = flexna.neighborhood_attention(q, k, v, rel_pos_bias=table, additional_keys=ak,
                                            additional_values=av, additional_queries=aq, **params)
    out, extra = res if mq else (res, None)
    mask, bias = per_head_mask_and_bias(table_, shape, per_head)
    ref = extended_reference(q_, k_, v_, mask, bias, ak_, av_, aq_)
    leaves.check(joined(out, extra), ref, nonzero_grads=[3])
    if device != "cpu":
        return
    # direct flex_attention use, eager (no grad)
    with torch.no_grad():
        mod = flexna.rel_pos_bias_score_mod(table.detach(), shape, num_extra_q=mq, num_extra_kv=mk, **params)
        bm = flexna.extended_na_block_mask(shape, num_extra_q=mq, num_extra_kv=mk, device="cpu", **params)
        direct = eager_flex(cat_tokens(q, aq).detach(), cat_tokens(k, ak).detach(), cat_tokens(v, av).detach(),
                            score_mod=mod, block_mask=bm).transpose(1, 2)
    torch.testing.assert_close(direct.double(), ref.detach(), atol=1e-5, rtol=1e-5)


def test_rpb_per_head_compiled_cpu_inference():
    """Compiled Flex (no grad) with per-head rpb + per-head BlockMask vs float64."""
    torch.manual_seed(11)
    shape, heads = (12, 10), 4
    params = {"kernel_size": 3, "dilation": flexna.PerHead([1, 1, 2, (3, 2)])}
    table = torch.randn(heads, 5, 5)
    q, k, v = (torch.randn(1, *shape, heads, 16) for _ in range(3))
    with torch.no_grad():
        out = flexna.na2d(q, k, v, rel_pos_bias=table, **params)
    mask, bias = per_head_mask_and_bias(table, shape, expand_heads(heads, **params))
    ref = extended_reference(q, k, v, mask, bias)
    torch.testing.assert_close(out.double(), ref.reshape(out.shape), atol=2e-5, rtol=1e-4)


def test_rpb_per_head_table_shapes_must_agree():
    x = torch.randn(1, 9, 9, 4, 8)
    kern = flexna.PerHead([3, 3, 5, (3, 5)])
    msg = r"one table shape for all heads.*heads \[0, 1\]: \(5, 5\); head 2: \(9, 9\); head 3: \(5, 9\)"
    with pytest.raises(ValueError, match=msg):
        flexna.na2d(x, x, x, kern, rel_pos_bias=torch.zeros(4, 5, 5))
    with pytest.raises(ValueError, match=msg):
        flexna.rel_pos_bias_score_mod(torch.zeros(4, 5, 5), (9, 9), kern)
    with pytest.raises(ValueError, match=r"rel_pos_bias=True needs one table shape.*"
                                         r"head 0: \(5, 5\); head 1: \(6, 5\)"):
        flexna.NeighborhoodAttention2D(32, 2, 3, stride=flexna.PerHead([1, (2, 1)]), rel_pos_bias=True)
    with pytest.raises(ValueError, match=r"kernel_size: PerHead has 4 entries, need one per query head \(2\)"):
        flexna.rel_pos_bias_score_mod(torch.zeros(2, 5, 5), (9, 9), kern)


# ---------------------------------------------------------------- 2. additional tokens
def union_mask(shape, kern, mq, mk, **kw):
    n = math.prod(shape)
    m = torch.ones(n + mq, n + mk, dtype=torch.bool)
    m[:n, :n] = reference_mask(shape, kern, **kw)
    return m


@pytest.mark.parametrize("mq,mk,device", on_devices([(0, 5), (7, 3), (4, 0)], [(7, 3)]))
def test_additional_tokens_vs_reference(mq, mk, device):
    """Extra keys/values (every query attends them) and extra query rows (attending every key),
    one fused call, forward + backward of every input vs float64."""
    torch.manual_seed(2)
    shape, heads, kern = (6, 5, 4), 2, (3, 3, 2)
    leaves = Leaves(device)
    (q, q_), (k, k_), (v, v_) = (leaves(2, *shape, heads, 16) for _ in range(3))
    ak, ak_ = leaves(2, mk, heads, 16) if mk else (None, None)
    av, av_ = leaves(2, mk, heads, 16) if mk else (None, None)
    aq, aq_ = leaves(2, mq, heads, 16) if mq else (None, None)
    with runs(device):
        res = flexna.na3d(q, k, v, kern, dilation=(2, 1, 1), additional_keys=ak, additional_values=av,
                          additional_queries=aq)
    out, extra = res if mq else (res, None)
    assert out.shape == q.shape and (extra is None or extra.shape == aq.shape)
    mask = reference_mask(shape, kern, dilation=(2, 1, 1))[None].expand(heads, -1, -1)
    ref = extended_reference(q_, k_, v_, mask, None, ak_, av_, aq_)
    leaves.check(joined(out, extra), ref)


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
@pytest.mark.parametrize("kv_heads,device", on_devices([1, 2], [1]))
def test_gqa_forward_backward(kv_heads, device):
    """GQA/MQA vs float64. On CUDA the layout has 77 (< 128) query tokens, where torch would pick
    its flex-decoding kernel for GQA with a head-broadcast BlockMask; on torch 2.11 that kernel
    fails to compile (NoValidChoicesError), so flexna passes FORCE_USE_FLEX_ATTENTION on CUDA
    (flexna.functional._cuda_kernel_options). This case guards it."""
    torch.manual_seed(4)
    shape = (11, 7)
    leaves = Leaves(device)
    q, q_ = leaves(2, *shape, 4, 16)
    (k, k_), (v, v_) = (leaves(2, *shape, kv_heads, 16) for _ in range(2))
    with runs(device):
        out = flexna.na2d(q, k, v, (3, 5), dilation=(2, 1))
    rep = 4 // kv_heads
    ref = attention64(bhnd(q_), bhnd(k_).repeat_interleave(rep, 1), bhnd(v_).repeat_interleave(rep, 1),
                      reference_mask(shape, (3, 5), dilation=(2, 1))).transpose(1, 2).reshape(out.shape)
    leaves.check(out, ref)
    if device != "cpu":
        return
    # direct flex use: the BlockMask broadcasts over heads, flex's enable_gqa does the grouping
    with torch.no_grad():
        bm = flexna.na_block_mask(shape, (3, 5), dilation=(2, 1), device="cpu")
        direct = eager_flex(bhnd(q).detach(), bhnd(k).detach(), bhnd(v).detach(), block_mask=bm,
                            enable_gqa=True)
    torch.testing.assert_close(direct.transpose(1, 2).reshape(out.shape).double(), ref.detach(),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 4. per-head patterns
@pytest.mark.parametrize("device", DEVICES)
def test_per_head_patterns(device):
    torch.manual_seed(5)
    shape = (12, 10)
    kern = flexna.PerHead([3, 5, (5, 3), 7])
    dil = flexna.PerHead([1, 2, 1, 1])
    leaves = Leaves(device)
    (q, q_), (k, k_), (v, v_) = (leaves(1, *shape, 4, 16) for _ in range(3))
    with runs(device):
        out = flexna.na2d(q, k, v, kern, dilation=dil)
    masks = torch.stack([reference_mask(shape, kk, dilation=dd) for kk, dd in
                         zip(kern.values, dil.values, strict=True)])
    ref = attention64(bhnd(q_), bhnd(k_), bhnd(v_), masks).transpose(1, 2).reshape(out.shape)
    leaves.check(out, ref)
    if device != "cpu":
        return
    bm = flexna.extended_na_block_mask(shape, kern, dilation=dil, num_extra_kv=9, block_size=16,
                                       device="cpu")
    assert bm.kv_num_blocks.shape[:2] == (1, 4)
    ref_bm = create_block_mask(bm.mask_mod, None, 4, *bm.seq_lengths, device="cpu", BLOCK_SIZE=16)
    assert_same_block_mask(bm, ref_bm)
    with torch.no_grad():  # direct flex use with the per-head BlockMask
        bm0 = flexna.extended_na_block_mask(shape, kern, dilation=dil, device="cpu")
        direct = eager_flex(bhnd(q).detach(), bhnd(k).detach(), bhnd(v).detach(), block_mask=bm0)
    torch.testing.assert_close(direct.transpose(1, 2).reshape(out.shape).double(), ref.detach(),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 5. packing
def test_packing_roundtrip_and_block_mask():
    torch.manual_seed(6)
    shapes = [(9, 10), (5, 7), (20, 3)]
    xs = [torch.randn(2, *s, 3, 8) for s in shapes]
    packed = flexna.pack_tokens(xs, shapes, block_size=32)
    assert packed.shape == (2, flexna.packed_length(shapes, block_size=32), 3, 8) == (2, 96 + 64 + 64, 3, 8)
    assert packed[:, 90:96].abs().max() == 0 and packed[:, 131:160].abs().max() == 0
    for a, b in zip(flexna.unpack_tokens(packed, shapes, block_size=32), xs, strict=True):
        assert torch.equal(a, b)
    bm = flexna.packed_block_mask(shapes, 3, block_size=32, device="cpu")
    ref_bm = create_block_mask(bm.mask_mod, None, None, *bm.seq_lengths, device="cpu", BLOCK_SIZE=32)
    assert_same_block_mask(bm, ref_bm)
    mask, _ = packed_mask_and_bias(None, shapes, 32, 3)
    dense = torch.nn.attention.flex_attention.create_mask(bm.mask_mod, None, None, 224, 224, "cpu")[0, 0]
    assert torch.equal(dense, mask)


PACKED = {
    "2d-mixed": ([(9, 10), (5, 7), (20, 3), (4, 4)], 32, {"kernel_size": 3}, 2),
    "2d-dilated-strided-gqa": ([(12, 9), (8, 14)], 16, {"kernel_size": (3, 4), "stride": (1, 2),
                                                       "dilation": (2, 1)}, 1),
    "1d-causal": ([(40,), (9,), (17,)], 16, {"kernel_size": 5, "is_causal": True, "dilation": 1}, 2),
}


@pytest.mark.parametrize("case,with_rpb,device", on_devices(
    [(c, r) for c in PACKED for r in (False, True)], [("2d-dilated-strided-gqa", True), ("1d-causal", False)]))
def test_packed_forward_backward_vs_float64(case, with_rpb, device):
    """Variable resolution (+ rpb: each sample's tokens index the shared table with their own
    layout's coordinates): whole packed output (padding rows 0) and grads vs float64."""
    torch.manual_seed(12)
    shapes, block, params, kv_heads = PACKED[case]
    if device == "cuda":
        block = 128  # compiled CUDA Flex needs blocks that are multiples of its 128 x 64 tiles
    heads = 2
    ndim = len(shapes[0])
    length = flexna.packed_length(shapes, block)
    leaves = Leaves(device)
    q, q_ = leaves(2, length, heads, 16)
    (k, k_), (v, v_) = (leaves(2, length, kv_heads, 16) for _ in range(2))
    table, table_ = None, None
    if with_rpb:
        table, table_ = leaves(heads, *flexna.rpb_table_shape(params["kernel_size"], params.get("stride", 1),
                                                              params.get("is_causal", False), ndim))
    with runs(device):
        out = flexna.packed_neighborhood_attention(q, k, v, shapes, block_size=block, rel_pos_bias=table,
                                                   **params)
    mask, bias = packed_mask_and_bias(table_, shapes, block, **params)
    rep = heads // kv_heads
    ref = attention64(q_.transpose(1, 2), k_.transpose(1, 2).repeat_interleave(rep, 1),
                      v_.transpose(1, 2).repeat_interleave(rep, 1), mask, bias).transpose(1, 2)
    leaves.check(out, ref, nonzero_grads=[3] if with_rpb else [])
    assert (out.detach()[:, ~mask.any(1).to(out.device)] == 0).all()  # padding rows give 0
    if device != "cpu":
        return
    # direct flex_attention use: packed_block_mask (+ packed_rel_pos_bias_score_mod)
    with torch.no_grad():
        mod = None if table is None else flexna.packing.packed_rel_pos_bias_score_mod(
            table.detach(), shapes, block_size=block, **params)
        bm = flexna.packed_block_mask(shapes, block_size=block, device="cpu", **params)
        direct = eager_flex(q.detach().transpose(1, 2), k.detach().transpose(1, 2),
                            v.detach().transpose(1, 2), score_mod=mod, block_mask=bm,
                            enable_gqa=kv_heads != heads)
    torch.testing.assert_close(direct.transpose(1, 2).double(), ref.detach(), atol=1e-5, rtol=1e-5)


def test_packed_rpb_compiled_cpu_inference():
    torch.manual_seed(13)
    shapes, block, heads = [(10, 12), (6, 9)], 64, 2
    table = torch.randn(heads, 5, 9)
    q, k, v = (flexna.pack_tokens([torch.randn(1, *s, heads, 16) for s in shapes], shapes, block)
               for _ in range(3))
    with torch.no_grad():
        out = flexna.packed_neighborhood_attention(q, k, v, shapes, (3, 5), block_size=block,
                                                   rel_pos_bias=table)
    mask, bias = packed_mask_and_bias(table, shapes, block, (3, 5))
    ref = attention64(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, bias).transpose(1, 2)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


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
    with pytest.raises(ValueError, match="rel_pos_bias needs one table shape for all heads"):
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


# bad inputs not covered above / in test_validation.py: every one is a ValueError naming the
# argument, the value and what is allowed, raised before any attention kernel runs
X4 = torch.zeros(1, 8, 8, 4, 8)     # [B, H, W, heads=4, D=8]
KV2 = torch.zeros(1, 8, 8, 2, 8)    # GQA: 2 kv heads
P160 = torch.zeros(1, 160, 2, 8)    # layouts (9, 10) + (5, 7) packed in blocks of 32
SHAPES = [(9, 10), (5, 7)]

BAD_EXTENSION_INPUTS = {
    # mismatched head counts
    "extra-k-heads-vs-gqa-key": (lambda: flexna.na2d(X4, KV2, KV2, 3, additional_keys=torch.zeros(1, 5, 4, 8),
                                                     additional_values=torch.zeros(1, 5, 4, 8)),
                                 r"additional_keys must be shaped \[batch=1, M >= 1, heads=2, dim=8\] "
                                 r"\(matching key\), got \(1, 5, 4, 8\)"),
    "extra-q-heads": (lambda: flexna.na2d(X4, X4, X4, 3, additional_queries=torch.zeros(1, 5, 2, 8)),
                      r"additional_queries must be shaped \[batch=1, M >= 1, heads=4, dim=8\] "
                      r"\(matching query\), got \(1, 5, 2, 8\)"),
    "rpb-heads": (lambda: flexna.na2d(X4, X4, X4, 3, rel_pos_bias=torch.zeros(2, 5, 5)),
                  r"rel_pos_bias must be a tensor shaped \[heads, \*table\] = \(4, 5, 5\) .* with 4 heads, "
                  r"got \(2, 5, 5\)"),
    "packed-kv-heads": (lambda: flexna.packed_neighborhood_attention(
        P160, torch.zeros(1, 160, 3, 8), torch.zeros(1, 160, 3, 8), SHAPES, 3, block_size=32),
        r"key has 3 heads, query 2: the number of key/value heads must divide"),
    "packed-rpb-heads": (lambda: flexna.packed_neighborhood_attention(
        P160, P160, P160, SHAPES, 3, block_size=32, rel_pos_bias=torch.zeros(4, 5, 5)),
        r"rel_pos_bias must be a tensor shaped \[heads, \*table\] = \(2, 5, 5\) .* got \(4, 5, 5\)"),
    "module-heads-vs-embed": (lambda: flexna.NeighborhoodAttention2D(30, 4, 3),
                              r"embed_dim \(30\) must be divisible by num_heads \(4\)"),
    "module-extra-kv-heads": (lambda: flexna.NeighborhoodAttention2D(32, 4, 3, num_kv_heads=2)(
        torch.zeros(1, 8, 8, 32), torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8)),
        r"additional_keys must be shaped \[batch=1, M >= 1, heads=2, dim=8\]"),
    # additional keys / values with wrong dims
    "extra-k-3d": (lambda: flexna.na2d(X4, X4, X4, 3, additional_keys=torch.zeros(5, 4, 8),
                                       additional_values=torch.zeros(5, 4, 8)),
                   r"additional_keys must be shaped \[batch=1, M >= 1, heads=4, dim=8\] .*got \(5, 4, 8\)"),
    "extra-k-batch": (lambda: flexna.na2d(X4, X4, X4, 3, additional_keys=torch.zeros(2, 5, 4, 8),
                                          additional_values=torch.zeros(2, 5, 4, 8)),
                      r"additional_keys must be shaped \[batch=1, .*got \(2, 5, 4, 8\)"),
    "extra-k-empty": (lambda: flexna.na2d(X4, X4, X4, 3, additional_keys=torch.zeros(1, 0, 4, 8),
                                          additional_values=torch.zeros(1, 0, 4, 8)),
                      r"additional_keys must be shaped .*got \(1, 0, 4, 8\)"),
    "extra-v-count": (lambda: flexna.na2d(X4, X4, X4, 3, additional_keys=torch.zeros(1, 5, 4, 8),
                                          additional_values=torch.zeros(1, 6, 4, 8)),
                      r"additional_values shape \(1, 6, 4, 8\) must match additional_keys \(1, 5, 4, 8\)"),
    "extra-v-dim": (lambda: flexna.na2d(X4, X4, X4, 3, additional_keys=torch.zeros(1, 5, 4, 8),
                                        additional_values=torch.zeros(1, 5, 4, 16)),
                    r"additional_values must be shaped \[batch=1, M >= 1, heads=4, dim=8\] \(matching value\)"),
    "extra-v-dtype": (lambda: flexna.na2d(X4, X4, X4, 3, additional_keys=torch.zeros(1, 5, 4, 8),
                                          additional_values=torch.zeros(1, 5, 4, 8, dtype=torch.float16)),
                      r"additional_values must have value's dtype and device \(torch.float32, cpu\), got "
                      r"torch.float16"),
    "extra-q-dim": (lambda: flexna.na2d(X4, X4, X4, 3, additional_queries=torch.zeros(1, 5, 4, 16)),
                    r"additional_queries must be shaped \[batch=1, M >= 1, heads=4, dim=8\] "
                    r".*got \(1, 5, 4, 16\)"),
    # per-head lists of the wrong length
    "perhead-dilation-long": (lambda: flexna.na2d(X4, X4, X4, 3, dilation=flexna.PerHead([1, 2, 1, 2, 1])),
                              r"dilation: PerHead has 5 entries, need one per query head \(4\)"),
    "perhead-stride-short": (lambda: flexna.na2d(X4, X4, X4, 3, stride=flexna.PerHead([1, 2])),
                             r"stride: PerHead has 2 entries, need one per query head \(4\)"),
    "perhead-causal": (lambda: flexna.na2d(X4, X4, X4, 3, is_causal=flexna.PerHead([True, False, True])),
                       r"is_causal: PerHead has 3 entries, need one per query head \(4\)"),
    "perhead-empty": (lambda: flexna.PerHead([]), r"PerHead needs a non-empty sequence of per-head values"),
    "perhead-block-mask-num-heads": (lambda: flexna.extended_na_block_mask((8, 8), flexna.PerHead([3, 5]),
                                                                           num_heads=4),
                                     r"kernel_size: PerHead has 2 entries, need one per query head \(4\)"),
    "perhead-head-value": (lambda: flexna.na2d(X4, X4, X4, 3, dilation=flexna.PerHead([1, 1, 1, 3])),
                           r"head 3: kernel_size\[axis 0\] = 3 is out of range"),
    "perhead-rpb-score-mod": (lambda: flexna.rel_pos_bias_score_mod(torch.zeros(4, 5, 5), (8, 8), 3,
                                                                    dilation=flexna.PerHead([1, 2])),
                              r"dilation: PerHead has 2 entries, need one per query head \(4\)"),
    "perhead-module": (lambda: flexna.NeighborhoodAttention2D(32, 4, 3, dilation=flexna.PerHead([1, 2, 1])),
                       r"dilation: PerHead has 3 entries, need one per query head \(4\)"),
    # packed layouts that don't add up to the sequence length
    "packed-key-length": (lambda: flexna.packed_neighborhood_attention(P160, torch.zeros(1, 128, 2, 8), P160,
                                                                       SHAPES, 3, block_size=32),
                          r"key must be shaped \[batch, 160, heads, dim\]: layouts \[\(9, 10\), \(5, 7\)\] "
                          r"packed in blocks of 32 add up to 160 tokens, got \(1, 128, 2, 8\)"),
    "packed-default-block": (lambda: flexna.packed_neighborhood_attention(P160, P160, P160, SHAPES, 3),
                             r"query must be shaped \[batch, 256, heads, dim\]: .* blocks of 128 add up "
                             r"to 256"),
    "packed-3d-query": (lambda: flexna.packed_neighborhood_attention(P160[0], P160, P160, SHAPES, 3,
                                                                     block_size=32),
                        r"query must be shaped \[batch, 160, heads, dim\].*got \(160, 2, 8\)"),
    "pack-count": (lambda: flexna.pack_tokens([torch.zeros(1, 9, 10, 8)], SHAPES),
                   r"xs has 1 tensors but shapes has 2 layouts"),
    "pack-shape": (lambda: flexna.pack_tokens([torch.zeros(1, 9, 10, 8), torch.zeros(1, 7, 5, 8)], SHAPES),
                   r"xs\[1\] must be shaped \[batch, 5, 7, ...\], got \(1, 7, 5, 8\)"),
    "packed-axes": (lambda: flexna.packed_length([(9, 10), (35,)]),
                    r"shapes must all have the same number of axes, got \(\(9, 10\), \(35,\)\)"),
    "packed-block": (lambda: flexna.packed_length(SHAPES, 0), r"block_size must be a positive int, got 0"),
    # relative positional bias tables of the wrong shape / type
    "rpb-stride-shape": (lambda: flexna.na2d(X4, X4, X4, 3, stride=2, rel_pos_bias=torch.zeros(4, 5, 5)),
                         r"rel_pos_bias must be a tensor shaped \[heads, \*table\] = \(4, 6, 6\) .*got "
                         r"\(4, 5, 5\)"),
    "rpb-causal-shape": (lambda: flexna.na2d(X4, X4, X4, 3, is_causal=(True, False),
                                             rel_pos_bias=torch.zeros(4, 5, 5)),
                         r"= \(4, 3, 5\) .*got \(4, 5, 5\)"),
    "rpb-flat": (lambda: flexna.na2d(X4, X4, X4, 3, rel_pos_bias=torch.zeros(4, 25)),
                 r"= \(4, 5, 5\) .*got \(4, 25\)"),
    "rpb-list": (lambda: flexna.na2d(X4, X4, X4, 3, rel_pos_bias=[[0.0] * 5] * 5),
                 r"rel_pos_bias must be a tensor shaped .*got list"),
    "rpb-int-dtype": (lambda: flexna.na2d(X4, X4, X4, 3, rel_pos_bias=torch.zeros(4, 5, 5, dtype=torch.int64)),
                      r"rel_pos_bias dtype must be float32, float16 or bfloat16, got torch.int64"),
    "rpb-score-mod-shape": (lambda: flexna.rel_pos_bias_score_mod(torch.zeros(4, 5, 5), (8, 8), (3, 5)),
                            r"table must be a tensor shaped \[heads, \*table\] = \(4, 5, 9\) .*"
                            r"got \(4, 5, 5\)"),
    "rpb-score-mod-scalar": (lambda: flexna.rel_pos_bias_score_mod(torch.tensor(1.0), (8, 8), 3),
                             r"table must be a tensor \[heads, \*rpb_table_shape\(...\)\], got \(\)"),
    "packed-rpb-score-mod-shape": (lambda: flexna.packing.packed_rel_pos_bias_score_mod(
        torch.zeros(2, 5, 5), SHAPES, (3, 5)),
        r"table must be a tensor shaped \[heads, \*table\] = \(2, 5, 9\)"),
    "packed-rpb-shape": (lambda: flexna.packed_neighborhood_attention(
        P160, P160, P160, SHAPES, 3, block_size=32, rel_pos_bias=torch.zeros(2, 3, 3)),
        r"rel_pos_bias must be a tensor shaped \[heads, \*table\] = \(2, 5, 5\) .*got \(2, 3, 3\)"),
    "module-rpb-perhead": (lambda: flexna.NeighborhoodAttention2D(32, 2, flexna.PerHead([3, 5]),
                                                                  rel_pos_bias=True),
                           r"rel_pos_bias=True needs one table shape for all heads.*head 0: \(5, 5\); "
                           r"head 1: \(9, 9\)"),
}


@pytest.mark.parametrize("case", list(BAD_EXTENSION_INPUTS))
def test_bad_extension_inputs(case, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("attention ran before the inputs were validated")

    monkeypatch.setattr(flexna.functional, "run_flex", no_kernel)
    call, match = BAD_EXTENSION_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        call()


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


# ---------------------------------------------------------------- GPU only
# (the attention tests above also run on CUDA: their "cuda" parameters carry the gpu mark)
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gpu_everything_at_once(dtype):
    """GQA + per-head dilation + per-head rpb + extra keys/values + extra queries, one compiled
    call, forward + backward vs float64 (fp16: inputs rounded first, fp16 tolerances)."""
    torch.manual_seed(8)
    shape, heads, kv_heads, m, mq = (12, 14), 4, 2, 7, 5
    dil = flexna.PerHead([1, 1, (2, 1), (2, 2)])
    leaves = Leaves("cuda", dtype)
    q, q_ = leaves(1, *shape, heads, 32)
    (k, k_), (v, v_) = (leaves(1, *shape, kv_heads, 32) for _ in range(2))
    (ak, ak_), (av, av_) = (leaves(1, m, kv_heads, 32) for _ in range(2))
    aq, aq_ = leaves(1, mq, heads, 32)
    rpb, rpb_ = leaves(heads, 5, 9)
    with runs("cuda"):
        out, extra = flexna.na2d(q, k, v, (3, 5), dilation=dil, additional_keys=ak, additional_values=av,
                                 additional_queries=aq, rel_pos_bias=rpb)
    assert out.dtype == dtype and out.device.type == "cuda"
    mask, bias = per_head_mask_and_bias(rpb_, shape, expand_heads(heads, kernel_size=(3, 5), dilation=dil))
    ref = extended_reference(q_, k_, v_, mask, bias, ak_, av_, aq_)
    leaves.check(joined(out, extra), ref, nonzero_grads=[5])


@gpu
@needs_cuda
def test_gpu_direct_flex_attention_compiled():
    """Direct use on CUDA: torch.compile(flex_attention) with flexna's score_mods (per-head rpb,
    composed with softcap; packed rpb) and BlockMasks, forward + backward incl. the tables."""
    torch.manual_seed(9)
    flex = torch.compile(flex_attention, dynamic=False)
    torch.compiler.reset()
    shape, heads, m = (10, 12), 2, 6
    n = math.prod(shape)
    dil = flexna.PerHead([1, (2, 3)])
    leaves = Leaves("cuda")
    (q, q_), (k, k_), (v, v_) = (leaves(1, heads, n + m, 16) for _ in range(3))
    table, table_ = leaves(heads, 5, 5)
    mod = flexna.compose_score_mods(
        flexna.rel_pos_bias_score_mod(table, shape, 3, dilation=dil, num_extra_q=m, num_extra_kv=m),
        flexna.softcap_score_mod(4.0))
    bm = flexna.extended_na_block_mask(shape, 3, dilation=dil, num_extra_q=m, num_extra_kv=m, device="cuda")
    with assert_compiled():
        out = flex(q, k, v, score_mod=mod, block_mask=bm)
    mask, bias = per_head_mask_and_bias(table_, shape, expand_heads(heads, kernel_size=3, dilation=dil))
    full = torch.ones(heads, n + m, n + m, dtype=torch.bool)
    full[:, :n, :n] = mask
    fb = torch.zeros(heads, n + m, n + m, dtype=torch.float64)
    fb[:, :n, :n] = bias
    s = (q_ @ k_.transpose(-2, -1)) * 16 ** -0.5 + fb
    s = (4.0 * torch.tanh(s / 4.0)).masked_fill(~full, float("-inf"))
    leaves.check(out, torch.softmax(s, -1) @ v_, nonzero_grads=[3])

    shapes, block = [(9, 10), (5, 7)], 128  # CUDA Flex: blocks multiple of its 128 x 64 tiles
    length = flexna.packed_length(shapes, block)
    leaves = Leaves("cuda")
    (q, q_), (k, k_), (v, v_) = (leaves(1, heads, length, 16) for _ in range(3))
    table, table_ = leaves(heads, 5, 5)
    mod = flexna.packing.packed_rel_pos_bias_score_mod(table, shapes, 3, block_size=block)
    bm = flexna.packed_block_mask(shapes, 3, block_size=block, device="cuda")
    with assert_compiled():
        out = flex(q, k, v, score_mod=mod, block_mask=bm)
    mask, bias = packed_mask_and_bias(table_, shapes, block, 3)
    leaves.check(out, attention64(q_, k_, v_, mask, bias), nonzero_grads=[3])


@gpu
@needs_cuda
def test_gpu_bad_inputs():
    p32 = torch.zeros(1, 160, 2, 16, device="cuda")
    with pytest.raises(ValueError, match=r"block_size = 32: on CUDA the packed samples' blocks must be a "
                                         r"multiple of 128"):
        flexna.packed_neighborhood_attention(p32, p32, p32, [(9, 10), (5, 7)], 3, block_size=32)
    x = torch.zeros(1, 8, 8, 2, 16, device="cuda")
    with pytest.raises(ValueError, match=r"rel_pos_bias is on cpu, query on cuda"):
        flexna.na2d(x, x, x, 3, rel_pos_bias=torch.zeros(2, 5, 5))
    p = torch.zeros(1, 128, 2, 16, device="cuda")
    with pytest.raises(ValueError, match=r"rel_pos_bias is on cpu, query on cuda"):
        flexna.packed_neighborhood_attention(p, p, p, [(8, 8)], 3, rel_pos_bias=torch.zeros(2, 5, 5))
