"""GPU benchmark: flexna vs dense attention (cuDNN / flash SDPA, dense Flex) and NATTEN's Flex backend.

Run on a CUDA machine:  python benchmarks/bench_attention.py [--workloads flux-na ...]
    [--dtype fp16|bf16] [--backward] [--out benchmarks/results]

Per workload (catalogue names from masks/): batch 1, the entry's heads and head_dim,
median of triton.testing.do_bench after warm-up. Writes a markdown table with the
device name, torch version and date, and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.catalogue import load_entry

DEFAULT_WORKLOADS = ["long-1d", "long-1d-s256", "long-1d-blocked", "flux-na", "flux-gna",
                     "hunyuan-na", "hunyuan-gna"]


def bench(fn, backward: bool = False) -> float:
    """Median ms of ``fn`` (forward, or forward+backward)."""
    from triton.testing import do_bench

    if backward:
        def step():
            out = fn()
            out.backward(torch.ones_like(out))
        return do_bench(step, warmup=50, rep=200, return_mode="median")
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def run_workload(name: str, dtype: torch.dtype, backward: bool, natten_ok: bool,
                 validate: int = 0) -> dict:
    entry = load_entry(name)
    p = entry.pattern
    heads, dim, n = entry.heads, entry.head_dim, p.num_tokens
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, device=dev, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    row: dict = {"name": name, "pattern": str(p), "heads": heads, "limit": p.flop_limit()}
    cflex = torch.compile(flex_attention, dynamic=False)

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["cudnn"] = bench(lambda: F.scaled_dot_product_attention(q, k, v), backward)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        row["flash"] = bench(lambda: F.scaled_dot_product_attention(q, k, v), backward)
    row["flex_dense"] = bench(lambda: cflex(q, k, v), backward)

    # row-major, 128-token blocks
    args = (p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal)
    flexna.na_block_mask(*args, device=dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bm = flexna.na_block_mask(*args, device=dev)
    torch.cuda.synchronize()
    row["build_rowmajor_ms"] = (time.perf_counter() - t0) * 1e3
    row["rowmajor"] = bench(lambda: cflex(q, k, v, block_mask=bm), backward)
    row["rowmajor_blocks"] = (int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum()))

    # tiled: the tile search's best arrangement
    from flexna.analysis import analyze, search_tiles

    ranked = search_tiles(p, top=max(1, validate))
    q_tile, kv_tile = ranked[0].q_tile, ranked[0].kv_tile
    if validate:
        meas = []
        for cand in [*ranked, analyze(p)]:
            vbm = flexna.na_block_mask(*args, q_tile=cand.q_tile, kv_tile=cand.kv_tile, device=dev)
            vq = torch.randn(1, heads, vbm.seq_lengths[0], dim, device=dev, dtype=dtype)
            vk = torch.randn(1, heads, vbm.seq_lengths[1], dim, device=dev, dtype=dtype)
            kvb = vbm.BLOCK_SIZE[1]
            vopts = {"BLOCK_N": kvb} if kvb < 128 else None
            ms = bench(lambda vq=vq, vk=vk, vbm=vbm, vopts=vopts: cflex(vq, vk, vk, block_mask=vbm,
                                                                       kernel_options=vopts))
            meas.append((cand.summary(), cand.cost * heads, ms))  # cost x heads: comparable across rows
            print(f"  validate {name}: predicted cost {cand.cost * heads:.0f}, measured {ms:.3f} ms — "
                  f"{cand.summary()}", flush=True)
        row["validate"] = meas
    if q_tile is not None:
        tbm = flexna.na_block_mask(*args, q_tile=q_tile, kv_tile=kv_tile, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tbm = flexna.na_block_mask(*args, q_tile=q_tile, kv_tile=kv_tile, device=dev)
        torch.cuda.synchronize()
        row["build_tiled_ms"] = (time.perf_counter() - t0) * 1e3
        row["tiles"] = f"{'x'.join(map(str, q_tile))}/{'x'.join(map(str, kv_tile))}"
        row["tiled_blocks"] = (int(tbm.full_kv_num_blocks.sum()), int(tbm.kv_num_blocks.sum()))

        def perm(t, tile):
            return flexna.tile_tokens(t.transpose(1, 2).reshape(1, *p.shape, heads, dim), p.shape,
                                      tile).transpose(1, 2).contiguous()

        qt, kt, vt = perm(q.detach(), q_tile), perm(k.detach(), kv_tile), perm(v.detach(), kv_tile)
        if backward:
            qt, kt, vt = (t.requires_grad_() for t in (qt, kt, vt))
        kv_block = tbm.BLOCK_SIZE[1]
        opts = {"BLOCK_N": kv_block} if kv_block < 128 else None
        row["tiled"] = bench(lambda: cflex(qt, kt, vt, block_mask=tbm, kernel_options=opts),
                             backward)
        row["permute"] = bench(lambda: (perm(q.detach(), q_tile), perm(k.detach(), kv_tile),
                                        perm(v.detach(), kv_tile)))
    if natten_ok:
        import natten

        natten.allow_flex_compile()
        fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[p.ndim]
        qn, kn, vn = (t.detach().transpose(1, 2).reshape(1, *p.shape, heads, dim).contiguous()
                      for t in (q, k, v))
        try:
            row["natten"] = bench(lambda: fn(qn, kn, vn, kernel_size=p.kernel_size, stride=p.stride,
                                             dilation=p.dilation, is_causal=p.is_causal,
                                             backend="flex-fna", torch_compile=True))
        except Exception as exc:  # report, don't stop the run
            row["natten_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    torch.cuda.empty_cache()
    return row


def fmt_table(rows: list[dict], dtype: str, backward: bool) -> str:
    dev = torch.cuda.get_device_name()
    head = (f"# flexna benchmark — {dev}, torch {torch.__version__}, {dtype}, "
            f"{'forward+backward' if backward else 'forward'}, {datetime.date.today()}\n\n"
            "Median ms (triton do_bench). Speed-ups are cuDNN time / flexna time; 'vs limit' is "
            "flexna kernel / (Flex dense / FLOP-wise limit).\n\n")
    cols = ["workload", "cuDNN", "flash", "Flex dense", "limit", "flexna row-major",
            "blocks full/partial", "flexna tiled", "tiles", "blocks full/partial", "permute",
            "best × cuDNN", "best vs limit", "NATTEN flex", "mask build GPU ms (rm / tiled)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        best = min(r["rowmajor"], r.get("tiled", math.inf))
        lines.append("| " + " | ".join([
            r["name"], f"{r['cudnn']:.3f}", f"{r['flash']:.3f}", f"{r['flex_dense']:.3f}",
            f"{r['limit']:.2f}×", f"{r['rowmajor']:.3f}", "{}/{}".format(*r["rowmajor_blocks"]),
            f"{r.get('tiled', float('nan')):.3f}", r.get("tiles", "-"),
            "{}/{}".format(*r.get("tiled_blocks", (0, 0))), f"{r.get('permute', float('nan')):.3f}",
            f"{r['cudnn'] / best:.2f}×", f"{best / (r['flex_dense'] / r['limit']):.2f}",
            f"{r['natten']:.3f}" if "natten" in r else r.get("natten_error", "n/a"),
            f"{r['build_rowmajor_ms']:.2f} / {r.get('build_tiled_ms', float('nan')):.2f}",
        ]) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=DEFAULT_WORKLOADS)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--validate", type=int, default=0,
                    help="also time the K best predicted tile pairs (+ row-major) to check the predictor")
    ap.add_argument("--no-natten", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA device")
    torch._dynamo.config.cache_size_limit = 256
    try:
        import natten  # noqa: F401
        natten_ok = True
    except ImportError:
        natten_ok = False
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    rows = []
    for w in a.workloads:
        t0 = time.time()
        rows.append(run_workload(w, dtype, a.backward, natten_ok and not a.no_natten, a.validate))
        print(f"{w}: {time.time() - t0:.0f} s {rows[-1]}", flush=True)
    table = fmt_table(rows, a.dtype, a.backward)
    val = [(w["name"], c, ms) for w in rows for (_, c, ms) in w.get("validate", [])]
    if len(val) > 2:
        import statistics
        costs = [c for _, c, _ in val]
        times = [ms for _, _, ms in val]
        # per workload the model predicts time up to a constant: correlate within workloads
        corr = statistics.correlation(costs, times)
        table += f"\nPredictor check: Pearson correlation of predicted cost vs measured time over {len(val)} "
        table += f"(workload, tiles) points: {corr:.3f}\n\n"
        table += "| workload | predicted cost | measured ms |\n|---|---|---|\n"
        table += "".join(f"| {w} | {c:.0f} | {ms:.3f} |\n" for w, c, ms in val)
    print(table)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{gpu}-{datetime.date.today()}-{a.dtype}{'-fwdbwd' if a.backward else ''}{a.tag}.md"
    (out / name).write_text(table)
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
