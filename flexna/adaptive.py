"""Adaptive blocks on top of a guaranteed window (the NABLA / VSA idea), on the device.

Given ``q`` and ``k``, pool them per BlockMask block (the mean of the block's real layout
tokens), score every (query block, key block) pair by the pooled dot product, and keep for
each query block

* ``threshold=p`` (NABLA): the key blocks of the smallest-score tail removed while it
  holds less than ``1 - p`` of the softmax mass over pooled scores: sort a row's
  probabilities ascending, take the running sum, keep a block iff the sum up to it is at
  least ``1 - p`` (``nablaT_v2_doc`` of Wan2.1-NABLA). So the kept blocks carry at least
  ``p`` of the mass.
* ``top_k=k`` (VSA-style): the ``k`` highest-scoring key blocks.

The result is the **union** with the analytic BlockMask of a :class:`~flexna.MaskSpec`
(its window, its extra tokens): a selected block is attended densely (a full block where
it holds only real layout tokens, else partial, its padding and extra tokens decided by the
mask_mod), and every pair the spec attends stays attended. One vectorised pass on the
device (pooling, one batched matmul, a sort or top-k, a cumulative sum, the index
tensors by a scatter); nothing goes through the host but the spec's cached base maps.
Attention stays differentiable: the selection is made without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask

from flexna.blockmask import ordered_by_scatter
from flexna.blocksparsity import spec_maps
from flexna.cache import cached
from flexna.spec import MaskSpec
from flexna.tables import MaskMod, build_tables, host_tables

__all__ = ["adaptive_block_mask", "local_qk", "select_blocks"]


@dataclass(frozen=True, eq=False)
class _Base:
    """Device-side pieces of a spec shared by every call: its maps and which tokens are real."""

    partial: torch.Tensor  # [heads, rows, cols] bool
    full: torch.Tensor
    q_real: torch.Tensor  # [q_len] bool: a layout token (not padding, not extra)
    kv_real: torch.Tensor
    q_block_real: torch.Tensor  # [rows]: every position of the block is a real layout token
    kv_block_real: torch.Tensor
    q_count: torch.Tensor  # [rows] real layout tokens per block (float, >= 1)
    kv_count: torch.Tensor
    mask_mod: MaskMod

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.partial, self.full, self.q_real,
                                                         self.kv_real))


def _base(spec: MaskSpec, device: torch.device) -> _Base:
    def build() -> _Base:
        host = host_tables(spec)
        partial, full = spec_maps(spec, host)
        # a padded position has an empty window / a -1 position on the axis it is padded on
        q_real = (host.lo[:, 0] <= host.hi[:, 0]).all(0) & (np.arange(spec.q_len) < spec.q_layout_len)
        kv_real = (host.pos[:, 0] >= 0).all(0) & (np.arange(spec.kv_len) < spec.kv_layout_len)
        rows, cols = spec.num_q_blocks, spec.num_kv_blocks

        def per_block(real: np.ndarray, block: int, blocks: int) -> tuple[np.ndarray, np.ndarray]:
            padded = np.zeros(blocks * block, dtype=bool)
            padded[:real.size] = real
            by_block = padded.reshape(blocks, block)
            return np.asarray(by_block.all(1)), np.asarray(by_block.sum(1))

        qb_real, q_count = per_block(q_real, spec.q_block, rows)
        kb_real, kv_count = per_block(kv_real, spec.kv_block, cols)

        def dev(a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
            t = torch.from_numpy(np.array(a))  # a writable copy
            return t.to(device=device, dtype=dtype) if dtype else t.to(device)

        return _Base(dev(partial), dev(full), dev(q_real), dev(kv_real), dev(qb_real), dev(kb_real),
                     dev(np.maximum(q_count, 1), torch.float32), dev(np.maximum(kv_count, 1), torch.float32),
                     build_tables(spec, device, host=host).mask_mod())

    return cached(("adaptive_base", spec, device), build, lambda b: b.nbytes)


def _pool(x: torch.Tensor, real: torch.Tensor, block: int, blocks: int, count: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, H, blocks, D]``: the mean over each block's real layout tokens."""
    b, h, n, d = x.shape
    x = x * real[:n, None].to(x.dtype)
    if blocks * block != n:
        x = torch.nn.functional.pad(x, (0, 0, 0, blocks * block - n))
    return x.reshape(b, h, blocks, block, d).sum(3) / count[:, None].to(x.dtype)


def select_blocks(q: torch.Tensor, k: torch.Tensor, spec: MaskSpec, *, threshold: float | None = None,
                  top_k: int | None = None, scale: float | None = None) -> torch.Tensor:
    """The adaptive selection alone: bool ``[B, H, q blocks, kv blocks]`` (see the module docstring).

    ``q`` ``[B, H, q_len, D]`` and ``k`` ``[B, H_kv, kv_len, D]`` in the spec's orders (``H``
    a multiple of ``H_kv``). Only blocks holding real layout tokens take part; rows of blocks
    without any select nothing.
    """
    _check(q, k, spec, threshold, top_k)
    base = _base(spec, torch.device(q.device))
    rows, cols = spec.num_q_blocks, spec.num_kv_blocks
    with torch.no_grad():
        qp = _pool(q, base.q_real, spec.q_block, rows, base.q_count)
        kp = _pool(k, base.kv_real, spec.kv_block, cols, base.kv_count)
        if kp.shape[1] != qp.shape[1]:
            kp = kp.repeat_interleave(qp.shape[1] // kp.shape[1], dim=1)
        scale_v = q.shape[-1] ** -0.5 if scale is None else scale
        scores = (qp @ kp.transpose(-2, -1)).float() * scale_v
        has_kv = _any_real(base.kv_real, spec.kv_block, cols)
        scores = scores.masked_fill(~has_kv, float("-inf"))
        if top_k is not None:
            kth = min(top_k, cols)
            idx = scores.topk(kth, dim=-1).indices
            sel = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
        else:
            probs = torch.softmax(scores, dim=-1)
            vals, order = probs.sort(dim=-1)
            keep_sorted = vals.cumsum(-1) >= 1 - threshold  # type: ignore[operator]
            sel = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        sel = sel & has_kv & _any_real(base.q_real, spec.q_block, rows)[..., :, None]
    return sel


def _any_real(real: torch.Tensor, block: int, blocks: int) -> torch.Tensor:
    padded = torch.nn.functional.pad(real, (0, blocks * block - real.numel()))
    return padded.reshape(blocks, block).any(1)


def _check(q: object, k: object, spec: MaskSpec, threshold: float | None, top_k: int | None) -> None:
    if not isinstance(spec, MaskSpec):
        raise TypeError(f"spec must be a flexna.MaskSpec, got {type(spec).__name__}")
    for name, t, length in (("q", q, spec.q_len), ("k", k, spec.kv_len)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[2] != length:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [batch, heads, {length}, dim] tensor in the spec's "
                             f"order, got {shape}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need the same batch and dim, "
                         "and query heads a multiple of key heads")
    if spec.heads not in (1, q.shape[1]):
        raise ValueError(f"the spec has {spec.heads} head patterns for {q.shape[1]} query heads")
    if (threshold is None) == (top_k is None):
        raise ValueError("give exactly one of threshold (softmax mass to keep, in (0, 1]) and top_k")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 < threshold <= 1):
        raise ValueError(f"threshold = {threshold!r} is out of range: need 0 < threshold <= 1")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k = {top_k!r} is out of range: need an int >= 1")


def adaptive_block_mask(q: torch.Tensor, k: torch.Tensor, spec: MaskSpec, *, threshold: float | None = None,
                        top_k: int | None = None, scale: float | None = None) -> BlockMask:
    """BlockMask ``[B, H, ...]``: the spec's analytic BlockMask united with the blocks
    :func:`select_blocks` picks from ``q`` and ``k`` (arguments as there).

    Its mask_mod attends a pair iff the spec's mask_mod does or the pair's block is selected
    and both tokens are real layout tokens; full blocks are the spec's full blocks and the
    selected blocks of real tokens only.

    Example::

        spec = flexna.MaskSpec.create(flexna.NAPattern.create((30, 48, 80), (18, 24, 24), (16, 8, 8)),
                                      q_tile=(2, 8, 8), kv_tile=(2, 8, 8), num_extra_kv=256)
        bm = flexna.adaptive_block_mask(q, k, spec, threshold=0.9)
        out = flex_attention(q, k, v, block_mask=bm)
    """
    sel = select_blocks(q, k, spec, threshold=threshold, top_k=top_k, scale=scale)
    base = _base(spec, torch.device(q.device))
    b, h, rows, cols = sel.shape
    full = base.full[None] | (sel & base.q_block_real[:, None] & base.kv_block_real[None, :])
    partial = (base.partial[None] | sel) & ~full
    kv_num, kv_idx = ordered_by_scatter(partial.reshape(b * h, rows, cols))
    full_num, full_idx = ordered_by_scatter(full.reshape(b * h, rows, cols))
    q_num, q_idx = ordered_by_scatter(partial.transpose(2, 3).reshape(b * h, cols, rows))
    fq_num, fq_idx = ordered_by_scatter(full.transpose(2, 3).reshape(b * h, cols, rows))
    na_mod, q_real, kv_real, qb, kb = base.mask_mod, base.q_real, base.kv_real, spec.q_block, spec.kv_block

    def adaptive_mask(bi: torch.Tensor, hi: torch.Tensor, q_idx: torch.Tensor,
                      kv_idx: torch.Tensor) -> torch.Tensor:
        chosen = sel[bi, hi, q_idx // qb, kv_idx // kb] & q_real[q_idx] & kv_real[kv_idx]
        return na_mod(bi, hi, q_idx, kv_idx) | chosen

    def shaped(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, h, *t.shape[1:])

    return BlockMask(
        seq_lengths=(spec.q_len, spec.kv_len),
        kv_num_blocks=shaped(kv_num), kv_indices=shaped(kv_idx),
        full_kv_num_blocks=shaped(full_num), full_kv_indices=shaped(full_idx),
        q_num_blocks=shaped(q_num), q_indices=shaped(q_idx),
        full_q_num_blocks=shaped(fq_num), full_q_indices=shaped(fq_idx),
        BLOCK_SIZE=(qb, kb), mask_mod=adaptive_mask,
    )



def local_qk(spec: MaskSpec, heads: int, dim: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic ``(q, k)``, ``[1, heads, q_len / kv_len, dim]``, with spatial locality.

    One feature vector per layout token, the same on both sides (self-attention, ``q = k``
    up to the token order): low-frequency random Fourier features of the token's layout
    coordinates plus noise, so pooled scores peak near the diagonal as real video attention
    does (pure noise would make every threshold selection nearly dense). ``q`` holds them in
    the spec's query order and ``k`` in its key order (tiles, curve, region), padding
    positions zero; the extra tokens are random, the first ones shared by both sides.
    Deterministic: drawn from a CPU ``torch.Generator`` seeded with ``seed``, then moved to
    ``device`` / ``dtype``. The benchmarks and ``flexna show`` (adaptive catalogue entries)
    draw adaptive selections from it; it models no particular network.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed = {seed!r} is out of range: need an int in 0..2**63-1")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim = {dim!r} is out of range: need an even int >= 2")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads = {heads!r} is out of range: need an int >= 1")
    if len(spec.samples) != 1:
        raise ValueError("local_qk draws one layout: a spec of packed samples is not supported")
    shape = spec.samples[0][0].shape
    g = torch.Generator().manual_seed(seed)
    coords = torch.from_numpy(np.indices(shape).reshape(len(shape), -1).T.copy()).float()  # row-major
    freq = torch.randn(heads, len(shape), dim // 2, generator=g) / torch.tensor(
        shape, dtype=torch.float32)[None, :, None] * 3
    phase = torch.einsum("ln,hnf->hlf", coords, freq)
    noise = torch.randn(heads, len(coords), dim, generator=g)
    feats = torch.cat([phase.sin(), phase.cos()], -1) * 2 + 0.5 * noise  # [heads, layout tokens, dim]
    extra = torch.randn(heads, max(spec.num_extra_q, spec.num_extra_kv), dim, generator=g)

    def side(order_coords: np.ndarray, region: tuple | None, n_extra: int) -> torch.Tensor:
        at = order_coords.copy()
        real = (at >= 0).all(1)
        if region is not None:
            at[real] += np.array([start for start, _ in region])
        flat = np.where(real, np.ravel_multi_index(tuple(np.where(real[:, None], at, 0).T), shape), 0)
        out = feats[:, torch.from_numpy(flat)] * torch.from_numpy(real)[None, :, None]
        return torch.cat([out, extra[:, :n_extra]], 1)[None].to(device, dtype)

    return (side(spec.q_order().coords(), spec.q_region, spec.num_extra_q),
            side(spec.kv_order().coords(), spec.kv_region, spec.num_extra_kv))
