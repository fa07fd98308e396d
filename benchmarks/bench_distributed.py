"""Context-parallel neighborhood attention (flexna.distributed) vs one GPU, and halo vs ring bytes.

Launch (one process per GPU; NCCL; keep NVLink multicast off):

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 benchmarks/bench_distributed.py
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 4 benchmarks/bench_distributed.py
        [--shape 30 48 80 [--shape 120 48 80]] [--kernel 18 24 24] [--heads 24] [--dim 128]
        [--dtype fp16] [--overlap off|on|both] [--tiles auto|none] [--no-backward]
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --device cpu --shape 8 6 8 \\
        --kernel 3 3 3 --heads 2 --dim 16          # gloo on CPU: a functional check of the script

Default rows: 30x48x80 and the 4x longer 120x48x80 video, kernel 18x24x24, 24 heads, head
dim 128, batch 1, sharded on time (axis 0) with flexna's default split. Per row:

- 1-GPU: ``flexna.neighborhood_attention`` on the whole problem, timed on rank 0 alone
  (``OOM`` if it does not fit), same dtype and token order (``--tiles``);
- P-GPU: ``flexna.distributed.sharded_neighborhood_attention``; every rank times the same
  fixed number of steps (CUDA events, median after warm-up; ranks stay in lock-step, so
  each step includes waiting for the halo); the slowest rank's median is reported;
- forward (inference, no autograd) and forward+backward (dQ/dK/dV, halo-gradient exchange);
- the halo exchange alone (send + receive of K and V, no attention);
- bytes each rank receives per forward (K+V halo; the backward returns the same amount of
  dK/dV) vs ring attention, which moves every other shard's K and V to every rank
  ((P-1)/P of all K and V per rank with even shards) in the forward, and K, V plus the dK/dV
  accumulators around the ring again in the backward;
- scaling efficiency ``t1 / (P * tP)``; max |difference| of the sharded output vs 1-GPU.

Rank 0 prints the table and appends it to
``benchmarks/results/distributed-<device>-<date>.md`` (``--out`` to change the folder)
with the device name, torch version, date and world size.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # before NCCL initialises

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.distributed import (
    PendingHalo,
    halo_bytes,
    halo_plan,
    shard,
    sharded_neighborhood_attention,
    split_sizes,
)
from flexna.functional import EagerFallbackWarning, resolve_tiles
from flexna.pattern import NAPattern

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
          barrier: bool = True) -> float:
    """Median ms per call of ``fn`` over ``iters`` calls after ``warmup`` calls.

    A fixed count on every rank (collectives inside ``fn`` must match across ranks; an
    adaptive count like triton's do_bench could differ per rank and hang).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    if barrier:
        dist.barrier()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gather_floats(value: float, device: torch.device) -> list[float]:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x) for x in torch.cat(out).tolist()]


def fwd_bwd_step(fn: Callable[[], torch.Tensor], leaves: tuple[torch.Tensor, ...],
                 dout: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for t in leaves:
            t.grad = None
        fn().backward(dout)
    return step


def single_gpu(args: argparse.Namespace, pattern: NAPattern, tensors: tuple[torch.Tensor, ...],
               device: torch.device, tiles: object) -> dict:
    """Rank 0 alone: the whole problem with flexna.neighborhood_attention."""
    q, k, v, dout = tensors
    p = pattern
    res: dict = {}

    def call(*qkv: torch.Tensor) -> torch.Tensor:
        return flexna.neighborhood_attention(*qkv, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                             tiles=tiles)

    try:
        with torch.no_grad():
            res["out"] = call(q, k, v)
            res["fwd"] = timed(lambda: call(q, k, v), device, args.warmup, args.iters, barrier=False)
        if args.backward:
            leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
            res["fwdbwd"] = timed(fwd_bwd_step(lambda: call(*leaves), leaves, dout), device,
                                  args.warmup, args.iters, barrier=False)
            del leaves
    except torch.cuda.OutOfMemoryError:
        res = {"oom": True, **({"out": res["out"]} if "out" in res else {})}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def run_row(args: argparse.Namespace, shape: tuple[int, ...], overlaps: list[bool],
            device: torch.device) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    def per_axis(values: list[int]) -> int | tuple[int, ...]:
        return values[0] if len(values) == 1 else tuple(values)

    causal = per_axis([bool(c) for c in args.causal])  # type: ignore[list-item]
    pattern = NAPattern.create(shape, per_axis(args.kernel), per_axis(args.stride), per_axis(args.dilation),
                               causal)
    axis = args.axis
    sizes = split_sizes(shape[axis], world)
    tiles = "auto" if args.tiles == "auto" else None
    order = resolve_tiles(tiles, (pattern,), False)
    # the same global tensors on every rank (same seed and device type), then each keeps its slab
    g = torch.Generator(device=device).manual_seed(0)
    full = [torch.randn(args.batch, *shape, args.heads, args.dim, device=device, dtype=dtype, generator=g)
            for _ in range(4)]
    slabs = [shard(t, rank, world, axis, sizes).contiguous() for t in full]
    single = single_gpu(args, pattern, tuple(full), device, tiles) if rank == 0 and not args.no_single else {}
    del full
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()

    # reference slab for the correctness check: rank 0 sends every rank its rows of the 1-GPU output
    have_ref = torch.tensor([1 if "out" in single else 0], device=device)
    dist.broadcast(have_ref, 0)
    ref_slab = None
    if have_ref.item():
        if rank == 0:
            for r in range(1, world):
                dist.send(shard(single["out"], r, world, axis, sizes).contiguous(), r)
            ref_slab = shard(single["out"], 0, world, axis, sizes)
        else:
            ref_slab = torch.empty_like(slabs[0])
            dist.recv(ref_slab, 0)
    single.pop("out", None)

    q, k, v, dout = slabs
    p = pattern

    def sharded(*qkv: torch.Tensor, overlap: bool) -> torch.Tensor:
        return sharded_neighborhood_attention(*qkv, p.kernel_size, p.stride, p.dilation, p.is_causal,
                                              axis=axis, shard_sizes=sizes, overlap=overlap, tiles=tiles)

    plan = halo_plan(pattern, axis, sizes, rank)
    exch = timed(lambda: PendingHalo(plan, (k, v), 1 + axis, None).wait(), device, args.warmup, args.iters)
    halo = halo_bytes(pattern, axis, sizes, args.batch, args.heads, args.dim, element_size=q.element_size())
    kv_bytes = math.prod(shape) * args.batch * args.heads * 2 * args.dim * q.element_size()
    ring = [kv_bytes * (shape[axis] - s) // shape[axis] for s in sizes]
    rows = []
    for overlap in overlaps:
        row = {"shape": shape, "kernel": pattern.kernel_size, "world": world, "sizes": sizes,
               "overlap": overlap, "tiles": order, "single": single,
               "exchange_ms": max(gather_floats(exch, device)), "halo_bytes": max(halo),
               "ring_bytes": max(ring), "halo_rows": [halo_plan(p, axis, sizes, r).halo_rows()
                                                      for r in range(world)]}
        with torch.no_grad():
            out = sharded(q, k, v, overlap=overlap)
            diff = (out.float() - ref_slab.float()).abs().max().item() if ref_slab is not None else float("nan")
            row["max_diff"] = max(gather_floats(diff, device))
            del out
            row["fwd"] = gather_floats(timed(lambda o=overlap: sharded(q, k, v, overlap=o), device,
                                             args.warmup, args.iters), device)
        if args.backward:
            leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
            step = fwd_bwd_step(lambda o=overlap, lv=leaves: sharded(*lv, overlap=o), leaves, dout)
            row["fwdbwd"] = gather_floats(timed(step, device, args.warmup, args.iters), device)
            del leaves, step
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def fmt_ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def table(rows: list[dict], backward: bool) -> str:
    head = ["shape", "kernel", "P", "shards", "halo rows (L, R) per rank", "overlap", "tiles (q/kv)",
            "fwd 1-GPU ms", "fwd P-GPU ms (max / mean rank)", "fwd speed-up", "fwd efficiency"]
    if backward:
        head += ["fwd+bwd 1-GPU ms", "fwd+bwd P-GPU ms (max / mean)", "fwd+bwd speed-up", "fwd+bwd efficiency"]
    head += ["halo exchange ms", "halo MB/rank (fwd)", "ring MB/rank (fwd)", "halo / ring", "max |Δ| vs 1-GPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        world, single = r["world"], r["single"]
        tiles = "row-major" if r["tiles"] is None else "/".join("x".join(map(str, t)) for t in r["tiles"])
        cells = ["x".join(map(str, r["shape"])), "x".join(map(str, r["kernel"])), str(world),
                 ",".join(map(str, r["sizes"])), " ".join(f"({a},{b})" for a, b in r["halo_rows"]),
                 "on" if r["overlap"] else "off", tiles]
        for key in ("fwd", "fwdbwd") if backward else ("fwd",):
            t1 = single.get(key)
            tp = max(r[key])
            cells += ["OOM" if single.get("oom") else fmt_ms(t1),
                      f"{tp:.2f} / {statistics.mean(r[key]):.2f}",
                      "—" if t1 is None else f"{t1 / tp:.2f}×",
                      "—" if t1 is None else f"{t1 / (world * tp):.0%}"]
        cells += [f"{r['exchange_ms']:.3f}", f"{r['halo_bytes'] / 2**20:.4g}", f"{r['ring_bytes'] / 2**20:.4g}",
                  f"{r['halo_bytes'] / r['ring_bytes']:.2f}" if r["ring_bytes"] else "—",
                  "—" if math.isnan(r["max_diff"]) else f"{r['max_diff']:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shape", type=int, nargs="+", action="append",
                    help="global layout (repeat for several rows; default: 30 48 80 and 120 48 80)")
    ap.add_argument("--kernel", type=int, nargs="+", default=[18, 24, 24])
    ap.add_argument("--stride", type=int, nargs="+", default=[1])
    ap.add_argument("--dilation", type=int, nargs="+", default=[1])
    ap.add_argument("--causal", type=int, nargs="+", default=[0], help="1/0 per axis (or one for all)")
    ap.add_argument("--axis", type=int, default=0, help="the shard axis (default 0: time)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--overlap", choices=["off", "on", "both"], default="both")
    ap.add_argument("--tiles", choices=["auto", "none"], default="auto",
                    help="local token order: flexna's choice for the global pattern, or row-major")
    ap.add_argument("--no-backward", dest="backward", action="store_false", help="forward only")
    ap.add_argument("--no-single", action="store_true", help="skip the 1-GPU baseline")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    shapes = [tuple(s) for s in (args.shape or [[30, 48, 80], [120, 48, 80]])]

    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench_distributed: no CUDA device (use --device cpu for a gloo check)")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
        name = torch.cuda.get_device_name(device)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
        warnings.simplefilter("ignore", EagerFallbackWarning)  # CPU backward: dense fallback
        name = "cpu"
    rank, world = dist.get_rank(), dist.get_world_size()
    overlaps = {"off": [False], "on": [True], "both": [False, True]}[args.overlap]
    t0 = time.perf_counter()
    rows = []
    for shape in shapes:
        rows += run_row(args, shape, overlaps, device)
        if rank == 0:
            print(f"[{time.perf_counter() - t0:.0f} s] {'x'.join(map(str, shape))} done", flush=True)
    if rank == 0:
        date = datetime.date.today().isoformat()
        title = (f"## flexna context parallelism — {name} x{world}, torch {torch.__version__}, {args.dtype}, "
                 f"{date}, world size {world}")
        text = (f"{title}\n\nSharded on axis {args.axis}; batch {args.batch}, {args.heads} heads, head dim "
                f"{args.dim}; median ms of {args.iters} steps after {args.warmup} warm-up (P-GPU: slowest "
                f"rank). Efficiency = t1 / (P · tP). Bytes: K+V each rank receives per forward (the "
                f"backward sends the same amount of dK/dV back); ring attention moves every other "
                f"shard's K+V to each rank in the forward (and K, V, dK, dV in the backward).\n\n"
                f"{table(rows, args.backward)}\n")
        print(text)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"distributed-{name.replace(' ', '-')}-{date}.md"
        with path.open("a") as f:
            f.write(("\n" if path.exists() and path.stat().st_size else "") + text)
        print(f"appended to {path} ({time.perf_counter() - t0:.0f} s in all)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
