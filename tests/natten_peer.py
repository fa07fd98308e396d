"""Reference ("peer") neighborhood-attention results taken from NATTEN itself.

NATTEN (https://natten.org, tested with 0.21.7) is installed on CPU-only
machines from its sdist by ``.ci/install_natten.sh``; without CUDA it builds
no ``libnatten`` and only has its Flex Attention backend
(``natten/backends/flex.py``).  Everything here is optional: call
``natten_available()`` first (or use ``pytest.importorskip``-style skipping).

What we take from NATTEN
------------------------
* ``natten.backends.flex.get_na_flex_mask(...)`` builds a torch ``BlockMask``
  whose ``.mask_mod`` is NATTEN's own ``mask_mod(b, h, q_idx, kv_idx)`` for
  neighborhood attention (kernel, stride, dilation, per-axis causal).  We
  evaluate that ``mask_mod`` densely.
* ``natten.backends.flex.flex_fna_generic(...)`` is NATTEN's Flex FNA op (what
  ``natten.na{1,2,3}d(..., backend="flex-fna")`` dispatches to); it runs on
  CPU in eager mode (unfused flex_attention, materializes the score matrix).

Token order: NATTEN's mask_mod (without its optional token-permute tiling,
which we never request) decodes ``q_idx``/``kv_idx`` with ``idx2crd`` over
``qkv_shape`` with the LAST axis fastest, i.e. plain row-major order — the
same order as ``x.reshape(B, N, ...)`` of a ``[B, *spatial, ...]`` tensor.  No
reordering is needed.

Constraints NATTEN imposes (enforced here via NATTEN's own checks when
``validate=True``): 1 to 3 spatial axes; every length >= 2; kernel >= 2;
stride >= 1 and stride <= kernel; dilation >= 1 and kernel * dilation <=
length; ``is_causal`` must be real ``bool`` values and ints must be real
``int``.  For attention additionally: head_dim a power of two in [8, 512]
(eager; compiled needs [32, 512]), dtype fp32/fp16/bf16 (compiled: fp16/bf16
only), Q/K/V same dtype/device, KV heads divide Q heads (GQA ok), head dims of
QK and V equal.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from unittest import mock

import torch

__all__ = ["natten_attention", "natten_available", "natten_mask", "natten_version"]


@functools.cache
def natten_available() -> bool:
    """True iff NATTEN is importable and its Flex backend is usable here."""
    try:
        import natten  # noqa: F401
        from natten.backends import flex as _flex
        from natten.backends.configs.checks import _FLEX_SUPPORTED
    except Exception:
        return False
    return bool(_FLEX_SUPPORTED) and hasattr(_flex, "get_na_flex_mask")


def natten_version() -> str | None:
    if not natten_available():
        return None
    import natten

    return natten.__version__


def _require() -> None:
    if not natten_available():
        raise RuntimeError(
            "NATTEN (with its Flex backend) is not available; run .ci/install_natten.sh"
        )


def _normalize(
    shape: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    is_causal: Sequence[bool],
    validate: bool,
) -> tuple[tuple, tuple, tuple, tuple, tuple]:
    shape = tuple(int(x) for x in shape)
    na_dim = len(shape)
    if not 1 <= na_dim <= 3:
        raise ValueError(f"NATTEN supports 1 to 3 spatial axes, got {shape=}")
    kernel_size = tuple(int(x) for x in kernel_size)
    stride = tuple(int(x) for x in stride)
    dilation = tuple(int(x) for x in dilation)
    is_causal = tuple(bool(c) for c in is_causal)
    if not (len(kernel_size) == len(stride) == len(dilation) == len(is_causal) == na_dim):
        raise ValueError("shape/kernel_size/stride/dilation/is_causal length mismatch")
    if validate:
        from natten.utils.checks import (
            check_all_args,
            check_args_against_input,
            check_input_size_arg,
        )

        shape = check_input_size_arg(na_dim, shape)
        kernel_size, stride, dilation, is_causal = check_all_args(
            na_dim, kernel_size, stride, dilation, is_causal
        )
        dummy = torch.empty((1, *shape, 1, 8), device="meta")
        check_args_against_input(
            dummy,
            kernel_size=kernel_size,
            stride=stride,
            dilation=dilation,
            is_causal=is_causal,
        )
    return shape, kernel_size, stride, dilation, is_causal


class _CapturedBlockMask:
    def __init__(self, mask_mod):
        self.mask_mod = mask_mod


def natten_mask_mod(
    shape: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    is_causal: Sequence[bool],
    *,
    validate: bool = True,
    via_block_mask: bool = False,
):
    """NATTEN's own ``mask_mod(b, h, q_idx, kv_idx)`` for this config.

    It is a closure inside ``natten.backends.flex.get_na_flex_mask``, reachable
    only as ``.mask_mod`` of the ``BlockMask`` that function returns.  Building
    the real BlockMask evaluates the whole N x N mask once more (slow for big N),
    so by default we temporarily replace ``create_block_mask`` *in NATTEN's
    module* with a stub that just captures the mask_mod it is given.  Pass
    ``via_block_mask=True`` to go through the real ``create_block_mask``
    (same mask_mod; used by the self-test to prove the shortcut is faithful).
    """
    _require()
    from natten.backends import flex as natten_flex

    shape, kernel_size, stride, dilation, is_causal = _normalize(
        shape, kernel_size, stride, dilation, is_causal, validate
    )
    kwargs = dict(
        device="cpu",
        na_dim=len(shape),
        qkv_shape=shape,
        kernel_size=kernel_size,
        stride=stride,
        dilation=dilation,
        is_causal=is_causal,
        torch_compile=False,
    )
    if via_block_mask:
        return natten_flex.get_na_flex_mask(**kwargs).mask_mod
    with mock.patch.object(
        natten_flex,
        "create_block_mask",
        lambda mask_mod, *a, **k: _CapturedBlockMask(mask_mod),
    ):
        return natten_flex.get_na_flex_mask(**kwargs).mask_mod


def natten_mask(
    shape: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    *,
    validate: bool = True,
    via_block_mask: bool = False,
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Dense [N, N] bool mask (N = prod(shape)) from NATTEN's own mask_mod.

    Entry [q, k] is True iff query token q attends key token k.  Tokens are in
    row-major order (last spatial axis fastest), which is exactly NATTEN's
    order (its mask_mod decodes flat indices with ``idx2crd`` over
    ``qkv_shape``, last axis fastest) -- no conversion is applied.

    The mask_mod is evaluated with broadcast index tensors in row chunks of
    ``chunk_rows`` queries (equivalent to
    ``torch.nn.attention.flex_attention.create_mask(mask_mod, None, None, N, N)``
    but with bounded memory).  With ``validate=True`` the config is first run
    through NATTEN's argument checks, so configs NATTEN rejects raise
    ValueError (e.g. kernel 1, stride > kernel, kernel*dilation > length,
    length 1, more than 3 axes).
    """
    mask_mod = natten_mask_mod(
        shape,
        kernel_size,
        stride,
        dilation,
        is_causal,
        validate=validate,
        via_block_mask=via_block_mask,
    )
    n = math.prod(int(x) for x in shape)
    b = torch.zeros((), dtype=torch.int64)
    h = torch.zeros((), dtype=torch.int64)
    kv_idx = torch.arange(n, dtype=torch.int64)[None, :]
    out = torch.empty((n, n), dtype=torch.bool)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        q_idx = torch.arange(start, stop, dtype=torch.int64)[:, None]
        out[start:stop] = torch.broadcast_to(mask_mod(b, h, q_idx, kv_idx), (stop - start, n))
    return out


def natten_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    is_causal: tuple[bool, ...],
    *,
    scale: float | None = None,
    torch_compile: bool = False,
    return_lse: bool = False,
):
    """Neighborhood attention through NATTEN's Flex backend (works on CPU, eager).

    Layout is NATTEN's: q, k, v are ``[B, *spatial, heads, head_dim]`` (1-3
    spatial axes); output has the same layout (lse: ``[B, *spatial, heads]``).
    Default scale is head_dim ** -0.5.

    Calls ``natten.backends.flex.flex_fna_generic`` directly -- the function
    ``natten.na{1,2,3}d(..., backend="flex-fna")`` dispatches to -- so NATTEN's
    "kernel == whole input => plain self attention" shortcut in the public API
    (which would route to Flex FMHA, and that refuses causal masks) is not taken.

    Eager (default) on CPU: fp32/fp16/bf16, head_dim a power of two in [8, 512].
    ``torch_compile=True`` does NOT work on CPU: NATTEN 0.21.7 sets
    ``_FLEX_COMPILE_SUPPORTED`` only when a CUDA device with compute capability
    >= 70 is present, so it raises RuntimeError("Can't run NATTEN with Flex
    Attention (compiled).") here.  (On GPU it additionally needs
    ``natten.allow_flex_compile()`` -- done here -- fp16/bf16 and head_dim a
    power of two in [32, 512].)
    """
    _require()
    from natten.backends.flex import flex_fna_generic

    if torch_compile:
        import natten

        if not natten.is_flex_compile_allowed():
            natten.allow_flex_compile(True)
    return flex_fna_generic(
        q,
        k,
        v,
        kernel_size=tuple(int(x) for x in kernel_size),
        stride=tuple(int(x) for x in stride),
        dilation=tuple(int(x) for x in dilation),
        is_causal=tuple(bool(c) for c in is_causal),
        scale=scale,
        torch_compile=torch_compile,
        return_lse=return_lse,
    )
