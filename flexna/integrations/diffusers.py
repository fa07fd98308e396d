"""Neighborhood attention in diffusers transformers: one call, no model code changed.

``apply_neighborhood_attention(transformer, config)`` installs flexna attention processors in a
``FluxTransformer2DModel``, ``HunyuanVideoTransformer3DModel`` or ``WanTransformer3DModel``;
``remove_neighborhood_attention(transformer)`` puts the stock processors back. The processors
keep the stock processor's projections, norms, rotary embeddings and output projections as they
are and replace only the attention core by **one** :func:`flexna.neighborhood_attention` call
(one cached BlockMask per pattern and token grid):

* the image / video tokens get the neighborhood pattern on their token grid;
* text tokens are additional keys and values for every image/video query, and text queries
  attend everything (FLUX: 512 text tokens first, joint attention; HunyuanVideo: text last, its
  padding mask respected); Wan's self-attention has no text tokens (text enters through its
  cross-attention, which stays as it is).

The token grid comes from the model's inputs (FLUX: ``img_ids``; HunyuanVideo and Wan: the
latents' shape and the patch size), or ``grid=`` gives it; a mismatch is a ``ValueError``.
``config`` is anything :meth:`flexna.integrations.config.SparsityConfig.create` takes: one
pattern for all layers, a per-layer list in the NATTEN / Cosmos format, dense layers, and dense
steps. Layers are numbered in execution order (FLUX: the 19 double-stream blocks, then the 38
single-stream blocks).

Needs ``diffusers`` (``pip install "flexna[diffusers]"``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from diffusers.models.embeddings import apply_rotary_emb  # type: ignore[import-untyped]
from diffusers.models.transformers import transformer_flux, transformer_wan  # type: ignore[import-untyped]
from diffusers.models.transformers.transformer_hunyuan_video import (  # type: ignore[import-untyped]
    HunyuanVideoAttnProcessor2_0,
    HunyuanVideoTransformer3DModel,
)

from flexna.analysis import choose_tiles
from flexna.functional import neighborhood_attention, tiled_neighborhood_attention
from flexna.integrations.config import Resolved, SparsityConfig
from flexna.layout import TokenLayout
from flexna.pattern import NAPattern

__all__ = ["apply_neighborhood_attention", "remove_neighborhood_attention", "set_denoising_step"]

STATE_ATTR = "_flexna_state"


# --------------------------------------------------------------------------- the attention core
@dataclass(frozen=True)
class LayerPlan:
    """One layer's pattern on the current grid, and the token order its padded-text calls run in."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    tiles: tuple[tuple[int, ...], tuple[int, ...]] | None  # the tiles its calls run in (None: row-major)
    kv_layout_len: int  # keys before the text keys in that order (layout tokens and padding)

    @classmethod
    def create(cls, grid: tuple[int, ...], resolved: Resolved) -> LayerPlan:
        kernel, stride, dilation, causal = resolved
        # fixed per model and grid, so tiles that pad the grid are fine (no recompiles): Wan's
        # 21 x 45 x 80 has no 128-token tile that divides it
        tiles = choose_tiles(NAPattern.create(grid, kernel, stride, dilation, causal), padding=True)
        kv_len = TokenLayout(grid, tiles[1]).length if tiles else math.prod(grid)
        return cls(kernel, stride, dilation, causal, tiles, kv_len)


def _common_layout(grid: tuple[int, ...], plans: Sequence[LayerPlan | None]) -> TokenLayout | None:
    """The one token order a transformer that stays tiled keeps for all its layers on ``grid``:
    the same 128-token tile for queries and keys, chosen for the pattern most layers run
    (:func:`flexna.analysis.choose_tiles`; tiles that divide the grid, so the token count is
    the model's). ``None`` when no such tile pays or every layer is dense: then each layer runs
    in its own (possibly padded) tiles, permuting per call."""
    patterns = [(p.kernel_size, p.stride, p.dilation, p.is_causal) for p in plans if p is not None]
    if not patterns:
        return None
    common = max(patterns, key=patterns.count)  # ties: the earliest layer's
    tiles = choose_tiles(NAPattern.create(grid, *common), same_tile=True)
    layout = None if tiles is None else TokenLayout.create(grid, tiles[0])
    return layout if layout is not None and layout.length == math.prod(grid) else None


def joint_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: tuple[int, ...],
                    plan: LayerPlan, *, text_len: int, text_first: bool,
                    text_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over ``[B, N, heads, D]`` sequences of ``prod(grid)`` layout tokens (row-major)
    and ``text_len`` text tokens (first or last): the layout's queries see their neighborhood and
    every text token, text queries see everything; one :func:`flexna.neighborhood_attention` call.

    ``text_valid`` ``[B, text_len]`` bool: text keys to attend (a padding mask; ``None``: all).
    Returns ``[B, N, heads, D]`` in the input's token order.
    """
    n = math.prod(grid)
    if query.shape[1] != n + text_len:
        raise ValueError(f"the attention layer got {query.shape[1]} tokens, but the token grid {grid} "
                         f"has {n} and there are {text_len} text tokens: the grid does not match")
    img = slice(text_len, None) if text_first else slice(0, n)
    txt = slice(0, text_len) if text_first else slice(n, None)

    def layout(t: torch.Tensor) -> torch.Tensor:
        return t[:, img].unflatten(1, grid)

    extra: dict[str, Any] = {}
    if text_len:
        extra = {"additional_keys": key[:, txt], "additional_values": value[:, txt],
                 "additional_queries": query[:, txt]}
    if text_valid is not None:  # it sees the indices of the order the call runs in: plan.tiles
        extra["score_mod"] = _text_padding_score_mod(text_valid, plan.kv_layout_len)
    result = neighborhood_attention(layout(query), layout(key), layout(value), plan.kernel_size,
                                    plan.stride, plan.dilation, plan.is_causal, tiles=plan.tiles, **extra)
    out, text_out = result if text_len else (result, None)
    out = out.flatten(1, len(grid))
    if text_out is None:
        return out
    return torch.cat([text_out, out] if text_first else [out, text_out], dim=1)


def _text_padding_score_mod(text_valid: torch.Tensor, offset: int) -> Callable[..., torch.Tensor]:
    """A score_mod masking the text keys ``j`` (sequence index ``offset + j``) where
    ``text_valid[b, j]`` is False."""
    width = text_valid.shape[1]  # read at where-guarded indices: no clamp (FLASH lowers none)

    def text_padding(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                     kv_idx: torch.Tensor) -> torch.Tensor:
        j = kv_idx - offset
        j = torch.where((j >= 0) & (j < width), j, 0)
        keep = (kv_idx < offset) | text_valid[b, j]
        return torch.where(keep, score, -float("inf"))

    return text_padding


# --------------------------------------------------------------------------- per-model state
@dataclass
class State:
    """What a transformer's flexna processors share: the config, the grid of this forward, the
    denoising step and the layers' plans (set eagerly by the transformer's forward pre-hook)."""

    family: Family
    config: SparsityConfig
    num_layers: int
    given_grid: tuple[int, ...] | None
    grid: tuple[int, ...] | None = None
    calls: int = 0
    dense_now: bool = False
    plans: tuple[LayerPlan | None, ...] = ()
    layout: TokenLayout | None = None  # the token order a model that stays tiled runs in (FLUX)
    permuted: bool = False  # this forward's inputs were moved into ``layout`` (its output goes back)
    stock: list[tuple[Any, Any]] = field(default_factory=list)  # (attention module, stock processor)
    hooks: list[Any] = field(default_factory=list)
    _plans_by_grid: dict[tuple[int, ...], tuple[LayerPlan | None, ...]] = field(default_factory=dict)
    _layouts: dict[tuple[int, ...], TokenLayout | None] = field(default_factory=dict)
    _ids_key: tuple | None = None
    _ids_grid: tuple[int, ...] | None = None

    def set_grid(self, grid: tuple[int, ...]) -> None:
        if grid not in self._plans_by_grid:
            plans: list[LayerPlan | None] = []
            for i in range(self.num_layers):
                pattern = self.config.layer(i)
                if pattern is None:
                    plans.append(None)
                    continue
                try:
                    plans.append(LayerPlan.create(grid, pattern.resolve(grid)))
                except ValueError as exc:
                    raise ValueError(f"{self.family.name} layer {i} on the token grid {grid}: {exc}") from None
            self._plans_by_grid[grid] = tuple(plans)
            self._layouts[grid] = _common_layout(grid, plans) if self.family.reorder is not None else None
        self.grid, self.plans, self.layout = grid, self._plans_by_grid[grid], self._layouts[grid]

    def step(self) -> int:
        return self.calls // self.config.calls_per_step

    def plan(self, layer: int) -> LayerPlan | None:
        """Layer ``layer``'s plan for this forward, ``None`` when it runs dense."""
        if self.grid is None:
            raise RuntimeError("flexna attention was called outside the transformer's forward (the token "
                               "grid is unknown): call the transformer, or pass grid= to "
                               "apply_neighborhood_attention")
        return None if self.dense_now else self.plans[layer]


class Processor:
    """Base of the flexna processors: layer ``layer`` of a transformer sharing ``state``; the stock
    processor it replaced runs the dense layers and steps."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, state: State, layer: int, stock: Any) -> None:
        self.state, self.layer, self.stock = state, layer, stock

    def attend(self, plan: LayerPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text: int,
               text_valid: torch.Tensor | None = None) -> torch.Tensor:
        """The attention core on joint ``[B, N + text, heads, D]`` sequences, text last, image /
        video tokens in the model's current order: one fused call. A model that stays tiled
        (``state.layout``) runs :func:`flexna.tiled_neighborhood_attention` with no permute;
        otherwise :func:`joint_attention` moves the tokens into the layer's own tiles and back."""
        layout, grid = self.state.layout, self.state.grid
        assert grid is not None
        if layout is None:
            return joint_attention(query, key, value, grid, plan, text_len=text, text_first=False,
                                   text_valid=text_valid)
        if query.shape[1] != layout.length + text:
            raise ValueError(f"the attention layer got {query.shape[1]} tokens, but the token grid {grid} "
                             f"has {layout.length} and there are {text} text tokens: the grid does not match")
        mod = None if text_valid is None else _text_padding_score_mod(text_valid, layout.length)
        return tiled_neighborhood_attention(query, key, value, layout, plan.kernel_size, plan.stride,
                                            plan.dilation, plan.is_causal, num_extra_tokens=text, score_mod=mod)


def _rotary(x: torch.Tensor, freqs: Any) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` on ``[B, N, heads, D]`` (as the stock processors call it)."""
    return cast(torch.Tensor, apply_rotary_emb(x, freqs, sequence_dim=1))


class FluxNAAttnProcessor(Processor):
    """``FluxAttnProcessor`` with flexna's attention core (joint attention with the text tokens).

    Where the transformer stays in one token order (its inputs reordered once per forward, see
    :func:`apply_neighborhood_attention`), each layer is one
    :func:`flexna.tiled_neighborhood_attention` call on the joint sequence ``[image tokens in
    that order, text tokens]``: no permute per layer. Rotary embeddings are applied to the image
    and text parts with their own rows of the model's (already reordered) frequencies, exactly
    as the stock processor applies them to the text-first sequence.
    """

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> Any:
        plan = self.state.plan(self.layer)
        if plan is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("flexna's FLUX processor takes no attention_mask (the stock pipelines pass none)")
        grid = self.state.grid
        assert grid is not None
        n = math.prod(grid)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        got = hidden_states.shape[1]
        text = encoder_hidden_states.shape[1] if joint else got - n  # type: ignore[union-attr]
        if (joint and got != n) or text < 0:
            raise ValueError(f"the attention layer got {got} tokens, but the token grid {grid} has {n}: "
                             "the grid does not match")
        query, key, value, encoder_query, encoder_key, encoder_value = transformer_flux._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if joint:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        else:  # single-stream block: the block concatenated [text, image]
            (encoder_query, query), (encoder_key, key), (encoder_value, value) = (
                t.split_with_sizes([text, n], dim=1) for t in (query, key, value))
        if image_rotary_emb is not None:  # rows: text first, then the image tokens (in layout order)
            f_text, f_image = zip(*(f.split_with_sizes([text, n]) for f in image_rotary_emb), strict=True)
            query, key = _rotary(query, f_image), _rotary(key, f_image)
            encoder_query, encoder_key = _rotary(encoder_query, f_text), _rotary(encoder_key, f_text)
        query, key, value = (torch.cat([a, b], dim=1) for a, b in
                             ((query, encoder_query), (key, encoder_key), (value, encoder_value)))
        out = self.attend(plan, query, key, value, text).flatten(2, 3).to(query.dtype)
        image_out, text_out = out[:, :n], out[:, n:]
        if joint:
            image_out = attn.to_out[1](attn.to_out[0](image_out))
            return image_out, attn.to_add_out(text_out)
        return torch.cat([text_out, image_out], dim=1)


class HunyuanVideoNAAttnProcessor(Processor):
    """``HunyuanVideoAttnProcessor2_0`` with flexna's attention core (text last, padding masked)."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> Any:
        plan = self.state.plan(self.layer)
        if plan is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if attn.add_q_proj is None and text_len:
                query = torch.cat([_rotary(query[:, :-text_len], image_rotary_emb), query[:, -text_len:]], 1)
                key = torch.cat([_rotary(key[:, :-text_len], image_rotary_emb), key[:, -text_len:]], 1)
            else:
                query = _rotary(query, image_rotary_emb)
                key = _rotary(key, image_rotary_emb)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)
        hidden_states = self.attend(plan, query, key, value, text_len,
                                    _text_valid(attention_mask, query.shape[1], text_len))
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, :-text_len], hidden_states[:, -text_len:])
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _text_valid(attention_mask: torch.Tensor | None, length: int, text_len: int) -> torch.Tensor | None:
    """HunyuanVideo's ``[B, 1, 1, N]`` bool key mask as ``[B, text_len]`` (the layout's keys are all
    valid in it); ``None`` without a mask or text."""
    if attention_mask is None or not text_len:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1:3] != (1, 1) \
            or attention_mask.shape[-1] != length:
        raise ValueError(f"attention_mask must be HunyuanVideo's [batch, 1, 1, {length}] bool key mask, got "
                         f"{tuple(attention_mask.shape)} {attention_mask.dtype}")
    return attention_mask[:, 0, 0, length - text_len:]


def _wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding, as ``WanAttnProcessor`` applies it."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanNAAttnProcessor(Processor):
    """``WanAttnProcessor`` of a self-attention (``attn1``) with flexna's attention core."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        plan = self.state.plan(self.layer)
        if plan is None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("flexna's Wan processor replaces self-attention only (attn1: no "
                             "encoder_hidden_states, attention_mask or added key/value projections)")
        query, key, value = transformer_wan._get_qkv_projections(attn, hidden_states, None)  # type: ignore[arg-type]
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rotary(query, *rotary_emb)
            key = _wan_rotary(key, *rotary_emb)
        hidden_states = self.attend(plan, query, key, value, 0).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


# --------------------------------------------------------------------------- model families
def _bind(model: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)


def _check_given(model: str, inferred: tuple[int, ...], given: tuple[int, ...] | None, what: str
                 ) -> tuple[int, ...]:
    if given is not None and given != inferred:
        raise ValueError(f"grid = {given} does not match the {model}'s token grid {inferred} ({what})")
    return inferred


def _flux_grid(state: State, model: Any, inputs: dict[str, Any]) -> tuple[int, ...]:
    """FLUX's image token grid from ``img_ids`` (``[N, 3]``: 0, row, column; row-major), checked
    against ``grid=`` when both are there (read once per ``img_ids`` tensor)."""
    n = inputs["hidden_states"].shape[1]
    given = state.given_grid
    if given is not None and math.prod(given) != n:
        raise ValueError(f"grid = {given} holds {math.prod(given)} tokens, but FluxTransformer2DModel got "
                         f"{n} image tokens (hidden_states {tuple(inputs['hidden_states'].shape)})")
    ids = inputs.get("img_ids")
    if ids is None:
        if given is None:
            raise ValueError("FluxTransformer2DModel was called without img_ids: pass grid=(rows, columns) "
                             "to apply_neighborhood_attention")
        return given
    ids = ids[0] if ids.dim() == 3 else ids
    key = (ids.data_ptr(), tuple(ids.shape), ids.device, ids._version)
    if key != state._ids_key or state._ids_grid is None:
        state._ids_key, state._ids_grid = None, _grid_of_ids(ids, n)
        state._ids_key = key
    return _check_given("FluxTransformer2DModel", state._ids_grid, given, "from img_ids")


def _grid_of_ids(ids: torch.Tensor, n: int) -> tuple[int, int]:
    """``(rows, columns)`` of FLUX ``img_ids`` laid out as one row-major grid, else ``ValueError``."""
    if ids.dim() != 2 or tuple(ids.shape) != (n, 3):
        raise ValueError(f"img_ids must be [{n}, 3] for {n} image tokens, got {tuple(ids.shape)}")
    rows, cols = int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1
    idx = torch.arange(n, device=ids.device)
    ok = rows * cols == n and bool(((ids[:, 1] == idx // cols) & (ids[:, 2] == idx % cols)
                                    & (ids[:, 0] == ids[0, 0])).all().item())
    if not ok:
        raise ValueError(f"img_ids do not describe one row-major image grid of {n} tokens (rows 0..{rows - 1}, "
                         f"columns 0..{cols - 1}); other token sets (several images, reference tokens) are "
                         "not supported")
    return rows, cols


def _video_grid(patch: tuple[int, int, int]) -> Callable[[State, Any, dict[str, Any]], tuple[int, ...]]:
    def grid(state: State, model: Any, inputs: dict[str, Any]) -> tuple[int, ...]:
        x = inputs["hidden_states"]
        if x.dim() != 5:
            raise ValueError(f"{type(model).__name__} expects latents [batch, channels, frames, height, "
                             f"width], got {tuple(x.shape)}")
        inferred = tuple(s // p for s, p in zip(x.shape[2:], patch, strict=True))
        return _check_given(type(model).__name__, inferred, state.given_grid,
                            f"latents {tuple(x.shape)}, patch size {patch}")
    return grid


def _to_layout(t: torch.Tensor, layout: TokenLayout, dim: int = 1) -> torch.Tensor:
    """Rows ``dim`` of ``t`` (row-major tokens of ``layout``'s grid) in ``layout``'s order."""
    moved = t.movedim(dim, 0)[None].unflatten(1, layout.shape)
    return layout.to_tokens(moved)[0].movedim(0, dim)


def _from_layout(t: torch.Tensor, layout: TokenLayout, dim: int = 1) -> torch.Tensor:
    """Rows ``dim`` of ``t`` in ``layout``'s order back in row-major order."""
    back = layout.from_tokens(t.movedim(dim, 0)[None])[0].flatten(0, len(layout.shape) - 1)
    return back.movedim(0, dim)


def _output_hook(state: State, dim: int = 1, top_level: bool = False) -> Callable[..., Any]:
    """A forward hook moving a module's token output (a tensor, a tuple's first tensor or a
    ``Transformer2DModelOutput``'s ``sample``) back to row-major order. On a submodule it is
    plain tensor work that dynamo traces into the user's graph (``torch.compiler.disable`` there
    would break the graph); on the compiled model itself (``top_level``) it runs eagerly after
    the compiled forward (traced, it would be a graph of its own)."""
    def hook(module: Any, args: tuple, output: Any) -> Any:
        if not state.permuted:
            return None
        layout = state.layout
        assert layout is not None
        if isinstance(output, torch.Tensor):
            return _from_layout(output, layout, dim)
        if isinstance(output, tuple):
            return (_from_layout(output[0], layout, dim), *output[1:])
        output.sample = _from_layout(output.sample, layout, dim)
        return output
    return torch.compiler.disable(hook) if top_level else hook


def _rows_hook(state: State, dim: int) -> Callable[..., Any]:
    """A forward hook moving a module's token outputs (a tensor or a tuple of them: rotary
    frequencies) into ``state.layout``'s order along ``dim``."""
    def hook(module: Any, args: tuple, output: Any) -> Any:
        if not state.permuted:
            return None
        layout = state.layout
        assert layout is not None
        if isinstance(output, tuple):
            return tuple(_to_layout(t, layout, dim) for t in output)
        return _to_layout(output, layout, dim)
    return hook


def _reorder_flux(model: Any, state: State) -> list[Any]:
    """FLUX stays tiled: its forward's latents, ``img_ids`` (so the rotary embedding follows the
    tokens) and ControlNet residuals move into the layout before the forward, its output back
    after. Everything else FLUX does per image token is token-wise."""
    @torch.compiler.disable
    def inputs_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not state.permuted:
            return None
        layout = state.layout
        assert layout is not None
        out = _bind(module, args, kwargs)
        out["hidden_states"] = _to_layout(out["hidden_states"], layout)
        ids = out.get("img_ids")
        if ids is not None:
            out["img_ids"] = _to_layout(ids, layout, ids.dim() - 2)
        for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
            if out.get(name) is not None:
                out[name] = [_to_layout(t, layout) for t in out[name]]
        return (), out

    return [model.register_forward_pre_hook(inputs_hook, with_kwargs=True),
            model.register_forward_hook(_output_hook(state, top_level=True))]


def _reorder_video(rope_dim: int) -> Callable[[Any, State], list[Any]]:
    """HunyuanVideo / Wan stay tiled: the patch embedding's tokens and the rotary frequencies
    (rows along ``rope_dim``) move into the layout as they are made, ``proj_out``'s tokens back
    before the model unpatchifies them; the blocks between are token-wise but attention (the
    text padding mask is all-true over the video tokens)."""
    def install(model: Any, state: State) -> list[Any]:
        embed = model.x_embedder if hasattr(model, "x_embedder") else model.patch_embedding
        hooks = [model.rope.register_forward_hook(_rows_hook(state, rope_dim)),
                 model.proj_out.register_forward_hook(_output_hook(state))]
        if isinstance(embed, torch.nn.Conv3d):  # Wan: the forward flattens the conv's [B, C, T, H, W]
            hooks.append(embed.register_forward_hook(_conv_tiles_hook(state)))
        else:
            hooks.append(embed.register_forward_hook(_rows_hook(state, 1)))
        return hooks
    return install


def _conv_tiles_hook(state: State) -> Callable[..., Any]:
    """Wan's patch embedding returns ``[B, C, T, H, W]``, which its forward flattens to tokens:
    return a ``[B, C, T/t, H/h, W/w, t, h, w]`` tensor instead, whose flatten is the layout's order."""
    def hook(module: Any, args: tuple, output: torch.Tensor) -> Any:
        if not state.permuted:
            return None
        layout = state.layout
        assert layout is not None
        tiled = output.unflatten(2, (-1, layout.tile[0])).unflatten(4, (-1, layout.tile[1]))
        tiled = tiled.unflatten(6, (-1, layout.tile[2]))  # [B, C, T/t, t, H/h, h, W/w, w]
        return tiled.permute(0, 1, 2, 4, 6, 3, 5, 7).contiguous()
    return hook


@dataclass(frozen=True)
class Family:
    """A supported transformer class: its self-attention modules in execution order, its processor
    and how its token grid is found from a forward's inputs."""

    name: str
    attentions: Callable[[Any], list[Any]]
    stock: type  # the processor flexna's replaces (others, e.g. IP-Adapter's, are refused)
    processor: type[Processor]
    grid: Callable[[Any], Callable[[State, Any, dict[str, Any]], tuple[int, ...]]]
    ndim: int
    # installs the hooks that keep the model in one token order (state.layout) for a forward
    reorder: Callable[[Any, State], list[Any]] | None = None


FAMILIES: dict[type, Family] = {
    transformer_flux.FluxTransformer2DModel: Family(
        "FluxTransformer2DModel",
        lambda m: [b.attn for b in m.transformer_blocks] + [b.attn for b in m.single_transformer_blocks],
        transformer_flux.FluxAttnProcessor, FluxNAAttnProcessor, lambda m: _flux_grid, 2, _reorder_flux),
    HunyuanVideoTransformer3DModel: Family(
        "HunyuanVideoTransformer3DModel",
        lambda m: [b.attn for b in m.transformer_blocks] + [b.attn for b in m.single_transformer_blocks],
        HunyuanVideoAttnProcessor2_0, HunyuanVideoNAAttnProcessor,
        lambda m: _video_grid((m.config.patch_size_t, m.config.patch_size, m.config.patch_size)), 3,
        _reorder_video(0)),
    transformer_wan.WanTransformer3DModel: Family(
        "WanTransformer3DModel", lambda m: [b.attn1 for b in m.blocks], transformer_wan.WanAttnProcessor,
        WanNAAttnProcessor,
        lambda m: _video_grid(tuple(m.config.patch_size)), 3, _reorder_video(1)),
}


def _family(transformer: Any) -> Family:
    for cls, family in FAMILIES.items():
        if isinstance(transformer, cls):
            return family
    known = ", ".join(f.name for f in FAMILIES.values())
    raise TypeError(f"transformer is a {type(transformer).__name__}; flexna's diffusers integration supports "
                    f"{known}")


# --------------------------------------------------------------------------- public calls
def apply_neighborhood_attention(transformer: Any, config: Any, *, grid: Sequence[int] | None = None,
                                 dense_layers: Sequence[int] | None = None, dense_steps: int | None = None,
                                 calls_per_step: int | None = None) -> Any:
    """Install flexna neighborhood attention in ``transformer`` (in place; returns it).

    ``config``: one pattern for all layers (a :class:`~flexna.integrations.config.LayerPattern` or a
    NATTEN / Cosmos dict such as ``{"window_size": (-1, 80, 80), "stride": 16}``), a list with one
    entry per attention layer (``None``: dense), or a model dict / :class:`SparsityConfig` with
    ``layers``/``pattern``, ``dense_layers``, ``dense_steps`` and ``calls_per_step`` (the keyword
    arguments override those). ``grid``: the image / video token grid (rows, columns) or (frames,
    rows, columns); by default inferred from each forward's inputs, and checked against them
    when given. Steps are counted by forward calls (``calls_per_step`` per denoising step); a new
    generation must start with :func:`set_denoising_step` ``(transformer, 0)`` when ``dense_steps``
    is used. Applying again replaces the previous flexna config.
    """
    family = _family(transformer)
    if hasattr(transformer, STATE_ATTR):
        remove_neighborhood_attention(transformer)
    cfg = SparsityConfig.create(config, dense_layers=dense_layers, dense_steps=dense_steps,
                                calls_per_step=calls_per_step)
    attentions = family.attentions(transformer)
    cfg.check(len(attentions), family.name)
    for i, attn in enumerate(attentions):
        if type(attn.processor) is not family.stock:
            raise TypeError(f"{family.name} attention layer {i} runs {type(attn.processor).__name__}; flexna "
                            f"replaces only the stock {family.stock.__name__} (put it back first, e.g. unload "
                            "the adapter that installed this one)")
    given = None
    if grid is not None:
        if isinstance(grid, str) or not isinstance(grid, Sequence) or len(grid) != family.ndim or not all(
                isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid):
            raise ValueError(f"grid = {grid!r} must be {family.ndim} positive ints for {family.name} "
                             f"({'rows, columns' if family.ndim == 2 else 'frames, rows, columns'} of tokens)")
        given = tuple(grid)
    state = State(family, cfg, len(attentions), given)
    if given is not None:
        state.set_grid(given)  # bad windows fail now, not at the first forward
    find_grid = family.grid(transformer)

    @torch.compiler.disable
    def before_forward(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        inputs = _bind(module, args, kwargs)
        state.set_grid(find_grid(state, module, inputs))
        state.dense_now = state.step() < cfg.dense_steps
        state.calls += 1
        layout = state.layout
        state.permuted = layout is not None
        return None

    for i, attn in enumerate(attentions):
        state.stock.append((attn, attn.processor))
        attn.set_processor(family.processor(state, i, attn.processor))
    state.hooks = [transformer.register_forward_pre_hook(before_forward, with_kwargs=True)]
    if family.reorder is not None:
        state.hooks += family.reorder(transformer, state)
    setattr(transformer, STATE_ATTR, state)
    return transformer


def remove_neighborhood_attention(transformer: Any) -> Any:
    """Put back the processors :func:`apply_neighborhood_attention` replaced (returns ``transformer``)."""
    state = getattr(transformer, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(transformer).__name__} has no flexna attention to remove")
    for attn, stock in state.stock:
        attn.set_processor(stock)
    for hook in state.hooks:
        hook.remove()
    delattr(transformer, STATE_ATTR)
    return transformer


def set_denoising_step(transformer: Any, step: int) -> None:
    """Set the denoising step the next forward belongs to (``0``: a new generation starts)."""
    state = getattr(transformer, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(transformer).__name__} has no flexna attention")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step = {step!r} is out of range: need an int >= 0")
    state.calls = step * state.config.calls_per_step
