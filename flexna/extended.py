"""Public builders for per-head patterns and additional (extra) tokens, row-major order.

Thin wrappers over :class:`~flexna.spec.MaskSpec` (every stage handles both variants in
one place; the functional API combines them with tiled orders and rpb too):

* **Per-head patterns**: wrap any pattern parameter in :class:`~flexna.PerHead` to give one
  value per query head (``kernel_size=PerHead([7, 7, 13, 13])``). The mask_mod reads per-head
  tables at ``h``; the BlockMask has a head dimension ``[1, H, ...]``.
* **Additional tokens**: ``num_extra_kv`` key/value tokens appended after the layout's ``N``
  tokens (kv index ``>= N``) are attended by every query, and ``num_extra_q`` query rows
  appended after the layout's queries (q index ``>= N``) attend every key (layout and
  extra): the joint attention of video models whose text tokens see everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask

from flexna.blockmask import build_block_mask
from flexna.pattern import PerHead, as_shape, head_patterns
from flexna.spec import MaskSpec, resolve_device
from flexna.tables import MaskMod, build_tables

__all__ = ["PerHead", "extended_na_block_mask", "extended_na_mask_mod"]


def _spec(shape: object, kernel_size: object, stride: object, dilation: object, is_causal: object,
          num_heads: int | None, num_extra_q: int, num_extra_kv: int,
          block_size: int | Sequence[int] | None = None) -> MaskSpec:
    as_shape("shape", shape)
    patterns = head_patterns(shape, kernel_size, stride, dilation, is_causal, num_heads)
    return MaskSpec.create(patterns, num_extra_q=num_extra_q, num_extra_kv=num_extra_kv,
                           block_size=block_size)


def extended_na_mask_mod(shape: object, kernel_size: object, stride: object = 1, dilation: object = 1,
                         is_causal: object = False, *, num_heads: int | None = None, num_extra_q: int = 0,
                         num_extra_kv: int = 0, device: torch.device | str | None = None) -> MaskMod:
    """``mask_mod`` of row-major neighborhood attention with per-head patterns and extra tokens.

    Any of ``kernel_size``/``stride``/``dilation``/``is_causal`` may be a
    :class:`PerHead` (then ``h`` selects the pattern; ``num_heads`` defaults to
    its length). Extra keys are kv indices ``N .. N + num_extra_kv - 1`` (attended
    by every query); extra queries are q indices ``N .. N + num_extra_q - 1``
    (attending every key). ``N = prod(shape)``.
    """
    spec = _spec(shape, kernel_size, stride, dilation, is_causal, num_heads, num_extra_q, num_extra_kv)
    return build_tables(spec, resolve_device(device)).mask_mod()


def extended_na_block_mask(shape: object, kernel_size: object, stride: object = 1, dilation: object = 1,
                           is_causal: object = False, *, num_heads: int | None = None, num_extra_q: int = 0,
                           num_extra_kv: int = 0, block_size: int | Sequence[int] | None = None,
                           device: torch.device | str | None = None) -> BlockMask:
    """Analytic BlockMask of :func:`extended_na_mask_mod` (same arguments; ``block_size``
    an int or ``(q, kv)`` pair, default 128). Per-head patterns give a BlockMask of
    shape ``[1, H, ...]``; otherwise ``[1, 1, ...]`` (broadcast over heads). Equals
    ``create_block_mask(mask_mod, None, H, N + num_extra_q, N + num_extra_kv)``.

    Example::

        mask = flexna.extended_na_block_mask((32, 32), 7, num_extra_kv=77)  # 77 text keys
    """
    spec = _spec(shape, kernel_size, stride, dilation, is_causal, num_heads, num_extra_q, num_extra_kv,
                 block_size)
    return build_block_mask(spec, resolve_device(device))
