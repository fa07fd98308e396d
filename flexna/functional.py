"""Functional neighborhood attention in NATTEN's tensor layout.

``neighborhood_attention(q, k, v, kernel_size, ...)`` takes tensors shaped
``[batch, *spatial, heads, head_dim]`` (1 to 3 spatial axes), runs compiled
FlexAttention with a cached analytic BlockMask and returns the same layout.
``na1d``/``na2d``/``na3d`` are the same function with the axis count checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask

from flexna import plan as plans
from flexna.analysis import choose_tiles
from flexna.backends import Backend, BackendError, backend_options, block_sizes, check_backend, resolve_backend
from flexna.blockmask import build_block_mask, index_tensors, spec_block_mask, static_addresses
from flexna.blocksparsity import spec_maps
from flexna.errors import warn_user
from flexna.flex import (
    EagerFallbackWarning,
    RecompileLimitError,
    dense_flex_attention,
    run_flex,
)
from flexna.layout import TokenLayout, as_tile
from flexna.pattern import MAX_AXES, BoolOrTuple, IntOrTuple, NAPattern, PerHead, head_patterns
from flexna.scores import bias_score_mod, check_rpb, compose_score_mods, rpb_token_tables
from flexna.spec import DEFAULT_BLOCK, MaskSpec, TensorMeta, check_mask_limit

__all__ = ["EagerFallbackWarning", "RecompileLimitError", "dense_flex_attention", "na1d", "na2d", "na3d",
           "neighborhood_attention", "packed_neighborhood_attention", "tiled_neighborhood_attention"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_CUDA_HEAD_DIM = 16  # torch's CUDA Flex templates fail ("NYI") below this
ScoreModArg = Callable[..., torch.Tensor] | None


Meta = torch.Tensor | TensorMeta


def check_tensors(query: Meta, key: Meta, value: Meta, ndim: int | None) -> int:
    """Validate NATTEN-layout ``query``/``key``/``value`` (tensors or their :class:`TensorMeta`);
    returns the number of spatial axes."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, (torch.Tensor, TensorMeta)):
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


def _check_sequences(query: TensorMeta, key: TensorMeta, value: TensorMeta, length: int,
                     why: str) -> None:
    """Validate ``[batch, length, heads, dim]`` sequences (token order chosen by the caller)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4 or t.shape[1] != length:
            raise ValueError(f"{name} must be shaped [batch, {length}, heads, dim]{why}, got {tuple(t.shape)}")

    def as_2d(t: TensorMeta) -> TensorMeta:
        return TensorMeta(torch.Size((*t.shape[:2], 1, *t.shape[2:])), t.dtype, t.device, t.requires_grad)

    check_tensors(as_2d(query), as_2d(key), as_2d(value), 2)


def _check_extra(name: str, t: TensorMeta | None, batch: int, heads: int, dim: int | None,
                 ref: TensorMeta, like: str) -> int:
    """Validate an additional-token tensor ``[batch, M, heads, dim]``; returns M (0 if None)."""
    if t is None:
        return 0
    want = f"[batch={batch}, M >= 1, heads={heads}, {'dim' if dim is None else f'dim={dim}'}]"
    if (t.dim() != 4 or t.shape[0] != batch or t.shape[2] != heads or t.shape[1] < 1
            or (dim is not None and t.shape[3] != dim)):
        raise ValueError(f"{name} must be shaped {want} (matching {like}), got {tuple(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} must have {like}'s dtype and device ({ref.dtype}, {ref.device}), "
                         f"got {t.dtype}, {t.device}")
    return t.shape[1]


Tiles = str | None | Sequence[int] | tuple[Sequence[int], Sequence[int]]


def resolve_tiles(tiles: Tiles, patterns: tuple[NAPattern, ...], user_score_mod: bool,
                  backend: str = "triton", block_size: tuple[int, int] | None = None,
                  padding: bool | str = "auto") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(q_tile, kv_tile)`` a call runs in (all ones: row-major); see ``tiles``. ``"auto"``
    ranks tiles for the kernel ``backend`` and its ``block_size`` (``None``: 128 x 128) among
    those ``padding`` allows (:func:`flexna.choose_tiles`)."""
    shape = patterns[0].shape
    row_major = ((1,) * len(shape),) * 2
    if tiles is None or tiles == "row-major":
        return row_major  # type: ignore[return-value]
    if isinstance(tiles, str):
        if tiles != "auto":
            raise ValueError(f"tiles must be 'auto', None, a tile or a (q_tile, kv_tile) pair, "
                             f"got {tiles!r}")
        if len(set(patterns)) > 1 or user_score_mod:
            return row_major  # type: ignore[return-value]
        return choose_tiles(patterns[0], padding=padding, backend=backend,
                            block_size=block_size) or row_major  # type: ignore[return-value]
    pair = (isinstance(tiles, Sequence) and len(tiles) == 2
            and all(isinstance(t, Sequence) for t in tiles))
    q_tile, kv_tile = tiles if pair else (tiles, tiles)
    q_t = as_tile("q_tile", q_tile, shape)  # type: ignore[arg-type]
    kv_t = as_tile("kv_tile", kv_tile, shape)  # type: ignore[arg-type]
    for name, t in (("q_tile", q_t), ("kv_tile", kv_t)):
        if math.prod(t) != DEFAULT_BLOCK and math.prod(t) != 1:
            raise ValueError(f"tiles: {name} {t} holds {math.prod(t)} tokens; the functional API "
                             f"runs one tile per {DEFAULT_BLOCK}-token block, so a tile must hold "
                             f"{DEFAULT_BLOCK} tokens (or 1 for row-major); build masks with "
                             "flexna.na_block_mask for other tiles")
    return q_t, kv_t


@dataclass(frozen=True, eq=False)
class CallPlan:
    """What one call needs from the host (see :mod:`flexna.plan`): its spec, BlockMask, token
    orders, rpb tables and kernel options."""

    spec: MaskSpec
    q_layout: TokenLayout
    kv_layout: TokenLayout
    device: torch.device
    has_rpb: bool
    kernel_options: dict[str, bool | str | int]
    dense: bool  # the CPU cases compiled Flex cannot run (gradients, lse): the dense stand-in
    backend: str  # the kernel backend the call runs on: "triton" or "flash"
    # resolved at trace time (the traced code must not touch the cache); None: from the cache
    mask: BlockMask | None = None
    rpb: tuple[torch.Tensor, torch.Tensor] | None = None

    def resolved(self, private: bool = False) -> CallPlan:
        """This plan with its BlockMask and rpb tables in hand (for traced code, which must not
        reach the cache); warns where the traced call will run the dense stand-in.

        ``private``: tensors of its own, shared with no other plan (a module's re-planned call:
        dynamo guards on which of a graph's inputs are the same tensor, so a layer whose new
        pattern equals another call's must not start sharing that call's cached mask)."""
        if self.dense:
            warn_user("flexna: inside torch.compile on CPU with gradients enabled and a tensor needing "
                      "them (or a user score_mod, whose captures flexna cannot see at trace time, or "
                      "return_lse), attention runs as the dense N x N stand-in (torch's CPU Flex "
                      "compiles inference only)",
                      EagerFallbackWarning)
        if private:
            rpb = None
            if self.has_rpb:
                q_base, kv_base = rpb_token_tables(self.spec, self.device)
                rpb = q_base.clone(), kv_base.clone()
                static_addresses(*rpb)
            return replace(self, mask=build_block_mask(self.spec, self.device), rpb=rpb)
        return replace(self, mask=spec_block_mask(self.spec, self.device),
                       rpb=rpb_token_tables(self.spec, self.device) if self.has_rpb else None)

    @property
    def nbytes(self) -> int:
        """Device bytes this resolved plan keeps alive (BlockMask index tensors, rpb tables)."""
        tensors = [*(index_tensors(self.mask) if self.mask is not None else ()), *(self.rpb or ())]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def block_mask(self) -> BlockMask:
        return self.mask if self.mask is not None else spec_block_mask(self.spec, self.device)

    def rpb_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rpb if self.rpb is not None else rpb_token_tables(self.spec, self.device)


def _const(value: object) -> object:
    """A pattern / tiles argument as a hashable constant (lists to tuples, PerHead tagged)."""
    if isinstance(value, PerHead):
        return ("PerHead", value.values)
    if isinstance(value, list | tuple):
        return tuple(_const(v) for v in value)
    return value


def _options(scale: object, return_lse: object, score_mod: object, backend: object = "auto",
             store: plans.PlanStore | None = None) -> tuple:
    """``scale``, ``return_lse``, ``score_mod`` and ``backend`` as constants for a signature (a
    type name where the value cannot be right, so that the plan's check names it). A module's
    call (``store``) takes its scale from the store: a float attribute is symbolic to dynamo
    under ``dynamic=True``, and the plan needs it only to validate it."""
    number = isinstance(scale, int | float) and not isinstance(scale, bool)
    scale_c: object = scale if scale is None or number else ("not a number", type(scale).__name__)
    if store is not None:
        scale_c = plans.module_entry("scale")
    lse_c = return_lse if isinstance(return_lse, bool) else ("not a bool", type(return_lse).__name__)
    mod_c = None if score_mod is None else (True if callable(score_mod) else type(score_mod).__name__)
    backend_c = backend if isinstance(backend, str) else ("not a str", repr(backend))
    return (scale_c, lse_c, mod_c, backend_c)


def _check_options(options: tuple) -> None:
    """``TypeError``/``ValueError`` for a bad ``scale``/``return_lse``/``score_mod`` (before anything
    compiles)."""
    scale, return_lse, score_mod, backend = options
    check_backend(backend[1] if isinstance(backend, tuple) else backend)
    if isinstance(scale, tuple):
        raise TypeError(f"scale must be a real number or None, got {scale[1]}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale = {scale!r} is out of range: need a finite number (or None for "
                         "head_dim ** -0.5)")
    if isinstance(return_lse, tuple):
        raise TypeError(f"return_lse must be a bool, got {return_lse[1]}")
    if isinstance(score_mod, str):
        raise TypeError(f"score_mod must be a callable (score, b, h, q_idx, kv_idx) -> score or None, "
                        f"got {score_mod}")


as_constant = _const  # for flexna.distributed


#: The pattern arguments, in signature order.
PATTERN_ARGS = ("kernel_size", "stride", "dilation", "is_causal")


def module_constants(scale: float | None, pattern: Mapping[str, object]) -> dict[str, object]:
    """What a module's plan store holds: each :func:`flexna.plan.module_entry` marker of its
    calls' signatures and the constant it stands for (the scale, in the options; the pattern
    arguments, by name)."""
    return {plans.module_entry("scale"): scale,
            **{plans.module_entry(name): _const(pattern[name]) for name in PATTERN_ARGS}}


def _pattern_consts(kernel_size: object, stride: object, dilation: object, is_causal: object,
                    store: plans.PlanStore | None) -> tuple:
    """A signature's pattern entries: the arguments' constants, or, for a module's call
    (``store``), :func:`flexna.plan.module_entry` markers in their place (the module's pattern is
    read from its store on the host, so compiled graphs do not guard on its values)."""
    if store is not None:
        return tuple(plans.module_entry(name) for name in PATTERN_ARGS)
    return _const(kernel_size), _const(stride), _const(dilation), _const(is_causal)


def check_options(scale: object, return_lse: object = False, score_mod: object = None) -> None:
    """``TypeError``/``ValueError`` for a bad ``scale``, ``return_lse`` or ``score_mod``."""
    _check_options(_options(scale, return_lse, score_mod))


def check_finite_inputs(check_finite: object, tensors: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    """With ``check_finite=True``, ``ValueError`` naming the first tensor that holds a NaN or an
    infinity (one host sync per tensor); with ``False`` nothing runs (no sync)."""
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
    if not check_finite:
        return
    for name, t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
            continue
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            first = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or inf), the first "
                             f"at index {first} of shape {tuple(t.shape)}: attention of non-finite inputs "
                             "is undefined (check_finite=True; see docs/SEMANTICS.md)")


def _unconst(value: object) -> object:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "PerHead":
        return PerHead(list(value[1]))
    return value


def _rpb_meta(signature: tuple | None) -> Any:
    """The rel_pos_bias argument for :func:`check_rpb`: its meta, or a stand-in of the non-tensor's
    type (check_rpb names it in its ValueError)."""
    if signature is not None and signature[0] == "not a tensor":
        return type(signature[1], (), {})()
    return TensorMeta.of("rel_pos_bias", signature)


def _block_pairs(spec: MaskSpec, batch: int, heads: int) -> tuple[int, float]:
    """Attended (query block, key block) pairs of one call (the kernel's work, in blocks) and
    the share of them that are partial."""
    partial, full = spec_maps(spec)
    n_partial, n_full = int(partial.sum()), int(full.sum())
    per_call = batch * (heads if spec.heads == 1 else 1)
    return (n_partial + n_full) * per_call, n_partial / max(1, n_partial + n_full)


def choose_backend(make_spec: Callable[[tuple[int, int] | None, str], MaskSpec], backend: str,
                   device: torch.device, grads: bool, batch: int, heads: int,
                   score_mod: bool = False, captured_grads: bool = False) -> tuple[MaskSpec, str]:
    """The spec and kernel backend of a call (see :func:`flexna.backends.resolve_backend`).

    ``make_spec(block_size, backend)`` builds the call's spec for a backend's block sizes
    (``None``: the spec's defaults) and cost model (tiles ranked for it). A user score_mod with
    gradients enabled counts as differentiated through captured tensors (it may capture
    trainable ones, which FLASH's backward rejects); ``captured_grads``: flexna's own captured
    tensor (the rpb table) requires grad.
    """
    if captured_grads and backend == "flash" and grads:
        raise BackendError("backend='flash': FLASH's backward cannot differentiate tensors a score_mod "
                           "captures (here a trainable rel_pos_bias); use backend='triton' or 'auto', "
                           "or run without gradients")
    if score_mod and torch.is_grad_enabled():  # it may capture trainable tensors
        grads = captured_grads = True
    chosen = resolve_backend(backend, device, grads=grads, captured_grads=captured_grads)
    try:
        spec = make_spec(block_sizes(chosen, device) if chosen == "flash" else None, chosen)
    except BackendError:
        if backend != "auto":
            raise
        chosen, spec = "triton", make_spec(None, "triton")
    if chosen == "flash" and backend == "auto":
        pairs, share = _block_pairs(spec, batch, heads)
        chosen = resolve_backend(backend, device, grads=grads, captured_grads=captured_grads,
                                 block_pairs=pairs, partial_share=share)
        if chosen != "flash":  # Triton's blocks and cost model (its tiles may differ)
            spec = make_spec(None, chosen)
    return spec, chosen


def _make_plan(spec: MaskSpec, q_layout: TokenLayout, kv_layout: TokenLayout, device: torch.device,
               rpb: bool, needs_dense: bool, backend: str = "triton") -> CallPlan:
    check_mask_limit(spec)  # before anything is built or compiled
    return CallPlan(spec, q_layout, kv_layout, device, rpb,
                    backend_options(backend, device, (spec.q_block, spec.kv_block)), needs_dense,
                    backend)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: CallPlan,
           scale: float | None, return_lse: bool, rel_pos_bias: torch.Tensor | None = None,
           score_mod: ScoreModArg = None) -> Any:
    """The one attention route: ``[B, H, N, D]`` tensors in the plan's sequence order, its cached
    BlockMask and rpb tables, one fused Flex call."""
    user_mod = score_mod
    if rel_pos_bias is not None:
        score_mod = compose_score_mods(bias_score_mod(rel_pos_bias, *plan.rpb_tables(), plan.spec), score_mod)
    kwargs: dict[str, Any] = {}
    if score_mod is not None:
        kwargs["score_mod"] = score_mod
    if key.shape[1] != query.shape[1]:
        kwargs["enable_gqa"] = True
    if plan.kernel_options:
        kwargs["kernel_options"] = dict(plan.kernel_options)
    # traced by the user's torch.compile, flexna cannot walk what a user score_mod reaches: on the CPU
    # with gradients enabled it takes the differentiable stand-in (eager calls walk it, run_flex)
    captured = ((rel_pos_bias is not None and rel_pos_bias.requires_grad)
                or (user_mod is not None and torch.compiler.is_compiling()))
    return run_flex(query, key, value, plan.block_mask(), scale, return_lse, captured_grad=captured,
                    **kwargs)


def _to_sequence(t: torch.Tensor, extra: torch.Tensor | None, layout: TokenLayout) -> torch.Tensor:
    """NATTEN-layout ``[B, *shape, H, D]`` (+ extra ``[B, M, H, D]``) -> ``[B, H, N (+ M), D]``.

    Row-major: views only (each is an autograd node, and sub-millisecond 1-D calls are bound
    by host time: no reshape of a 1-D layout, no cat without extra tokens); tiled: one copy.
    """
    if layout.is_row_major:
        if t.dim() != 4:
            t = t.reshape(t.shape[0], layout.length, t.shape[-2], t.shape[-1])
        if extra is not None:
            t = torch.cat([t, extra], dim=1)
        return t.transpose(1, 2)
    seq = layout.heads_first(t)
    return seq if extra is None else torch.cat([seq, extra.transpose(1, 2)], dim=2)


def _from_sequence(out: torch.Tensor, layout: TokenLayout, like: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, Dv]`` in ``layout``'s order -> ``[B, *shape, H, Dv]``."""
    if layout.is_row_major:
        main = out.transpose(1, 2)
        return main if main.dim() == like.dim() else main.reshape(*like.shape[:-1], out.shape[-1])
    return layout.from_heads_first(out)


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
    score_mod: ScoreModArg = None,
    tiles: Tiles = "auto",
    backend: Backend = "auto",
    check_finite: bool = False,
    _ndim: int | None = None,
    _store: plans.PlanStore | None = None,
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
    order when :func:`flexna.choose_tiles` predicts it pays (one pattern for all heads and
    no user ``score_mod``; inputs are permuted in and the output back, two copies; tiles
    that divide the layout or pad it to :func:`flexna.analysis.auto_shape`, at most 1/8 per
    axis, so a shape runs at two sequence lengths at most);
    ``None`` forces row-major; a tile (one int per axis) or a ``(q_tile, kv_tile)`` pair
    forces those tiles, with any combination of per-head patterns, additional tokens and
    ``rel_pos_bias`` (then a user ``score_mod`` sees tiled indices).

    ``backend``: the FlexAttention kernels on CUDA (:mod:`flexna.backends`). ``"auto"``
    (default) runs forward-only calls large enough to pay on FLASH (flash-attn-4) where it
    is installed and the GPU supports it, everything else on Triton; ``"triton"`` or
    ``"flash"`` force one (``"flash"`` where it cannot run is a ``BackendError``).

    ``check_finite=True``: raise ``ValueError`` naming the first input (query, key, value, the
    additional tensors, rel_pos_bias) holding a NaN or an infinity, before attention runs (a
    host sync per tensor, and a graph break under ``torch.compile``: a debugging aid; off by
    default, when nothing is checked).

    Returns the output ``[batch, *spatial, heads, value_dim]``; with
    ``additional_queries`` a pair ``(out, extra_out [batch, Mq, heads, value_dim])``;
    with ``return_lse`` the log-sum-exp(s) (``[batch, *spatial, heads]``, float32)
    are appended: ``(out, lse)`` or ``(out, extra_out, lse, extra_lse)``.
    Every argument is validated before anything runs.

    Example::

        q = k = v = torch.randn(2, 32, 32, 4, 64)
        out = flexna.neighborhood_attention(q, k, v, kernel_size=7)  # [2, 32, 32, 4, 64]
    """
    signature = na_signature(query, key, value, kernel_size, stride, dilation, is_causal, scale, return_lse,
                             additional_keys=additional_keys, additional_values=additional_values,
                             additional_queries=additional_queries, rel_pos_bias=rel_pos_bias,
                             score_mod=score_mod, tiles=tiles, backend=backend, _ndim=_ndim, _store=_store)
    plan = plans.plan_for(signature, _store)
    check_finite_inputs(check_finite, (("query", query), ("key", key), ("value", value),
                                       ("additional_keys", additional_keys),
                                       ("additional_values", additional_values),
                                       ("additional_queries", additional_queries),
                                       ("rel_pos_bias", rel_pos_bias)))
    result = attend(_to_sequence(query, additional_queries, plan.q_layout),
                    _to_sequence(key, additional_keys, plan.kv_layout),
                    _to_sequence(value, additional_values, plan.kv_layout),
                    plan, scale, return_lse, rel_pos_bias, score_mod)
    out, lse = result if return_lse else (result, None)
    n, extra_q = plan.spec.q_layout_len, plan.spec.num_extra_q
    q_layout = plan.q_layout
    outs = [_from_sequence(out[:, :, :n] if extra_q else out, q_layout, query)]
    if extra_q:
        outs.append(out[:, :, n:].transpose(1, 2))
    if lse is not None:
        main_lse = _from_sequence((lse[:, :, :n] if extra_q else lse)[..., None], q_layout, query[..., :1])
        outs.append(main_lse.reshape(query.shape[:-1]))
        if extra_q:
            outs.append(lse[:, :, n:].transpose(1, 2))
    return outs[0] if len(outs) == 1 else tuple(outs)


def na_signature(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: object,
                 stride: object = 1, dilation: object = 1, is_causal: object = False, scale: object = None,
                 return_lse: object = False, *, additional_keys: torch.Tensor | None = None,
                 additional_values: torch.Tensor | None = None,
                 additional_queries: torch.Tensor | None = None, rel_pos_bias: torch.Tensor | None = None,
                 score_mod: object = None, tiles: object = "auto", backend: object = "auto",
                 _ndim: int | None = None, _store: plans.PlanStore | None = None) -> tuple:
    """The signature (:mod:`flexna.plan`) of a :func:`neighborhood_attention` call."""
    sig = plans.tensor_signature
    return ("na", sig(query), sig(key), sig(value), sig(additional_keys), sig(additional_values),
            sig(additional_queries), sig(rel_pos_bias), _options(scale, return_lse, score_mod, backend, _store),
            *_pattern_consts(kernel_size, stride, dilation, is_causal, _store), _const(tiles),
            _ndim, torch.is_grad_enabled())


def _na_plan(signature: tuple) -> CallPlan:
    """Validate a :func:`neighborhood_attention` call from its signature and plan it."""
    (_, q_s, k_s, v_s, ak_s, av_s, aq_s, rpb_s, options, kernel_size, stride, dilation,
     is_causal, tiles, ndim, grad) = signature
    _check_options(options)
    return_lse, has_score_mod = options[1], options[2] is not None
    names = ("query", "key", "value", "additional_keys", "additional_values", "additional_queries")
    query, key, value, ak, av, aq = (TensorMeta.of(n, s) for n, s in zip(names, (
        q_s, k_s, v_s, ak_s, av_s, aq_s), strict=True))
    rpb = _rpb_meta(rpb_s)
    assert query is not None and key is not None and value is not None
    spatial = check_tensors(query, key, value, ndim)
    shape = tuple(query.shape[1:1 + spatial])
    batch, heads, kv_heads = query.shape[0], query.shape[-2], key.shape[-2]
    if (ak is None) != (av is None):
        raise ValueError("additional_keys and additional_values must be given together")
    extra_kv = _check_extra("additional_keys", ak, batch, kv_heads, key.shape[-1], key, "key")
    if av is not None and ak is not None and av.shape[:2] != ak.shape[:2]:
        raise ValueError(f"additional_values shape {tuple(av.shape)} must match "
                         f"additional_keys {tuple(ak.shape)} in batch and M")
    _check_extra("additional_values", av, batch, kv_heads, value.shape[-1], value, "value")
    extra_q = _check_extra("additional_queries", aq, batch, heads, query.shape[-1], query, "query")
    patterns = head_patterns(shape, _unconst(kernel_size), _unconst(stride), _unconst(dilation),
                             _unconst(is_causal), num_heads=heads)
    if rpb is not None:
        check_rpb(rpb, patterns, heads, device=query.device)
    # limits first (int32 token counts, the mask limit): choosing tiles analyses the row-major mask
    check_mask_limit(MaskSpec.create(patterns, num_extra_q=extra_q, num_extra_kv=extra_kv))
    grads = grad and (has_score_mod or any(t is not None and t.requires_grad
                                           for t in (query, key, value, ak, av, aq, rpb)))
    def make_spec(block: tuple[int, int] | None, chosen: str) -> MaskSpec:
        q_tile, kv_tile = resolve_tiles(tiles, patterns, has_score_mod, chosen, block)
        return MaskSpec.create(patterns, q_tile=q_tile, kv_tile=kv_tile, block_size=block,
                               num_extra_q=extra_q, num_extra_kv=extra_kv)

    spec, backend = choose_backend(make_spec, options[3], query.device, grads, batch, heads,
                                   options[2] is not None, grads and rpb is not None and rpb.requires_grad)
    return _make_plan(spec, TokenLayout(shape, spec.q_tile), TokenLayout(shape, spec.kv_tile), query.device,
                      rpb is not None, query.device.type == "cpu" and (return_lse or grads), backend)


plans.register("na", _na_plan)


def tiled_neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: TokenLayout,
    kernel_size: IntOrTuple | PerHead,
    stride: IntOrTuple | PerHead = 1,
    dilation: IntOrTuple | PerHead = 1,
    is_causal: BoolOrTuple | PerHead = False,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    num_extra_tokens: int = 0,
    rel_pos_bias: torch.Tensor | None = None,
    score_mod: ScoreModArg = None,
    backend: Backend = "auto",
    check_finite: bool = False,
    _store: plans.PlanStore | None = None,
) -> Any:
    """Neighborhood attention on sequences already in ``layout``'s token order.

    For models that stay tiled across layers: ``x = layout.to_tokens(x)`` once at the
    input (``layout`` from :func:`flexna.choose_layout`), every attention layer calls this
    with ``query``/``key``/``value`` ``[batch, layout.length, heads, head_dim]`` (no permute),
    and ``layout.from_tokens`` once at the output. Returns ``[batch, layout.length, heads,
    value_dim]`` (and the lse ``[batch, layout.length, heads]`` with ``return_lse``). Padded
    positions are never attended; their output is 0 (without additional keys, which every
    query row attends, padded ones included). Pattern arguments may be
    :class:`flexna.PerHead`; ``additional_keys``/``additional_values`` ``[batch, M, kv_heads,
    dim]`` are extra keys every query attends. ``num_extra_tokens`` ``M``: the sequences are
    joint ones, ``[batch, layout.length + M, heads, dim]``, whose last ``M`` rows are extra
    tokens (text, registers; FLUX-style joint attention with the text last): every layout query
    attends their keys, their queries attend every key, and the output has all ``layout.length
    + M`` rows (one fused call, no concatenation or split of the inputs). ``backend`` and
    ``check_finite`` as in :func:`neighborhood_attention`.
    """
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a flexna.TokenLayout, got {type(layout).__name__}")
    plan = plans.plan_for(tiled_signature(
        query, key, value, layout, kernel_size, stride, dilation, is_causal, scale, return_lse,
        additional_keys=additional_keys, additional_values=additional_values,
        num_extra_tokens=num_extra_tokens, rel_pos_bias=rel_pos_bias, score_mod=score_mod, backend=backend,
        _store=_store), _store)
    check_finite_inputs(check_finite, (("query", query), ("key", key), ("value", value),
                                       ("additional_keys", additional_keys),
                                       ("additional_values", additional_values),
                                       ("rel_pos_bias", rel_pos_bias)))

    def seq(t: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        return (t if extra is None else torch.cat([t, extra], dim=1)).transpose(1, 2)

    out = attend(query.transpose(1, 2), seq(key, additional_keys), seq(value, additional_values), plan,
                 scale, return_lse, rel_pos_bias, score_mod)
    if return_lse:
        return out[0].transpose(1, 2), out[1].transpose(1, 2)
    return out.transpose(1, 2)


def tiled_signature(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: TokenLayout,
                    kernel_size: object, stride: object = 1, dilation: object = 1, is_causal: object = False,
                    scale: object = None, return_lse: object = False, *,
                    additional_keys: torch.Tensor | None = None,
                    additional_values: torch.Tensor | None = None, num_extra_tokens: int = 0,
                    rel_pos_bias: torch.Tensor | None = None, score_mod: object = None,
                    backend: object = "auto", _store: plans.PlanStore | None = None) -> tuple:
    """The signature (:mod:`flexna.plan`) of a :func:`tiled_neighborhood_attention` call."""
    sig = plans.tensor_signature
    return ("tiled", sig(query), sig(key), sig(value), sig(additional_keys), sig(additional_values),
            sig(rel_pos_bias), layout.shape, layout.tile,
            *_pattern_consts(kernel_size, stride, dilation, is_causal, _store),
            _options(scale, return_lse, score_mod, backend, _store), torch.is_grad_enabled(), num_extra_tokens)


def _tiled_plan(signature: tuple) -> CallPlan:
    """Validate a :func:`tiled_neighborhood_attention` call from its signature and plan it."""
    (_, q_s, k_s, v_s, ak_s, av_s, rpb_s, shape, tile, kernel_size, stride, dilation, is_causal,
     options, grad, joint) = signature
    _check_options(options)
    if isinstance(joint, bool) or not isinstance(joint, int) or joint < 0:
        raise ValueError(f"num_extra_tokens = {joint!r} is out of range: need an int >= 0")
    return_lse = options[1]
    layout = TokenLayout(shape, tile)
    query, key, value, ak, av = (TensorMeta.of(n, s) for n, s in zip(
        ("query", "key", "value", "additional_keys", "additional_values"),
        (q_s, k_s, v_s, ak_s, av_s), strict=True))
    rpb = _rpb_meta(rpb_s)
    assert query is not None and key is not None and value is not None
    _check_sequences(query, key, value, layout.length + joint,
                     f" (layout {layout.shape} in tile {layout.tile} order"
                     f"{f', then {joint} extra tokens' if joint else ''})")
    batch, heads, kv_heads = query.shape[0], query.shape[2], key.shape[2]
    if (ak is None) != (av is None):
        raise ValueError("additional_keys and additional_values must be given together")
    extra_kv = _check_extra("additional_keys", ak, batch, kv_heads, key.shape[-1], key, "key")
    _check_extra("additional_values", av, batch, kv_heads, value.shape[-1], value, "value")
    patterns = head_patterns(layout.shape, _unconst(kernel_size), _unconst(stride), _unconst(dilation),
                             _unconst(is_causal), num_heads=heads)
    if rpb is not None:
        check_rpb(rpb, patterns, heads, device=query.device)
    grads = grad and (options[2] is not None or any(t is not None and t.requires_grad
                                                    for t in (query, key, value, ak, av, rpb)))
    spec, backend = choose_backend(lambda block, _chosen: MaskSpec.create(
        patterns, q_tile=layout.tile, kv_tile=layout.tile, block_size=block, num_extra_q=joint,
        num_extra_kv=joint + extra_kv),
        options[3], query.device, grads, batch, heads, options[2] is not None,
        grads and rpb is not None and rpb.requires_grad)
    return _make_plan(spec, layout, layout, query.device, rpb is not None,
                      query.device.type == "cpu" and (return_lse or grads), backend)


plans.register("tiled", _tiled_plan)


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
    shapes: Sequence[Sequence[int]],
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple = False,
    scale: float | None = None,
    *,
    block_size: int = 128,
    rel_pos_bias: torch.Tensor | None = None,
    score_mod: ScoreModArg = None,
    backend: Backend = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """Neighborhood attention over several layouts packed in one sequence (variable resolution).

    ``query`` ``[batch, L, heads, dim]`` with ``L = flexna.packed_length(shapes, block_size)``
    (build it with :func:`flexna.pack_tokens`); ``key``/``value`` likewise (fewer heads:
    GQA). Each sample attends only within its own layout; padding outputs are 0.
    ``rel_pos_bias`` ``[heads, *flexna.rpb_table_shape(kernel_size, stride, is_causal)]``: one
    table for all samples, each sample's tokens indexing it with their own layout's
    coordinates; ``score_mod`` is applied after it (indices in the packed sequence).
    Returns ``[batch, L, heads, value_dim]`` (split it with :func:`flexna.unpack_tokens`).
    ``backend`` as in :func:`neighborhood_attention` (FLASH on Blackwell needs ``block_size``
    a multiple of 256); ``check_finite``: as in :func:`neighborhood_attention`.
    """
    sig = plans.tensor_signature
    plan = plans.plan_for(("packed", sig(query), sig(key), sig(value), sig(rel_pos_bias),
                           _const(shapes), _const(kernel_size), _const(stride), _const(dilation),
                           _const(is_causal), block_size, _options(scale, False, score_mod, backend),
                           torch.is_grad_enabled()))
    check_finite_inputs(check_finite, (("query", query), ("key", key), ("value", value),
                                       ("rel_pos_bias", rel_pos_bias)))
    out = attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), plan, scale, False,
                 rel_pos_bias, score_mod)
    return out.transpose(1, 2)


def _packed_plan(signature: tuple) -> CallPlan:
    """Validate a :func:`packed_neighborhood_attention` call from its signature and plan it."""
    from flexna.packing import as_block, packed_patterns, packed_spec

    (_, q_s, k_s, v_s, rpb_s, shapes, kernel_size, stride, dilation, is_causal, block_size, options,
     grad) = signature
    _check_options(options)
    query, key, value = (TensorMeta.of(n, s) for n, s in zip(
        ("query", "key", "value"), (q_s, k_s, v_s), strict=True))
    rpb = _rpb_meta(rpb_s)
    assert query is not None and key is not None and value is not None
    patterns = packed_patterns(shapes, kernel_size, stride, dilation, is_causal)
    block = as_block(block_size)
    spec = packed_spec(patterns, block)
    _check_sequences(query, key, value, spec.q_len, f": layouts {[p.shape for p in patterns]} packed in "
                     f"blocks of {block} add up to {spec.q_len} tokens")
    if query.device.type == "cuda" and block % DEFAULT_BLOCK:
        raise ValueError(
            f"block_size = {block}: on CUDA the packed samples' blocks must be a multiple of "
            f"{DEFAULT_BLOCK} tokens (compiled FlexAttention needs BlockMask blocks divisible by its "
            f"kernel tiles, up to 128 x 64); use block_size={DEFAULT_BLOCK} (the default)"
        )
    if rpb is not None:
        check_rpb(rpb, patterns[0], query.shape[2], device=query.device)
    ones = TokenLayout(patterns[0].shape, (1,) * patterns[0].ndim)
    grads = grad and (options[2] is not None or any(t is not None and t.requires_grad
                                                    for t in (query, key, value, rpb)))

    def make_spec(blocks: tuple[int, int] | None, _chosen: str) -> MaskSpec:
        if blocks is not None and block % blocks[0]:
            raise BackendError(f"backend='flash' on this GPU runs {blocks[0]}-token query blocks; "
                               f"block_size = {block} is not a multiple: use block_size={blocks[0]}")
        return spec

    spec, backend = choose_backend(make_spec, options[3], query.device, grads, query.shape[0], query.shape[2],
                                   options[2] is not None, grads and rpb is not None and rpb.requires_grad)
    return _make_plan(spec, ones, ones, query.device, rpb is not None, query.device.type == "cpu" and grads,
                      backend)


plans.register("packed", _packed_plan)
