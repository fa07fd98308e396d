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


def per_axis(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def per_head_mask_and_bias(table, shape, heads):
    """Per-head ``[H, N, N]`` mask and bias; ``heads``: one dict of pattern kwargs per head
    (kernel_size, stride, dilation, is_causal; scalars or per-axis tuples). Head ``h``
    indexes ``table[h]`` with its own pattern. ``table=None``: bias is None."""
    from flexna.reference import reference_mask

    n = len(shape)
    masks, biases = [], []
    for h, kw in enumerate(heads):
        p = {name: per_axis(kw.get(name, default), n) for name, default in
             (("kernel_size", 1), ("stride", 1), ("dilation", 1), ("is_causal", False))}
        masks.append(reference_mask(shape, **p))
        if table is not None:
            biases.append(rpb_dense(table[h:h + 1], shape, p["kernel_size"], p["stride"], p["dilation"],
                                    p["is_causal"])[0])
    return torch.stack(masks), (torch.stack(biases) if table is not None else None)


def packed_mask_and_bias(table, shapes, block, kernel_size, stride=1, dilation=1, is_causal=False):
    """Packed sequence (each sample padded to a multiple of ``block``): block-diagonal
    ``[L, L]`` mask and ``[H, L, L]`` bias (zeros off the samples; None without a table),
    each sample's block built from its own layout alone."""
    from flexna.reference import reference_mask

    lengths = [-(-int(np.prod(s)) // block) * block for s in shapes]
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    bias = None if table is None else torch.zeros(table.shape[0], total, total, dtype=table.dtype)
    off = 0
    for s, length in zip(shapes, lengths, strict=True):
        n = len(s)
        kw = {"kernel_size": per_axis(kernel_size, n), "stride": per_axis(stride, n),
              "dilation": per_axis(dilation, n), "is_causal": per_axis(is_causal, n)}
        tok = int(np.prod(s))
        mask[off:off + tok, off:off + tok] = reference_mask(s, **kw)
        if table is not None:
            bias[:, off:off + tok, off:off + tok] = rpb_dense(table, s, kw["kernel_size"], kw["stride"],
                                                             kw["dilation"], kw["is_causal"])
        off += length
    return mask, bias
