"""Porting from NATTEN: both generations' signatures, running on flexna.

* **NATTEN >= 0.20** (``natten.na1d/na2d/na3d``, ``natten.functional``): :func:`na1d`, :func:`na2d`,
  :func:`na3d` take the same arguments in the same order. flexna always runs FlexAttention
  (compiled by flexna, or inside your ``torch.compile``), so NATTEN's kernel-selection
  keywords are accepted where they mean "the default" and rejected with a message otherwise:
  ``backend`` None / ``"flex-fna"`` (flexna's ``backend="auto"``), ``"hopper-fna"`` /
  ``"blackwell-fna"`` (NATTEN's hand-written Hopper / Blackwell kernels: flexna's
  ``backend="flash"``, flash-attn-4's CuTe kernels through Flex), ``"cutlass-fna"`` rejected;
  ``q_tile_shape`` / ``kv_tile_shape`` become flexna's
  ``tiles=`` (128-token tiles); ``torch_compile`` either value (flexna compiles regardless);
  ``attention_kwargs`` None or empty; the backward tiling keywords at their defaults.
  The modules of NATTEN >= 0.20 have flexna's own signature: use ``flexna.NeighborhoodAttention*D``.
* **NATTEN <= 0.17** modules (the NAT / DiNAT checkpoints' era), whose fourth positional argument
  is ``dilation`` (flexna's and NATTEN >= 0.20's is ``stride``) and whose ``bias=True`` adds the
  relative positional bias ``rpb``: :class:`LegacyNeighborhoodAttention1D` / ``2D`` / ``3D``, same
  state_dict keys (``qkv.*``, ``proj.*``, ``rpb``). Their split ops (``natten2dqkrpb`` /
  ``natten2dav``) materialise the attention weights, which a fused kernel never does: use the
  modules or :func:`flexna.neighborhood_attention` with ``rel_pos_bias=`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flexna.backends import Backend
from flexna.functional import neighborhood_attention
from flexna.modules import NeighborhoodAttentionGeneric

__all__ = ["LegacyNeighborhoodAttention1D", "LegacyNeighborhoodAttention2D", "LegacyNeighborhoodAttention3D",
           "na1d", "na2d", "na3d"]

# NATTEN's backend names -> flexna's kernel backend
_BACKENDS: dict[str | None, Backend] = {None: "auto", "flex-fna": "auto", "flex": "auto",
                                        "hopper-fna": "flash", "blackwell-fna": "flash"}


def _natten_call(ndim: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: Any,
                 stride: Any, dilation: Any, is_causal: Any, scale: float | None,
                 additional_keys: torch.Tensor | None, additional_values: torch.Tensor | None,
                 attention_kwargs: dict | None, backend: str | None, q_tile_shape: Any, kv_tile_shape: Any,
                 return_lse: bool, torch_compile: bool, **backward: Any) -> Any:
    if backend not in _BACKENDS:
        raise ValueError(f"backend = {backend!r}: flexna runs FlexAttention only (its analytic BlockMask on "
                         "Flex's Triton or FLASH kernels); pass backend=None or 'flex-fna' (auto), or "
                         "'hopper-fna' / 'blackwell-fna' (flexna's FLASH backend)")
    if attention_kwargs:
        raise ValueError(f"attention_kwargs = {attention_kwargs!r}: flexna takes no attention kwargs; pass "
                         "scale= / return_lse= directly, a score_mod through flexna.neighborhood_attention")
    defaults = {"backward_q_tile_shape": None, "backward_kv_tile_shape": None, "backward_kv_splits": None,
                "backward_use_pt_reduction": False, "run_persistent_kernel": True, "kernel_schedule": None}
    for name, value in backward.items():
        if name not in defaults:
            raise TypeError(f"na{ndim}d() got an unexpected keyword argument {name!r}")
        if value != defaults[name]:
            raise ValueError(f"{name} = {value!r}: a NATTEN CUDA-kernel setting; flexna's kernels are "
                             "Flex's own (their backward tiling is torch's choice): leave it at its default")
    if not isinstance(torch_compile, bool):
        raise TypeError(f"torch_compile must be a bool, got {type(torch_compile).__name__}")
    if (q_tile_shape is None) != (kv_tile_shape is None):
        raise ValueError("q_tile_shape and kv_tile_shape must be given together (flexna's tiles=(q, kv))")
    tiles: Any = "auto" if q_tile_shape is None else (tuple(q_tile_shape), tuple(kv_tile_shape))
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                                  return_lse, additional_keys=additional_keys,
                                  additional_values=additional_values, tiles=tiles,
                                  backend=_BACKENDS[backend], _ndim=ndim)


def _natten_na(ndim: int, layout: str) -> Callable[..., Any]:
    """NATTEN >= 0.20's ``na{ndim}d``, same arguments in the same order, on flexna."""

    def na(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: Any, stride: Any = 1,
           dilation: Any = 1, is_causal: Any = False, scale: float | None = None,
           additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None,
           attention_kwargs: dict | None = None, backend: str | None = None, q_tile_shape: Any = None,
           kv_tile_shape: Any = None, *, torch_compile: bool = False, return_lse: bool = False,
           **backward: Any) -> Any:
        return _natten_call(ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale,
                            additional_keys, additional_values, attention_kwargs, backend, q_tile_shape,
                            kv_tile_shape, return_lse, torch_compile, **backward)

    na.__name__ = na.__qualname__ = f"na{ndim}d"
    na.__doc__ = f"NATTEN >= 0.20's ``na{ndim}d`` on flexna (``{layout}``)."
    return na


na1d = _natten_na(1, "[batch, L, heads, dim]")
na2d = _natten_na(2, "[batch, H, W, heads, dim]")
na3d = _natten_na(3, "[batch, T, H, W, heads, dim]")


class _Legacy(NeighborhoodAttentionGeneric):
    """NATTEN <= 0.17's module signature: ``(dim, num_heads, kernel_size, dilation=1, bias=True,
    qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0)``; ``bias`` is the rpb table."""

    NA_DIM = 0

    def __init__(self, dim: int, num_heads: int, kernel_size: Any, dilation: Any = 1, bias: bool = True,
                 qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(self.NA_DIM, dim, num_heads, kernel_size, 1, dilation, False, qkv_bias, qk_scale,
                         attn_drop, proj_drop, rel_pos_bias=bias)


class LegacyNeighborhoodAttention1D(_Legacy):
    """NATTEN <= 0.17's ``NeighborhoodAttention1D`` (``x`` ``[batch, L, dim]``)."""

    NA_DIM = 1


class LegacyNeighborhoodAttention2D(_Legacy):
    """NATTEN <= 0.17's ``NeighborhoodAttention2D`` (``x`` ``[batch, H, W, dim]``; NAT, DiNAT)."""

    NA_DIM = 2


class LegacyNeighborhoodAttention3D(_Legacy):
    """NATTEN <= 0.17's ``NeighborhoodAttention3D`` (``x`` ``[batch, T, H, W, dim]``), with its
    ``kernel_size_d`` / ``dilation_d`` for the time axis."""

    NA_DIM = 3

    def __init__(self, dim: int, num_heads: int, kernel_size: int, kernel_size_d: int | None = None,
                 dilation: int = 1, dilation_d: int | None = None, bias: bool = True, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        kernel = (kernel_size if kernel_size_d is None else kernel_size_d, kernel_size, kernel_size)
        dil = (dilation if dilation_d is None else dilation_d, dilation, dilation)
        super().__init__(dim, num_heads, kernel, dil, bias, qkv_bias, qk_scale, attn_drop, proj_drop)
