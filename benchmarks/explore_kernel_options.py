"""Which FlexAttention kernel options help flexna's block-sparse kernels (forward, GPU).

    python benchmarks/explore_kernel_options.py [--workloads long-1d-s256 flux-gna ...] [--dtype fp16]

For each workload: the tile search's best 128x128 tiles (row-major for 1-D), the kernel
with a few option sets (default, TMA loads, 64-row/64-column tiles, more warps), median ms
of do_bench; also dense Flex with the same options, so the ratio to dense / FLOP-wise limit
is comparable. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.analysis import choose_tiles
from flexna.tools.catalogue import load_entry

OPTION_SETS = {
    "default": {},
    "TMA": {"USE_TMA": True},
    "M64 N64": {"BLOCK_M": 64, "BLOCK_N": 64},
    "warps8 stages2": {"num_warps": 8, "num_stages": 2},
    "warps4 stages3": {"num_warps": 4, "num_stages": 3},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=["long-1d-s256", "flux-gna", "flux-na", "hunyuan-gna"])
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    a = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    torch._dynamo.config.cache_size_limit = 256
    cflex = torch.compile(flex_attention, dynamic=False)
    lines = ["| workload | options | dense ms | flexna ms | flexna / (dense / limit) |",
             "|---|---|---|---|---|"]
    for name in a.workloads:
        lines += explore(name, dtype, cflex)
    print("\n".join(lines))


def explore(name: str, dtype: torch.dtype, cflex) -> list[str]:
    """Table rows of one workload, one per option set."""
    from triton.testing import do_bench

    e = load_entry(name)
    p = e.pattern
    tiles = choose_tiles(p) or (None, None)
    bm = flexna.na_block_mask(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal,
                              q_tile=tiles[0], kv_tile=tiles[1], device="cuda")
    q, k, v = (torch.randn(1, e.heads, bm.seq_lengths[i], e.head_dim, device="cuda", dtype=dtype)
               for i in (0, 1, 1))
    rows = []
    for label, opts in OPTION_SETS.items():
        try:
            dense = do_bench(lambda opts=opts: cflex(q, k, v, kernel_options=opts or None),
                             warmup=50, rep=200, return_mode="median")
            ms = do_bench(lambda opts=opts: cflex(q, k, v, block_mask=bm, kernel_options=opts or None),
                          warmup=50, rep=200, return_mode="median")
            rows.append(f"| {name} | {label} | {dense:.3f} | {ms:.3f} | "
                        f"{ms / (dense / p.flop_limit()):.2f} |")
        except Exception as exc:
            rows.append(f"| {name} | {label} | error: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:80]} | | |")
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
