"""GPU benchmark: flexna on FlexAttention's Triton and FLASH backends, beside dense attention.

    PYTHONPATH=$PWD python benchmarks/bench_backends.py [--dtype fp16|bf16] [--backward]
        [--rows flux-na ...] [--out DIR] [--budget-s 500]

Per catalogue row (masks/; batch 1, the row's heads and head_dim), median ms of
``triton.testing.do_bench`` (CUDA events, after warm-up, at least 10 repetitions), all in one run:

* ``cudnn``: SDPA's cuDNN kernel, dense; ``dense_triton`` / ``dense_flash``: dense Flex (no
  mask) on each backend (forward only: dense Flex's backward autotunes for minutes);
* ``kernel_<backend>``: flexna's compiled Flex call on inputs already in the token order
  ``tiles="auto"`` picks for that backend, with its BlockMask (the call the public API makes);
* ``e2e_<backend>``: ``flexna.neighborhood_attention(..., backend=...)`` on NATTEN-layout
  tensors ``[1, *shape, heads, dim]`` in and out (permute, kernel, permute back; mask cached),
  and ``e2e_auto`` with the backend "auto" chose (``auto_backend``); three interleaved rounds
  of (triton, flash, auto), the median round reported, every round kept in the JSON;
* ``permute_tbps``: the token permute into tile order (bytes read + written).

Writes ``backends-<gpu>-<date>-<dtype>-<fwd|fwdbwd>.json`` to ``--out`` after every
measurement (a run cut short keeps what it has) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.analysis import choose_tiles
from flexna.backends import flash_unavailable
from flexna.flex import call_compiled, cuda_kernel_options
from flexna.layout import TokenLayout
from flexna.tools.catalogue import load_entry

ROUNDS = 3
ROWS = ["long-1d", "long-1d-s256", "long-1d-blocked", "flux-na", "flux-gna", "hunyuan-na", "hunyuan-gna"]


def bench(fn, backward: bool, grads=()) -> float:
    """Median ms of ``fn`` (with ``backward``: forward and backward) by ``do_bench``, with at
    least 10 timed repetitions however long one call takes (a fixed 100 ms of repetitions
    would time a 50 ms call twice)."""
    from triton.testing import do_bench

    def step():
        for t in grads:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    call = step if backward else fn
    call()  # compile / autotune outside the estimate
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    one = start.elapsed_time(end)
    return do_bench(call, warmup=max(25.0, 3 * one), rep=max(100.0, 10 * one), return_mode="median")


def versions() -> dict:
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "flexna": flexna.__version__,
            "date": datetime.date.today().isoformat()}
    try:
        from importlib.metadata import version

        info["flash-attn-4"] = version("flash-attn-4")
        info["nvidia-cutlass-dsl"] = version("nvidia-cutlass-dsl")
    except Exception:
        info["flash-attn-4"] = "not installed"
    return info


def run_row(name: str, dtype: torch.dtype, backward: bool, save) -> dict:
    entry = load_entry(name)
    p = entry.pattern
    heads, dim, n = entry.heads, entry.head_dim, p.num_tokens
    row: dict = {"name": name, "pattern": str(p), "heads": heads, "head_dim": dim, "limit": p.flop_limit()}
    flash_ok = flash_unavailable(torch.device("cuda")) is None
    backends = ["triton", "flash"] if flash_ok else ["triton"]
    torch.manual_seed(0)
    natten = [torch.randn(1, *p.shape, heads, dim, device="cuda", dtype=dtype) for _ in range(3)]
    grads = [t.requires_grad_(backward) for t in natten] if backward else []
    dense = [t.detach().reshape(1, n, heads, dim).transpose(1, 2).contiguous().requires_grad_(backward)
             for t in natten]

    def measure(key, fn, g=()):
        try:
            row[key] = bench(fn, backward, g)
        except Exception as exc:
            row[key + "_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
            torch.cuda.empty_cache()
        save(row)

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        measure("cudnn", lambda: F.scaled_dot_product_attention(*dense), dense if backward else ())
    if not backward:
        cflex = torch.compile(flex_attention, dynamic=False)
        measure("dense_triton", lambda: cflex(*dense, kernel_options=cuda_kernel_options(dense[0].device)))
        if flash_ok:
            measure("dense_flash", lambda: cflex(*dense, kernel_options={"BACKEND": "FLASH"}))

    x = natten[0].detach()
    for b in backends:  # each backend's kernel on the tiles "auto" ranks for it (Hopper blocks)
        tiles = choose_tiles(p, padding="auto", backend=b)  # as tiles="auto" does
        row[f"tiles_{b}"] = "row-major" if tiles is None else "/".join("x".join(map(str, t)) for t in tiles)
        q_tile, kv_tile = tiles if tiles is not None else ((1,) * p.ndim,) * 2
        ql, kl = TokenLayout.create(p.shape, q_tile), TokenLayout.create(p.shape, kv_tile)
        bm = flexna.na_block_mask(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal, q_tile=q_tile,
                                  kv_tile=kv_tile, device="cuda")
        row[f"blocks_{b}"] = (int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum()))
        seq = [lay.heads_first(t.detach()).requires_grad_(backward)
               for lay, t in zip((ql, kl, kl), natten, strict=True)]
        if "permute_ms" not in row and tiles is not None:
            ms = bench(lambda ql=ql: ql.heads_first(x), False)
            row["permute_ms"], row["permute_tbps"] = ms, 2 * x.numel() * x.element_size() / ms / 1e9
        opts = {"BACKEND": "FLASH"} if b == "flash" else cuda_kernel_options(x.device)
        measure(f"kernel_{b}", lambda opts=opts, seq=seq, bm=bm: call_compiled(*seq, block_mask=bm,
                                                                               kernel_options=opts),
                seq if backward else ())
    row["tiles"] = row["tiles_flash" if flash_ok else "tiles_triton"]
    row["blocks"] = row["blocks_flash" if flash_ok else "blocks_triton"]

    from flexna import plan as plans
    from flexna.functional import _const, _options

    sig = plans.tensor_signature
    signature = ("na", *(sig(t) for t in natten), None, None, None, None,
                 _options(None, False, None, "auto"), _const(p.kernel_size), _const(p.stride),
                 _const(p.dilation), _const(p.is_causal), "auto", None, torch.is_grad_enabled())
    row["auto_backend"] = plans.build(signature).backend
    # end to end, interleaved: ROUNDS rounds of (triton, flash, auto), the median of the rounds'
    # medians (one pass per backend, back to back, drifted up to 11% in an earlier run)
    rounds: dict[str, list[float]] = {}
    for _ in range(ROUNDS):
        for b in [*backends, "auto"]:
            def e2e(b=b):
                return flexna.neighborhood_attention(*natten, p.kernel_size, p.stride, p.dilation,
                                                     p.is_causal, backend=b)
            measure(f"e2e_{b}", e2e, grads)
            if f"e2e_{b}" in row:
                rounds.setdefault(b, []).append(row[f"e2e_{b}"])
    for b, times in rounds.items():
        row[f"e2e_{b}_rounds"] = times
        row[f"e2e_{b}"] = sorted(times)[len(times) // 2]
    save(row)
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict], backward: bool) -> str:
    cols = ["cudnn", "dense_triton", "dense_flash", "kernel_triton", "kernel_flash", "e2e_triton", "e2e_flash",
            "e2e_auto"]
    head = ("| row | tiles | limit | " + " | ".join(cols)
            + " | auto | e2e speed-up vs cuDNN (best) | permute TB/s |")
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if c in r else ("err" if c + "_error" in r else "") for c in cols]
        best = min((r[c] for c in ("e2e_triton", "e2e_flash") if c in r), default=None)
        speed = f"{r['cudnn'] / best:.2f}x" if best and "cudnn" in r else ""
        tiles = r.get("tiles", "")
        if r.get("tiles_triton", tiles) != tiles:
            tiles = f"triton {r['tiles_triton']}, flash {tiles}"
        lines.append(f"| {r['name']} | {tiles} | {r['limit']:.1f} | " + " | ".join(cells)
                     + f" | {r.get('auto_backend', '')} | {speed} | {r.get('permute_tbps', 0):.2f} |")
    errors = [f"- {r['name']} {k}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    return "\n".join(lines + (["", *errors] if errors else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--rows", nargs="+", default=ROWS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new row after this many seconds")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_backends: needs CUDA; nothing to do")
        return
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    info = versions()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = info["gpu"].replace(" ", "-")
    path = args.out / f"backends-{gpu}-{info['date']}-{args.dtype}-{'fwdbwd' if args.backward else 'fwd'}.json"
    rows: list[dict] = []
    t0 = time.time()

    def save(row):
        done = [r for r in rows if r is not row] + [row]
        path.write_text(json.dumps({"info": info, "dtype": args.dtype, "backward": args.backward,
                                    "rows": done}, indent=1))

    for name in args.rows:
        if time.time() - t0 > args.budget_s:
            print(f"budget reached: skipped {name}", file=sys.stderr)
            continue
        row = run_row(name, dtype, args.backward, save)
        rows.append(row)
        print(f"{name}: done at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(info))
    print(table(rows, args.backward))


if __name__ == "__main__":
    main()
