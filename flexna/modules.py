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

from typing import Any

import torch
from torch import nn

from flexna.backends import Backend, check_backend
from flexna.functional import neighborhood_attention, tiled_neighborhood_attention
from flexna.layout import TokenLayout
from flexna.pattern import BoolOrTuple, IntOrTuple, PerHead, as_bool_tuple, as_int_tuple
from flexna.scores import common_table_shape, rpb_table_shape


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

        def norm(name: str, value: Any, fn) -> Any:
            if isinstance(value, PerHead):
                if len(value) != num_heads:
                    raise ValueError(f"{name}: PerHead has {len(value)} entries, need one per "
                                     f"query head ({num_heads})")
                return value
            return fn(name, value, na_dim)

        self.na_dim, self.embed_dim, self.num_heads = na_dim, embed_dim, num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kernel_size = norm("kernel_size", kernel_size, as_int_tuple)
        self.stride = norm("stride", stride, as_int_tuple)
        self.dilation = norm("dilation", dilation, as_int_tuple)
        self.is_causal = norm("is_causal", is_causal, as_bool_tuple)
        self.scale = self.head_dim ** -0.5 if qk_scale is None else qk_scale
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_bias:
            def head(value: Any, h: int) -> Any:
                return value.values[h] if isinstance(value, PerHead) else value

            table = common_table_shape(
                [rpb_table_shape(head(self.kernel_size, h), head(self.stride, h),
                                 head(self.is_causal, h), na_dim) for h in range(num_heads)],
                "rel_pos_bias=True")
            self.rpb = nn.Parameter(torch.zeros(num_heads, *table))
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
        out = neighborhood_attention(*self._project(x), self.kernel_size, self.stride, self.dilation,
                                     self.is_causal, scale=self.scale, rel_pos_bias=self.rpb,
                                     additional_keys=additional_keys,
                                     additional_values=additional_values, backend=self.backend,
                                     check_finite=self.check_finite)
        return self.proj_drop(self.proj(out.flatten(-2)))

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
        out = tiled_neighborhood_attention(*self._project(x), layout, self.kernel_size, self.stride,
                                           self.dilation, self.is_causal, scale=self.scale,
                                           rel_pos_bias=self.rpb, additional_keys=additional_keys,
                                           additional_values=additional_values, backend=self.backend,
                                           check_finite=self.check_finite)
        return self.proj_drop(self.proj(out.flatten(-2)))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, is_causal={self.is_causal}, "
                f"rel_pos_bias={self.rpb is not None}, backend={self.backend!r}")


class NeighborhoodAttention1D(NeighborhoodAttentionGeneric):
    """1-D: ``x`` ``[batch, L, embed_dim]``."""

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
    """2-D: ``x`` ``[batch, H, W, embed_dim]``."""

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
    """3-D: ``x`` ``[batch, T, H, W, embed_dim]``."""

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple | PerHead,
                 stride: IntOrTuple | PerHead = 1, dilation: IntOrTuple | PerHead = 1,
                 is_causal: BoolOrTuple | PerHead = False, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rel_pos_bias: bool = False, num_kv_heads: int | None = None, *,
                 backend: Backend = "auto", check_finite: bool = False) -> None:
        super().__init__(3, embed_dim, num_heads, kernel_size, stride, dilation, is_causal, qkv_bias,
                         qk_scale, attn_drop, proj_drop, rel_pos_bias, num_kv_heads, backend=backend,
                         check_finite=check_finite)
