"""The validated description of a neighborhood-attention pattern.

A :class:`NAPattern` holds only numbers: the token layout and the per-axis
window parameters of ``SEMANTICS.md``. Everything that builds masks takes one,
so every invalid input is rejected here, once, before any tensor is made.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

MAX_AXES = 3
# FlexAttention indexes tokens with int32; keep every index (padding included) below this.
MAX_TOKENS = 2**31 - 1

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_int_tuple(name: str, value: object, ndim: int) -> tuple[int, ...]:
    """Broadcast a scalar or check a sequence of ``ndim`` integers (bools rejected)."""
    if _is_int(value):
        return (int(value),) * ndim  # type: ignore[arg-type]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"{name} must be an int or a sequence of {ndim} ints, got {value!r}"
        )
    if len(value) != ndim:
        raise ValueError(
            f"{name} must have one entry per layout axis ({ndim}), "
            f"got {len(value)} entries: {tuple(value)!r}"
        )
    for axis, item in enumerate(value):
        if not _is_int(item):
            raise ValueError(
                f"{name}[axis {axis}] must be an int, got {item!r} ({type(item).__name__})"
            )
    return tuple(int(v) for v in value)


def as_bool_tuple(name: str, value: object, ndim: int) -> tuple[bool, ...]:
    """Broadcast a bool or check a sequence of ``ndim`` bools."""
    if isinstance(value, bool):
        return (value,) * ndim
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(
            f"{name} must be a bool or a sequence of {ndim} bools, got {value!r}"
        )
    if len(value) != ndim:
        raise ValueError(
            f"{name} must have one entry per layout axis ({ndim}), "
            f"got {len(value)} entries: {tuple(value)!r}"
        )
    for axis, item in enumerate(value):
        if not isinstance(item, bool):
            raise ValueError(
                f"{name}[axis {axis}] must be a bool, got {item!r} ({type(item).__name__})"
            )
    return tuple(value)


def as_shape(name: str, value: object) -> tuple[int, ...]:
    """Check a token-layout shape: 1 to 3 positive ints whose product fits int32."""
    if _is_int(value):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a sequence of 1 to {MAX_AXES} ints, got {value!r}")
    if not 1 <= len(value) <= MAX_AXES:
        raise ValueError(
            f"{name} must have 1 to {MAX_AXES} axes, got {len(value)}: {tuple(value)!r}"
        )
    shape = as_int_tuple(name, value, len(value))
    for axis, length in enumerate(shape):
        if length < 1:
            raise ValueError(f"{name}[axis {axis}] = {length} is out of range: need >= 1")
    if math.prod(shape) > MAX_TOKENS:
        raise ValueError(
            f"{name} = {shape} has {math.prod(shape)} tokens, more than int32 indices "
            f"allow (at most {MAX_TOKENS})"
        )
    return shape


@dataclass(frozen=True)
class NAPattern:
    """A neighborhood-attention pattern over a row-major token layout.

    Fields are per-axis tuples; build one with :meth:`create`, which validates
    and broadcasts scalars. Instances are hashable and serve as cache keys.
    """

    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]

    @classmethod
    def create(
        cls,
        shape: IntOrTuple,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        is_causal: BoolOrTuple = False,
    ) -> NAPattern:
        """Validate the arguments (``ValueError`` naming argument, axis, value, range)."""
        shape_t = as_shape("shape", shape)
        n = len(shape_t)
        kernel = as_int_tuple("kernel_size", kernel_size, n)
        stride_t = as_int_tuple("stride", stride, n)
        dil = as_int_tuple("dilation", dilation, n)
        causal = as_bool_tuple("is_causal", is_causal, n)
        for a in range(n):
            length, k, s, d = shape_t[a], kernel[a], stride_t[a], dil[a]
            if d < 1:
                raise ValueError(f"dilation[axis {a}] = {d} is out of range: need dilation >= 1")
            if k < 1 or k * d > length:
                raise ValueError(
                    f"kernel_size[axis {a}] = {k} is out of range: need "
                    f"1 <= kernel_size <= length // dilation = {length} // {d} = {length // d}"
                )
            if not 1 <= s <= k:
                raise ValueError(
                    f"stride[axis {a}] = {s} is out of range: need 1 <= stride <= "
                    f"kernel_size = {k}"
                )
        return cls(shape_t, kernel, stride_t, dil, causal)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def keys_per_query(self) -> int:
        """Keys each query attends when no axis is causal (windows never shrink)."""
        return math.prod(self.kernel_size)

    def density(self) -> float:
        """Exact fraction of (query, key) pairs attended (counts causal shrinkage)."""
        from flexna.geometry import axis_pair_count

        pairs = math.prod(
            axis_pair_count(self.shape[a], self.kernel_size[a], self.stride[a],
                            self.dilation[a], self.is_causal[a])
            for a in range(self.ndim)
        )
        return pairs / self.num_tokens**2

    def flop_limit(self) -> float:
        """FLOP-wise speed-up bound over dense attention: 1 / density."""
        return 1.0 / self.density()

    def __str__(self) -> str:
        def fmt(t: tuple) -> str:
            return "x".join(str(int(v)) for v in t)

        parts = [f"layout {fmt(self.shape)}", f"kernel {fmt(self.kernel_size)}"]
        if any(s != 1 for s in self.stride):
            parts.append(f"stride {fmt(self.stride)}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation {fmt(self.dilation)}")
        if any(self.is_causal):
            parts.append("causal " + "x".join("T" if c else "F" for c in self.is_causal))
        return ", ".join(parts)
