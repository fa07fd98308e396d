"""Running FlexAttention: flexna's own compiled entry, its recompile guard, CUDA kernel
options and the eager / dense fallbacks. Plumbing only: nothing of flexna's masks is imported
here (only its error types).

flexna compiles a function of its own (:func:`_flexna_flex_attention`), never the user's
``flex_attention``: dynamo counts recompiles per code object, so flexna's compilations
never spend the user's budget for their own ``torch.compile(flex_attention)``.
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexna.errors import EagerFallbackWarning, RecompileLimitError, warn_user

try:
    from torch.nn.attention.flex_attention import AuxRequest as _AuxRequest
except ImportError:  # torch < 2.9: return_lse=True
    _AuxRequest = None  # type: ignore[assignment,misc]
AuxRequest: Any = _AuxRequest

_CPU_SHARED_BUFFER_BUG = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 13)

# Each distinct (shapes, dtype, device, options) signature compiles once; pattern
# parameters live in tensors, so changing kernel/stride/dilation/causal recompiles nothing.
RECOMPILE_LIMIT = 64


def _flexna_flex_attention(*args: Any, **kwargs: Any) -> Any:
    """flexna's own frame around ``flex_attention`` (what flexna compiles)."""
    return flex_attention(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def compiled_flex_attention() -> Callable[..., Any]:
    """``torch.compile`` of flexna's own flex_attention frame, made once per process."""
    return torch.compile(_flexna_flex_attention, dynamic=False)


@functools.cache
def _limit_names() -> tuple[str, str]:
    cfg = torch._dynamo.config
    names = ("recompile_limit", "fail_on_recompile_limit_hit")
    if not all(name in cfg._config for name in names):  # type: ignore[attr-defined]  # older torch spellings
        names = ("cache_size_limit", "fail_on_cache_limit_hit")
    return names


@functools.cache
def _config_per_thread() -> bool:
    """Whether dynamo's config values are per thread: torch 2.13 keeps them in context
    variables (a new thread sees the defaults), torch 2.11 shares them across the process.
    Probed once: a value read in a new thread, after a change of this thread's restored at once."""
    cfg = torch._dynamo.config
    name = _limit_names()[0]
    seen: list[Any] = []

    def read_in_thread() -> Any:
        t = threading.Thread(target=lambda: seen.append(getattr(cfg, name)))
        t.start()
        t.join()
        return seen[-1]

    with _RaisedLimit.lock:  # no flexna call (nor a concurrent probe) changes it meanwhile
        mine = getattr(cfg, name)
        if read_in_thread() != mine:
            return True
        setattr(cfg, name, mine + 1)
        try:
            return read_in_thread() != mine + 1
        finally:
            setattr(cfg, name, mine)


class _RaisedLimit:
    """Dynamo's recompile limit raised to :data:`RECOMPILE_LIMIT` (and hitting it made an error)
    while a flexna compiled call runs; the caller's values restored after it.

    Where dynamo's config is per thread, each call saves and restores its thread's values.
    Where it is shared by the process, overlapping calls in several threads count themselves in
    and out: the first saves the user's values, the last restores them (a per-call save would
    save another call's raised values and leave them). Set by hand, not with dynamo's
    ``config.patch``, which costs about 25 us more per call: it shows on host-bound eager calls
    (``benchmarks/results/host-overhead-NVIDIA-H100-2026-12-07.md``)."""

    lock = threading.Lock()
    _shared_calls = 0
    _shared_saved: tuple[Any, Any] = (None, None)

    def __enter__(self) -> int:
        cfg = torch._dynamo.config
        self.per_thread = _config_per_thread()
        if self.per_thread:
            self.saved = _limit_values(cfg)
            return _raise_limit(cfg, self.saved[0])
        with _RaisedLimit.lock:
            if _RaisedLimit._shared_calls == 0:
                _RaisedLimit._shared_saved = _limit_values(cfg)
            _RaisedLimit._shared_calls += 1
            return _raise_limit(cfg, _RaisedLimit._shared_saved[0])

    def __exit__(self, *exc: object) -> None:
        cfg = torch._dynamo.config
        if self.per_thread:
            _set_limit_values(cfg, self.saved)
            return
        with _RaisedLimit.lock:
            _RaisedLimit._shared_calls -= 1
            if _RaisedLimit._shared_calls == 0:
                _set_limit_values(cfg, _RaisedLimit._shared_saved)


def _limit_values(cfg: Any) -> tuple[Any, Any]:
    """(recompile limit, fail on hitting it) as this thread sees them."""
    limit_name, fail_name = _limit_names()
    return getattr(cfg, limit_name), getattr(cfg, fail_name)


def _set_limit_values(cfg: Any, values: tuple[Any, Any]) -> None:
    for name, value in zip(_limit_names(), values, strict=True):
        setattr(cfg, name, value)


def _raise_limit(cfg: Any, user_limit: int) -> int:
    """Raise the limit to at least :data:`RECOMPILE_LIMIT` and make hitting it an error."""
    limit = max(user_limit, RECOMPILE_LIMIT)
    _set_limit_values(cfg, (limit, True))
    return limit


def call_compiled(*args: Any, **kwargs: Any) -> Any:
    """Run compiled ``flex_attention``; never let dynamo fall back to eager at its limit.

    At dynamo's recompile limit torch would run ``flex_attention`` eagerly, which
    materialises every score (a 384 GiB allocation on a 256x256 layout). Here the limit is
    raised to :data:`RECOMPILE_LIMIT` for this call (:class:`_RaisedLimit`: restored after it,
    in every thread) and hitting it is an error.
    """
    with _RaisedLimit() as limit:
        try:
            return compiled_flex_attention()(*args, **kwargs)
        except Exception as exc:
            if "LimitHit" not in type(exc).__name__ and "recompile_limit" not in str(exc):
                raise
            raise RecompileLimitError(
                f"flexna: its compiled flex_attention reached {limit} recompilations (one per "
                "distinct tensor shape / dtype / device / option set). Rather than fall back to "
                "eager attention (which materialises all N x N scores), flexna stops here. Fix: "
                "use fewer distinct shapes, or raise flexna.flex.RECOMPILE_LIMIT."
            ) from exc


def _eager_reason(query: torch.Tensor, tensors: tuple[torch.Tensor, ...], return_lse: bool,
                  score_mod: object = None) -> str | None:
    """Why compiled Flex cannot run this call, or None. (CPU Flex compiles inference only.)

    With gradients enabled, a ``score_mod`` that may reach a tensor requiring grad (see
    :func:`reachable_tensors`: closures, globals, bound methods, partials) counts as needing
    them; nothing is walked under ``torch.no_grad()``.
    """
    if query.device.type != "cpu":
        return None
    if return_lse:
        return "return_lse=True"
    if not torch.is_grad_enabled():
        return None
    if any(t.requires_grad for t in tensors):
        return "gradients are required"
    if score_mod is not None and score_mod_needs_grad(score_mod):
        return "score_mod reaches a tensor that requires grad"
    return None


def lse_call(fn: Callable[..., Any], *args: Any, return_lse: bool, **kwargs: Any) -> Any:
    """Call a flex_attention-like ``fn`` asking for the lse the way this torch prefers.

    torch >= 2.9 deprecates ``return_lse`` for ``return_aux=AuxRequest(lse=True)``.
    """
    if not return_lse:
        return fn(*args, **kwargs)
    if AuxRequest is None:
        return fn(*args, return_lse=True, **kwargs)
    out, aux = fn(*args, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse


def run_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
             scale: float | None, return_lse: bool, *, captured_grad: bool = False, **kwargs: Any) -> Any:
    """Compiled ``flex_attention`` on ``[B, H, N, D]`` tensors; where torch cannot compile it
    on CPU, eager Flex (``return_lse``) or, when gradients are needed (torch's Flex has no CPU
    backward at all), :func:`dense_flex_attention`, with an :class:`EagerFallbackWarning`.

    Inside the user's ``torch.compile`` this is one ``flex_attention`` op of their graph (the
    CPU cases above: the dense stand-in, warned about when the call was planned); the caller
    passes ``kernel_options`` then (nothing here is looked up at trace time) and
    ``captured_grad``: whether a tensor its score_mod captures needs gradients.
    """
    if torch.compiler.is_compiling():
        if query.device.type == "cpu":
            kwargs.pop("kernel_options", None)
            if _CPU_SHARED_BUFFER_BUG:  # torch < 2.13's CPU lowering rejects q/k/v views of one buffer
                key, value = key.contiguous(), value.contiguous()
            # the CPU template reads its inputs' sizes as 4-D: a [B, H, N, D] view of a graph input
            # of another rank (a [B, frames, *spatial, H, D] chunk) fails to lower; copy those
            query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        if query.device.type == "cpu" and (return_lse or (torch.is_grad_enabled() and (captured_grad or any(
                t.requires_grad for t in (query, key, value))))):
            if torch.compiler.is_exporting():
                raise RuntimeError(
                    "flexna: exporting on the CPU with gradients enabled (or return_lse) would export "
                    "the dense N x N stand-in, not flex_attention (torch's CPU Flex compiles inference "
                    "only). Export under torch.no_grad() / torch.inference_mode(), or on CUDA.")
            return dense_flex_attention(query, key, value, block_mask=block_mask, scale=scale,
                                        return_lse=return_lse, **kwargs)
        return lse_call(flex_attention, query, key, value, block_mask=block_mask, scale=scale,
                        return_lse=return_lse, **kwargs)
    reason = _eager_reason(query, (query, key, value), return_lse, kwargs.get("score_mod"))
    if query.is_cuda:
        user = kwargs.get("kernel_options") or {}
        if user.get("BACKEND") != "FLASH":  # the Triton options mean nothing to FLASH
            kwargs["kernel_options"] = {**cuda_kernel_options(query.device), **user}
    if reason is None:
        if query.device.type == "cpu":
            # no gradients wanted, but torch's CPU Flex rejects inputs that require grad
            query, key, value = query.detach(), key.detach(), value.detach()
        return lse_call(call_compiled, query, key, value, block_mask=block_mask, scale=scale,
                        return_lse=return_lse, **kwargs)
    warn_user(
        f"flexna: compiled FlexAttention on CPU supports inference only, and {reason}; "
        "running FlexAttention eagerly, which materialises the [batch, heads, N, N] score "
        "matrix (fine for small layouts; use a CUDA device for large ones)",
        EagerFallbackWarning,
    )
    if reason != "return_lse=True":
        return dense_flex_attention(query, key, value, block_mask=block_mask, scale=scale,
                                    return_lse=return_lse, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return lse_call(flex_attention, query, key, value, block_mask=block_mask, scale=scale,
                        return_lse=return_lse, **kwargs)


@functools.lru_cache(maxsize=16)
def cuda_kernel_options(device: torch.device) -> dict[str, bool]:
    """Flex kernel options flexna passes on CUDA, where this torch's lowering knows them.

    * ``FORCE_USE_FLEX_ATTENTION``: with fewer than 128 queries torch switches to its
      decoding kernel, which fails to compile for GQA with a shared BlockMask on torch 2.11
      (NoValidChoicesError, found by the GPU tests); the main kernel handles every case.
    * ``USE_TMA`` on Hopper or newer (torch turns it off itself where the tensors don't allow
      it): 4-6% faster block-sparse kernels on an H200
      (benchmarks/results/explore-kernel-options-NVIDIA-H200-2026-11-21.md).
    """
    try:
        from torch._inductor.kernel.flex import flex_attention as lowering
        from torch._inductor.kernel.flex import flex_decoding as decoding
    except ImportError:
        return {}
    options = {}
    if "FORCE_USE_FLEX_ATTENTION" in inspect.getsource(decoding):
        options["FORCE_USE_FLEX_ATTENTION"] = True
    if torch.cuda.get_device_capability(device)[0] >= 9 and "USE_TMA" in inspect.getsource(lowering):
        options["USE_TMA"] = True
    return options


_LEAVES = (type(None), bool, int, float, complex, str, bytes, types.ModuleType, type,
           types.BuiltinFunctionType, types.CodeType, torch.dtype, torch.device, torch.Size)
REACH_LIMIT = 10_000  # objects walked per score_mod before flexna assumes the worst


def _code_names(code: types.CodeType) -> set[str]:
    """Global names ``code`` (and the code objects nested in it) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _children(obj: object) -> list[object]:
    """What a score_mod-like object can reach one step on (see :func:`reachable_tensors`)."""
    if isinstance(obj, types.FunctionType):
        cells = [c.cell_contents for c in obj.__closure__ or () if _cell_full(c)]
        globs = [obj.__globals__[n] for n in _code_names(obj.__code__) if n in obj.__globals__]
        return [*cells, *(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values(), *globs,
                *vars(obj).values()]
    if isinstance(obj, types.MethodType):
        return [obj.__func__, obj.__self__]
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, list | tuple | set | frozenset):
        return list(obj)
    reach = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    call = next((vars(c)["__call__"] for c in type(obj).__mro__ if "__call__" in vars(c)), None)
    return [*reach, call] if isinstance(call, types.FunctionType) else reach


def _cell_full(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell (a name not yet bound)
        return False
    return True


def reachable_tensors(mod: object, limit: int = REACH_LIMIT) -> tuple[tuple[torch.Tensor, ...], bool]:
    """Tensors a score_mod can reach, and whether the walk saw everything.

    Walked: closure cells, default arguments, the globals its code (and nested code) names,
    a bound method's ``__self__`` (an ``nn.Module``'s parameters, buffers and submodules
    through its attributes), a ``functools.partial``'s function, args and keywords, a
    callable object's attributes and ``__call__``, and containers of these. Modules,
    classes and builtins are not entered. ``complete`` is False when more than ``limit``
    objects were reachable (the caller then assumes a tensor needing gradients is among them).
    """
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack: list[object] = [mod]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        if len(seen) >= limit:
            return tuple(found.values()), False
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[id(obj)] = obj
            continue
        stack.extend(_children(obj))
    return tuple(found.values()), True


def score_mod_needs_grad(mod: object) -> bool:
    """Whether a score_mod may reach a tensor that requires grad (True when unsure)."""
    tensors, complete = reachable_tensors(mod)
    return not complete or any(t.requires_grad for t in tensors)


def dense_flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         score_mod: Callable[..., torch.Tensor] | None = None,
                         block_mask: BlockMask | None = None, scale: float | None = None,
                         enable_gqa: bool = False, return_lse: bool = False) -> Any:
    """Differentiable dense stand-in for ``flex_attention`` (same arguments and results).

    Computes all ``[B, H, Nq, Nkv]`` scores in float32 (float64 for float64 inputs), applies
    ``score_mod`` and ``block_mask.mask_mod`` with broadcast index tensors, and a safe
    softmax (rows with no key give output 0, lse ``-inf``). Works on any device with
    autograd, including gradients of tensors captured by ``score_mod``; memory is
    O(N^2): for small problems and CPU training/tests only.
    """
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv:
        if not enable_gqa or hq % hkv:
            raise ValueError(f"query has {hq} heads and key {hkv}: need enable_gqa=True and "
                             "query heads divisible by key heads")
        key = key.repeat_interleave(hq // hkv, dim=1)
        value = value.repeat_interleave(hq // hkv, dim=1)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (query.to(work) @ key.to(work).transpose(-2, -1)) * scale
    dev = query.device
    b = torch.arange(query.shape[0], device=dev)[:, None, None, None]
    h = torch.arange(hq, device=dev)[None, :, None, None]
    q_idx = torch.arange(query.shape[2], device=dev)[None, None, :, None]
    kv_idx = torch.arange(key.shape[2], device=dev)[None, None, None, :]
    if score_mod is not None:
        scores = score_mod(scores, b, h, q_idx, kv_idx)
    if block_mask is not None:
        keep = block_mask.mask_mod(b, h, q_idx, kv_idx)
        scores = scores.masked_fill(~keep, float("-inf"))
    empty = (scores.amax(dim=-1) == float("-inf"))[..., None]  # rows attending nothing
    scores = scores.masked_fill(empty, 0.0)  # keeps their gradients finite (then zeroed)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(empty, 0.0)
    out = (probs @ value.to(work)).to(query.dtype)
    if return_lse:
        return out, lse.masked_fill(empty, float("-inf"))[..., 0].float()
    return out
