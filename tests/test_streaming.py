"""NACache (flexna.streaming): every chunk's output and lse equal the full-sequence float64
reference (flexna.reference, which shares no code with the mask builders), the BlockMask of
each chunk equals torch's create_block_mask over the reference's sub-mask, the retained frame
count equals the need read off the reference mask, and bad use is a clear error."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import warnings

import pytest
import torch
from helpers import assert_block_masks_equal, eager_flex_ok, expected_block_mask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexna
from flexna.errors import EagerFallbackWarning
from flexna.reference import reference_attention, reference_mask


@contextlib.contextmanager
def lse_path():
    """CPU Flex compiles inference only; with return_lse flexna runs it eagerly and warns."""
    with warnings.catch_warnings(), eager_flex_ok():
        warnings.simplefilter("ignore", EagerFallbackWarning)
        yield


def full_reference(shape, kernel, stride, dilation, causal, q, k, v, ek=None, ev=None):
    """Full-sequence float64 outputs ``[B, *shape, H, D]``, lse ``[B, *shape, H]`` and the mask."""
    n = math.prod(shape)
    b, h, hk = q.shape[0], q.shape[-2], k.shape[-2]
    mask = reference_mask(shape, kernel, stride, dilation, causal)
    layout_mask = mask
    ks, vs = k.reshape(b, n, hk, -1), v.reshape(b, n, hk, -1)
    if ek is not None:
        mask = torch.cat([mask, torch.ones(n, ek.shape[1], dtype=torch.bool)], 1)
        ks, vs = torch.cat([ks, ek], 1), torch.cat([vs, ev], 1)
    seq = [t.transpose(1, 2).repeat_interleave(h // t.shape[2], 1) for t in (ks, vs)]
    out, lse = reference_attention(q.reshape(b, n, h, -1).transpose(1, 2), seq[0], seq[1], mask)
    return (out.transpose(1, 2).reshape(*q.shape[:-1], -1), lse.transpose(1, 2).reshape(q.shape[:-1]),
            layout_mask)


def needed_frames(layout_mask: torch.Tensor, frames: int) -> list[int]:
    """Per ``t = 0..T``: frames before ``t`` that some query frame ``>= t`` attends, from the dense
    reference mask (independent of flexna's window bounds)."""
    per_frame = layout_mask.shape[0] // frames
    key_frame = torch.arange(layout_mask.shape[1]) // per_frame
    first = [int(key_frame[row].min()) for row in layout_mask]  # each query's first key frame
    first_by_frame = [min(first[f * per_frame:(f + 1) * per_frame]) for f in range(frames)]
    return [t - min(first_by_frame[t:]) if t < frames else 0 for t in range(frames + 1)]


@st.composite
def axis(draw, length_range, causal):
    length = draw(st.integers(*length_range))
    dilation = draw(st.integers(1, max(1, min(3, length // 2))))
    kernel = draw(st.integers(1, length // dilation))
    stride = draw(st.integers(1, kernel))
    return length, kernel, stride, dilation, causal


@st.composite
def streams(draw):
    """A layout (time first, causal), pattern, chunk schedule, batch/heads, extra tokens."""
    ndim = draw(st.integers(1, 3))
    time_range = (2, 16) if ndim == 1 else (2, 7)
    axes = [draw(axis(time_range, True))]
    for _ in range(ndim - 1):
        axes.append(draw(axis((1, 5), draw(st.booleans()) and draw(st.booleans()))))
    shape, kernel, stride, dilation, causal = (tuple(a[i] for a in axes) for i in range(5))
    chunks, left = [], shape[0]
    while left:
        chunks.append(draw(st.integers(1, left)))
        left -= chunks[-1]
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    return dict(shape=shape, kernel=kernel, stride=stride, dilation=dilation, causal=causal, chunks=chunks,
                batch=draw(st.integers(1, 2)), heads=heads, kv_heads=kv_heads,
                extra=draw(st.sampled_from([0, 0, 1, 3])), block=draw(st.sampled_from([None, 4, 8])),
                seed=draw(st.integers(0, 2**16)))


def make_inputs(case, dim=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(case["seed"])

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=dtype)

    b, shape = case["batch"], case["shape"]
    q = rand(b, *shape, case["heads"], dim)
    k, v = rand(b, *shape, case["kv_heads"], dim), rand(b, *shape, case["kv_heads"], dim + 1)
    ek = ev = None
    if case["extra"]:
        extra = (b, case["extra"], case["kv_heads"])
        ek, ev = rand(*extra, dim), rand(*extra, dim + 1)
    return q, k, v, ek, ev


def expected_chunk_mask(layout_mask, per_frame, t0, t1, start, width, extra):
    """The reference's rows of frames [t0, t1) x columns of frames [start, start + width) + extra."""
    rows = layout_mask[t0 * per_frame:t1 * per_frame, start * per_frame:(start + width) * per_frame]
    return torch.cat([rows, torch.ones(rows.shape[0], extra, dtype=torch.bool)], 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_every_chunk_equals_full_sequence_reference(case):
    q, k, v, ek, ev = make_inputs(case)
    shape = case["shape"]
    ref_out, ref_lse, layout_mask = full_reference(shape, case["kernel"], case["stride"], case["dilation"],
                                                   case["causal"], q, k, v, ek, ev)
    need = needed_frames(layout_mask, shape[0])
    block = case["block"]
    cache = flexna.NACache(shape, case["kernel"], case["stride"], case["dilation"], case["causal"],
                           extra_k=ek, extra_v=ev, block_size=None if block is None else (block, block))
    assert cache.capacity == max(need)
    per_frame = math.prod(shape[1:])
    t0, ring = 0, None
    with torch.no_grad(), lse_path():
        for frames in case["chunks"]:
            t1 = t0 + frames
            start, width = cache.window(frames)
            mask, _ = cache.block_mask(frames)
            want = expected_chunk_mask(layout_mask, per_frame, t0, t1, start, width, case["extra"])
            assert_block_masks_equal(mask, expected_block_mask(want, tuple(mask.BLOCK_SIZE)),
                                     f"chunk [{t0}, {t1}) window [{start}, {start + width})")
            out, lse = cache.attend(q[:, t0:t1], k[:, t0:t1], v[:, t0:t1], return_lse=True)
            torch.testing.assert_close(out.double(), ref_out[:, t0:t1], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(lse.double(), ref_lse[:, t0:t1], atol=2e-5, rtol=1e-4)
            assert cache.frames_seen == t1
            assert cache.retained_frames == need[t1], (t1, cache.retained_frames, need)
            assert cache._k is not None and cache._k.shape[1] == cache.capacity
            ring = cache._k.data_ptr() if ring is None else ring
            assert cache._k.data_ptr() == ring  # fixed storage: never reallocated
            t0 = t1


def stream_setup(case, dim=4, device="cpu"):
    """The case's inputs (on ``device``), its full-sequence float64 reference and a fresh cache."""
    q, k, v, ek, ev = make_inputs(case, dim=dim)
    ref_out, _, _ = full_reference(case["shape"], case["kernel"], case["stride"], case["dilation"],
                                   case["causal"], q, k, v, ek, ev)
    q, k, v, ek, ev = (None if t is None else t.to(device) for t in (q, k, v, ek, ev))
    cache = flexna.NACache(case["shape"], case["kernel"], case["stride"], case["dilation"], case["causal"],
                           extra_k=ek, extra_v=ev)
    return (q, k, v, ek, ev), ref_out, cache


def compiled_stream(case, compare_functional=False):
    """One frame per step, no lse, under no_grad: compiled Flex on CPU (one shape per step)."""
    (q, k, v, ek, ev), ref_out, cache = stream_setup(case)
    with torch.no_grad():
        outs = [cache.attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1]) for t in range(case["shape"][0])]
        streamed = torch.cat(outs, 1)
        torch.testing.assert_close(streamed.double(), ref_out, atol=2e-5, rtol=1e-4)
        if compare_functional:
            full = flexna.neighborhood_attention(q, k, v, case["kernel"], case["stride"], case["dilation"],
                                                 case["causal"], additional_keys=ek, additional_values=ev)
            torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-4)


def test_video_one_frame_at_a_time_compiled():
    compiled_stream(dict(shape=(6, 4, 5), kernel=(3, 3, 3), stride=(1, 1, 2), dilation=(1, 1, 1),
                         causal=(True, False, False), batch=1, heads=2, kv_heads=1, extra=2, seed=1),
                    compare_functional=True)


@pytest.mark.slow
def test_tokens_one_at_a_time_compiled():
    compiled_stream(dict(shape=(40,), kernel=(8,), stride=(2,), dilation=(2,), causal=(True,), batch=2,
                         heads=4, kv_heads=2, extra=3, seed=2), compare_functional=True)


def test_gradients_reach_the_chunk():
    """With gradients (CPU: the dense stand-in), the chunk's q gets the reference's gradient."""
    case = dict(shape=(5, 3), kernel=(3, 3), stride=(1, 1), dilation=(1, 1), causal=(True, False), batch=1,
                heads=1, kv_heads=1, extra=0, seed=3)
    q, k, v, _, _ = make_inputs(case)
    mask = reference_mask(case["shape"], case["kernel"], 1, 1, case["causal"])
    q64 = q.double().reshape(1, 15, 4).requires_grad_()
    scores = (q64 @ k.double().reshape(1, 15, 4).transpose(1, 2) * 0.5).masked_fill(~mask, float("-inf"))
    ref_out = torch.softmax(scores, -1) @ v.double().reshape(1, 15, 5)  # differentiable float64 reference
    cache = flexna.NACache(case["shape"], case["kernel"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerFallbackWarning)
        cache.attend(q[:, :3], k[:, :3], v[:, :3])
        q_last = q[:, 3:].clone().requires_grad_()
        out = cache.attend(q_last, k[:, 3:], v[:, 3:])
    out.sum().backward()
    (want,) = torch.autograd.grad(ref_out[:, 9:].sum(), q64)
    torch.testing.assert_close(q_last.grad.double().reshape(1, 6, 4), want[:, 9:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.double().reshape(1, 6, 5), ref_out[:, 9:].detach(), atol=1e-5, rtol=1e-4)


def test_reset_starts_a_new_stream_on_the_same_ring():
    """A second stream (other data, other chunks) reuses the ring and never reads the first's frames."""
    case = dict(shape=(9, 3), kernel=(4, 3), stride=(2, 1), dilation=(1, 1), causal=(True, False), batch=2,
                heads=2, kv_heads=2, extra=1, block=None)
    first = make_inputs({**case, "seed": 5})
    cache = flexna.NACache(case["shape"], case["kernel"], case["stride"], extra_k=first[3], extra_v=first[4])
    with torch.no_grad(), lse_path():
        for t in range(0, 9, 3):
            cache.attend(*(x[:, t:t + 3] for x in first[:3]), return_lse=True)
        ring = cache._k.data_ptr()
        cache.reset()
        assert cache.frames_seen == 0 and cache.retained_frames == 0
        q, k, v, _, _ = make_inputs({**case, "seed": 6})
        ref_out, ref_lse, _ = full_reference(case["shape"], case["kernel"], case["stride"], 1, case["causal"],
                                             q, k, v, first[3], first[4])
        for t0, t1 in ((0, 1), (1, 5), (5, 6), (6, 9)):
            out, lse = cache.attend(q[:, t0:t1], k[:, t0:t1], v[:, t0:t1], return_lse=True)
            torch.testing.assert_close(out.double(), ref_out[:, t0:t1], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(lse.double(), ref_lse[:, t0:t1], atol=2e-5, rtol=1e-4)
        assert cache._k.data_ptr() == ring
        cache.reset(free=True)
        assert cache._k is None


def test_steady_state_reuses_its_masks():
    """One token per step, stride 2 x dilation 3 on time: 6 steady-state masks, rebuilt never."""
    cache = flexna.NACache(200, 5, stride=2, dilation=3)
    with torch.no_grad(), lse_path():
        for t in range(150):
            if t == 100:
                built = dict(cache._masks)
            cache.attend(chunk(1), chunk(1), chunk(1), return_lse=True)
    assert len(built) <= 6 + cache.capacity  # warm-up masks, then one per residue of t mod 6
    assert all(cache._masks[key] is mask for key, mask in built.items() if key in cache._masks)
    assert len(cache._masks) == len(built)  # steps 100..149 built nothing new


def test_reach_of_a_2048_window_over_32k_frames():
    cache = flexna.NACache(32768, 2048)
    assert cache.capacity == 2047
    assert cache.window(1) == (0, 2048)
    video = flexna.NACache((30, 6, 10), (18, 3, 3))
    assert video.capacity == 17 and video.window(4) == (0, 21)


def _gpu_stream(stride):
    """A 12x8x16 CUDA stream (extra tokens, GQA): its case, float64 reference, q/k/v and cache."""
    case = dict(shape=(12, 8, 16), kernel=(4, 5, 7), stride=stride, dilation=(1, 1, 2),
                causal=(True, False, False), batch=1, heads=4, kv_heads=2, extra=3, seed=4)
    (q, k, v, _, _), ref_out, cache = stream_setup(case, dim=32, device="cuda")
    return case, ref_out, (q, k, v), cache


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_stream_equals_reference_without_host_syncs_in_the_steady_state():
    """On CUDA: one frame per step equals the reference, and once every steady-state mask is built
    (first pass) the steps run with torch's sync debug mode set to error (no device-to-host sync)."""
    case, ref_out, (q, k, v), cache = _gpu_stream((2, 1, 1))
    with torch.no_grad():
        for passes in range(2):
            cache.reset()
            outs = []
            for t in range(case["shape"][0]):
                if passes:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    outs.append(cache.attend(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1]))
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.testing.assert_close(torch.cat(outs, 1).cpu().double(), ref_out, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- the static step
@st.composite
def static_streams(draw):
    """Layouts whose time axis has stride 1 and dilation 1 (what StaticStep takes), a fixed chunk
    size, a stream length up to the layout (and past it: the pattern does not depend on T)."""
    case = draw(streams())
    k0 = case["kernel"][0]
    t = max(case["shape"][0], k0 + 1)
    case["shape"] = (t, *case["shape"][1:])
    case["kernel"] = (k0, *case["kernel"][1:])
    case["stride"] = (1, *case["stride"][1:])
    case["dilation"] = (1, *case["dilation"][1:])
    cap = k0 - 1
    case["frames"] = draw(st.integers(1, max(1, t - cap)))
    return case


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(static_streams())
def test_static_step_equals_full_sequence_reference(case):
    """Every fixed-size chunk of a StaticStep, from the first frame on (the ring still filling)
    and after a reset, equals the full-sequence float64 reference."""
    q, k, v, ek, ev = make_inputs(case)
    shape, f = case["shape"], case["frames"]
    ref_out, _, _ = full_reference(shape, case["kernel"], case["stride"], case["dilation"], case["causal"],
                                   q, k, v, ek, ev)
    block = case["block"]
    cache = flexna.NACache(shape, case["kernel"], case["stride"], case["dilation"], case["causal"],
                           extra_k=ek, extra_v=ev, block_size=None if block is None else (block, block))
    step = cache.static_step(q[:, :f], k[:, :f], v[:, :f])
    with torch.no_grad():
        for _ in range(2):
            for t0 in range(0, shape[0] - f + 1, f):
                out = step(q[:, t0:t0 + f], k[:, t0:t0 + f], v[:, t0:t0 + f])
                torch.testing.assert_close(out.double(), ref_out[:, t0:t0 + f], atol=2e-5, rtol=1e-4,
                                           msg=lambda m, t0=t0: f"chunk at frame {t0}: {m}")
            step.reset()


def test_static_step_continues_attend_and_hands_back():
    """attend() for a warm-up, a StaticStep for the rest (attend refuses meanwhile), then back."""
    case = dict(shape=(9, 3, 6), kernel=(4, 3, 3), stride=(1, 2, 1), dilation=(1, 1, 2),
                causal=(True, False, False), batch=2, heads=4, kv_heads=2, extra=2, seed=3)
    (q, k, v, _, _), ref_out, cache = stream_setup(case)
    with torch.no_grad():
        outs = [cache.attend(q[:, :2], k[:, :2], v[:, :2])]
        step = cache.static_step(q[:, :2], k[:, :2], v[:, :2])
        with pytest.raises(RuntimeError, match="driven by its StaticStep"):
            cache.attend(q[:, 2:4], k[:, 2:4], v[:, 2:4])
        with pytest.raises(ValueError, match="this StaticStep takes 2"):
            step(q[:, 2:5], k[:, 2:5], v[:, 2:5])
        outs += [step(q[:, t:t + 2], k[:, t:t + 2], v[:, t:t + 2]) for t in (2, 4, 6)]
        assert step.frames_seen == 8
        assert step.release() is cache and cache.frames_seen == 8
        outs.append(cache.attend(q[:, 8:], k[:, 8:], v[:, 8:]))
    torch.testing.assert_close(torch.cat(outs, 1).double(), ref_out, atol=2e-5, rtol=1e-4)


def test_static_step_needs_unit_time_stride():
    cache = flexna.NACache((8, 4), (4, 3), stride=(2, 1))
    x = torch.randn(1, 1, 4, 2, 8)
    with pytest.raises(ValueError, match="static_step needs stride 1 and dilation 1 on the time axis"):
        cache.static_step(x, x, x)
    with pytest.raises(ValueError, match=r"at least capacity \+ frames = 9 frames"):
        flexna.NACache((8, 4), (4, 3)).static_step(*(torch.randn(1, 6, 4, 2, 8),) * 3)


def test_static_step_compiles_once_for_the_whole_stream():
    """torch.compile of the step: one graph for every chunk of the stream (warm-up, steady state,
    a second stream after reset), no recompiles, no graph breaks."""
    from torch._dynamo.utils import counters

    case = dict(shape=(10, 4, 4), kernel=(3, 3, 3), stride=(1, 1, 2), dilation=(1, 1, 1),
                causal=(True, False, False), batch=1, heads=2, kv_heads=2, extra=0, seed=1)
    q, k, v, _, _ = make_inputs(case)
    ref_out, _, _ = full_reference(case["shape"], case["kernel"], case["stride"], case["dilation"],
                                   case["causal"], q, k, v)
    cache = flexna.NACache(case["shape"], case["kernel"], case["stride"])
    step = cache.static_step(q[:, :1], k[:, :1], v[:, :1])
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            out = torch.cat([compiled(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1]) for t in range(10)], 1)
            torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
            step.reset()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"]
    torch.compiler.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_static_step_in_a_cuda_graph_without_host_syncs():
    """torch.compile(mode="reduce-overhead") captures the step; after warm-up its replays run with
    torch's sync debug mode set to error, and every chunk equals the reference."""
    case, ref_out, (q, k, v), cache = _gpu_stream((1, 1, 1))
    step = cache.static_step(q[:, :1], k[:, :1], v[:, :1])
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for passes in range(3):
            step.reset()
            outs = []
            for t in range(case["shape"][0]):
                if passes == 2:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    outs.append(compiled(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1]).clone())
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.testing.assert_close(torch.cat(outs, 1).cpu().double(), ref_out, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flexna.flash_unavailable(torch.device("cuda")) is not None
                    or not importlib.util.find_spec("flash_attn"), reason="needs CUDA and flash-attn-4")
@pytest.mark.parametrize("frames", [1, 4])
def test_gpu_stream_on_flash_equals_reference(frames):
    """backend="flash": every chunk of a video stream (chunks of 1 and 4 frames, extra tokens,
    GQA) equals the float64 reference, fp16, as the Triton stream does."""
    case = dict(shape=(8, 16, 16), kernel=(4, 7, 9), stride=(1, 2, 1), dilation=(1, 1, 1),
                causal=(True, False, False), batch=1, heads=4, kv_heads=2, extra=8, seed=5)
    q, k, v, ek, ev = make_inputs(case, dim=64)
    v, ev = v[..., :64], ev[..., :64]
    ref_out, _, _ = full_reference(case["shape"], case["kernel"], case["stride"], case["dilation"],
                                   case["causal"], q.half().double(), k.half().double(), v.half().double(),
                                   ek.half().double(), ev.half().double())
    q, k, v, ek, ev = (t.cuda().half() for t in (q, k, v, ek, ev))
    cache = flexna.NACache(case["shape"], case["kernel"], case["stride"], extra_k=ek, extra_v=ev,
                           backend="flash")
    with torch.no_grad():
        outs = [cache.attend(q[:, t:t + frames], k[:, t:t + frames], v[:, t:t + frames])
                for t in range(0, case["shape"][0], frames)]
    torch.testing.assert_close(torch.cat(outs, 1).cpu().double(), ref_out, atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------- bad use


def chunk(frames, *spatial, heads=2, dim=4):
    return torch.randn(1, frames, *spatial, heads, dim)


def test_non_causal_time_axis_is_rejected():
    with pytest.raises(ValueError, match=r"is_causal\[axis 0\] = False .*need is_causal\[axis 0\] = True"):
        flexna.NACache((8, 4), 3, is_causal=(False, True))
    with pytest.raises(ValueError, match=r"is_causal\[axis 0\]"):
        flexna.NACache(8, 3, is_causal=False)


def test_pattern_and_option_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"kernel_size\[axis 1\] = 5 is out of range"):
        flexna.NACache((8, 4), (3, 5))
    with pytest.raises(ValueError, match="extra_k and extra_v must be given together"):
        flexna.NACache(8, 3, extra_k=torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="block_size"):
        flexna.NACache(8, 3, block_size=0)


def test_chunk_not_fitting_the_layout():
    cache = flexna.NACache((8, 4, 5), (3, 3, 3))
    with pytest.raises(ValueError, match=r"q_chunk must be shaped \[batch, frames, 4, 5, heads, dim\].*got "
                                         r"\(1, 1, 4, 6, 2, 4\)"):
        cache.attend(chunk(1, 4, 6), chunk(1, 4, 6), chunk(1, 4, 6))
    with pytest.raises(ValueError, match=r"k_chunk must be shaped"):
        cache.attend(chunk(1, 4, 5), chunk(1, 4), chunk(1, 4, 5))
    with pytest.raises(ValueError, match=r"q_chunk has 9 frames at frame 0: out of range, need 1 <= "
                                         r"frames <= 8"):
        cache.attend(chunk(9, 4, 5), chunk(9, 4, 5), chunk(9, 4, 5))


def test_more_frames_than_the_layout():
    cache = flexna.NACache(4, 2)
    with torch.no_grad(), lse_path():
        cache.attend(chunk(3), chunk(3), chunk(3), return_lse=True)
        with pytest.raises(ValueError, match=r"q_chunk has 2 frames at frame 3: out of range, need 1 <= "
                                             r"frames <= 1 \(the layout has 4 frames"):
            cache.attend(chunk(2), chunk(2), chunk(2), return_lse=True)


def test_mismatched_heads():
    cache = flexna.NACache(6, 3)
    with pytest.raises(ValueError, match="key has 2 heads, query 3"):
        cache.attend(chunk(1, heads=3), chunk(1), chunk(1))
    with torch.no_grad(), lse_path():
        cache.attend(chunk(1, heads=4), chunk(1), chunk(1), return_lse=True)
        with pytest.raises(ValueError, match=r"differ from the cache's .*set by the first chunk"):
            cache.attend(chunk(1, heads=4), chunk(1, heads=4), chunk(1, heads=4), return_lse=True)


def test_extra_tokens_must_match_the_chunks():
    cache = flexna.NACache(6, 3, extra_k=torch.randn(1, 2, 3, 4), extra_v=torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"extra_k must be shaped \[batch, M, kv_heads, dim\] = "
                                         r"\(1, 2, 2, 4\)"):
        cache.attend(chunk(1), chunk(1), chunk(1))
