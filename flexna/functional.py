"""Functional neighborhood attention in NATTEN's tensor layout.

``neighborhood_attention(q, k, v, kernel_size, ...)`` takes tensors shaped
``[batch, *spatial, heads, head_dim]`` (1 to 3 spatial axes), runs compiled
FlexAttention with a cached analytic BlockMask and returns the same layout.
``na1d``/``na2d``/``na3d`` are the same function with the axis count checked.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexna.analysis import choose_tiles
from flexna.blockmask import DEFAULT_BLOCK, pattern_block_mask, resolve_block_sizes
from flexna.extended import PerHead, head_patterns, patterns_block_mask
from flexna.layout import TokenLayout, as_tile
from flexna.pattern import MAX_AXES, BoolOrTuple, IntOrTuple, NAPattern
from flexna.scores import (
    _bias_score_mod,
    _packed_rpb_score_mod,
    _rpb_score_mod,
    check_rpb,
    compose_score_mods,
    rpb_token_tables,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_CUDA_HEAD_DIM = 16  # torch's CUDA Flex templates fail ("NYI") below this
_MASK_CACHE_SIZE = 64
_mask_cache: OrderedDict[tuple, BlockMask] = OrderedDict()
_compiled: Callable[..., Any] | None = None


def _cached_mask(key: tuple, build: Callable[[], BlockMask]) -> BlockMask:
    """The BlockMask cached under ``key``, built by ``build()`` on a miss (LRU of 64)."""
    mask = _mask_cache.get(key)
    if mask is None:
        mask = _mask_cache[key] = build()
        if len(_mask_cache) > _MASK_CACHE_SIZE:
            _mask_cache.popitem(last=False)
    else:
        _mask_cache.move_to_end(key)
    return mask


def cached_block_mask(pattern: NAPattern, device: torch.device, q_tile: tuple[int, ...] | None = None,
                      kv_tile: tuple[int, ...] | None = None) -> BlockMask:
    """BlockMask of ``pattern`` on ``device`` in the given orders (default row-major; blocks of
    one tile, or 128 tokens row-major), built once."""
    q_t = q_tile or (1,) * pattern.ndim
    kv_t = kv_tile or (1,) * pattern.ndim
    q_block, kv_block = resolve_block_sizes(None, q_t, kv_t)
    return _cached_mask((pattern, q_t, kv_t, device), lambda: pattern_block_mask(
        pattern, q_t, kv_t, q_block, kv_block, device))


def compiled_flex_attention() -> Callable[..., Any]:
    """``torch.compile(flex_attention)``, made once per process."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


# Each distinct (shapes, dtype, device, options) signature compiles once; pattern
# parameters live in tensors, so changing kernel/stride/dilation/causal recompiles nothing.
RECOMPILE_LIMIT = 64


class RecompileLimitError(RuntimeError):
    """Dynamo's recompile limit was reached: flexna refuses to drop to eager silently."""


def call_compiled(*args: Any, **kwargs: Any) -> Any:
    """Run compiled ``flex_attention``; never let dynamo fall back to eager at its limit.

    At dynamo's recompile limit torch would run ``flex_attention`` eagerly, which
    materialises every score (a 384 GiB allocation on a 256x256 layout). Here the limit is
    raised to :data:`RECOMPILE_LIMIT` for this call and hitting it is an error.
    """
    cfg = torch._dynamo.config
    names = ("recompile_limit", "fail_on_recompile_limit_hit")
    if not all(name in cfg._config for name in names):  # older torch spellings
        names = ("cache_size_limit", "fail_on_cache_limit_hit")
    limit = max(getattr(cfg, names[0]), RECOMPILE_LIMIT)
    with cfg.patch(**{names[0]: limit, names[1]: True}):
        try:
            return compiled_flex_attention()(*args, **kwargs)
        except Exception as exc:
            if "LimitHit" not in type(exc).__name__ and "recompile_limit" not in str(exc):
                raise
            raise RecompileLimitError(
                f"flexna: torch.compile(flex_attention) reached {limit} recompilations (one per "
                "distinct tensor shape / dtype / device / option set). Rather than fall back to "
                "eager attention (which materialises all N x N scores), flexna stops here. Fix: "
                "use fewer distinct shapes, or raise flexna.functional.RECOMPILE_LIMIT."
            ) from exc


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


def _lse_call(fn: Callable[..., Any], *args: Any, return_lse: bool, **kwargs: Any) -> Any:
    """Call a flex_attention-like ``fn`` asking for the lse the way this torch prefers.

    torch >= 2.9 deprecates ``return_lse`` for ``return_aux=AuxRequest(lse=True)``.
    """
    if not return_lse:
        return fn(*args, **kwargs)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return fn(*args, return_lse=True, **kwargs)
    out, aux = fn(*args, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse


def run_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
             scale: float | None, return_lse: bool, **kwargs: Any) -> Any:
    """Compiled ``flex_attention`` on ``[B, H, N, D]`` tensors; where torch cannot compile it
    on CPU, eager Flex (``return_lse``) or, when gradients are needed (torch's Flex has no CPU
    backward at all), :func:`dense_flex_attention`, with an :class:`EagerFallbackWarning`."""
    reason = _eager_reason(query, (query, key, value, *_captured(kwargs)), return_lse)
    if query.is_cuda:
        user = kwargs.get("kernel_options") or {}
        kwargs["kernel_options"] = {**_cuda_kernel_options(query.device), **user}
    if reason is None:
        if query.device.type == "cpu":
            # no gradients wanted, but torch's CPU Flex rejects inputs that require grad
            query, key, value = query.detach(), key.detach(), value.detach()
        return _lse_call(call_compiled, query, key, value, block_mask=block_mask, scale=scale,
                         return_lse=return_lse, **kwargs)
    warnings.warn(
        f"flexna: compiled FlexAttention on CPU supports inference only, and {reason}; "
        "running FlexAttention eagerly, which materialises the [batch, heads, N, N] score "
        "matrix (fine for small layouts; use a CUDA device for large ones)",
        EagerFallbackWarning, stacklevel=3,
    )
    if reason != "return_lse=True":
        return dense_flex_attention(query, key, value, block_mask=block_mask, scale=scale,
                                    return_lse=return_lse, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _lse_call(flex_attention, query, key, value, block_mask=block_mask, scale=scale,
                         return_lse=return_lse, **kwargs)


@functools.lru_cache(maxsize=16)
def _cuda_kernel_options(device: torch.device) -> dict[str, bool]:
    """Flex kernel options flexna passes on CUDA, where this torch's lowering knows them.

    * ``FORCE_USE_FLEX_ATTENTION``: with fewer than 128 queries torch switches to its
      decoding kernel, which fails to compile for GQA with a shared BlockMask on torch 2.11
      (NoValidChoicesError, found by the GPU tests); the main kernel handles every case.
    * ``USE_TMA`` on Hopper or newer (torch turns it off itself where the tensors don't allow
      it): 4-6% faster block-sparse kernels on an H200
      (benchmarks/results/explore-kernel-options-NVIDIA-H200-2026-11-21.md).
    """
    try:
        from torch._inductor.kernel.flex import flex_attention as lowering
        from torch._inductor.kernel.flex import flex_decoding as decoding
    except ImportError:
        return {}
    options = {}
    if "FORCE_USE_FLEX_ATTENTION" in inspect.getsource(decoding):
        options["FORCE_USE_FLEX_ATTENTION"] = True
    if torch.cuda.get_device_capability(device)[0] >= 9 and "USE_TMA" in inspect.getsource(lowering):
        options["USE_TMA"] = True
    return options


def _captured(kwargs: dict) -> tuple[torch.Tensor, ...]:
    """Tensors captured by a score_mod closure (e.g. a relative-position-bias table)."""
    mod = kwargs.get("score_mod")
    cells = getattr(mod, "__closure__", None) or ()
    found = []
    for cell in cells:
        try:
            v = cell.cell_contents
        except ValueError:
            continue
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, tuple):
            found += [m for f in v if callable(f) for m in _captured({"score_mod": f})]
    return tuple(found)


def dense_flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         score_mod: Callable[..., torch.Tensor] | None = None,
                         block_mask: BlockMask | None = None, scale: float | None = None,
                         enable_gqa: bool = False, return_lse: bool = False) -> Any:
    """Differentiable dense stand-in for ``flex_attention`` (same arguments and results).

    Computes all ``[B, H, Nq, Nkv]`` scores in float32 (float64 for float64 inputs), applies
    ``score_mod`` and ``block_mask.mask_mod`` with broadcast index tensors, and a safe
    softmax (rows with no key give output 0, lse ``-inf``). Works on any device with
    autograd, including gradients of tensors captured by ``score_mod``; memory is
    O(N^2): for small problems and CPU training/tests only.
    """
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv:
        if not enable_gqa or hq % hkv:
            raise ValueError(f"query has {hq} heads and key {hkv}: need enable_gqa=True and "
                             "query heads divisible by key heads")
        key = key.repeat_interleave(hq // hkv, dim=1)
        value = value.repeat_interleave(hq // hkv, dim=1)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query.to(work) @ key.to(work).transpose(-2, -1)) * scale
    dev = query.device
    b = torch.arange(query.shape[0], device=dev)[:, None, None, None]
    h = torch.arange(hq, device=dev)[None, :, None, None]
    q_idx = torch.arange(query.shape[2], device=dev)[None, None, :, None]
    kv_idx = torch.arange(key.shape[2], device=dev)[None, None, None, :]
    if score_mod is not None:
        scores = score_mod(scores, b, h, q_idx, kv_idx)
    if block_mask is not None:
        keep = block_mask.mask_mod(b, h, q_idx, kv_idx)
        scores = scores.masked_fill(~keep, float("-inf"))
    empty = (scores.amax(dim=-1) == float("-inf"))[..., None]  # rows attending nothing
    scores = scores.masked_fill(empty, 0.0)  # keeps their gradients finite (then zeroed)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(empty, 0.0)
    out = (probs @ value.to(work)).to(query.dtype)
    if return_lse:
        return out, lse.masked_fill(empty, float("-inf"))[..., 0].float()
    return out


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
    if key.dim() != query.dim() or key.shape[:-2] != query.shape[:-2] or key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key shape {tuple(key.shape)} must equal query shape {tuple(query.shape)} "
                         "(except for fewer heads with GQA/MQA)")
    hq, hkv = query.shape[-2], key.shape[-2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"key has {hkv} heads, query {hq}: the number of key/value heads must "
                         "divide the number of query heads (GQA/MQA)")
    if value.shape[:-1] != key.shape[:-1]:
        raise ValueError(
            f"value shape {tuple(value.shape)} must match key shape {tuple(key.shape)} "
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
    if query.is_cuda and min(query.shape[-1], value.shape[-1]) < MIN_CUDA_HEAD_DIM:
        raise ValueError(f"head_dim {query.shape[-1]} (value {value.shape[-1]}) is out of range on CUDA: "
                         f"torch's Flex kernels need >= {MIN_CUDA_HEAD_DIM}")
    return spatial


def _check_sequences(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, length: int,
                     why: str) -> None:
    """Validate ``[batch, length, heads, dim]`` sequences (token order chosen by the caller)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] != length:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be shaped [batch, {length}, heads, dim]{why}, got {got}")
    _check_tensors(query[:, :, None], key[:, :, None], value[:, :, None], 2)


def _check_extra(name: str, t: torch.Tensor | None, batch: int, heads: int, dim: int | None,
                 ref: torch.Tensor, like: str) -> int:
    """Validate an additional-token tensor ``[batch, M, heads, dim]``; returns M (0 if None)."""
    if t is None:
        return 0
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = f"[batch={batch}, M >= 1, heads={heads}, {'dim' if dim is None else f'dim={dim}'}]"
    if (t.dim() != 4 or t.shape[0] != batch or t.shape[2] != heads or t.shape[1] < 1
            or (dim is not None and t.shape[3] != dim)):
        raise ValueError(f"{name} must be shaped {want} (matching {like}), got {tuple(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} must have {like}'s dtype and device ({ref.dtype}, {ref.device}), "
                         f"got {t.dtype}, {t.device}")
    return t.shape[1]


def cached_extended_block_mask(patterns: tuple[NAPattern, ...], extra_q: int, extra_kv: int,
                               device: torch.device) -> BlockMask:
    """BlockMask of per-head patterns with extra tokens (block 128), built once (LRU)."""
    if len(patterns) == 1 and not extra_q and not extra_kv:
        return cached_block_mask(patterns[0], device)
    return _cached_mask(("ext", patterns, extra_q, extra_kv, device), lambda: patterns_block_mask(
        patterns, extra_q, extra_kv, DEFAULT_BLOCK, DEFAULT_BLOCK, device))


Tiles = str | None | Sequence[int] | tuple[Sequence[int], Sequence[int]]


def resolve_tiles(tiles: Tiles, patterns: tuple[NAPattern, ...], extra_tokens: bool,
                  user_score_mod: bool) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(q_tile, kv_tile)`` a call runs in, or ``None`` for row-major (see ``tiles``)."""
    if tiles is None or tiles == "row-major":
        return None
    if isinstance(tiles, str):
        if tiles != "auto":
            raise ValueError(f"tiles must be 'auto', None, a tile or a (q_tile, kv_tile) pair, "
                             f"got {tiles!r}")
        if len(patterns) > 1 or extra_tokens or user_score_mod:
            return None
        return choose_tiles(patterns[0])
    if len(patterns) > 1 or extra_tokens:
        raise ValueError("tiles: tiled order supports one pattern for all heads and no additional "
                         "tokens; use tiles=None (row-major) with per-head patterns or "
                         "additional_keys/values/queries")
    shape = patterns[0].shape
    pair = (isinstance(tiles, Sequence) and len(tiles) == 2
            and all(isinstance(t, Sequence) for t in tiles))
    q_tile, kv_tile = tiles if pair else (tiles, tiles)
    q_t, kv_t = as_tile("q_tile", q_tile, shape), as_tile("kv_tile", kv_tile, shape)
    for name, t in (("q_tile", q_t), ("kv_tile", kv_t)):
        if math.prod(t) != DEFAULT_BLOCK and math.prod(t) != 1:
            raise ValueError(f"tiles: {name} {t} holds {math.prod(t)} tokens; the functional API "
                             f"runs one tile per {DEFAULT_BLOCK}-token block, so a tile must hold "
                             f"{DEFAULT_BLOCK} tokens (or 1 for row-major); build masks with "
                             "flexna.na_block_mask for other tiles")
    return q_t, kv_t


def _ordered_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       pattern: NAPattern, q_layout: TokenLayout, kv_layout: TokenLayout,
                       scale: float | None, return_lse: bool, rel_pos_bias: torch.Tensor | None,
                       score_mod: Callable[..., torch.Tensor] | None) -> Any:
    """Attention in the layouts' token orders on NATTEN-layout tensors: permute, run, permute back."""
    out = attention_in_order(q_layout.heads_first(query), kv_layout.heads_first(key),
                             kv_layout.heads_first(value), pattern, q_layout, kv_layout, scale,
                             return_lse, rel_pos_bias, score_mod)
    if not return_lse:
        return q_layout.from_heads_first(out)
    return q_layout.from_heads_first(out[0]), q_layout.from_heads_first(out[1][..., None])[..., 0]


def attention_in_order(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pattern: NAPattern,
                       q_layout: TokenLayout, kv_layout: TokenLayout, scale: float | None,
                       return_lse: bool, rel_pos_bias: torch.Tensor | None = None,
                       score_mod: Callable[..., torch.Tensor] | None = None) -> Any:
    """Fused attention on ``[B, H, N, D]`` tensors already in the layouts' orders (cached mask)."""
    heads = query.shape[1]
    device = query.device
    q_t, kv_t = q_layout.tile, kv_layout.tile
    if rel_pos_bias is not None:
        check_rpb(rel_pos_bias, pattern, heads, device=device)

        def token_tables() -> tuple[torch.Tensor, torch.Tensor]:
            q_base, kv_base = rpb_token_tables(pattern, device=device)
            return (q_layout.to_tokens(q_base.reshape(1, *pattern.shape))[0],
                    kv_layout.to_tokens(kv_base.reshape(1, *pattern.shape))[0])

        q_base, kv_base = _cached_mask(("rpb", pattern, q_t, kv_t, device), token_tables)
        score_mod = compose_score_mods(_bias_score_mod(rel_pos_bias, q_base, kv_base, None, False),
                                       score_mod)
    mask = cached_block_mask(pattern, device, q_t, kv_t)
    kwargs: dict[str, Any] = {}
    if score_mod is not None:
        kwargs["score_mod"] = score_mod
    if key.shape[1] != heads:
        kwargs["enable_gqa"] = True
    return run_flex(query, key, value, mask, scale, return_lse, **kwargs)


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple | PerHead,
    stride: IntOrTuple | PerHead = 1,
    dilation: IntOrTuple | PerHead = 1,
    is_causal: BoolOrTuple | PerHead = False,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    additional_queries: torch.Tensor | None = None,
    rel_pos_bias: torch.Tensor | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
    tiles: Tiles = "auto",
    _ndim: int | None = None,
) -> Any:
    """Neighborhood attention over ``[batch, *spatial, heads, head_dim]`` tensors.

    ``kernel_size``, ``stride``, ``dilation``, ``is_causal``: per spatial axis
    (scalars broadcast), or :class:`flexna.PerHead` for one value per query head.
    ``scale`` defaults to ``head_dim ** -0.5``. ``key``/``value`` may have fewer
    heads than ``query`` (GQA/MQA: a divisor; run with ``enable_gqa``, no repeat).

    ``additional_keys``/``additional_values`` ``[batch, M, kv_heads, dim]``: M extra
    tokens every query attends besides its neighborhood (one fused call).
    ``additional_queries`` ``[batch, Mq, heads, dim]``: extra query rows attending
    every key (layout and additional); their output is returned too.
    ``rel_pos_bias``: ``[heads, *flexna.rpb_table_shape(kernel_size, stride, is_causal)]``
    relative positional bias (NAT/DiNAT ``rpb``; with per-head patterns each head uses its
    own pattern, all heads giving the same table shape); ``score_mod``: a FlexAttention
    score_mod applied after the bias, indices in the fused sequence (layout tokens
    first, then the additional ones).

    ``tiles``: the token order attention runs in. ``"auto"`` (default) runs in tiled
    order when :func:`flexna.choose_tiles` predicts it pays (one pattern for all heads, no
    additional tokens, no user ``score_mod``; inputs are permuted in and the output back,
    two copies); ``None`` forces row-major; a tile (one int per axis) or a ``(q_tile,
    kv_tile)`` pair forces those tiles (then a user ``score_mod`` sees tiled indices).

    Returns the output ``[batch, *spatial, heads, value_dim]``; with
    ``additional_queries`` a pair ``(out, extra_out [batch, Mq, heads, value_dim])``;
    with ``return_lse`` the log-sum-exp(s) (``[batch, *spatial, heads]``, float32)
    are appended: ``(out, lse)`` or ``(out, extra_out, lse, extra_lse)``.
    Every argument is validated before anything runs.
    """
    spatial = _check_tensors(query, key, value, _ndim)
    shape = tuple(query.shape[1:1 + spatial])
    batch, heads, kv_heads = query.shape[0], query.shape[-2], key.shape[-2]
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    extra_kv = _check_extra("additional_keys", additional_keys, batch, kv_heads, key.shape[-1],
                            key, "key")
    if additional_values is not None and additional_values.shape[:2] != additional_keys.shape[:2]:
        raise ValueError(f"additional_values shape {tuple(additional_values.shape)} must match "
                         f"additional_keys {tuple(additional_keys.shape)} in batch and M")
    _check_extra("additional_values", additional_values, batch, kv_heads, value.shape[-1], value, "value")
    extra_q = _check_extra("additional_queries", additional_queries, batch, heads, query.shape[-1],
                           query, "query")
    patterns = head_patterns(shape, kernel_size, stride, dilation, is_causal, num_heads=heads)
    order = resolve_tiles(tiles, patterns, bool(extra_q or extra_kv), score_mod is not None)
    if order is not None:
        return _ordered_attention(query, key, value, patterns[0], TokenLayout(shape, order[0]),
                                  TokenLayout(shape, order[1]), scale, return_lse, rel_pos_bias,
                                  score_mod)
    if rel_pos_bias is not None:
        check_rpb(rel_pos_bias, patterns, heads, device=query.device)
        bias = _rpb_score_mod(rel_pos_bias, patterns, extra_q, extra_kv, query.device)
        score_mod = compose_score_mods(bias, score_mod)
    mask = cached_extended_block_mask(patterns, extra_q, extra_kv, query.device)
    tokens = patterns[0].num_tokens

    # as few views as possible: each is an autograd node, and sub-millisecond 1-D calls are
    # bound by host time (no reshape of a 1-D layout, no slice without extra queries)
    def to_bhnd(t: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        if t.dim() != 4:
            t = t.reshape(batch, tokens, t.shape[-2], t.shape[-1])
        if extra is not None:
            t = torch.cat([t, extra], dim=1)
        return t.transpose(1, 2)

    kwargs: dict[str, Any] = {}
    if score_mod is not None:
        kwargs["score_mod"] = score_mod
    if kv_heads != heads:
        kwargs["enable_gqa"] = True
    result = run_flex(to_bhnd(query, additional_queries), to_bhnd(key, additional_keys),
                      to_bhnd(value, additional_values), mask, scale, return_lse, **kwargs)
    out, lse = result if return_lse else (result, None)
    out = out.transpose(1, 2)
    main = out[:, :tokens] if extra_q else out
    if main.dim() != query.dim():
        main = main.reshape(*query.shape[:-1], value.shape[-1])
    outs = [main, out[:, tokens:]] if extra_q else [main]
    if lse is not None:
        lse = lse.transpose(1, 2)
        outs.append(lse[:, :tokens].reshape(query.shape[:-1]))
        if extra_q:
            outs.append(lse[:, tokens:])
    return outs[0] if len(outs) == 1 else tuple(outs)


def tiled_neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: TokenLayout,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    rel_pos_bias: torch.Tensor | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
) -> Any:
    """Neighborhood attention on sequences already in ``layout``'s token order.

    For models that stay tiled across layers: ``x = layout.to_tokens(x)`` once at the
    input (``layout`` from :func:`flexna.choose_layout`), every attention layer calls this
    with ``query``/``key``/``value`` ``[batch, layout.length, heads, head_dim]`` (no permute),
    and ``layout.from_tokens`` once at the output. Returns ``[batch, layout.length, heads,
    value_dim]`` (and the lse ``[batch, layout.length, heads]`` with ``return_lse``). Padded
    positions attend nothing (their output is 0) and are never attended.
    """
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a flexna.TokenLayout, got {type(layout).__name__}")
    _check_sequences(query, key, value, layout.length,
                     f" (layout {layout.shape} in tile {layout.tile} order)")
    pattern = NAPattern.create(layout.shape, kernel_size, stride, dilation, is_causal)
    out = attention_in_order(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                             pattern, layout, layout, scale, return_lse, rel_pos_bias, score_mod)
    if return_lse:
        return out[0].transpose(1, 2), out[1].transpose(1, 2)
    return out.transpose(1, 2)


def na1d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
         stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
         scale: float | None = None, return_lse: bool = False, **kwargs: Any) -> Any:
    """1-D neighborhood attention: tensors ``[batch, L, heads, head_dim]``."""
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, return_lse, _ndim=1, **kwargs)


def na2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
         stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
         scale: float | None = None, return_lse: bool = False, **kwargs: Any) -> Any:
    """2-D neighborhood attention: tensors ``[batch, H, W, heads, head_dim]``."""
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, return_lse, _ndim=2, **kwargs)


def na3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: IntOrTuple,
         stride: IntOrTuple = 1, dilation: IntOrTuple = 1, is_causal: BoolOrTuple = False,
         scale: float | None = None, return_lse: bool = False, **kwargs: Any) -> Any:
    """3-D neighborhood attention: tensors ``[batch, T, H, W, heads, head_dim]``."""
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                  scale, return_lse, _ndim=3, **kwargs)


def packed_neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    shapes: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: float | None = None,
    *,
    block_size: int = 128,
    rel_pos_bias: torch.Tensor | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Neighborhood attention over several layouts packed in one sequence (variable resolution).

    ``query`` ``[batch, L, heads, dim]`` with ``L = flexna.packed_length(shapes, block_size)``
    (build it with :func:`flexna.pack_tokens`); ``key``/``value`` likewise (fewer heads:
    GQA). Each sample attends only within its own layout; padding outputs are 0.
    ``rel_pos_bias`` ``[heads, *flexna.rpb_table_shape(kernel_size, stride, is_causal)]``: one
    table for all samples, each sample's tokens indexing it with their own layout's
    coordinates; ``score_mod`` is applied after it (indices in the packed sequence).
    Returns ``[batch, L, heads, value_dim]`` (split it with :func:`flexna.unpack_tokens`).
    """
    from flexna.packing import _block, packed_length, packed_patterns, packed_patterns_block_mask

    patterns = packed_patterns(shapes, kernel_size, stride, dilation, is_causal)
    block = _block(block_size)
    total = packed_length([p.shape for p in patterns], block)
    _check_sequences(query, key, value, total, f": layouts {[p.shape for p in patterns]} packed in "
                     f"blocks of {block} add up to {total} tokens")
    if query.device.type == "cuda" and block % DEFAULT_BLOCK:
        raise ValueError(
            f"block_size = {block}: on CUDA the packed samples' blocks must be a multiple of "
            f"{DEFAULT_BLOCK} tokens (compiled FlexAttention needs BlockMask blocks divisible by its "
            f"kernel tiles, up to 128 x 64); use block_size={DEFAULT_BLOCK} (the default)"
        )
    if rel_pos_bias is not None:
        check_rpb(rel_pos_bias, patterns[0], query.shape[2], device=query.device)
        score_mod = compose_score_mods(_packed_rpb_score_mod(rel_pos_bias, patterns, block, query.device),
                                       score_mod)
    mask = _cached_mask(("packed", patterns, block, query.device),
                        lambda: packed_patterns_block_mask(patterns, block, query.device))
    kwargs: dict[str, Any] = {}
    if score_mod is not None:
        kwargs["score_mod"] = score_mod
    if key.shape[2] != query.shape[2]:
        kwargs["enable_gqa"] = True
    out = run_flex(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask, scale,
                   False, **kwargs)
    return out.transpose(1, 2)
