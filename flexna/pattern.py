"""The validated description of a neighborhood-attention pattern.

A :class:`NAPattern` holds only numbers: the token layout and the per-axis
window parameters of ``docs/SEMANTICS.md``. Everything that builds masks takes one,
so every invalid input is rejected here, once, before any tensor is made.
:class:`PerHead` gives one value of a parameter per query head.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

MAX_AXES = 3
# FlexAttention indexes tokens with int32; keep every index (padding included) below this.
MAX_TOKENS = 2**31 - 1


def fmt_dims(values: Sequence[int | bool]) -> str:
    """``(30, 48, 80)`` -> ``"30x48x80"`` (booleans as T/F): how flexna prints per-axis values."""
    return "x".join(("T" if v else "F") if isinstance(v, bool) else str(int(v)) for v in values)

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_int_tuple(name: str, value: object, ndim: int) -> tuple[int, ...]:
    """Broadcast a scalar or check a sequence of ``ndim`` integers (bools rejected)."""
    if _is_int(value):
        return (int(value),) * ndim  # type: ignore[call-overload]
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

    def envelope_bounds(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-query key window on ``axis`` that contains every key a query may attend.

        With :meth:`core_bounds` this is the seam for rules that are not separable per axis
        (a window on one axis depending on the offset along another): the envelope gives
        the blocks that may hold pairs, the core the blocks every pair of which attends.
        The per-axis rule of NA is exact, so both are its window.
        """
        from flexna.geometry import window_bounds

        return window_bounds(self.shape[axis], self.kernel_size[axis], self.stride[axis],
                             self.dilation[axis], self.is_causal[axis])

    def core_bounds(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-query key window on ``axis`` every key of which is attended (see
        :meth:`envelope_bounds`)."""
        return self.envelope_bounds(axis)

    # False for a rule whose windows are not exact per axis: its mask is the envelope windows AND
    # :meth:`element_check` (a subclass changes the bounds, this flag and that method only).
    separable: ClassVar[bool] = True

    def element_check(self, q: tuple[Any, ...], kv: tuple[Any, ...]) -> Any:
        """For a non-separable rule: whether query coordinates ``q`` attend key coordinates ``kv``
        (one NumPy array or torch tensor per axis, broadcast), inside the envelope windows."""
        raise NotImplementedError("a separable rule has no element-wise check")

    def box_pairs(self, q_lo: np.ndarray, q_hi: np.ndarray, k_lo: np.ndarray,
                  k_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For boxes of query and key coordinates (``[..., n]`` inclusive corners inside the
        layout, broadcast): (some pair attends, every pair attends), bool ``[...]``.

        The block-map builder decides the blocks of a non-separable rule with it. This default
        is exact for a separable rule (per-axis tests of the windows); for a non-separable one
        it is the envelope (some) and core (every) bound, so such a rule overrides it to get
        exact full and partial blocks.
        """
        from flexna.blocksparsity import exact_pairs

        some = every = np.ones(np.broadcast_shapes(q_lo.shape[:-1], k_lo.shape[:-1]), dtype=bool)
        for a in range(self.ndim):
            box = (q_lo[..., a], q_hi[..., a], k_lo[..., a], k_hi[..., a])
            some = some & exact_pairs(*box, *self.envelope_bounds(a), self.dilation[a])[0]
            every = every & exact_pairs(*box, *self.core_bounds(a), self.dilation[a])[1]
        return some, every

    def __str__(self) -> str:
        parts = [f"layout {fmt_dims(self.shape)}", f"kernel {fmt_dims(self.kernel_size)}"]
        if any(s != 1 for s in self.stride):
            parts.append(f"stride {fmt_dims(self.stride)}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation {fmt_dims(self.dilation)}")
        if any(self.is_causal):
            parts.append(f"causal {fmt_dims(self.is_causal)}")
        return ", ".join(parts)


class PerHead:
    """One value of a pattern parameter per query head.

    Each entry is what the parameter normally takes (a scalar or a per-axis
    tuple): ``PerHead([7, 7, (13, 5), (13, 5)])`` for 4 heads. Its length must
    equal the number of query heads.
    """

    __slots__ = ("values",)

    def __init__(self, values: Sequence) -> None:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"PerHead needs a non-empty sequence of per-head values, got {values!r}")
        self.values = tuple(tuple(v) if isinstance(v, list) else v for v in values)

    def __len__(self) -> int:
        return len(self.values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerHead) and other.values == self.values

    def __hash__(self) -> int:
        return hash(("PerHead", self.values))

    def __repr__(self) -> str:
        return f"PerHead({list(self.values)!r})"


def head_patterns(shape: object, kernel_size: object, stride: object = 1, dilation: object = 1,
                  is_causal: object = False, num_heads: int | None = None) -> tuple[NAPattern, ...]:
    """Validated patterns: one per query head if any argument is :class:`PerHead`, else one.

    ``ValueError`` names the argument (and head) when a :class:`PerHead` has the
    wrong length or a head's values are out of range.
    """
    args = {"kernel_size": kernel_size, "stride": stride, "dilation": dilation,
            "is_causal": is_causal}
    per_head = {k: v for k, v in args.items() if isinstance(v, PerHead)}
    if not per_head:
        return (NAPattern.create(shape, kernel_size, stride, dilation, is_causal),)  # type: ignore[arg-type]
    lengths = {k: len(v) for k, v in per_head.items()}
    if num_heads is None:
        num_heads = next(iter(lengths.values()))
    for name, length in lengths.items():
        if length != num_heads:
            raise ValueError(
                f"{name}: PerHead has {length} entries, need one per query head ({num_heads})"
            )
    out = []
    for h in range(num_heads):
        vals = {k: (v.values[h] if isinstance(v, PerHead) else v) for k, v in args.items()}
        try:
            out.append(NAPattern.create(shape, **vals))  # type: ignore[arg-type]
        except ValueError as err:
            raise ValueError(f"head {h}: {err}") from None
    return tuple(out)
