"""BlockMask build time: flexna's analytic builder vs torch's create_block_mask.

Run:  python benchmarks/bench_blockmask.py [--device cpu|cuda] [--out benchmarks/results]

Times (median of 10 after 2 warm-ups, device synchronised) the catalogue workloads
row-major with 128-token blocks and tiled, and create_block_mask (with and without
_compile) on the same mask_mod where it fits in memory.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.tools.catalogue import load_entry

CASES = [  # (workload, q_tile, kv_tile)
    ("hunyuan-na", None, None),
    ("hunyuan-na", (2, 8, 8), (2, 8, 8)),
    ("hunyuan-na", (2, 8, 8), (2, 8, 4)),
    ("hunyuan-gna", (2, 8, 8), (2, 8, 8)),
    ("flux-na", None, None),
    ("flux-na", (16, 8), (8, 8)),
    ("flux-gna", (16, 8), (16, 8)),
    ("long-1d", None, None),
    ("long-1d-s256", None, None),
    ("long-1d-blocked", None, None),
]


def timed(fn, device: torch.device, reps: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_cbm(mask_mod, bm, dev: torch.device, compile_: bool) -> str:
    """create_block_mask time for the same mask_mod, orders and block sizes (or why not)."""
    nq, nkv = bm.seq_lengths

    def build():
        return create_block_mask(mask_mod, None, None, nq, nkv, device=dev, BLOCK_SIZE=bm.BLOCK_SIZE,
                                 _compile=compile_)

    try:
        return f"{timed(build, dev, reps=3, warmup=1):.1f}"
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--create-block-mask", action="store_true",
                    help="also time torch's create_block_mask (slow on CPU)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "CPU"
    lines = [f"# BlockMask build time — {name} ({dev.type}, {torch.get_num_threads()} CPU threads), "
             f"torch {torch.__version__}, {datetime.date.today()}", "",
             "Median ms of 10 builds after 2 warm-ups.", "",
             "| workload | q tile / kv tile | blocks full / partial | flexna na_block_mask | "
             "create_block_mask | create_block_mask _compile=True |",
             "|---|---|---|---|---|---|"]
    for workload, qt, kt in CASES:
        p = load_entry(workload).pattern
        args = (p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal)
        bm = flexna.na_block_mask(*args, q_tile=qt, kv_tile=kt, device=dev)
        ours = timed(lambda args=args, qt=qt, kt=kt: flexna.na_block_mask(
            *args, q_tile=qt, kv_tile=kt, device=dev), dev)
        cbm = cbm_c = "-"
        if a.create_block_mask:
            mm = flexna.na_mask_mod(*args, q_tile=qt, kv_tile=kt, device=dev)
            cbm = _time_cbm(mm, bm, dev, compile_=False)
            if dev.type == "cuda":
                cbm_c = _time_cbm(mm, bm, dev, compile_=True)
        tiles = "row-major 128" if qt is None else f"{'x'.join(map(str, qt))} / {'x'.join(map(str, kt))}"
        full = int(bm.full_kv_num_blocks.sum())
        partial = int(bm.kv_num_blocks.sum())
        lines.append(f"| {workload} | {tiles} | {full} / {partial} | {ours:.2f} | {cbm} | {cbm_c} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = name.replace(" ", "-") if dev.type == "cuda" else "cpu"
    path = out / f"blockmask-build-{tag}-{datetime.date.today()}.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
