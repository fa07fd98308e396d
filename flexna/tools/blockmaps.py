"""The block maps of a ``BlockMask``, decoded by torch's own ``BlockMask.to_dense()``."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask


def _dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return BlockMask.from_kv_blocks(num, idx, compute_q_blocks=False).to_dense().to(torch.bool)


def block_maps(bm: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)``: bool ``[B, H, q blocks, kv blocks]`` maps of the mask's block lists.

    ``bm.to_dense()`` is their union; each list alone is decoded by ``to_dense()`` of a
    BlockMask that holds only that list. A block may show in both when the mask lists it
    twice (flexna never does; callers check).
    """
    partial = _dense(bm.kv_num_blocks, bm.kv_indices)
    if bm.full_kv_num_blocks is None:
        return partial, torch.zeros_like(partial)
    assert bm.full_kv_indices is not None
    return partial, _dense(bm.full_kv_num_blocks, bm.full_kv_indices)
