"""The host side of an attention call, kept out of the user's compiled graph.

Every functional call splits in two. Its *signature* is a tuple of Python constants (tensor
shapes, dtypes and devices, the pattern arguments, the options); from it a :class:`CallPlan`
is made on the host: arguments validated, the :class:`~flexna.spec.MaskSpec`, its BlockMask
and relative-position-bias tables from the cache, and the kernel options. The tensor work
that follows uses only the plan.

Called eagerly, the plan is made once per signature (memoised; it holds no tensors, the
BlockMask comes from the cache on each call). Inside
``torch.compile`` the signature is a constant to dynamo, so the plan is made once, *at trace
time* (dynamo's ``comptime`` hook runs ordinary Python there), and stored under the
signature; the traced code only reads the plan's tensors. So flexna's host work (NumPy,
locks, caches, validation) never enters the user's graph: a model of flexna layers compiles
to one graph with no breaks, ``fullgraph=True`` included. Outside dynamo (eager, or
``torch.export``'s non-strict tracing) the plan is made in Python as usual.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

try:  # dynamo's trace-time hook (torch >= 2.1)
    from torch._dynamo.comptime import comptime as _comptime
except ImportError:  # pragma: no cover - old torch
    _comptime = None  # type: ignore[assignment]
comptime: Any = _comptime

# signature -> plan; a plan's ``resolved()`` is the copy traced code reads (tensors in hand)
PlanBuilder = Callable[[tuple], Any]

# Plans made at trace time, one attribute per signature (dynamo reads attributes it has not
# seen before freshly, so each traced call finds its own plan).
_TRACED = types.SimpleNamespace()
_BUILDERS: dict[str, PlanBuilder] = {}
_LOCK = threading.Lock()


def register(kind: str, builder: PlanBuilder) -> None:
    """Name the function that makes the plan of signatures whose first entry is ``kind``."""
    _BUILDERS[kind] = builder


def tensor_signature(t: object) -> tuple | None:
    """What a plan may know of a tensor argument: shape, dtype, device, requires_grad (or why
    it is not a tensor). Python constants only, so dynamo folds it."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return ("not a tensor", type(t).__name__)
    return (tuple(t.shape), str(t.dtype), str(t.device), bool(t.requires_grad))


def build(signature: tuple) -> Any:
    """The plan of ``signature``, made now."""
    return _BUILDERS[signature[0]](signature)


@functools.lru_cache(maxsize=1024)
def _eager_plan(signature: tuple) -> Any:
    """Eager plans, memoised: a plan holds no tensors (the cache keeps the masks), so a repeated
    call skips validation; bad arguments raise every time (exceptions are not memoised)."""
    return build(signature)


def _flat(value: object) -> str:
    """A constant signature as text, with operations dynamo folds on every torch version
    (``str`` of leaves, concatenation), no dots (attribute names)."""
    if isinstance(value, tuple):
        text = "("
        for item in value:
            text = text + _flat(item) + ","
        return text + ")"
    if isinstance(value, str):  # quoted: the string "None" is not None
        return "'" + value.replace(".", "_") + "'"
    return str(value).replace(".", "_")


def _name(signature: tuple) -> str:
    return "plan" + _flat(signature)


def _build_at_trace_time(ctx: Any) -> None:
    signature = ctx.get_local("signature").as_python_constant()
    name = _name(signature)
    with _LOCK:
        entry = getattr(_TRACED, name, None)
        if entry is None or entry[0] != signature:
            setattr(_TRACED, name, (signature, build(signature).resolved()))


def plan_for(signature: tuple) -> Any:
    """The plan of ``signature``: made at trace time under dynamo, otherwise now."""
    if comptime is not None and torch.compiler.is_dynamo_compiling():
        comptime(_build_at_trace_time)
        return getattr(_TRACED, _name(signature))[1]
    if torch.compiler.is_compiling():  # torch.export's non-strict tracing: plain Python, no memo
        return build(signature)
    return _eager_plan(signature)


def clear_traced_plans() -> None:
    """Forget the plans made at trace time (graphs that read them recompile on their next call)."""
    with _LOCK:
        _TRACED.__dict__.clear()
    _eager_plan.cache_clear()
