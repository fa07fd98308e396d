"""Functional neighborhood attention in NATTEN's tensor layout.

``neighborhood_attention(q, k, v, kernel_size, ...)`` takes tensors shaped
``[batch, *spatial, heads, head_dim]`` (1 to 3 spatial axes), runs compiled
FlexAttention with a cached analytic BlockMask and returns the same layout.
``na1d``/``na2d``/``na3d`` are the same function with the axis count checked.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexna.blockmask import DEFAULT_BLOCK, pattern_block_mask
from flexna.pattern import MAX_AXES, BoolOrTuple, IntOrTuple, NAPattern

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK_CACHE_SIZE = 64
_mask_cache: OrderedDict[tuple, BlockMask] = OrderedDict()
_compiled: Callable[..., Any] | None = None


def cached_block_mask(pattern: NAPattern, device: torch.device) -> BlockMask:
    """Row-major BlockMask of ``pattern`` on ``device``, built once (LRU of 64)."""
    key = (pattern, device)
    mask = _mask_cache.get(key)
    if mask is None:
        tile = (1,) * pattern.ndim
        mask = pattern_block_mask(pattern, tile, tile, DEFAULT_BLOCK, DEFAULT_BLOCK, device)
        _mask_cache[key] = mask
        if len(_mask_cache) > _MASK_CACHE_SIZE:
            _mask_cache.popitem(last=False)
    else:
        _mask_cache.move_to_end(key)
    return mask


def compiled_flex_attention() -> Callable[..., Any]:
    """``torch.compile(flex_attention)``, made once per process."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


class EagerFallbackWarning(UserWarning):
    """flexna ran FlexAttention unfused (eager), which holds all N x N scores in memory."""


def _eager_reason(query: torch.Tensor, tensors: tuple[torch.Tensor, ...], return_lse: bool) -> str | None:
    """Why compiled Flex cannot run this call, or None. (CPU Flex compiles inference only.)"""
    if query.device.type != "cpu":
        return None
    if return_lse:
        return "return_lse=True"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "gradients are required"
    return None


def run_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
             scale: float | None, return_lse: bool, **kwargs: Any) -> Any:
    """Compiled ``flex_attention`` on ``[B, H, N, D]`` tensors; eager, with a warning,
    only where torch cannot compile it (CPU backward or lse)."""
    reason = _eager_reason(query, (query, key, value), return_lse)
    if reason is None:
        return compiled_flex_attention()(query, key, value, block_mask=block_mask, scale=scale,
                                         return_lse=return_lse, **kwargs)
    warnings.warn(
        f"flexna: compiled FlexAttention on CPU supports inference only, and {reason}; "
        "running FlexAttention eagerly, which materialises the [batch, heads, N, N] score "
        "matrix (fine for small layouts; use a CUDA device for large ones)",
        EagerFallbackWarning, stacklevel=3,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale,
                              return_lse=return_lse, **kwargs)


def _check_tensors(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   ndim: int | None) -> int:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    spatial = query.dim() - 3
    if not 1 <= spatial <= MAX_AXES:
        raise ValueError(
            f"query must be shaped [batch, *spatial, heads, head_dim] with 1 to {MAX_AXES} "
            f"spatial axes, got {query.dim()} dims: {tuple(query.shape)}"
        )
    if ndim is not None and spatial != ndim:
        raise ValueError(
            f"query must have {ndim} spatial axes ([batch, {'X, ' * ndim}heads, head_dim]) "
            f"for na{ndim}d, got shape {tuple(query.shape)}"
        )
    if key.shape != query.shape:
        raise ValueError(f"key shape {tuple(key.shape)} must equal query shape {tuple(query.shape)}")
    if value.shape[:-1] != query.shape[:-1]:
        raise ValueError(
            f"value shape {tuple(value.shape)} must match query shape {tuple(query.shape)} "
            "in every dim but the last"
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name} dtype {t.dtype} is not supported: use one of "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not query.device == key.device == value.device:
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, "
            f"{value.device}"
        )
    if 0 in query.shape or 0 in value.shape:
        raise ValueError(f"empty tensors are not supported, got query {tuple(query.shape)}")
    return spatial


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    _ndim: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Neighborhood attention over ``[batch, *spatial, heads, head_dim]`` tensors.

    ``kernel_size``, ``stride``, ``dilation``, ``is_causal``: per spatial axis
    (scalars broadcast). ``scale`` defaults to ``head_dim ** -0.5``. Returns
    the output ``[batch, *spatial, heads, value_dim]`` and, with
    ``return_lse``, the log-sum-exp ``[batch, *spatial, heads]`` (float32).
    Every argument is validated before anything runs.
    """
    spatial = _check_tensors(query, key, value, _ndim)
    shape = tuple(query.shape[1:1 + spatial])
    pattern = NAPattern.create(shape, kernel_size, stride, dilation, is_causal)
    mask = cached_block_mask(pattern, query.device)
    batch, heads = query.shape[0], query.shape[-2]
    tokens = pattern.num_tokens

    def to_bhnd(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, tokens, heads, t.shape[-1]).transpose(1, 2)

    result = run_flex(to_bhnd(query), to_bhnd(key), to_bhnd(value), mask, scale, return_lse)
    out, lse = result if return_lse else (result, None)
    out = out.transpose(1, 2).reshape(*query.shape[:-1], value.shape[-1])
    if lse is None:
        return out
    return out, lse.transpose(1, 2).reshape(query.shape[:-1])


def na1d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
         stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
         scale: float | None = None, return_lse: bool = False
         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """1-D neighborhood attention: tensors ``[batch, L, heads, head_dim]``."""
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, return_lse, _ndim=1)


def na2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
         stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
         scale: float | None = None, return_lse: bool = False
         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """2-D neighborhood attention: tensors ``[batch, H, W, heads, head_dim]``."""
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, return_lse, _ndim=2)


def na3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
         stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
         scale: float | None = None, return_lse: bool = False
         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """3-D neighborhood attention: tensors ``[batch, T, H, W, heads, head_dim]``."""
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, return_lse, _ndim=3)
