"""The eager token permute (:func:`flexna.row_gather.gather_rows`): values, zero padding and
gradients against plain indexing, on the CPU (index_select) and on CUDA (the Triton row copy)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexna
from flexna.layout import gather_from_order, gather_to_order
from flexna.row_gather import gather_rows

HAS_CUDA = torch.cuda.is_available()


def _padded_permutation(n: int, pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random order of ``n`` tokens with ``pad`` padded positions (``-1``), and its inverse."""
    g = torch.Generator().manual_seed(seed)
    index = torch.cat([torch.randperm(n, generator=g), torch.full((pad,), -1)])
    index = index[torch.randperm(n + pad, generator=g)]
    inverse = torch.empty(n, dtype=torch.int64)
    inverse[index[index >= 0]] = torch.nonzero(index >= 0).flatten()
    return index, inverse


def _expected(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], index.numel(), *x.shape[2:], dtype=x.dtype)
    for p, t in enumerate(index.tolist()):
        if t >= 0:
            out[:, p] = x[:, t]
    return out


def _check(device: str, dtype: torch.dtype, batch: int, n: int, pad: int, row: tuple[int, ...],
           seed: int) -> None:
    index, inverse = _padded_permutation(n, pad, seed)
    x = torch.randn(batch, n, *row, dtype=torch.float64).to(dtype)
    want = _expected(x, index)
    xd = x.to(device).requires_grad_(dtype.is_floating_point)
    got = gather_rows(xd, index.to(device), inverse.to(device))
    assert got.shape == want.shape and torch.equal(got.cpu(), want)
    back = gather_rows(got, inverse.to(device), index.to(device))  # the inverse gather undoes it
    assert torch.equal(back.cpu(), x)
    grad = torch.randn(want.shape, dtype=torch.float64).to(dtype)
    got.backward(grad.to(device))
    want_grad = torch.zeros_like(x)  # d/dx of sum(grad * out): grad rows routed back, padding dropped
    keep = index >= 0
    want_grad[:, index[keep]] = grad[:, keep]
    assert torch.equal(xd.grad.cpu(), want_grad)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 40), pad=st.integers(0, 9),
       row=st.sampled_from([(1,), (3, 4), (2, 5, 3)]), seed=st.integers(0, 2**16))
def test_gather_rows_cpu(batch, n, pad, row, seed) -> None:
    _check("cpu", torch.float32, batch, n, pad, row, seed)


def test_gather_rows_double_backward() -> None:
    index, inverse = _padded_permutation(7, 3, 0)
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, index, inverse), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gather_rows(t, index, inverse), (x,))


def test_layout_gathers_invert_each_other_with_gradients() -> None:
    """to-order then from-order is the identity, values and gradients, deterministic mode too."""
    layout = flexna.TokenLayout.create((5, 6, 7), (2, 4, 4))  # pads every axis
    x = torch.randn(2, 5, 6, 7, 3, 8, requires_grad=True)
    torch.use_deterministic_algorithms(True)
    try:
        hf = gather_to_order(x, layout)
        back = gather_from_order(hf.transpose(1, 2), layout).unflatten(1, layout.shape)
        assert torch.equal(back, x)
        (back * 2).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("row", [(24, 128), (3, 5), (40, 128)], ids=["3072", "15", "5120"])
def test_gather_rows_cuda_triton(dtype, row) -> None:
    """The Triton row copy: odd rows, rows longer than one block, padding, batch > 1."""
    from flexna.row_gather import _triton_kernel
    assert _triton_kernel() is not None
    _check("cuda", dtype, 2, 300, 37, row, 1)
    _check("cuda", dtype, 1, 64, 0, row, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gather_rows_cuda_strided_input() -> None:
    """A non-contiguous input (a transposed view) gathers the right rows."""
    index, inverse = _padded_permutation(50, 6, 3)
    x = torch.randn(2, 4, 50, 8, device="cuda").transpose(1, 2)  # [2, 50, 4, 8], strided
    got = gather_rows(x, index.cuda(), inverse.cuda())
    assert torch.equal(got.cpu(), _expected(x.cpu(), index))


def test_gather_rows_inside_torch_compile() -> None:
    """Traced (the path without a host sync): same values and gradients as eagerly."""
    index, inverse = _padded_permutation(20, 5, 7)
    x = torch.randn(2, 20, 3, 4, requires_grad=True)
    compiled = torch.compile(gather_rows, fullgraph=True, backend="aot_eager")
    got = compiled(x, index, inverse)
    assert torch.equal(got, _expected(x.detach(), index))
    got.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
