"""Independent float64 references for the extension tests (autograd-capable)."""

from __future__ import annotations

import numpy as np
import torch


def coords(shape):
    return np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), axis=1)


def rpb_dense(table, shape, kernel_size, stride, dilation, is_causal):
    """[H, N, N] bias: table[h, per axis (y'-x') + offset] (offset: NAT k-1 (+ s-1-s//2))."""
    n = len(shape)
    c = coords(shape)
    idx = []
    for a in range(n):
        k, s, d, causal = kernel_size[a], stride[a], dilation[a], is_causal[a]
        off = k - 1 if causal else (k - 1) + (s - 1 - s // 2)
        rel = c[None, :, a] // d - c[:, None, a] // d + off
        idx.append(torch.from_numpy(np.clip(rel, 0, table.shape[1 + a] - 1)))
    return table[(slice(None), *idx)]


def attention64(q, k, v, mask, bias=None, scale=None):
    """q [B, H, Nq, D], k/v [B, H, Nk, D] (any dtype, keeps autograd), mask [.., Nq, Nk] bool."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias.double()
    s = s.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, -1).masked_fill(empty | ~mask, 0.0)
    return p @ v
