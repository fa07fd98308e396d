"""Host-side build times on the CPU: BlockMasks, analysis and the extended/packed variants.

Run:  python benchmarks/bench_host_build.py [--busy] [--label before] [--out FILE.md]

Times (median of 7 after 2 warm-ups) what a first call pays on a CPU: ``na_block_mask`` for the
catalogue rows (row-major and tiled), ``analyze`` (the tile search's cost comparison), a 3-D
BlockMask with 16 extra keys and a packed (variable-resolution) BlockMask. ``--busy`` runs one
spinning process per core beside the timings (a machine that also runs tests or a data loader),
where torch's intra-op thread pool is known to collapse. Only public names are used, so the same
script times any version of flexna.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import statistics
import time

import torch

import flexna

ROWS = [  # (name, shape, kernel, stride, q_tile, kv_tile)
    ("hunyuan-na", (30, 48, 80), (18, 24, 24), 1, None, None),
    ("hunyuan-na", (30, 48, 80), (18, 24, 24), 1, (2, 8, 8), (2, 8, 8)),
    ("hunyuan-gna", (30, 48, 80), (18, 24, 24), (16, 8, 8), (2, 8, 8), (2, 8, 8)),
    ("flux-na", (256, 256), (80, 80), 1, None, None),
    ("flux-na", (256, 256), (80, 80), 1, (16, 8), (8, 8)),
    ("flux-gna", (256, 256), (80, 80), (16, 16), (16, 8), (16, 8)),
    ("long-1d", (32768,), (2048,), 1, None, None),
    ("nat-7x7", (56, 56), (7, 7), 1, None, None),
]


def timed(fn, reps: int = 7, warmup: int = 2) -> float:
    """Median ms of ``fn`` from a cold cache (flexna >= its MaskSpec release caches block maps)."""
    clear = getattr(flexna, "clear_cache", lambda: None)
    for _ in range(warmup):
        clear()
        fn()
    times = []
    for _ in range(reps):
        clear()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _spin() -> None:
    while True:
        pass


def cases() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name, shape, kernel, stride, qt, kt in ROWS:
        order = "row-major" if qt is None else f"{'x'.join(map(str, qt))} / {'x'.join(map(str, kt))}"
        out.append((f"na_block_mask {name} {order}",
                    lambda s=shape, k=kernel, st=stride, q=qt, kv=kt: flexna.na_block_mask(
                        s, k, st, q_tile=q, kv_tile=kv, device="cpu")))
    flux = flexna.NAPattern.create((256, 256), (80, 80))
    hunyuan = flexna.NAPattern.create((30, 48, 80), (18, 24, 24))
    out.append(("analyze flux-na row-major", lambda: flexna.analyze(flux)))
    out.append(("analyze hunyuan-na row-major", lambda: flexna.analyze(hunyuan)))
    out.append(("extended_na_block_mask 30x48x80 + 16 extra keys",
                lambda: flexna.extended_na_block_mask((30, 48, 80), (18, 24, 24), num_extra_kv=16,
                                                      device="cpu")))
    out.append(("packed_block_mask 64x64 + 48x80 + 32x32, kernel 7",
                lambda: flexna.packed_block_mask([(64, 64), (48, 80), (32, 32)], 7, device="cpu")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", action="store_true", help="one spinning process per core beside")
    parser.add_argument("--label", default="", help="column label (e.g. before / after)")
    parser.add_argument("--out", help="Markdown file to append the table to")
    args = parser.parse_args()
    spinners = []
    if args.busy:
        for _ in range(os.cpu_count() or 1):
            p = multiprocessing.Process(target=_spin, daemon=True)
            p.start()
            spinners.append(p)
    try:
        rows = [(name, timed(fn)) for name, fn in cases()]
    finally:
        for p in spinners:
            p.terminate()
    head = (f"## {args.label or 'run'}{' (busy CPU)' if args.busy else ''}: flexna "
            f"{getattr(flexna, '__version__', '?')}, torch {torch.__version__}, "
            f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"{platform.processor() or platform.machine()}, {datetime.date.today()}\n\n"
            "| case | median ms |\n|---|---|\n")
    table = head + "".join(f"| {name} | {ms:.1f} |\n" for name, ms in rows) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
