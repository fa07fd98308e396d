"""GPU benchmark: what a partial block costs, and how much of it is flexna's mask_mod.

    PYTHONPATH=$PWD python benchmarks/bench_mask_cost.py [--rows hunyuan-na flux-na]
        [--dtype fp16] [--out FILE.md]

A partial block costs a full block's price plus the kernel's masked path plus the
mask_mod's per-element work (``flexna.analysis.PARTIAL_COST`` prices the sum). This separates
the parts, per catalogue row (tiles as ``tiles="auto"`` picks them) and kernel backend,
timing flexna's compiled Flex call (forward, batch 1, the row's heads and head_dim, median
of ``do_bench``) on one BlockMask's blocks with different mask_mods:

* ``flexna``: the library's mask_mod (fused int32 fields: 4 loads, 5 operations);
* ``const_guard``: the same with the guard a literal constant (3 loads): what the guard
  table costs (flexna keeps it a tensor so another pattern does not recompile);
* ``trivial``: ``kv_idx >= 0`` (no loads): the kernel's masked path alone;
* ``one_load``: ``pos[kv_idx] >= -1`` (the per-key load of flexna's mask, one comparison);
* ``all_full``: every partial block marked full (no mask evaluated; a wrong result, a lower
  bound);
* ``heads_last``: flexna's mask on q, k, v that are ``[B, heads, N, dim]`` views of
  ``[B, N, heads, dim]`` memory (what flexna's eager token permute hands the kernel; the other
  columns run on contiguous ``[B, heads, N, dim]``).

So ``trivial - all_full`` is what the masked path costs whatever the mask, ``one_load -
trivial`` the per-key load, ``flexna - one_load`` the rest of the mask_mod (its arithmetic and
the per-query loads). Prints a markdown table and writes
it to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.analysis import choose_tiles
from flexna.backends import flash_unavailable
from flexna.blockmask import build_block_mask
from flexna.flex import call_compiled, cuda_kernel_options
from flexna.spec import MaskSpec
from flexna.tables import build_tables
from flexna.tools.catalogue import load_entry


def bench(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def variants(spec: MaskSpec, device: str = "cuda") -> dict[str, BlockMask]:
    """One BlockMask per mask_mod variant, all on the spec's blocks."""
    bm = build_block_mask(spec, torch.device(device))
    t = build_tables(spec, device)
    f = t.fused
    assert f is not None, "the rows benchmarked here have fused tables"
    g = int(f.guards[0])

    def const_guard(b, h, q_idx, kv_idx):
        y = f.pos[kv_idx]
        return ((y - f.lo_g[q_idx]) & (f.hi_g[q_idx] - y) & g) == g

    def trivial(b, h, q_idx, kv_idx):
        return kv_idx >= 0

    def one_load(b, h, q_idx, kv_idx):
        return f.pos[kv_idx] >= -1

    def with_mod(mod):
        return BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                        bm.full_kv_indices, BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=mod,
                                        seq_lengths=bm.seq_lengths)

    # the dense block map of partial + full blocks, as one full-block list (stable order)
    dense = torch.zeros(bm.kv_indices.shape, dtype=torch.bool, device=device)
    cols = torch.arange(bm.kv_indices.shape[-1], device=device)
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        hit = torch.zeros(dense.shape, dtype=torch.int32, device=device)  # add: unused slots repeat
        hit.scatter_add_(-1, idx.long(), (cols < num[..., None]).to(torch.int32))
        dense |= hit > 0
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    counts = dense.sum(-1).to(torch.int32)
    all_full = BlockMask.from_kv_blocks(torch.zeros_like(counts), order, counts, order,
                                        BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod,
                                        seq_lengths=bm.seq_lengths)
    return {"flexna": bm, "const_guard": with_mod(const_guard), "trivial": with_mod(trivial),
            "one_load": with_mod(one_load),
            "all_full": all_full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=["hunyuan-na", "flux-na"])
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    backends = ["triton"] + (["flash"] if flash_unavailable(torch.device("cuda")) is None else [])
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, flexna {flexna.__version__}, "
             f"{datetime.date.today().isoformat()}; `benchmarks/bench_mask_cost.py`, {args.dtype} "
             "forward, kernel only, ms (median of do_bench).", "",
             "| row | backend | full / partial blocks | flexna | const_guard | one_load | trivial | all_full | "
             "heads_last | partial block / full block (flexna) | mask_mod share of a partial block |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.rows:
        entry = load_entry(name)
        p = entry.pattern
        for b in backends:
            tiles = choose_tiles(p, padding="auto", backend=b)
            q_tile, kv_tile = tiles if tiles is not None else (None, None)
            spec = MaskSpec.create(p, q_tile=q_tile, kv_tile=kv_tile)
            masks = variants(spec)
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, entry.heads, n, entry.head_dim, device="cuda", dtype=dtype)
                       for n in (spec.q_len, spec.kv_len, spec.kv_len))
            opts = {"BACKEND": "FLASH"} if b == "flash" else cuda_kernel_options(q.device)
            last = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
            runs = [(key, bm, (q, k, v)) for key, bm in masks.items()] + [("heads_last", masks["flexna"], last)]
            ms = {}
            for key, bm, qkv in runs:
                try:
                    ms[key] = bench(lambda bm=bm, qkv=qkv, opts=opts: call_compiled(
                        *qkv, block_mask=bm, kernel_options=opts))
                except Exception as exc:  # a variant the backend cannot compile is reported
                    ms[key] = float("nan")
                    print(f"{name} {b} {key}: {type(exc).__name__}: {str(exc).splitlines()[-1][:160]}",
                          file=sys.stderr)
            full = int(masks["flexna"].full_kv_num_blocks.sum())
            part = int(masks["flexna"].kv_num_blocks.sum())
            per_block = ms["all_full"] / (full + part)  # a full block's time
            ratio = (ms["flexna"] - full * per_block) / (part * per_block)
            share = (ms["flexna"] - ms["trivial"]) / max(ms["flexna"] - ms["all_full"], 1e-9)
            lines.append(f"| {name} | {b} | {full} / {part} | {ms['flexna']:.3f} | {ms['const_guard']:.3f} | "
                         f"{ms['one_load']:.3f} | "
                         f"{ms['trivial']:.3f} | {ms['all_full']:.3f} | {ms['heads_last']:.3f} | {ratio:.2f} | "
                         f"{share:.0%} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
