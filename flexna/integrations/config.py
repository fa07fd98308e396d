"""Sparsity configs as users write them for whole models (no model library needed).

One pattern for every attention layer, or a per-layer list in the NATTEN / Cosmos-Predict2
format (one dict per layer)::

    {"window_size": (-1, 12, 24), "stride": (1, 4, 8), "dilation": 1, "base_size": (-1, 44, 80)}

``window_size`` per axis (``-1``: the whole axis; Cosmos-Predict2's own code also reads a window
of 0 or 1 as the whole axis, here 1 is a window of one token and 0 an error), ``stride`` and
``dilation`` per axis (or one int), ``is_causal`` (optional), and ``base_size``: the token grid
the window was written for. On another grid the window, stride and dilation of every axis whose
``base_size`` is not ``-1`` scale with ``grid / base_size`` as Cosmos-Predict2 scales them
(rounded; window at least 2 and at most the axis, stride at most the window, dilation at most
``axis // window``); a ``-1`` window stays the whole axis. A ``None`` entry (or ``"dense"``)
keeps that layer's attention dense.

:class:`SparsityConfig` adds the schedule: ``dense_layers`` (layer indices left dense) and
``dense_steps`` (the first N denoising steps run dense, as STA, SVG and Radial do). Bad
configs raise ``ValueError`` naming the field, its value and the allowed range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from flexna.pattern import MAX_AXES, NAPattern

LAYER_KEYS = ("window_size", "stride", "dilation", "is_causal", "base_size")
IGNORED_KEYS = ("layer_id",)  # Cosmos-Predict2 adds it to each layer's dict; the list position decides here
MODEL_KEYS = ("layers", "pattern", "dense_layers", "dense_steps", "calls_per_step")

Resolved = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]


def _ints(field: str, value: object, *, allow_whole: bool = False) -> int | tuple[int, ...]:
    """An int or a tuple of 1-3 ints (``-1`` allowed where ``allow_whole``), else ``ValueError``."""
    def one(name: str, v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} = {v!r} must be an int, got {type(v).__name__}")
        if not (v >= 1 or (allow_whole and v == -1)):
            need = "an int >= 1 or -1 (the whole axis)" if allow_whole else "an int >= 1"
            raise ValueError(f"{name} = {v} is out of range: need {need}")
        return v

    if isinstance(value, Sequence) and not isinstance(value, str):
        if not 1 <= len(value) <= MAX_AXES:
            raise ValueError(f"{field} = {tuple(value)!r} must have 1 to {MAX_AXES} entries (one per axis)")
        return tuple(one(f"{field}[axis {a}]", v) for a, v in enumerate(value))
    return one(field, value)


def _per_axis(field: str, value: int | bool | tuple, n: int, grid: tuple[int, ...]) -> tuple:
    if not isinstance(value, tuple):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"{field} = {value!r} has {len(value)} axes, but the model's token grid {grid} "
                         f"has {n}: give one value per axis")
    return value


@dataclass(frozen=True)
class LayerPattern:
    """One layer's neighborhood pattern in the NATTEN / Cosmos format (see the module docstring).

    Build it with :meth:`create` (or :meth:`from_dict`); :meth:`resolve` turns it into flexna
    pattern arguments for a token grid.
    """

    window_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    is_causal: bool | tuple[bool, ...] = False
    base_size: tuple[int, ...] | None = None

    @classmethod
    def create(cls, window_size: int | Sequence[int], stride: int | Sequence[int] = 1,
               dilation: int | Sequence[int] = 1, is_causal: bool | Sequence[bool] = False,
               base_size: Sequence[int] | None = None) -> LayerPattern:
        """Validate the fields (``ValueError`` naming the field, axis, value and range)."""
        causal: bool | tuple[bool, ...]
        if isinstance(is_causal, bool):
            causal = is_causal
        elif isinstance(is_causal, Sequence) and all(isinstance(c, bool) for c in is_causal):
            causal = tuple(is_causal)
        else:
            raise ValueError(f"is_causal = {is_causal!r} must be a bool or one bool per axis")
        base: tuple[int, ...] | None = None
        if base_size is not None:
            b = _ints("base_size", base_size, allow_whole=True)
            if not isinstance(b, tuple):
                raise ValueError(f"base_size = {base_size!r} must give one size per axis (-1: any)")
            base = b
        return cls(_ints("window_size", window_size, allow_whole=True), _ints("stride", stride),
                   _ints("dilation", dilation), causal, base)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], where: str = "layer") -> LayerPattern:
        """From a NATTEN / Cosmos dict; unknown keys and a missing ``window_size`` are errors."""
        unknown = sorted(set(entry) - set(LAYER_KEYS) - set(IGNORED_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; a layer's dict takes "
                             f"{', '.join(LAYER_KEYS)}")
        if "window_size" not in entry:
            raise ValueError(f"{where}: 'window_size' is missing (one int per axis, -1 for the whole axis)")
        try:
            return cls.create(**{k: entry[k] for k in LAYER_KEYS if k in entry})
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def resolve(self, grid: Sequence[int]) -> Resolved:
        """``(kernel_size, stride, dilation, is_causal)`` for the token ``grid``, validated by
        :meth:`flexna.NAPattern.create` (``ValueError`` when a window does not fit the grid)."""
        grid = tuple(grid)
        n = len(grid)
        window = _per_axis("window_size", self.window_size, n, grid)
        stride = _per_axis("stride", self.stride, n, grid)
        dilation = _per_axis("dilation", self.dilation, n, grid)
        causal = _per_axis("is_causal", self.is_causal, n, grid)
        base = _per_axis("base_size", self.base_size, n, grid) if self.base_size is not None else (-1,) * n
        kernel, strides, dils = [], [], []
        for x, w, s, d, b in zip(grid, window, stride, dilation, base, strict=True):
            if w == -1:  # the whole axis, whatever the resolution
                kernel.append(x)
                strides.append(min(s, x))
                dils.append(1)
                continue
            if b != -1 and b != x:  # Cosmos-Predict2's rescaling
                scale = x / b
                w = min(max(2, round(w * scale)), x)
                s = min(max(1, round(s * scale)), w)
                d = min(max(1, round(d * scale)), x // w)
            kernel.append(w)
            strides.append(s)
            dils.append(d)
        pattern = NAPattern.create(grid, tuple(kernel), tuple(strides), tuple(dils), tuple(causal))
        return pattern.kernel_size, pattern.stride, pattern.dilation, pattern.is_causal


LayerEntry = LayerPattern | Mapping[str, Any] | str | None


def as_layer(entry: LayerEntry, where: str) -> LayerPattern | None:
    """A layer entry (pattern, NATTEN/Cosmos dict, ``None`` or ``"dense"``) as a pattern or ``None``."""
    if entry is None or entry == "dense":
        return None
    if isinstance(entry, LayerPattern):
        return entry
    if isinstance(entry, Mapping):
        return LayerPattern.from_dict(entry, where)
    raise TypeError(f"{where} must be a flexna LayerPattern, a dict with 'window_size', None or 'dense', "
                    f"got {type(entry).__name__}")


@dataclass(frozen=True)
class SparsityConfig:
    """What a model runs: one pattern for every layer or one entry per layer, and the dense schedule.

    ``layers``: a :class:`LayerPattern` for all layers, or a tuple with one entry per attention
    layer (``None``: dense). ``dense_layers``: layer indices that stay dense. ``dense_steps``: the
    first N denoising steps run dense. ``calls_per_step``: model calls per denoising step (2 when
    a pipeline runs its conditional and unconditional passes separately).
    """

    layers: LayerPattern | tuple[LayerPattern | None, ...]
    dense_layers: frozenset[int] = frozenset()
    dense_steps: int = 0
    calls_per_step: int = 1

    @classmethod
    def create(cls, config: Any, **overrides: Any) -> SparsityConfig:
        """From a :class:`SparsityConfig`, a :class:`LayerPattern`, one layer's dict, a per-layer
        list, or a model dict (``layers`` or ``pattern``, and the schedule keys); keyword
        ``overrides`` (``dense_layers``, ``dense_steps``, ``calls_per_step``) replace fields."""
        if isinstance(config, SparsityConfig):
            base = config
        elif isinstance(config, LayerPattern):
            base = cls(config)
        elif isinstance(config, Mapping) and "window_size" in config:
            base = cls(LayerPattern.from_dict(config, "config"))
        elif isinstance(config, Mapping):
            unknown = sorted(set(config) - set(MODEL_KEYS))
            if unknown:
                raise ValueError(f"config: unknown key {unknown[0]!r}; a model config takes "
                                 f"{', '.join(MODEL_KEYS)} (or is one layer's dict with 'window_size')")
            if ("layers" in config) == ("pattern" in config):
                raise ValueError("config: give exactly one of 'layers' (one entry per layer) and "
                                 "'pattern' (one pattern for all layers)")
            inner = config["pattern"] if "pattern" in config else config["layers"]
            if "pattern" in config and not isinstance(inner, LayerPattern | Mapping):
                raise ValueError(f"config: 'pattern' must be one layer's dict, got {type(inner).__name__}")
            rest = {k: config[k] for k in ("dense_layers", "dense_steps", "calls_per_step") if k in config}
            return cls.create(inner, **{**rest, **overrides})
        elif isinstance(config, Sequence) and not isinstance(config, str):
            if not config:
                raise ValueError("config: the per-layer list is empty")
            base = cls(tuple(as_layer(e, f"config[{i}]") for i, e in enumerate(config)))
        else:
            raise TypeError(f"config must be a flexna SparsityConfig or LayerPattern, a layer's dict, a "
                            f"per-layer list or a model dict, got {type(config).__name__}")
        unknown = sorted(set(overrides) - {"dense_layers", "dense_steps", "calls_per_step"})
        if unknown:
            raise TypeError(f"unexpected keyword {unknown[0]!r}")
        fields = {k: v for k, v in overrides.items() if v is not None}
        if "dense_layers" in fields:
            layers = fields["dense_layers"]
            if not isinstance(layers, Sequence | set | frozenset) or isinstance(layers, str) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"dense_layers = {layers!r} must be a list of layer indices (ints)")
            fields["dense_layers"] = frozenset(layers)
        for name in ("dense_steps", "calls_per_step"):
            if name in fields:
                v, low = fields[name], 0 if name == "dense_steps" else 1
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise ValueError(f"{name} = {v!r} is out of range: need an int >= {low}")
        return replace(base, **fields)

    def check(self, num_layers: int, model: str) -> None:
        """``ValueError`` when the per-layer list or ``dense_layers`` do not fit ``num_layers``."""
        if isinstance(self.layers, tuple) and len(self.layers) != num_layers:
            raise ValueError(f"the per-layer config has {len(self.layers)} entries, but {model} has "
                             f"{num_layers} attention layers: give one entry per layer (None: dense)")
        bad = sorted(i for i in self.dense_layers if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"dense_layers: layer {bad[0]} is out of range: {model} has layers 0 to "
                             f"{num_layers - 1}")

    def layer(self, index: int) -> LayerPattern | None:
        """Layer ``index``'s pattern, ``None`` when it stays dense."""
        if index in self.dense_layers:
            return None
        return self.layers[index] if isinstance(self.layers, tuple) else self.layers
