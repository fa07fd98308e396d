"""Where host time goes: torch.profiler tables of a BlockMask build and of an end-to-end call (GPU).

    python benchmarks/profile_overhead.py [--workloads long-1d hunyuan-na] [--backward] [--rows 25]

Profiles (after warm-up) 20 BlockMask builds in the order flexna runs the workload
(``flexna.analysis.choose_tiles``) and 20 end-to-end ``flexna.neighborhood_attention``
calls (BlockMask cached; forward, or forward + backward with ``--backward``), and prints
the top operators by host self time plus the number of kernel launches and copies per
call. Used to find what keeps the GPU build above 1 ms and what makes sub-millisecond
calls host-bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.analysis import choose_tiles
from flexna.tools.catalogue import load_entry

REPS = 20


def report(title: str, prof, rows: int, wall_ms: float) -> None:
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                         "cuLaunchKernelEx", "cudaLaunchKernelExC"))
    copies = sum(e.count for e in events if "Memcpy" in e.key and e.key.startswith("cuda"))
    syncs = sum(e.count for e in events if "Synchronize" in e.key)
    print(f"\n## {title}: {wall_ms:.3f} ms per call (wall, synchronised), per call "
          f"{launches / REPS:.1f} kernel launches, {copies / REPS:.1f} memcpy calls, "
          f"{syncs / REPS:.1f} synchronisations")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def profiled(title: str, fn, warmup: int, sync_each: bool, rows: int) -> None:
    """Wall ms per call of ``fn`` (REPS calls after ``warmup``), then the same under the profiler."""

    def reps() -> None:
        for _ in range(REPS):
            fn()
            if sync_each:
                torch.cuda.synchronize()
        torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps()
    wall = (time.perf_counter() - t0) * 1e3 / REPS
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        reps()
    report(title, prof, rows, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=["long-1d", "hunyuan-na"])
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--builds-only", action="store_true", help="profile BlockMask builds only")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_overhead.py needs CUDA")
    dev = torch.device("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    for w in a.workloads:
        entry = load_entry(w)
        p = entry.pattern
        args = (p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal)
        tiles = choose_tiles(p)
        qt, kt = tiles if tiles is not None else (None, None)

        def build(qt=qt, kt=kt, args=args):
            return flexna.na_block_mask(*args, q_tile=qt, kv_tile=kt, device=dev)

        profiled(f"{w} BlockMask build (tiles {qt} / {kt})", build, warmup=5, sync_each=True, rows=a.rows)
        if a.builds_only:
            continue

        shape = (1, *p.shape, entry.heads, entry.head_dim)
        q, k, v = (torch.randn(shape, device=dev, dtype=dtype, requires_grad=a.backward) for _ in range(3))

        def call(q=q, k=k, v=v, p=p):
            out = flexna.neighborhood_attention(q, k, v, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                                tiles="auto")
            if a.backward:
                out.backward(torch.ones_like(out))
            return out

        profiled(f"{w} end to end ({'fwd+bwd' if a.backward else 'fwd'}, not synchronised per call)", call,
                 warmup=10, sync_each=False, rows=a.rows)


if __name__ == "__main__":
    main()
