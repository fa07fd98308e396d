"""Per-step cost of streaming neighborhood attention (flexna.NACache) on a GPU.

Run (CUDA):  python benchmarks/bench_streaming.py [--out FILE.md]
Without CUDA it prints that it skipped and exits 0 (``--cpu-smoke`` runs tiny sizes on the
CPU instead, to check the script itself; its times mean nothing).

Rows, each the median per-step time over the steady state (the cache already holding a full
window of history):

* **1-D**: one token per step, causal window 2048, history of 32768 tokens (8 heads, head dim
  128, fp16, forward);
* **video**: 30 frames of 48x80 tokens, causal window of 18 frames in time, full attention in
  space (12 heads, head dim 128, fp16), 1 and 4 frames per step.

Each against **recompute**: full-sequence :func:`flexna.neighborhood_attention` over the
whole layout every step (what a model without a cache does), and **SDPA over the whole
cache**: ``scaled_dot_product_attention`` of the step's queries against every key so far (a
dense KV cache, no window: the cost a dense-attention model pays; no mask, so it is a cost
reference, not the same result). The streamed output is checked against the recompute's rows.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import flexna


@dataclass(frozen=True)
class Case:
    """One streaming workload: layout, window (kernel) and frames per step."""

    name: str
    shape: tuple[int, ...]
    kernel: tuple[int, ...]
    frames_per_step: int
    heads: int
    dim: int


def cases(smoke: bool) -> list[Case]:
    """The issue's workloads (or tiny stand-ins for ``--cpu-smoke``)."""
    if smoke:
        return [Case("1-D smoke", (300,), (16,), 1, 2, 16), Case("video smoke", (8, 4, 6), (3, 4, 6), 2, 2, 16)]
    video = "video 30x48x80: {} frame(s)/step, 18-frame causal window, full space"
    return [Case("1-D: 1 token/step, window 2048, 32k history", (32768 + 256,), (2048,), 1, 8, 128),
            Case(video.format(1), (30, 48, 80), (18, 48, 80), 1, 12, 128),
            Case(video.format(4), (30, 48, 80), (18, 48, 80), 4, 12, 128)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call (synchronised)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def first_timed_frame(case: Case) -> int:
    """Frames already in the stream when timing starts: 1-D, the last 256 steps (history >= 32k);
    video, every step after the first full window of frames."""
    if len(case.shape) == 1:
        return case.shape[0] - 256 * case.frames_per_step
    return min(case.kernel[0], case.shape[0] - case.frames_per_step)


def stream_times(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, full: torch.Tensor,
                 repeats: int) -> list[float]:
    """Seconds per NACache step; the first pass (compiling, building the masks) is checked against
    the recompute's rows and not timed."""
    start, step = first_timed_frame(case), case.frames_per_step
    cache, times = flexna.NACache(case.shape, case.kernel), []
    for rep in range(repeats):
        cache.reset()
        cache.attend(q[:, :start], k[:, :start], v[:, :start])  # prefill (not timed)
        for t in range(start, case.shape[0] - step + 1, step):
            chunk = (q[:, t:t + step], k[:, t:t + step], v[:, t:t + step])
            if rep == 0:
                torch.testing.assert_close(cache.attend(*chunk).float(), full[:, t:t + step].float(),
                                           atol=2e-2, rtol=2e-2)
                continue
            times.append(timed(lambda chunk=chunk: cache.attend(*chunk), q.device))
    return times


def static_times(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, full: torch.Tensor,
                 repeats: int, mode: str | None) -> list[float]:
    """Seconds per step of :meth:`flexna.NACache.static_step` (eager when ``mode`` is None, else
    ``torch.compile(step, mode=mode)``): prefill with ``attend``, then the static step; the first
    pass (compiling, capturing) is checked against the recompute and not timed, later passes go
    on past the layout's end with the same chunks (the step's pattern does not depend on T)."""
    start, f = first_timed_frame(case), case.frames_per_step
    cache = flexna.NACache(case.shape, case.kernel)
    cache.attend(q[:, :start], k[:, :start], v[:, :start])  # prefill (not timed)
    step = cache.static_step(q[:, :f], k[:, :f], v[:, :f])
    run = step if mode is None else torch.compile(step, mode=mode, fullgraph=True)
    times = []
    for rep in range(repeats):
        for t in range(start, case.shape[0] - f + 1, f):
            chunk = (q[:, t:t + f], k[:, t:t + f], v[:, t:t + f])
            if rep == 0:
                torch.testing.assert_close(run(*chunk).float(), full[:, t:t + f].float(), atol=2e-2, rtol=2e-2)
                continue
            times.append(timed(lambda chunk=chunk: run(*chunk), q.device))
    return times


def sdpa_times(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> list[float]:
    """Seconds per step of SDPA: the step's queries against every key so far (a dense KV cache)."""
    start, step = first_timed_frame(case), case.frames_per_step
    per_frame = q[0, 0].numel() // (case.heads * case.dim)
    seq = [x.reshape(1, -1, x.shape[-2], x.shape[-1]).transpose(1, 2) for x in (q, k, v)]
    times = []
    for rep in range(repeats):
        for t in range(start, case.shape[0] - step + 1, step):
            qs = seq[0][:, :, t * per_frame:(t + step) * per_frame]
            ks, vs = (x[:, :, :(t + step) * per_frame] for x in seq[1:])
            seconds = timed(lambda qs=qs, ks=ks, vs=vs: F.scaled_dot_product_attention(qs, ks, vs), q.device)
            if rep:
                times.append(seconds)
    return times


def bench_case(case: Case, device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Median per-step ms of the cache, the full recompute and SDPA over the whole cache."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, *case.shape, case.heads, case.dim, device=device, dtype=dtype, generator=gen)
               for _ in range(3))
    causal = (True,) + (False,) * (len(case.shape) - 1)

    def recompute() -> torch.Tensor:
        return flexna.neighborhood_attention(q, k, v, case.kernel, is_causal=causal)

    with torch.no_grad():
        full = recompute()
        times = {"NACache.attend": stream_times(case, q, k, v, full, repeats),
                 "static_step (eager)": static_times(case, q, k, v, full, repeats, None),
                 "static_step (compiled)": static_times(case, q, k, v, full, repeats, "default"),
                 "static_step (reduce-overhead)": static_times(case, q, k, v, full, repeats, "reduce-overhead"),
                 "recompute (full mask)": [timed(recompute, device) for _ in range(max(3, repeats))],
                 "SDPA over whole cache": sdpa_times(case, q, k, v, repeats)}
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    args = ap.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_streaming: skipped (needs a CUDA device; --cpu-smoke checks the script on the CPU)")
        return 0
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.float16
    where = "CPU smoke (times meaningless)" if args.cpu_smoke else torch.cuda.get_device_name()
    lines = [f"# Streaming NA: per-step cost — {where}, torch {torch.__version__}, "
             f"flexna {flexna.__version__}, {datetime.date.today()}\n",
             f"Median ms per step (steady state: a full window of history), {dtype}, forward.\n",
             "Each step is timed as a whole (host work included: synchronised before and after).\n"]
    header = False
    for case in cases(args.cpu_smoke):
        ms = bench_case(case, device, dtype, max(2, args.repeats))
        if not header:
            lines += ["| workload | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
            header = True
        lines.append(f"| {case.name} | " + " | ".join(f"{value:.3f}" for value in ms.values()) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
