"""The patterns beyond one window on CUDA: compiled FlexAttention with their BlockMasks against
the float64 reference (forward and gradients), and the adaptive selection built on the GPU
equal to the CPU's. Skipped without CUDA (``python -m pytest -q -m gpu``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

import flexna
from flexna.blockmask import spec_block_mask
from flexna.radial import radial_pattern, radial_window_pattern
from flexna.reference import reference_attention
from flexna.tables import build_tables

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _dense(spec: flexna.MaskSpec, heads: int) -> torch.Tensor:
    mm = build_tables(spec, "cpu").mask_mod()
    qq, kk = torch.arange(spec.q_len)[:, None], torch.arange(spec.kv_len)[None, :]
    return torch.stack([mm(torch.tensor(0), torch.tensor(h), qq, kk) for h in range(heads)])[None]


SPECS = {
    "sta-even-text": lambda: flexna.sta_spec((8, 16, 16), (2, 8, 8), (2, 1, 2), text_length=40),
    "sta-per-head": lambda: flexna.sta_spec((16, 32), (8, 8), flexna.PerHead([(1, 3), (2, 2)])),
    "hilbert": lambda: flexna.MaskSpec.create(flexna.NAPattern.create((24, 40), (7, 9), (1, 3)),
                                              q_curve="hilbert", kv_curve="hilbert"),
    "radial-wan-text": lambda: flexna.MaskSpec.create(radial_pattern(6, 256, model="wan", block_size=32),
                                                      num_extra_q=64, num_extra_kv=64),
    "radial-window-tiled": lambda: flexna.MaskSpec.create(
        radial_window_pattern((8, 16, 16), (4, 6), min_radius=1), q_tile=(1, 8, 16), kv_tile=(1, 8, 16)),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.gpu
@requires_cuda
def test_gpu_pattern_attention_and_gradients(name) -> None:
    spec = SPECS[name]()
    heads = 2
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 64, device="cuda", generator=g, requires_grad=True)
               for n in (spec.q_len, spec.kv_len, spec.kv_len))
    bm = spec_block_mask(spec, "cuda")
    opts = flexna.kernel_options("triton", "cuda", block_size=bm.BLOCK_SIZE)  # tiles divide small blocks
    out = torch.compile(flex_attention)(q, k, v, block_mask=bm, kernel_options=opts)
    mask = _dense(spec, spec.heads).expand(1, heads, -1, -1) if spec.heads == 1 else _dense(spec, heads)
    want, _ = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out.detach().cpu().double(), want, atol=2e-4, rtol=1e-4)
    grad = torch.randn_like(out)
    out.backward(grad)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_(True) for t in (q, k, v))
    scores = (qd @ kd.transpose(-2, -1) / math.sqrt(64)).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, -1).nan_to_num(0.0) @ vd
    ref.backward(grad.cpu().double())
    for t, r, n in ((q, qd, "q"), (k, kd, "k"), (v, vd, "v")):
        torch.testing.assert_close(t.grad.cpu().double(), r.grad, atol=2e-3, rtol=1e-3,
                                   msg=lambda m, n=n: f"d{n}: {m}")


@pytest.mark.gpu
@requires_cuda
def test_gpu_adaptive_equals_cpu_and_runs_compiled() -> None:
    spec = flexna.MaskSpec.create(flexna.NAPattern.create((16, 32), (5, 7)), q_tile=(4, 8),
                                  kv_tile=(4, 8), num_extra_kv=16)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, spec.q_len, 32, generator=g)
    k = torch.randn(2, 2, spec.kv_len, 32, generator=g)
    v = torch.randn(2, 2, spec.kv_len, 32, generator=g)
    for mode in ({"threshold": 0.8}, {"top_k": 3}):
        cpu = flexna.select_blocks(q.double(), k.double(), spec, **mode)
        gpu = flexna.select_blocks(q.cuda().double(), k.cuda().double(), spec, **mode)
        assert torch.equal(cpu, gpu.cpu())
        bm = flexna.adaptive_block_mask(q.cuda().double(), k.cuda().double(), spec, **mode)
        opts = flexna.kernel_options("triton", "cuda", block_size=bm.BLOCK_SIZE)
        out = torch.compile(flex_attention)(q.cuda(), k.cuda(), v.cuda(), block_mask=bm, kernel_options=opts)
        qq, kk = torch.arange(spec.q_len)[:, None], torch.arange(spec.kv_len)[None, :]
        cpu_bm = flexna.adaptive_block_mask(q.double(), k.double(), spec, **mode)
        mask = torch.stack([torch.stack([cpu_bm.mask_mod(torch.tensor(b), torch.tensor(h), qq, kk)
                                         for h in range(2)]) for b in range(2)])
        want, _ = reference_attention(q, k, v, mask)
        torch.testing.assert_close(out.cpu().double(), want, atol=2e-4, rtol=1e-4)
