"""``nn.Module``s with NATTEN's interface and state_dict keys.

``NeighborhoodAttention{1,2,3}D(embed_dim, num_heads, kernel_size, ...)`` take
``x`` ``[batch, *spatial, embed_dim]``: a ``qkv`` Linear, neighborhood attention,
a ``proj`` Linear. Keys ``qkv.weight``, ``qkv.bias``, ``proj.weight``,
``proj.bias`` as in NATTEN >= 0.20, plus ``rpb`` ``[heads, *table]`` with
``rel_pos_bias=True`` as in NAT/DiNAT checkpoints (older NATTEN).

``attn_drop`` (dropout on attention probabilities) cannot be expressed in
FlexAttention (a score_mod acts before the softmax, and the fused kernel never
materialises the probabilities); ``attn_drop > 0`` raises. NATTEN >= 0.20's modules
have no ``attn_drop`` argument at all for the same reason (their fused kernels have
no attention dropout); both offer ``proj_drop``, dropout on the output projection.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from flexna.backends import Backend, check_backend
from flexna.functional import (
    PATTERN_ARGS,
    module_constants,
    na_signature,
    neighborhood_attention,
    tiled_neighborhood_attention,
    tiled_signature,
)
from flexna.layout import TokenLayout
from flexna.pattern import BoolOrTuple, IntOrTuple, PerHead, as_bool_tuple, as_int_tuple
from flexna.plan import PlanStore, tensor_signature
from flexna.scores import common_table_shape, rpb_table_shape

# The pattern arguments of a module's call: read from its plan store (``_store``), not passed.
_IN_STORE: Any = None


class _PatternArg:
    """A module's settable pattern argument (``kernel_size``, ``stride``, ``dilation``,
    ``is_causal``): per axis, or a :class:`flexna.PerHead`. Setting it validates the value and
    re-plans the module's traced calls (see :meth:`NeighborhoodAttentionGeneric._set_pattern`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, module: Any, owner: type | None = None) -> Any:
        return self if module is None else module._pattern[self.name]

    def __set__(self, module: Any, value: Any) -> None:
        module._set_pattern(self.name, value)


class NeighborhoodAttentionGeneric(nn.Module):
    """NATTEN-compatible neighborhood attention module over ``na_dim`` spatial axes.

    ``kernel_size``/``stride``/``dilation``/``is_causal`` may be :class:`flexna.PerHead`
    (per-head patterns; with ``rel_pos_bias`` every head must give the same table shape,
    e.g. per-head dilation only). ``num_kv_heads`` (default ``num_heads``)
    gives GQA/MQA: ``qkv`` then outputs ``(num_heads + 2 * num_kv_heads) * head_dim``.
    ``backend``: the CUDA kernels, as in :func:`flexna.neighborhood_attention` (``"auto"``:
    FLASH for large forward-only calls where flash-attn-4 is installed, else Triton).
    ``check_finite=True`` (attribute ``check_finite``, settable later): every forward raises
    ``ValueError`` naming q, k, v or the bias if one holds a NaN or an infinity (a host sync;
    off by default, see :func:`flexna.neighborhood_attention`).

    ``kernel_size``, ``stride``, ``dilation`` and ``is_causal`` are settable attributes: a new
    value is validated against every input shape the module has been compiled for (a bad one
    raises and changes nothing) and a compiled model runs it on its next call without
    recompiling, unless the plan's structure changes (other tiles or block sizes). With
    ``rel_pos_bias=True`` the rpb table's shape must stay the same.

    Example::

        layer = flexna.NeighborhoodAttention2D(64, 4, 7, dilation=2)
        y = torch.compile(layer)(torch.randn(1, 32, 32, 64))
        layer.kernel_size = 5  # the compiled layer runs 5x5 windows next, with no recompile
    """

    def __init__(self, na_dim: int, embed_dim: int, num_heads: int, kernel_size: IntOrTuple | PerHead,
                 stride: IntOrTuple | PerHead = 1, dilation: IntOrTuple | PerHead = 1,
                 is_causal: BoolOrTuple | PerHead = False, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rel_pos_bias: bool = False, num_kv_heads: int | None = None, *,
                 backend: Backend = "auto", check_finite: bool = False) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {type(check_finite).__name__}")
        self.check_finite = check_finite
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if attn_drop:
            raise ValueError(
                f"attn_drop={attn_drop}: dropout on attention probabilities cannot be expressed "
                "in FlexAttention (score_mods act before the softmax; the fused kernel never "
                "materialises the probabilities), and NATTEN >= 0.20's modules have no attn_drop "
                "either. Use attn_drop=0.0, and proj_drop for dropout after the output projection"
            )

        self.na_dim, self.embed_dim, self.num_heads = na_dim, embed_dim, num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        args = dict(zip(PATTERN_ARGS, (kernel_size, stride, dilation, is_causal), strict=True))
        self._pattern = {name: self._normalized(name, value) for name, value in args.items()}
        self.scale = self.head_dim ** -0.5 if qk_scale is None else qk_scale
        self._plans = PlanStore(module_constants(self.scale, self._pattern))
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *self._rpb_table(self._pattern)))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)

    def forward(self, x: torch.Tensor, additional_keys: torch.Tensor | None = None,
                additional_values: torch.Tensor | None = None, *,
                layout: TokenLayout | None = None) -> torch.Tensor:
        """``x`` ``[batch, *spatial, embed_dim]`` -> same shape.

        ``additional_keys``/``additional_values`` ``[batch, M, num_kv_heads, head_dim]``:
        extra tokens every query attends (already projected).
        ``layout``: ``x`` is ``[batch, layout.length, embed_dim]``, a sequence already in
        ``layout``'s token order (a model that stays tiled: :func:`flexna.choose_layout`,
        ``layout.to_tokens`` once at its input); the output is in the same order.
        """
        if layout is not None:
            return self._forward_in_layout(x, layout, additional_keys, additional_values)
        if x.dim() != self.na_dim + 2:
            raise ValueError(f"{type(self).__name__} expects x [batch, {self.na_dim} spatial axes, "
                             f"embed_dim], got {tuple(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x has embed dim {x.shape[-1]}, expected {self.embed_dim}")
        out = neighborhood_attention(*self._project(x), _IN_STORE,
                                     **self._call_kwargs(additional_keys, additional_values),
                                     check_finite=self.check_finite)
        return self.proj_drop(self.proj(out.flatten(-2)))

    def _call_kwargs(self, additional_keys: torch.Tensor | None,
                     additional_values: torch.Tensor | None) -> dict[str, Any]:
        """The functional call's arguments besides q, k, v (and the layout). The pattern is not
        among them: it comes from the plan store, so compiled graphs do not guard on it."""
        return {"scale": self.scale, "rel_pos_bias": self.rpb, "additional_keys": additional_keys,
                "additional_values": additional_values, "backend": self.backend, "_store": self._plans}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_compiled_call_impl", None) is not None and not torch.compiler.is_compiling():
            with contextlib.suppress(Exception):  # bad input: forward raises its own, clearer error
                self._plan_ahead(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def _plan_ahead(self, x: torch.Tensor, additional_keys: torch.Tensor | None = None,
                    additional_values: torch.Tensor | None = None, *,
                    layout: TokenLayout | None = None) -> None:
        """Regional compilation (``module.compile()``): plan this call into the store before the
        compiled forward's guards read it, so that every layer of this class shares one
        compiled graph per structure instead of recompiling at each layer's first call. The
        q/k/v signatures come from the projection run on fake tensors (autocast and grad mode
        included), memoised per input signature. Errors are the caller's to drop: bad input is
        left to the forward's own checks."""
        sig = tensor_signature
        autocast = (torch.is_autocast_enabled(x.device.type) and
                    torch.get_autocast_dtype(x.device.type)) if isinstance(x, torch.Tensor) else None
        key = (sig(x), sig(additional_keys), sig(additional_values), layout, torch.is_grad_enabled(),
               autocast, self.rpb is not None and self.rpb.requires_grad)
        if key in self._plans.ahead:
            return
        with FakeTensorMode(allow_non_fake_inputs=True):
            q, k, v = self._project(x)
        kwargs = self._call_kwargs(additional_keys, additional_values)
        if layout is None:
            signature = na_signature(q, k, v, _IN_STORE, **kwargs)
        else:
            signature = tiled_signature(q, k, v, layout, _IN_STORE, **kwargs)
        self._plans.trace(signature)
        if len(self._plans.ahead) < 64:  # bounded: a memo of input signatures, not of masks
            self._plans.ahead.add(key)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[..., embed_dim]`` -> q ``[..., heads, head_dim]``, k / v ``[..., kv_heads, head_dim]``
        (the qkv weight holds q, k, v one after another: NATTEN's layout)."""
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        return q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))

    def _forward_in_layout(self, x: torch.Tensor, layout: TokenLayout,
                           additional_keys: torch.Tensor | None,
                           additional_values: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(layout, TokenLayout):
            raise TypeError(f"layout must be a flexna.TokenLayout, got {type(layout).__name__}")
        if len(layout.shape) != self.na_dim:
            raise ValueError(f"layout has {len(layout.shape)} axes, {type(self).__name__} needs "
                             f"{self.na_dim}: got layout shape {layout.shape}")
        if x.dim() != 3 or x.shape[1] != layout.length or x.shape[2] != self.embed_dim:
            raise ValueError(f"with layout={layout}, x must be [batch, {layout.length}, "
                             f"{self.embed_dim}], got {tuple(x.shape)}")
        out = tiled_neighborhood_attention(*self._project(x), layout, _IN_STORE,
                                           **self._call_kwargs(additional_keys, additional_values),
                                           check_finite=self.check_finite)
        return self.proj_drop(self.proj(out.flatten(-2)))

    # The pattern arguments: settable after construction. Setting one re-plans the calls this
    # module has traced (torch.compile) in its plan store: their compiled graphs run the new
    # pattern without recompiling unless the plan's structure changes (tiles, block sizes).

    kernel_size = _PatternArg()
    stride = _PatternArg()
    dilation = _PatternArg()
    is_causal = _PatternArg()

    def _normalized(self, name: str, value: Any) -> Any:
        """A pattern argument per axis (or a :class:`PerHead` of one entry per head)."""
        if isinstance(value, PerHead):
            if len(value) != self.num_heads:
                raise ValueError(f"{name}: PerHead has {len(value)} entries, need one per "
                                 f"query head ({self.num_heads})")
            return value
        return (as_bool_tuple if name == "is_causal" else as_int_tuple)(name, value, self.na_dim)

    def _rpb_table(self, pattern: dict[str, Any]) -> tuple[int, ...]:
        """The rpb table shape of ``pattern`` (every head's must agree)."""
        def head(value: Any, h: int) -> Any:
            return value.values[h] if isinstance(value, PerHead) else value

        return common_table_shape(
            [rpb_table_shape(head(pattern["kernel_size"], h), head(pattern["stride"], h),
                             head(pattern["is_causal"], h), self.na_dim) for h in range(self.num_heads)],
            "rel_pos_bias=True")

    def _set_pattern(self, name: str, value: Any) -> None:
        """Validate the new value, re-plan the traced calls (all or nothing), then take it."""
        if "_pattern" not in self.__dict__:
            raise AttributeError(f"{name} is set by the constructor")
        pattern = {**self._pattern, name: self._normalized(name, value)}
        if self.rpb is not None and self._rpb_table(pattern) != tuple(self.rpb.shape[1:]):
            raise ValueError(f"{name}={value!r}: the rel_pos_bias table would change shape from "
                             f"{tuple(self.rpb.shape[1:])} to {self._rpb_table(pattern)}; build a new "
                             "module (and table) for that pattern")
        self._plans.set_pattern(module_constants(self.scale, pattern))
        self._pattern = pattern

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}, backend={self.backend!r}")


class NeighborhoodAttention1D(NeighborhoodAttentionGeneric):
    """1-D: ``x`` ``[batch, L, embed_dim]``; arguments and settable pattern attributes as in
    :class:`NeighborhoodAttentionGeneric`."""

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple | PerHead,
                 stride: IntOrTuple | PerHead = 1, dilation: IntOrTuple | PerHead = 1,
                 is_causal: BoolOrTuple | PerHead = False, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rel_pos_bias: bool = False, num_kv_heads: int | None = None, *,
                 backend: Backend = "auto", check_finite: bool = False) -> None:
        super().__init__(1, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias,
                         qk_scale, attn_drop, proj_drop, rel_pos_bias, num_kv_heads, backend=backend,
                         check_finite=check_finite)


class NeighborhoodAttention2D(NeighborhoodAttentionGeneric):
    """2-D: ``x`` ``[batch, H, W, embed_dim]``; arguments and settable pattern attributes as in
    :class:`NeighborhoodAttentionGeneric`."""

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple | PerHead,
                 stride: IntOrTuple | PerHead = 1, dilation: IntOrTuple | PerHead = 1,
                 is_causal: BoolOrTuple | PerHead = False, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rel_pos_bias: bool = False, num_kv_heads: int | None = None, *,
                 backend: Backend = "auto", check_finite: bool = False) -> None:
        super().__init__(2, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias,
                         qk_scale, attn_drop, proj_drop, rel_pos_bias, num_kv_heads, backend=backend,
                         check_finite=check_finite)


class NeighborhoodAttention3D(NeighborhoodAttentionGeneric):
    """3-D: ``x`` ``[batch, T, H, W, embed_dim]``; arguments and settable pattern attributes as in
    :class:`NeighborhoodAttentionGeneric`."""

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple | PerHead,
                 stride: IntOrTuple | PerHead = 1, dilation: IntOrTuple | PerHead = 1,
                 is_causal: BoolOrTuple | PerHead = False, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rel_pos_bias: bool = False, num_kv_heads: int | None = None, *,
                 backend: Backend = "auto", check_finite: bool = False) -> None:
        super().__init__(3, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias,
                         qk_scale, attn_drop, proj_drop, rel_pos_bias, num_kv_heads, backend=backend,
                         check_finite=check_finite)
