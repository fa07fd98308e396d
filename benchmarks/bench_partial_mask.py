"""What the mask costs inside partial blocks: one BlockMask's blocks with different mask_mods,
on each kernel backend (GPU).

    python benchmarks/bench_partial_mask.py [--workloads flux-na hunyuan-na] [--dtype fp16]
        [--backends triton flash] [--row-major] [--out benchmarks/results]

Per plain-NA workload, kernel backend (Triton with TMA as flexna runs it; FLASH where
flash-attn-4 is installed) and tile arrangement (the backend's best tiles by the cost model;
with ``--row-major`` also row-major 128-token blocks), the fused Flex kernel (forward) on the
same blocks with:

* ``div/mod coordinates`` (before): N-D coordinates recovered from the flat index with
  div/mod chains per element (tile index, tile coordinates, in-tile coordinates), then the
  window test by arithmetic -- what NATTEN's Flex backend does (Triton only: FLASH's code
  generation lowers no min/max);
* ``per-axis tables``: ``lo[q] <= pos[kv] <= hi[q]`` per axis (``MaskTables.mask_mod(fused=False)``);
* ``packed tables``: all axes in one int32, 5 integer operations per element
  (``MaskTables.mask_mod(fused=True)``, flexna's default from 2 axes on);
* ``const guard``: the packed mask with its guard a literal constant instead of a per-query
  table read (flexna keeps it a tensor so another pattern does not recompile, and reads it per
  query because FLASH lowers no load at a constant index);
* ``one load``: ``pos[kv] >= -1``, the packed mask's per-key load and one comparison;
* ``no mask``: ``q_idx >= 0`` -- the kernel's masked path alone (wrong answer: a bound);
* ``all full``: every partial block marked full, no mask evaluated (wrong answer: the bound);
* ``heads-last views``: the packed mask on q, k, v that are ``[B, heads, N, dim]`` views of
  ``[B, N, heads, dim]`` memory (what flexna's eager token permute hands the kernel; every other
  column runs on contiguous ``[B, heads, N, dim]``).

So ``no mask - all full`` is the masked path whatever the mask, ``one load - no mask`` the
per-key load, ``packed - one load`` the rest of flexna's mask. Derived columns: a partial
block's price in full blocks (``packed``), and the mask_mod's share of a partial block's extra
time. Also cuDNN and dense Flex on the backend in the same run, for the ratios. Median ms of
do_bench. Writes ``partial-mask-<gpu>-<date>-<dtype>-<workloads>.md``.
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
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.analysis import search_tiles
from flexna.backends import flash_unavailable
from flexna.blockmask import build_block_mask
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


def with_mask_mod(bm: BlockMask, mask_mod) -> BlockMask:
    """``bm``'s blocks (the same index tensors) with another mask_mod."""
    return type(bm)(bm.seq_lengths, bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                    bm.full_kv_indices, bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks,
                    bm.full_q_indices, BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=mask_mod)


def all_full(bm: BlockMask) -> BlockMask:
    """``bm`` with every partial block marked full (no mask_mod evaluated anywhere)."""
    device = bm.kv_indices.device
    visited = torch.zeros(bm.kv_indices.shape, dtype=torch.bool, device=device)
    cols = torch.arange(bm.kv_indices.shape[-1], device=device)
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        hit = torch.zeros(visited.shape, dtype=torch.int32, device=device)  # add: unused slots repeat
        hit.scatter_add_(-1, idx.long(), (cols < num[..., None]).to(torch.int32))
        visited |= hit > 0
    order = torch.argsort((~visited).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    counts = visited.sum(-1).to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), order, counts, order,
                                    BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod,
                                    seq_lengths=bm.seq_lengths)


def mask_mods(pattern: NAPattern, q_tile: tuple[int, ...], kv_tile: tuple[int, ...], tables,
              backend: str) -> dict[str, object]:
    """The mask_mod variants of the docstring (``None``: not run on ``backend``)."""
    f = tables.fused
    mods: dict[str, object] = {
        "coords": coordinate_mask_mod(pattern, q_tile, kv_tile) if backend == "triton" else None,
        "axis": tables.mask_mod(fused=False), "packed": None, "const_guard": None,
        "one_load": None, "none": no_mask}
    if f is not None:
        g = int(f.guards[0])

        def const_guard(b, h, q_idx, kv_idx):
            y = f.pos[kv_idx]
            return ((y - f.lo_g[q_idx]) & (f.hi_g[q_idx] - y) & g) == g

        def one_load(b, h, q_idx, kv_idx):
            return f.pos[kv_idx] >= -1

        mods.update(packed=tables.mask_mod(fused=True), const_guard=const_guard, one_load=one_load)
    return mods


def self_check() -> None:
    """On small layouts (CPU), tiled and row-major: the div/mod mask and the constant-guard
    mask equal flexna's tables, and ``all_full`` keeps exactly the blocks it marks full."""
    cases = [((9, 13), (3, 4), (2, 4), (4, 2)), ((5, 6, 7), (3, 2, 5), (2, 2, 3), (1, 3, 2)),
             ((12, 10), (5, 5), (1, 1), (1, 1))]
    for shape, kernel, qt, kt in cases:
        p = NAPattern.create(shape, kernel)
        spec = MaskSpec.create(p, q_tile=qt, kv_tile=kt)
        t = build_tables(spec, "cpu")
        want = create_mask(t.mask_mod(fused=False), None, None, t.q_len, t.kv_len, device="cpu")
        mods = mask_mods(p, qt, kt, t, "triton")
        for key in ("coords", "packed", "const_guard"):
            got = create_mask(mods[key], None, None, t.q_len, t.kv_len, device="cpu")
            assert torch.equal(got, want), (key, shape, kernel, qt, kt)
        bm = build_block_mask(spec, torch.device("cpu"))
        full = all_full(bm)
        assert int(full.kv_num_blocks.sum()) == 0
        assert torch.equal(full.to_dense(), bm.to_dense()), (shape, kernel, qt, kt)


def timed(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def run_workload(w: str, dtype: torch.dtype, cflex, backend: str, row_major: bool) -> list[str]:
    """Table lines of one workload on one backend: each arrangement with each variant."""
    entry = load_entry(w)
    p = entry.pattern
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, entry.heads, p.num_tokens, entry.head_dim, device=dev, dtype=dtype)
               for _ in range(3))
    base_opts = {"BACKEND": "FLASH"} if backend == "flash" else {"USE_TMA": True}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        cudnn = timed(lambda: F.scaled_dot_product_attention(q, k, v))
    dense = timed(lambda: cflex(q, k, v, kernel_options=base_opts))
    # Triton: 128-token query blocks, 128- or 64-token key blocks; FLASH: 128 x 128 (Hopper)
    best = search_tiles(p, top=1, backend=backend)[0]
    arrangements = [(None, None)] if row_major else []
    arrangements.append((best.q_tile, best.kv_tile))
    lines = []
    for qt, kt in arrangements:
        q_t, kv_t = qt or (1,) * p.ndim, kt or (1,) * p.ndim
        spec = MaskSpec.create(p, q_tile=q_t, kv_tile=kv_t)
        bm = build_block_mask(spec, dev)
        tables = build_tables(spec, dev)
        nq, nkv = bm.seq_lengths
        tq, tk, tv = (torch.randn(1, entry.heads, n, entry.head_dim, device=dev, dtype=dtype)
                      for n in (nq, nkv, nkv))
        views = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (tq, tk, tv))
        opts = {**base_opts, **({"BLOCK_N": bm.BLOCK_SIZE[1]} if bm.BLOCK_SIZE[1] < 128 else {})}
        masks = {key: None if mm is None else with_mask_mod(bm, mm)
                 for key, mm in mask_mods(p, q_t, kv_t, tables, backend).items()}
        runs = [(key, m, (tq, tk, tv)) for key, m in masks.items()]
        runs += [("all_full", all_full(bm), (tq, tk, tv)), ("heads_last", masks["packed"], views)]
        ms: dict[str, float] = {}
        for key, bmm, qkv in runs:
            ms[key] = float("nan")
            if bmm is None:
                continue
            try:
                ms[key] = timed(lambda bmm=bmm, qkv=qkv, opts=opts: cflex(*qkv, block_mask=bmm,
                                                                          kernel_options=opts))
            except Exception as exc:  # a variant the backend cannot compile is reported as such
                print(f"{w} {backend} {key}: {type(exc).__name__}: {str(exc).splitlines()[-1][:160]}",
                      file=sys.stderr)
            print(w, backend, qt, kt, key, f"{ms[key]:.3f}", flush=True)
        tiles = "row-major 128" if qt is None else \
            f"{'x'.join(map(str, qt))} / {'x'.join(map(str, kt))}, {bm.BLOCK_SIZE[1]}"
        full, partial = int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum())
        mine = ms["packed"] if ms["packed"] == ms["packed"] else ms["axis"]  # flexna's mask
        per_block = ms["all_full"] / (full + partial)  # one full block's time
        price = (mine - full * per_block) / (partial * per_block) if partial else float("nan")
        share = (mine - ms["none"]) / (mine - ms["all_full"]) if partial else float("nan")
        real = min(t for key, t in ms.items() if key not in ("none", "all_full", "one_load") and t == t)
        cells = " | ".join(f"{ms[key]:.2f}" for key in ("coords", "axis", "packed", "const_guard", "one_load",
                                                       "none", "all_full", "heads_last"))
        lines.append(f"| {w} | {backend} | {tiles} | {full} / {partial} | {cudnn:.2f} | {dense:.2f} | "
                     f"{cells} | {price:.2f} | {share:.0%} | {cudnn / real:.2f}× |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=["flux-na", "hunyuan-na"])
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--backends", nargs="*", choices=["triton", "flash"], default=None,
                    help="kernel backends (default: Triton, and FLASH where it can run)")
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
    flash = flash_unavailable(torch.device("cuda"))
    backends = a.backends or (["triton"] + (["flash"] if flash is None else []))
    if "flash" in backends and flash is not None:
        sys.exit(f"--backends flash: {flash}")
    lines = [f"# Partial-block mask cost — {name}, torch {torch.__version__}, flexna {flexna.__version__}, "
             f"{a.dtype} forward, {datetime.date.today()}", "",
             "benchmarks/bench_partial_mask.py: one BlockMask per row, only the mask_mod (or the "
             "full/partial split) differs; median ms (do_bench); Triton with TMA. Columns: see the "
             "script's docstring. ×cuDNN = cuDNN ms / fastest correct flexna ms.", "",
             "| workload | backend | tiles (q / kv, BLOCK_N) | full / partial blocks | cuDNN | Flex dense "
             "| div/mod coordinates | per-axis tables | packed tables | const guard | one load "
             "| no mask (bound) | all full (bound) | heads-last views | partial ÷ full block "
             "| mask share of a partial block's extra | best ×cuDNN |",
             "|---" * 17 + "|"]
    for w in a.workloads:
        for backend in backends:
            lines += run_workload(w, dtype, cflex, backend, a.row_major)
            torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-".join(a.workloads)
    path = out / f"partial-mask-{name.replace(' ', '-')}-{datetime.date.today()}-{a.dtype}-{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
