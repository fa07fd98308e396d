"""Variable resolution: several token layouts packed into one sequence.

Packing: sample ``i`` (layout ``shapes[i]``, row-major) occupies positions
``[offset_i, offset_i + N_i)`` and is followed by zero padding up to the next
multiple of ``block_size`` (default 128), so that no BlockMask block straddles
two samples. Each token attends only its own sample's neighborhood; padded
positions never attend and are never attended (their outputs are 0). The
packed length is ``sum(ceil(N_i / block_size) * block_size)``. On CUDA use a
multiple of 128: compiled FlexAttention needs BlockMask blocks divisible by its
kernel tiles (up to 128 x 64), and fails to compile smaller ones.

Relative positional bias over a packed sequence
(:func:`packed_rel_pos_bias_score_mod`, or ``rel_pos_bias=`` of
:func:`flexna.packed_neighborhood_attention`): one table for all samples, each
sample's tokens indexing it with their own layout's coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask

from flexna.blockmask import build_block_mask
from flexna.pattern import MAX_TOKENS, NAPattern, as_shape
from flexna.scores import ScoreMod, check_rpb, spec_rpb_score_mod
from flexna.spec import DEFAULT_BLOCK, MaskSpec, resolve_device
from flexna.tables import MaskMod, build_tables


def _shapes(shapes: Sequence) -> tuple[tuple[int, ...], ...]:
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or not shapes:
        raise ValueError(f"shapes must be a non-empty sequence of layout shapes, got {shapes!r}")
    out = tuple(as_shape(f"shapes[{i}]", s) for i, s in enumerate(shapes))
    if len({len(s) for s in out}) != 1:
        raise ValueError(f"shapes must all have the same number of axes, got {out}")
    return out


def as_block(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return block_size


def packed_offsets(shapes: Sequence, block_size: int = DEFAULT_BLOCK) -> list[tuple[int, int, int]]:
    """Per sample ``(offset, tokens, padded_tokens)`` in the packed sequence."""
    shapes_t, block = _shapes(shapes), as_block(block_size)
    out, offset = [], 0
    for s in shapes_t:
        n = math.prod(s)
        padded = -(-n // block) * block
        out.append((offset, n, padded))
        offset += padded
    if offset > MAX_TOKENS:
        raise ValueError(f"shapes: {len(shapes_t)} samples padded to {block}-token blocks add up to {offset} "
                         f"tokens, more than int32 indices allow: need at most {MAX_TOKENS}")
    return out


def packed_length(shapes: Sequence, block_size: int = DEFAULT_BLOCK) -> int:
    """Length of the packed sequence (every sample padded to a multiple of ``block_size``)."""
    last = packed_offsets(shapes, block_size)[-1]
    return last[0] + last[2]


def pack_tokens(xs: Sequence[torch.Tensor], shapes: Sequence, block_size: int = DEFAULT_BLOCK
                ) -> torch.Tensor:
    """``[B, *shapes[i], *rest]`` tensors -> one ``[B, packed_length, *rest]`` (zero padded)."""
    shapes_t = _shapes(shapes)
    if len(xs) != len(shapes_t):
        raise ValueError(f"xs has {len(xs)} tensors but shapes has {len(shapes_t)} layouts")
    parts = []
    rest = None
    for i, (x, s, (_, n, padded)) in enumerate(zip(xs, shapes_t, packed_offsets(shapes_t, block_size),
                                                   strict=True)):
        if x.dim() < 1 + len(s) or tuple(x.shape[1:1 + len(s)]) != s:
            raise ValueError(f"xs[{i}] must be shaped [batch, {', '.join(map(str, s))}, ...], "
                             f"got {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], n, *x.shape[1 + len(s):])
        if rest is None:
            rest = (x.shape[0], *flat.shape[2:])
        elif (x.shape[0], *flat.shape[2:]) != rest:
            raise ValueError(f"xs[{i}] batch / trailing dims {(x.shape[0], *flat.shape[2:])} differ "
                             f"from xs[0]'s {rest}")
        parts.append(flat)
        if padded > n:
            parts.append(flat.new_zeros(flat.shape[0], padded - n, *flat.shape[2:]))
    return torch.cat(parts, dim=1)


def unpack_tokens(x: torch.Tensor, shapes: Sequence, block_size: int = DEFAULT_BLOCK) -> list[torch.Tensor]:
    """``[B, packed_length, *rest]`` -> list of ``[B, *shapes[i], *rest]`` (padding dropped)."""
    shapes_t = _shapes(shapes)
    total = packed_length(shapes_t, block_size)
    if x.dim() < 2 or x.shape[1] != total:
        raise ValueError(f"x must be shaped [batch, {total}, ...] for layouts {shapes_t} packed in "
                         f"blocks of {block_size}, got {tuple(x.shape)}")
    return [x[:, o:o + n].reshape(x.shape[0], *s, *x.shape[2:])
            for s, (o, n, _) in zip(shapes_t, packed_offsets(shapes_t, block_size), strict=True)]


def packed_patterns(shapes: Sequence, kernel_size: object, stride: object = 1, dilation: object = 1,
                    is_causal: object = False) -> tuple[NAPattern, ...]:
    """One validated pattern per sample (``ValueError`` names the sample at fault)."""
    out = []
    for i, s in enumerate(_shapes(shapes)):
        try:
            out.append(NAPattern.create(s, kernel_size, stride, dilation, is_causal))  # type: ignore[arg-type]
        except ValueError as err:
            raise ValueError(f"shapes[{i}] = {s}: {err}") from None
    return tuple(out)


def packed_spec(patterns: Sequence[NAPattern], block: int) -> MaskSpec:
    """The :class:`~flexna.spec.MaskSpec` of samples packed in blocks of ``block`` tokens."""
    return MaskSpec.create((), samples=[(p,) for p in patterns], block_size=block)


def _spec(shapes: Sequence, kernel_size: object, stride: object, dilation: object, is_causal: object,
          block_size: int) -> MaskSpec:
    return packed_spec(packed_patterns(shapes, kernel_size, stride, dilation, is_causal), as_block(block_size))


def packed_mask_mod(shapes: Sequence, kernel_size: object, stride: object = 1, dilation: object = 1,
                    is_causal: object = False, *, block_size: int = DEFAULT_BLOCK,
                    device: torch.device | str | None = None) -> MaskMod:
    """``mask_mod`` over the packed sequence of ``shapes`` (same pattern parameters for all)."""
    spec = _spec(shapes, kernel_size, stride, dilation, is_causal, block_size)
    return build_tables(spec, resolve_device(device)).mask_mod()


def packed_block_mask(shapes: Sequence, kernel_size: object, stride: object = 1, dilation: object = 1,
                      is_causal: object = False, *, block_size: int = DEFAULT_BLOCK,
                      device: torch.device | str | None = None) -> BlockMask:
    """Analytic block-diagonal BlockMask of the packed sequence (blocks of ``block_size``).

    Equals ``create_block_mask(packed_mask_mod(...), None, None, L, L, BLOCK_SIZE=block_size)``
    with ``L = packed_length(shapes, block_size)``.

    Example::

        mask = flexna.packed_block_mask([(32, 32), (48, 16)], 7)
    """
    spec = _spec(shapes, kernel_size, stride, dilation, is_causal, block_size)
    return build_block_mask(spec, resolve_device(device))


def packed_rel_pos_bias_score_mod(table: torch.Tensor, shapes: Sequence, kernel_size: object,
                                  stride: object = 1, dilation: object = 1, is_causal: object = False, *,
                                  block_size: int = DEFAULT_BLOCK,
                                  device: torch.device | str | None = None) -> ScoreMod:
    """``score_mod`` adding relative positional bias over the packed sequence of ``shapes``.

    ``table``: ``[heads, *flexna.rpb_table_shape(kernel_size, stride, is_causal)]``, shared by
    all samples; a query and a key of the same sample get ``table[h, ...]`` at their offset
    in that sample's layout (as :func:`flexna.rel_pos_bias_score_mod` for one layout).
    Pairs across samples or involving padding are masked by :func:`packed_block_mask`
    (their bias is meaningless). Gradients reach ``table``.
    """
    patterns = packed_patterns(shapes, kernel_size, stride, dilation, is_causal)
    heads = table.shape[0] if isinstance(table, torch.Tensor) and table.dim() else 0
    check_rpb(table, patterns[0], heads, "table")
    spec = packed_spec(patterns, as_block(block_size))
    return spec_rpb_score_mod(table, spec, table.device if device is None else resolve_device(device))
