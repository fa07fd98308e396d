"""Whole-token row gathers, the eager token permute into and out of a token order.

``gather_rows(x, index, inverse)`` returns ``out[b, p] = x[b, index[p]]`` for ``index[p] >= 0``
and zeros where ``index[p] < 0`` (padded positions), one ``[heads, dim]`` row per token. It is a
differentiable permutation with padding: the gradient is the gather by ``inverse``
(``inverse[t]``: where token ``t`` went), so the backward pass is another gather (deterministic,
no ``index_add``) and the two directions of :mod:`flexna.layout` are each other's backward.

On CUDA one Triton program copies one row (the padding is written as zeros in the same pass,
no second pass over the output). Elsewhere ``index_select``, then, where there is padding, an
in-place ``index_fill_`` of the padded rows (CPU) or a ``masked_fill_`` (CUDA without Triton, and
inside ``torch.compile``: no host sync, no data-dependent shape).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_MAX_BLOCK = 4096  # elements one program copies per loop step


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``[B, N, *row]`` -> ``[B, len(index), *row]``: rows of ``x`` at ``index`` (int64), zeros
    where ``index < 0``. ``inverse`` (int64, ``N`` entries) is the gather that undoes it (its
    gradient): ``inverse[index[p]] == p`` for every real ``p``, ``-1`` for a row ``index`` drops.

    ``index`` is a permutation of ``range(N)`` with ``-1`` inserted (padding: longer than ``N``)
    or the inverse of one (shorter than ``N``, never negative), as a token order's indices are.
    """
    return _RowGather.apply(x, index, inverse)


class _RowGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, inverse)
        return _gather(x, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        index, inverse = ctx.saved_tensors
        return _RowGather.apply(grad, inverse, index), None, None


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    usable = x.is_cuda and not x.dtype.is_complex and x.shape[0] < 65536  # batch: grid axis 1
    kernel = _triton_kernel() if usable and not torch.compiler.is_compiling() else None
    if kernel is None or x.numel() == 0:
        if index.numel() <= x.shape[1]:  # a permutation, or one that drops rows: no padding
            return x.index_select(1, index)
        out = x.index_select(1, index.clamp(min=0))
        dropped = index < 0
        if x.is_cuda or torch.compiler.is_compiling():  # no host sync, no data-dependent shape
            return out.masked_fill_(dropped.view(-1, *(1,) * (x.dim() - 2)), 0)
        return out.index_fill_(1, torch.nonzero(dropped).flatten(), 0)  # in place: out is fresh
    rows = x.reshape(x.shape[0], x.shape[1], -1)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    row = rows.shape[-1]
    out = torch.empty(x.shape[0], index.numel(), *x.shape[2:], dtype=x.dtype, device=x.device)
    block = min(_MAX_BLOCK, 1 << max(row - 1, 1).bit_length())
    vector = 16 // x.element_size()
    with torch.cuda.device(x.device):
        kernel[(index.numel(), x.shape[0])](
            rows, index, out, row, rows.stride(0), rows.stride(1), out.stride(0),
            BLOCK=block, num_warps=max(1, min(8, block // (32 * vector))))
    return out


@functools.cache
def _triton_kernel() -> Any:
    """The row-copy kernel, or ``None`` where Triton is not importable (then ``index_select``)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_rows(x_ptr, index_ptr, out_ptr, row, x_batch, x_token, out_batch,  # type: ignore[no-untyped-def]
                  BLOCK: tl.constexpr):
        p = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        src = tl.load(index_ptr + p)
        keep = src >= 0
        source = x_ptr + b * x_batch + tl.maximum(src, 0) * x_token
        target = out_ptr + b * out_batch + p * row
        offsets = tl.arange(0, BLOCK)
        for start in range(0, row, BLOCK):
            inside = start + offsets < row
            values = tl.load(source + start + offsets, mask=inside & keep, other=0.0)
            tl.store(target + start + offsets, values, mask=inside)

    return copy_rows
