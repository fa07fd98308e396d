"""Streaming neighborhood attention: a rolling key/value cache for chunked, causal-in-time decoding.

An autoregressive video model (or a long-sequence 1-D model) produces a layout of shape
``(T, *spatial)`` a few frames at a time. Axis 0 is time and must be causal; the other axes
are whatever the pattern says. A chunk of frames ``[t0, t1)`` attends itself and earlier
frames, and a query frame ``x`` reaches key frames ``>= lo[x]`` on the time axis
(:func:`flexna.geometry.window_bounds`, any kernel, stride and dilation). So after ``t``
frames, no future query reaches a frame before ``reach(t) = min(lo[t:])``: those are evicted.
:class:`NACache` keeps the rest in a ring of ``capacity = max_t (t - reach(t))`` frames
(fixed storage: steady-state steps keep every tensor shape).

Each :meth:`NACache.attend` is one fused Flex call: the chunk's queries (global frames
``[t0, t1)``, the ``q_region``) x a fixed-length window of frames ``[b, b + W)`` ending at
``t1`` (the ``kv_region``, ``W = min(capacity + chunk, T)``: the ring read in logical order,
then the chunk's own K/V) plus the extra always-attended tokens. Frames of the window that are
already evicted (still in the ring until overwritten) or not yet written (zeros, while the
stream is shorter than the window) are never attended. The BlockMask is the analytic one of
the *global* pattern restricted to those regions (:class:`flexna.MaskSpec`), so the output
equals full-sequence :func:`flexna.neighborhood_attention` on the ``T``-frame layout
restricted to the chunk's queries. The time-axis pair set, in region-local coordinates,
depends only on ``(lo[x] - b, x - b)`` for the chunk's frames: masks are cached per cache
object under that key, so a steady state rebuilds nothing (it needs one mask per residue of
``t0`` modulo stride x dilation of the time axis).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask

from flexna.backends import Backend, backend_options, check_backend
from flexna.blockmask import assemble_block_mask, build_block_mask
from flexna.blocksparsity import spec_maps
from flexna.flex import reachable_tensors, run_flex
from flexna.functional import check_options, check_tensors, choose_backend
from flexna.geometry import window_bounds
from flexna.pattern import BoolOrTuple, IntOrTuple, NAPattern, as_bool_tuple, as_shape
from flexna.spec import MaskSpec
from flexna.tables import build_tables

__all__ = ["NACache", "StaticStep", "time_reach"]

MASK_CACHE_SIZE = 32  # BlockMasks one cache keeps (a steady state needs stride x dilation at most)


def time_reach(pattern: NAPattern) -> np.ndarray:
    """``reach[t]`` for ``t = 0 .. T``: the first frame any query frame ``>= t`` attends on axis 0
    (``reach[T] = T``: no query is left). Frames before ``reach[t]`` can be evicted after ``t``."""
    length = pattern.shape[0]
    lo, _ = window_bounds(length, pattern.kernel_size[0], pattern.stride[0], pattern.dilation[0],
                          pattern.is_causal[0])
    suffix_min = np.minimum.accumulate(lo[::-1])[::-1]
    return np.concatenate([suffix_min, [length]]).astype(np.int64)


def _causal_axes(is_causal: BoolOrTuple | None, ndim: int) -> tuple[bool, ...]:
    """``is_causal`` per axis (``None``: causal time, non-causal elsewhere); time must be causal."""
    if is_causal is None:
        return (True,) + (False,) * (ndim - 1)
    causal = as_bool_tuple("is_causal", is_causal, ndim)
    if not causal[0]:
        raise ValueError(f"is_causal[axis 0] = False is out of range: NACache streams along axis 0 (time), "
                         f"which must be causal (is_causal = {causal}); need is_causal[axis 0] = True")
    return causal


class NACache:
    """A rolling key/value cache for neighborhood attention streamed along axis 0 (time).

    ``shape``: the whole layout ``(T, *spatial)`` (``T``: the most frames the stream may
    have; for 1-D the only axis is the token axis). ``kernel_size``, ``stride``,
    ``dilation``: per axis as in :func:`flexna.neighborhood_attention`; ``is_causal``: per
    axis, ``None`` for causal time and non-causal space (axis 0 must be causal).
    ``extra_k``/``extra_v`` ``[batch, M, kv_heads, dim]``: tokens every query attends (text,
    sinks), given once. ``scale``: as in :func:`flexna.neighborhood_attention`; ``backend``:
    the CUDA kernels (``"auto"``, ``"triton"``, ``"flash"``). ``block_size``: the BlockMask's
    ``(q, kv)`` block sizes in tokens (default: the backend's; 128 on Triton).

    Call :meth:`attend` with consecutive chunks ``[batch, frames, *spatial, heads, dim]``;
    batch, kv heads, dims, dtype and device are fixed by the first call. Gradients reach the
    chunk's own ``q``/``k``/``v`` (and the extra tokens), not the frames held from earlier
    chunks (they are stored detached).

    Example::

        cache = flexna.NACache((16, 8, 8), kernel_size=(4, 3, 3))
        for t in range(16):
            out = cache.attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
    """

    def __init__(self, shape: IntOrTuple, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 dilation: IntOrTuple = 1, is_causal: BoolOrTuple | None = None, *,
                 extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                 scale: float | None = None, backend: Backend = "auto",
                 block_size: int | tuple[int, int] | None = None) -> None:
        shape_t = as_shape("shape", shape)
        causal = _causal_axes(is_causal, len(shape_t))
        self.pattern = NAPattern.create(shape_t, kernel_size, stride, dilation, causal)
        check_options(scale)
        self.scale, self.backend = scale, check_backend(backend)
        if block_size is not None:  # validated now, not at the first chunk
            MaskSpec.create(self.pattern, block_size=block_size)
        self.block_size = block_size
        if (extra_k is None) != (extra_v is None):
            raise ValueError("extra_k and extra_v must be given together")
        for name, t in (("extra_k", extra_k), ("extra_v", extra_v)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[1] < 1):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a tensor shaped [batch, M >= 1, kv_heads, dim], got {got}")
        self.extra_k, self.extra_v = extra_k, extra_v
        self._reach = time_reach(self.pattern)
        self._lo = window_bounds(shape_t[0], self.pattern.kernel_size[0], self.pattern.stride[0],
                                 self.pattern.dilation[0], True)[0]
        frames = np.arange(shape_t[0] + 1)
        self.capacity = int((frames - self._reach).max())
        self._masks: OrderedDict[tuple, tuple[BlockMask, str]] = OrderedDict()
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self, free: bool = False) -> None:
        """Forget every frame (a new stream). The ring is kept (a new stream reads only frames it
        wrote itself) unless ``free``: then it is released and the next chunk allocates it anew
        (and may change batch, heads, dims, dtype or device)."""
        if getattr(self, "_static", None) is not None:
            raise RuntimeError("this NACache is driven by its StaticStep: call step.reset() or "
                               "step.release() instead")
        self._static: StaticStep | None = None
        self.frames_seen = 0
        if free or not hasattr(self, "_k"):
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None

    @property
    def num_frames(self) -> int:
        """Frames the layout holds (``T``)."""
        return self.pattern.shape[0]

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """The spatial shape of one frame (``()`` in 1-D)."""
        return self.pattern.shape[1:]

    @property
    def tokens_per_frame(self) -> int:
        return math.prod(self.frame_shape)

    @property
    def first_retained(self) -> int:
        """The first frame a future query can still reach (frames before it are evicted)."""
        return int(self._reach[self.frames_seen])

    @property
    def retained_frames(self) -> int:
        """Frames held for future queries: ``frames_seen - first_retained`` (<= :attr:`capacity`)."""
        return self.frames_seen - self.first_retained

    @property
    def num_extra(self) -> int:
        return 0 if self.extra_k is None else self.extra_k.shape[1]

    # ------------------------------------------------------------------ validation
    def _check_chunk(self, q: Any, k: Any, v: Any) -> int:
        """Validate one chunk; returns its frame count (``ValueError`` naming what is wrong)."""
        for name, t in (("q_chunk", q), ("k_chunk", k), ("v_chunk", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        n, spatial = self.pattern.ndim, self.frame_shape
        want = f"[batch, frames, {''.join(f'{s}, ' for s in spatial)}heads, dim]"
        for name, t in (("q_chunk", q), ("k_chunk", k), ("v_chunk", v)):
            if t.dim() != n + 3 or tuple(t.shape[2:2 + n - 1]) != spatial:
                raise ValueError(f"{name} must be shaped {want} (layout {self.pattern.shape}, frames "
                                 f"along axis 0), got {tuple(t.shape)}")
        check_tensors(q, k, v, None)
        frames, left = q.shape[1], self.num_frames - self.frames_seen
        if not 1 <= frames <= left:
            raise ValueError(f"q_chunk has {frames} frames at frame {self.frames_seen}: out of range, need "
                             f"1 <= frames <= {left} (the layout has {self.num_frames} frames along axis 0)")
        self._check_state(k, v)
        return frames

    def _check_state(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Later chunks must match the first one (batch, kv heads, dims, dtype, device)."""
        if self._k is not None:
            ref_k, ref_v = self._k, self._v
            assert ref_v is not None
            got = (k.shape[0], *k.shape[-2:], v.shape[-1], k.dtype, k.device)
            want = (ref_k.shape[0], *ref_k.shape[-2:], ref_v.shape[-1], ref_k.dtype, ref_k.device)
            if got != want:
                raise ValueError(f"k_chunk/v_chunk (batch, kv_heads, dim, value_dim, dtype, device) = {got} "
                                 f"differ from the cache's {want} (set by the first chunk; "
                                 "reset(free=True) to start a stream of other tensors)")
            return
        if self.extra_k is not None and self.extra_v is not None:
            for name, t, like in (("extra_k", self.extra_k, k), ("extra_v", self.extra_v, v)):
                want_s = (like.shape[0], t.shape[1], like.shape[-2], like.shape[-1])
                if tuple(t.shape) != want_s or t.dtype != like.dtype or t.device != like.device:
                    raise ValueError(f"{name} must be shaped [batch, M, kv_heads, dim] = {want_s} with "
                                     f"{like.dtype} on {like.device} (matching the chunks), got "
                                     f"{tuple(t.shape)} {t.dtype} on {t.device}")
            if self.extra_k.shape[1] != self.extra_v.shape[1]:
                raise ValueError(f"extra_k has {self.extra_k.shape[1]} tokens and extra_v "
                                 f"{self.extra_v.shape[1]}: they must match")

    # ------------------------------------------------------------------ masks
    def window(self, frames: int) -> tuple[int, int]:
        """``(b, W)``: the key frames ``[b, b + W)`` the next chunk of ``frames`` frames is
        presented with (fixed ``W`` for a fixed chunk size, so shapes repeat)."""
        t1 = self.frames_seen + frames
        width = min(self.capacity + frames, self.num_frames)
        return max(0, t1 - width), width

    def _spec(self, t0: int, t1: int, b: int, width: int, block: tuple[int, int] | None) -> MaskSpec:
        full = tuple((0, s) for s in self.frame_shape)
        return MaskSpec.create(self.pattern, q_region=((t0, t1), *full), kv_region=((b, b + width), *full),
                               num_extra_kv=self.num_extra,
                               block_size=block if self.block_size is None else self.block_size)

    def block_mask(self, frames: int, *, batch: int = 1, heads: int = 1, grads: bool = False,
                   device: torch.device | str = "cpu") -> tuple[BlockMask, str]:
        """The BlockMask (and kernel backend) of the next chunk of ``frames`` frames: its queries x
        the window of :meth:`window` plus the extra tokens, cached under the chunk's region-local
        time-axis windows."""
        t0 = self.frames_seen
        t1 = t0 + frames
        b, width = self.window(frames)
        dev = torch.device(device)
        key = (width, t0 - b, tuple((self._lo[t0:t1] - b).tolist()), dev, grads, batch, heads)
        hit = self._masks.get(key)
        if hit is not None:
            self._masks.move_to_end(key)
            return hit
        spec, chosen = choose_backend(lambda block, _chosen: self._spec(t0, t1, b, width, block),
                                      self.backend, dev, grads, batch, heads)
        entry = (build_block_mask(spec, dev), chosen)
        self._masks[key] = entry
        if len(self._masks) > MASK_CACHE_SIZE:
            self._masks.popitem(last=False)
        return entry

    # ------------------------------------------------------------------ attention
    def _window_kv(self, chunk: torch.Tensor, ring: torch.Tensor, b: int, width: int) -> torch.Tensor:
        """Frames ``[b, b + width)`` in order: the ring's (held), the chunk's, zeros (future frames,
        while the stream is shorter than the window). Every frame in ``[b, t0)`` is in the ring:
        ``b >= t0 - capacity`` (``width = capacity + frames``, or ``T`` and then ``b = 0 <= t0 - capacity``
        would need ``t1 > T``)."""
        t0, t1 = self.frames_seen, self.frames_seen + chunk.shape[1]
        assert b >= t0 - self.capacity
        pieces = []
        if t0 > b:
            slots = torch.arange(b, t0, device=ring.device) % self.capacity
            pieces.append(ring.index_select(1, slots))
        pieces.append(chunk)
        if b + width > t1:
            pieces.append(chunk.new_zeros((chunk.shape[0], b + width - t1, *chunk.shape[2:])))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _store(self, chunk: torch.Tensor, ring: torch.Tensor) -> None:
        """Write the chunk's last ``capacity`` frames into their ring slots (detached)."""
        if self.capacity == 0:
            return
        t0, t1 = self.frames_seen, self.frames_seen + chunk.shape[1]
        first = max(t0, t1 - self.capacity)
        slots = torch.arange(first, t1, device=ring.device) % self.capacity
        ring.index_copy_(1, slots, chunk[:, first - t0:].detach())

    def _as_sequence(self, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """``[B, frames, *spatial, H, D]`` (+ extra ``[B, M, H, D]``) -> ``[B, H, N (+ M), D]``."""
        seq = x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])
        if extra is not None:
            seq = torch.cat([seq, extra], dim=1)
        return seq.transpose(1, 2)

    def attend(self, q_chunk: torch.Tensor, k_chunk: torch.Tensor, v_chunk: torch.Tensor,
               return_lse: bool = False) -> Any:
        """Append the chunk's K/V and return its attention output ``[B, frames, *spatial, heads,
        value_dim]`` (with ``return_lse``: and the lse ``[B, frames, *spatial, heads]``, float32),
        equal to full-sequence :func:`flexna.neighborhood_attention` on the layout for these
        queries. One fused Flex call."""
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
        if self._static is not None:
            raise RuntimeError("this NACache is driven by its StaticStep (cache.static_step); call "
                               "step.release() first to go back to attend()")
        frames = self._check_chunk(q_chunk, k_chunk, v_chunk)
        if self._k is None:
            size = (k_chunk.shape[0], self.capacity, *self.frame_shape)
            self._k = k_chunk.new_zeros((*size, *k_chunk.shape[-2:]))
            self._v = v_chunk.new_zeros((*size, *v_chunk.shape[-2:]))
        ring_k, ring_v = self._k, self._v
        assert ring_v is not None
        b, width = self.window(frames)
        grads = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q_chunk, k_chunk, v_chunk, self.extra_k, self.extra_v))
        mask, chosen = self.block_mask(frames, batch=q_chunk.shape[0], heads=q_chunk.shape[-2], grads=grads,
                                       device=q_chunk.device)
        kwargs: dict[str, Any] = {"enable_gqa": True} if k_chunk.shape[-2] != q_chunk.shape[-2] else {}
        if options := backend_options(chosen, q_chunk.device, mask.BLOCK_SIZE):
            kwargs["kernel_options"] = options
        result = run_flex(self._as_sequence(q_chunk, None),
                          self._as_sequence(self._window_kv(k_chunk, ring_k, b, width), self.extra_k),
                          self._as_sequence(self._window_kv(v_chunk, ring_v, b, width), self.extra_v),
                          mask, self.scale, return_lse, **kwargs)
        self._store(k_chunk, ring_k)
        self._store(v_chunk, ring_v)
        self.frames_seen += frames
        out, lse = result if return_lse else (result, None)
        shape = q_chunk.shape[:-1]
        out = out.transpose(1, 2).reshape(*shape, out.shape[-1])
        if lse is None:
            return out
        return out, lse.transpose(1, 2).reshape(shape)

    def static_step(self, q_chunk: torch.Tensor, k_chunk: torch.Tensor, v_chunk: torch.Tensor) -> StaticStep:
        """A fixed-shape step for chunks shaped like these (nothing is computed from them): see
        :class:`StaticStep`. It continues this cache's stream (frames seen so far, ring) and
        takes it over: :meth:`attend` refuses until :meth:`StaticStep.release`."""
        return StaticStep(self, q_chunk, k_chunk, v_chunk)

    def __repr__(self) -> str:
        return (f"NACache({self.pattern}, capacity {self.capacity} frames, {self.frames_seen} seen, "
                f"{self.retained_frames} retained, {self.num_extra} extra tokens)")


class StaticStep(torch.nn.Module):
    """One streaming step of a fixed chunk size as a static computation: no host work, no host
    sync, no Python state that changes, so ``torch.compile(step, mode="reduce-overhead")``
    captures it in a CUDA graph and replays it for every chunk of the stream.

    Made by :meth:`NACache.static_step` for chunks of ``f`` frames. Calling it with
    ``(q_chunk, k_chunk, v_chunk)`` returns the chunk's output, equal to :meth:`NACache.attend`
    (and so to full-sequence attention restricted to the chunk), from the first frame on:

    * the frame counter is a device tensor; the keys are the ring read in logical order
      (a device-computed gather) then the chunk, ``capacity + f`` frames (plus the extra
      tokens), and the chunk is written into the ring in place;
    * one BlockMask serves every step: that of an interior chunk, with the ring's key blocks
      marked partial, and the mask_mod also requiring the key's frame to exist (``>= 0``:
      the first ``capacity`` frames of a stream, read from a per-query table of the counter).

    Needs stride 1 and dilation 1 on the time axis (then a chunk's pattern relative to its
    window does not depend on where it is, and the stream may run past ``T``; other time
    strides need :meth:`NACache.attend`). Gradients are not supported (inference only).
    """

    seen: torch.Tensor  # frames of the stream so far (int64 scalar)
    seen_q: torch.Tensor  # the same per query token (int32): the mask_mod reads it FLASH-safely
    kv_frame: torch.Tensor  # each key's frame in the window (ring keys 0..cap-1; the rest cap)
    offsets: torch.Tensor  # arange for ring slot arithmetic

    def __init__(self, cache: NACache, q_chunk: torch.Tensor, k_chunk: torch.Tensor,
                 v_chunk: torch.Tensor) -> None:
        super().__init__()
        pattern = cache.pattern
        if pattern.stride[0] != 1 or pattern.dilation[0] != 1:
            raise ValueError(f"static_step needs stride 1 and dilation 1 on the time axis (axis 0), got stride "
                             f"{pattern.stride[0]}, dilation {pattern.dilation[0]}: use cache.attend() for "
                             "these patterns")
        if cache._static is not None:
            raise RuntimeError("this NACache already has a StaticStep")
        frames = cache._check_chunk(q_chunk, k_chunk, v_chunk)
        cap, tpf = cache.capacity, cache.tokens_per_frame
        if cap + frames > cache.num_frames:
            raise ValueError(f"static_step of {frames} frames needs a layout of at least capacity + frames = "
                             f"{cap + frames} frames along axis 0, got {cache.num_frames}")
        self.cache, self.frames, self.capacity = cache, frames, cap
        dev = q_chunk.device
        if cache._k is None:
            size = (k_chunk.shape[0], cap, *cache.frame_shape)
            cache._k = k_chunk.new_zeros((*size, *k_chunk.shape[-2:]))
            cache._v = v_chunk.new_zeros((*size, *v_chunk.shape[-2:]))
        spec, chosen = choose_backend(
            lambda block, _chosen: cache._spec(cap, cap + frames, 0, cap + frames, block), cache.backend,
            dev, False, q_chunk.shape[0], q_chunk.shape[-2])
        partial, full = spec_maps(spec)
        ring_blocks = -(-cap * tpf // spec.kv_block)  # key blocks holding ring frames (may not exist yet)
        partial, full = partial.copy(), full.copy()
        partial[:, :, :ring_blocks] |= full[:, :, :ring_blocks]
        full[:, :, :ring_blocks] = False
        inner = build_tables(spec, dev).mask_mod()
        kv_frame = torch.full((spec.kv_len,), cap, dtype=torch.int32, device=dev)  # frames >= cap: the chunk
        kv_frame[:cap * tpf] = torch.arange(cap * tpf, device=dev, dtype=torch.int32) // tpf
        self.register_buffer("seen", torch.full((), cache.frames_seen, dtype=torch.int64, device=dev))
        self.register_buffer("seen_q", torch.full((spec.q_len,), cache.frames_seen, dtype=torch.int32,
                                                  device=dev))
        self.register_buffer("kv_frame", kv_frame)
        self.register_buffer("offsets", torch.arange(max(cap, frames, 1), device=dev))
        seen_q = self.seen_q

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                     kv_idx: torch.Tensor) -> torch.Tensor:
            # ring key j (logical) holds frame seen - cap + j: attended only once it exists
            return inner(b, h, q_idx, kv_idx) & (kv_frame[kv_idx] + seen_q[q_idx] >= cap)

        self.block_mask = assemble_block_mask(partial, full, (spec.q_len, spec.kv_len),
                                              (spec.q_block, spec.kv_block), mask_mod, dev)
        self.kernel_options = backend_options(chosen, dev, self.block_mask.BLOCK_SIZE)
        self.backend = chosen
        held = [x for x in self.block_mask.as_tuple() if isinstance(x, torch.Tensor)]
        for t in (cache._k, cache._v, *held, *reachable_tensors(mask_mod)[0]):
            torch._dynamo.mark_static_address(t)  # fixed buffers: CUDA graphs read them in place
        cache._static = self

    @property
    def frames_seen(self) -> int:
        """Frames of the stream so far (reads the device counter: a sync)."""
        return int(self.seen.item())

    def reset(self) -> None:
        """A new stream (the ring is kept; frames of the old stream are never attended)."""
        self.seen.zero_()
        self.seen_q.zero_()

    def release(self) -> NACache:
        """Hand the stream back to its :class:`NACache` (one sync: the frame count); returns it."""
        cache = self.cache
        cache._static = None
        cache.frames_seen = self.frames_seen
        return cache

    def forward(self, q_chunk: torch.Tensor, k_chunk: torch.Tensor, v_chunk: torch.Tensor) -> torch.Tensor:
        cache, cap, frames = self.cache, self.capacity, self.frames
        if not torch.compiler.is_compiling():  # eager calls are checked; a traced step was, once
            if q_chunk.shape[1] != frames:
                raise ValueError(f"q_chunk has {q_chunk.shape[1]} frames; this StaticStep takes {frames}")
            cache._check_state(k_chunk, v_chunk)
        ring_k, ring_v = cache._k, cache._v
        assert ring_k is not None and ring_v is not None
        keys, values = k_chunk, v_chunk
        if cap:
            read = (self.seen - cap + self.offsets[:cap]) % cap  # ring slots in frame order
            keys, values = (torch.cat([ring.index_select(1, read), chunk], dim=1)
                            for ring, chunk in ((ring_k, k_chunk), (ring_v, v_chunk)))
        kwargs: dict[str, Any] = {"enable_gqa": True} if k_chunk.shape[-2] != q_chunk.shape[-2] else {}
        if self.kernel_options:
            kwargs["kernel_options"] = dict(self.kernel_options)
        out = run_flex(cache._as_sequence(q_chunk, None), cache._as_sequence(keys, cache.extra_k),
                       cache._as_sequence(values, cache.extra_v), self.block_mask, cache.scale, False, **kwargs)
        kept = min(frames, cap)
        if kept:
            write = (self.seen + frames - kept + self.offsets[:kept]) % cap
            ring_k.index_copy_(1, write, k_chunk[:, frames - kept:].detach())
            ring_v.index_copy_(1, write, v_chunk[:, frames - kept:].detach())
        self.seen.add_(frames)
        self.seen_q.add_(frames)  # kept equal to seen (updated after the kernel that reads it)
        return out.transpose(1, 2).reshape(*q_chunk.shape[:-1], out.shape[-1])
