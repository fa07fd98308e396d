"""What the mask costs inside partial blocks: the same BlockMask with different mask_mods (GPU).

    python benchmarks/bench_partial_mask.py [--workloads flux-na hunyuan-na] [--dtype fp16]
        [--out benchmarks/results]

Per plain-NA workload and tile arrangement (row-major 128-token blocks, and the tile search's
best tiles), the fused Flex kernel (forward, TMA as flexna runs it) with one BlockMask and:

* ``div/mod coordinates`` (before): N-D coordinates recovered from the flat index with
  div/mod chains per element (tile index, tile coordinates, in-tile coordinates), then the
  window test by arithmetic -- what NATTEN's Flex backend does;
* ``per-axis tables``: flexna's table mask, ``lo[q] <= pos[kv] <= hi[q]`` per axis
  (``MaskTables.mask_mod(fused=False)``);
* ``fused tables``: all axes in one int32, 5 integer operations per element
  (``MaskTables.mask_mod(fused=True)``, flexna's default from 2 axes on);
* ``no mask`` (bound, wrong answer): partial blocks computed without masking -- what a
  partial block costs at the least.

Also cuDNN and dense Flex in the same run, for the ratios. Median ms of do_bench.
Writes ``partial-mask-<gpu>-<date>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.analysis import search_tiles
from flexna.geometry import tile_grid
from flexna.pattern import NAPattern
from flexna.spec import MaskSpec
from flexna.tables import build_tables
from flexna.tools.catalogue import load_entry


def coordinate_mask_mod(pattern: NAPattern, tile: tuple[int, ...], kv_tile: tuple[int, ...]):
    """Plain NA (stride 1, dilation 1, not causal) by div/mod coordinate recovery per element."""
    assert all(s == 1 for s in pattern.stride) and all(d == 1 for d in pattern.dilation)
    assert not any(pattern.is_causal)
    shape, kernel = pattern.shape, pattern.kernel_size

    def coords(idx: torch.Tensor, t: tuple[int, ...]) -> list[torch.Tensor]:
        grid, per_tile = tile_grid(shape, t), math.prod(t)
        tile_id, inner = idx // per_tile, idx % per_tile
        out = [None] * len(shape)
        for a in reversed(range(len(shape))):
            out[a] = (tile_id % grid[a]) * t[a] + inner % t[a]
            tile_id, inner = tile_id // grid[a], inner // t[a]
        return out

    def mask(b, h, q_idx, kv_idx):
        ok = None
        for a, (x, y) in enumerate(zip(coords(q_idx, tile), coords(kv_idx, kv_tile), strict=True)):
            left = kernel[a] // 2
            start = torch.clamp(x - left, 0, shape[a] - kernel[a])
            axis_ok = (x < shape[a]) & (y < shape[a]) & (start <= y) & (y < start + kernel[a])
            ok = axis_ok if ok is None else ok & axis_ok
        return ok

    return mask


def no_mask(b, h, q_idx, kv_idx):
    return q_idx >= 0


def self_check() -> None:
    """The div/mod mask equals flexna's tables on small layouts (CPU), tiled and row-major."""
    cases = [((9, 13), (3, 4), (2, 4), (4, 2)), ((5, 6, 7), (3, 2, 5), (2, 2, 3), (1, 3, 2)),
             ((12, 10), (5, 5), (1, 1), (1, 1))]
    for shape, kernel, qt, kt in cases:
        p = NAPattern.create(shape, kernel)
        t = build_tables(MaskSpec.create(p, q_tile=qt, kv_tile=kt), "cpu")
        want = create_mask(t.mask_mod(fused=False), None, None, t.q_len, t.kv_len, device="cpu")
        got = create_mask(coordinate_mask_mod(p, qt, kt), None, None, t.q_len, t.kv_len, device="cpu")
        assert torch.equal(got, want), (shape, kernel, qt, kt)
        assert torch.equal(create_mask(t.mask_mod(fused=True), None, None, t.q_len, t.kv_len,
                                       device="cpu"), want)


def timed(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def run_workload(w: str, dtype: torch.dtype, cflex, row_major: bool) -> list[str]:
    """Table lines of one workload: each arrangement with each mask_mod."""
    entry = load_entry(w)
    p = entry.pattern
    dev = torch.device("cuda")
    args = (p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, entry.heads, p.num_tokens, entry.head_dim, device=dev, dtype=dtype)
               for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    dense = timed(lambda: cflex(q, k, v, kernel_options={"USE_TMA": True}))
    best = search_tiles(p, kv_tokens=(128, 64), top=1)[0]
    arrangements = [(None, None)] if row_major else []
    arrangements.append((best.q_tile, best.kv_tile))
    lines = []
    for qt, kt in arrangements:
        bm = flexna.na_block_mask(*args, q_tile=qt, kv_tile=kt, device=dev)
        q_t, kv_t = qt or (1,) * p.ndim, kt or (1,) * p.ndim
        tables = build_tables(MaskSpec.create(p, q_tile=q_t, kv_tile=kv_t), dev)
        nq, nkv = bm.seq_lengths
        tq, tk, tv = (torch.randn(1, entry.heads, n, entry.head_dim, device=dev, dtype=dtype)
                      for n in (nq, nkv, nkv))
        opts = {"USE_TMA": True, **({"BLOCK_N": bm.BLOCK_SIZE[1]} if bm.BLOCK_SIZE[1] < 128 else {})}
        mods = {"coords": coordinate_mask_mod(p, q_t, kv_t), "axis": tables.mask_mod(fused=False),
                "packed": tables.mask_mod(fused=True) if tables.fused is not None else None,
                "none": no_mask}
        ms = {}
        for key, mm in mods.items():
            if mm is None:
                ms[key] = float("nan")
                continue
            bmm = type(bm)(  # the same index tensors for every variant
                bm.seq_lengths, bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                bm.full_kv_indices, bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks,
                bm.full_q_indices, BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=mm)
            ms[key] = timed(lambda bmm=bmm, tq=tq, tk=tk, tv=tv, opts=opts:
                            cflex(tq, tk, tv, block_mask=bmm, kernel_options=opts))
            print(w, qt, kt, key, f"{ms[key]:.3f}", flush=True)
        tiles = "row-major 128" if qt is None else \
            f"{'x'.join(map(str, qt))} / {'x'.join(map(str, kt))}, {bm.BLOCK_SIZE[1]}"
        full, partial = int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum())
        real = min(t for key, t in ms.items() if key != "none" and t == t)
        lines.append(f"| {w} | {tiles} | {full} / {partial} | {cudnn:.2f} | {dense:.2f} | "
                     f"{ms['coords']:.2f} | {ms['axis']:.2f} | {ms['packed']:.2f} | {ms['none']:.2f} | "
                     f"{cudnn / real:.2f}× |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=["flux-na", "hunyuan-na"])
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--row-major", action="store_true", help="also the row-major 128-token arrangement")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args()
    self_check()
    if not torch.cuda.is_available():
        sys.exit("bench_partial_mask.py needs CUDA (the self-check passed)")
    torch._dynamo.config.cache_size_limit = 256
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    cflex = torch.compile(flex_attention, dynamic=False)
    name = torch.cuda.get_device_name()
    lines = [f"# Partial-block mask cost — {name}, torch {torch.__version__}, {a.dtype} forward, "
             f"{datetime.date.today()}", "",
             "benchmarks/bench_partial_mask.py: one BlockMask per row, only the mask_mod differs; "
             "median ms (do_bench), TMA on. ×cuDNN = cuDNN ms / fastest correct flexna ms.", "",
             "| workload | tiles (q / kv, BLOCK_N) | full / partial blocks | cuDNN | Flex dense "
             "| div/mod coordinates | per-axis tables | packed tables | no mask (bound) | best ×cuDNN |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w in a.workloads:
        lines += run_workload(w, dtype, cflex, a.row_major)
        torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-".join(a.workloads)
    path = out / f"partial-mask-{name.replace(' ', '-')}-{datetime.date.today()}-{a.dtype}-{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
