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

A module's pattern (kernel size, stride, dilation, causality) is *not* in its signature: it
lives in the module's :class:`PlanStore`, and the signature holds :func:`module_entry` markers
in its place. The traced code then reads only the store's plan for the call's shapes, so dynamo
guards on what the plan holds (its token orders, block sizes, tensor shapes), never on the
pattern's values: setting ``layer.kernel_size`` re-plans in the store and the compiled graph
runs the new pattern with no recompilation, as long as the plan's structure is unchanged
(another tile choice or block size recompiles, as it must).
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from collections import OrderedDict
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
_TRACED_BYTES: OrderedDict[str, int] = OrderedDict()  # name -> bytes, oldest first
_BUILDERS: dict[str, PlanBuilder] = {}
_LOCK = threading.Lock()


def register(kind: str, builder: PlanBuilder) -> None:
    """Name the function that makes the plan of signatures whose first entry is ``kind``."""
    _BUILDERS[kind] = builder


def tensor_signature(t: object) -> tuple | None:
    """What a plan may know of a tensor argument: shape, dtype, device, requires_grad (or why
    it is not a tensor). Python constants only, so dynamo folds it: under dynamo a dynamic
    size (automatic dynamic shapes, ``dynamic=True``) is first specialised to its value, since
    a mask is made for one shape (each new shape compiles once, as with ``dynamic=False``)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return ("not a tensor", type(t).__name__)
    if comptime is not None and torch.compiler.is_dynamo_compiling():
        comptime(_specialize_sizes)
    return (tuple(t.shape), str(t.dtype), str(t.device), bool(t.requires_grad))


def _specialize_sizes(ctx: Any) -> None:
    """Guard every symbolic size of the local ``t`` to its value (dynamo then folds the shape)."""
    from torch.fx.experimental.symbolic_shapes import guard_int

    for size in ctx.get_local("t").as_fake().shape:
        if isinstance(size, torch.SymInt):
            guard_int(size)


def _constant_signature(ctx: Any) -> tuple:
    """The local ``signature`` as a constant, or a clear error where dynamo made one of its
    entries symbolic (an int argument of the user's compiled function that changed between
    calls becomes dynamic)."""
    try:
        return ctx.get_local("signature").as_python_constant()
    except Exception as exc:  # AsPythonConstantNotImplementedError: a SymNodeVariable
        raise TypeError(
            "flexna: a number argument of this call (kernel_size, stride, dilation, tiles, "
            "num_extra_tokens, scale, ...) is dynamic under torch.compile: dynamo makes an int "
            "argument of a compiled function symbolic once it changes between calls (and floats "
            "under dynamic=True), and a mask needs its value. Pass it as a constant (a closure or "
            "module attribute; flexna's modules may change their pattern without recompiling), or "
            "compile with dynamic=False") from exc


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
    from flexna.cache import cache_info

    signature = _constant_signature(ctx)
    name = _name(signature)
    with _LOCK:
        entry = getattr(_TRACED, name, None)
        if entry is None or entry[0] != signature:
            plan = build(signature).resolved()
            setattr(_TRACED, name, (signature, plan))
            _TRACED_BYTES[name] = plan.nbytes
        _TRACED_BYTES.move_to_end(name)
        # bounded by flexna's cache budget: the oldest plans go first (a graph reading one
        # recompiles on its next call and plans it again)
        budget, held = cache_info().max_bytes, sum(_TRACED_BYTES.values())
        while held > budget and len(_TRACED_BYTES) > 1:
            old, freed = _TRACED_BYTES.popitem(last=False)
            delattr(_TRACED, old)
            held -= freed


def plan_for(signature: tuple, store: PlanStore | None = None) -> Any:
    """The plan of ``signature``: made at trace time under dynamo, otherwise now. With a
    ``store`` (a module's), its values fill the signature's :func:`module_entry` markers and
    traced plans are kept in the store."""
    if comptime is not None and torch.compiler.is_dynamo_compiling():
        if store is not None:
            comptime(_trace_into_store)
            return getattr(store.plans, _name(signature))
        comptime(_build_at_trace_time)
        return getattr(_TRACED, _name(signature))[1]
    if store is not None:
        signature = store.complete(signature)
    if torch.compiler.is_compiling():  # torch.export's non-strict tracing: plain Python, no memo
        return build(signature)
    return _eager_plan(signature)


def clear_traced_plans() -> None:
    """Forget the plans made at trace time, modules' stores included (graphs that read them
    recompile on their next call)."""
    with _LOCK:
        _TRACED.__dict__.clear()
        _TRACED_BYTES.clear()
        stores = list(_STORES)
    for store in stores:
        store.clear()
    _eager_plan.cache_clear()


def module_entry(name: str) -> str:
    """The marker standing in a signature for the module's argument ``name`` (its value lives
    in the module's :class:`PlanStore`)."""
    return f"<the module's {name}>"


_STORES: weakref.WeakSet[PlanStore] = weakref.WeakSet()


class PlanStore:
    """A module's pattern arguments and the plans of its traced calls.

    ``values``: marker (:func:`module_entry`) -> the constant it stands for in a signature.
    :meth:`set_pattern` re-plans every traced call for new values (all or nothing), so
    graphs that read the store run them without recompiling where the plans keep their
    structure. Freed with the module; :func:`flexna.clear_cache` empties it too.
    """

    def __init__(self, values: dict[str, object]) -> None:
        self.values = values
        self.plans = types.SimpleNamespace()  # name -> plan (read by traced code)
        self._signatures: dict[str, tuple] = {}  # name -> signature (with markers)
        self.ahead: set[tuple] = set()  # the owner's inputs already planned ahead of a call
        self._lock = threading.Lock()
        _STORES.add(self)

    def complete(self, signature: tuple, values: dict[str, object] | None = None) -> tuple:
        """``signature`` with its markers (nested tuples included) replaced by their values."""
        table = self.values if values is None else values

        def fill(item: object) -> object:
            if isinstance(item, str) and item in table:
                return table[item]
            return tuple(fill(x) for x in item) if isinstance(item, tuple) else item

        return tuple(fill(item) for item in signature)

    def trace(self, signature: tuple) -> None:
        """Plan ``signature`` for traced code (at trace time), unless already planned."""
        name = _name(signature)
        with self._lock:
            if name not in self._signatures:
                setattr(self.plans, name, build(self.complete(signature)).resolved())
                self._signatures[name] = signature

    def set_pattern(self, values: dict[str, object]) -> None:
        """Take new ``values``, re-planning every traced call first: values one of them rejects
        raise its error and change nothing."""
        with self._lock:
            new = {name: build(self.complete(sig, values)).resolved(private=True)
                   for name, sig in self._signatures.items()}
            self.values = values
            for name, plan in new.items():
                setattr(self.plans, name, plan)

    def clear(self) -> None:
        with self._lock:
            self.plans.__dict__.clear()
            self._signatures.clear()
            self.ahead.clear()

    def __deepcopy__(self, memo: dict) -> PlanStore:
        return PlanStore(dict(self.values))  # plans are re-made on the copy's first traced call

    def __getstate__(self) -> dict:
        return {"values": self.values}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["values"])  # type: ignore[misc]


def _object_of(var: Any) -> Any:
    """The Python object behind a comptime variable (not a constant to dynamo)."""
    try:
        return var.as_python_constant()
    except Exception:  # a user-defined object: dynamo's tracker holds it
        tracker = var._i_will_not_complain_if_bc_breaks_VariableTracker()
        return tracker.value


def _trace_into_store(ctx: Any) -> None:
    _object_of(ctx.get_local("store")).trace(_constant_signature(ctx))
