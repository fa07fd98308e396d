"""GPU benchmark: flexna vs dense attention (cuDNN / flash SDPA, dense Flex) and NATTEN's Flex backend.

Run on a CUDA machine (one invocation per dtype x direction; each < 10 minutes):

    python benchmarks/bench_attention.py [--workloads flux-na ...] [--dtype fp16|bf16]
        [--backward] [--out benchmarks/results] [--validate K] [--no-natten]

or everything, spread over the visible GPUs: ``python benchmarks/run_all.py``.

Per workload (catalogue names from masks/): batch 1, the entry's heads and head_dim,
median of ``triton.testing.do_bench`` (CUDA events) after warm-up. Rows:

* cuDNN and flash SDPA, dense Flex (no mask) — the dense baselines of the same run;
* flexna kernel only: row-major 128-token blocks, and the tile search's best tiles
  (inputs already permuted; forward may use 64-token kv tiles with ``BLOCK_N=64``), with
  TMA loads as the functional API runs them (dense Flex: the faster of with / without);
* flexna end to end per call: ``flexna.neighborhood_attention`` on NATTEN-layout tensors
  with ``tiles="auto"`` (permute in, kernel, permute out; BlockMask cached, as in a model),
  and the same with the BlockMask rebuilt on every call ("cold");
* NATTEN's Flex backend per call (``backend="flex-fna"``, ``torch_compile=True``);
* BlockMask build (GPU, median of 10, synchronised) and the token permute's GB/s.

Writes ``<gpu>-<date>-<dtype>-<fwd|fwdbwd><tag>.json`` (raw numbers) and ``.md`` to
``--out``; ``benchmarks/summarize.py`` merges them into the results file with ratios and
the issue's targets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.analysis import analyze, choose_tiles, search_tiles
from flexna.layout import TokenLayout
from flexna.tools.catalogue import load_entry

# the kernel options flexna's functional API passes on Hopper (flexna.flex.cuda_kernel_options)
TMA = {"USE_TMA": True}

DEFAULT_WORKLOADS = ["long-1d", "long-1d-s256", "long-1d-blocked", "flux-na", "flux-gna",
                     "hunyuan-na", "hunyuan-gna"]


def bench(fn, backward: bool = False, grads=()) -> float:
    """Median ms of ``fn`` (forward, or forward + backward) over do_bench's CUDA-event timings."""
    from triton.testing import do_bench

    if backward:
        def step():
            for t in grads:
                t.grad = None
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            out.backward(torch.ones_like(out))
        return do_bench(step, warmup=50, rep=200, return_mode="median")
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def build_ms(build, reps: int = 10) -> float:
    """Median wall ms of a (synchronised) BlockMask build after two warm-ups."""
    for _ in range(2):
        build()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        build()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def guarded(row: dict, key: str, fn) -> None:
    """row[key] = fn(), or row[key + '_error'] with the exception (one failure must not end the run)."""
    try:
        row[key] = fn()
    except Exception as exc:
        row[key + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        torch.cuda.empty_cache()


def run_workload(name: str, dtype: torch.dtype, backward: bool, natten_ok: bool,
                 validate: int = 0, save=lambda row: None) -> dict:
    """One workload's row; ``save(row)`` is called after every measurement (partial rows)."""
    entry = load_entry(name)
    p = entry.pattern
    heads, dim, n = entry.heads, entry.head_dim, p.num_tokens
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, device=dev, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    grads = (q, k, v) if backward else ()
    args = (p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal)
    row: dict = {"name": name, "pattern": str(p), "heads": heads, "head_dim": dim, "tokens": n,
                 "limit": p.flop_limit(), "ndim": p.ndim}
    cflex = torch.compile(flex_attention, dynamic=False)

    def measure(key: str, fn) -> None:
        guarded(row, key, fn)
        save(row)

    # cheap baselines first; then flexna and NATTEN; dense Flex and row-major flexna last (the
    # long compiles): results are saved after every measurement, so a run cut short keeps them
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        measure("cudnn", lambda: bench(lambda: F.scaled_dot_product_attention(q, k, v), backward, grads))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        measure("flash", lambda: bench(lambda: F.scaled_dot_product_attention(q, k, v), backward, grads))

    # --- kernel only, the tile search's best tiles (backward: 128-token kv tiles only)
    ranked = search_tiles(p, kv_tokens=(128,) if backward else (128, 64), top=max(1, validate))
    best = ranked[0]
    if validate and not backward:
        row["validate"] = []
        for cand in [*ranked, analyze(p)]:
            vbm = flexna.na_block_mask(*args, q_tile=cand.q_tile, kv_tile=cand.kv_tile, device=dev)
            vq, vk, vv = (torch.randn(1, heads, vbm.seq_lengths[i], dim, device=dev, dtype=dtype)
                          for i in (0, 1, 1))
            opts = {**TMA, "BLOCK_N": vbm.BLOCK_SIZE[1]} if vbm.BLOCK_SIZE[1] < 128 else TMA
            ms = bench(lambda vq=vq, vk=vk, vv=vv, vbm=vbm, opts=opts: cflex(vq, vk, vv, block_mask=vbm,
                                                                             kernel_options=opts))
            row["validate"].append((cand.summary(), cand.cost * heads, ms))
    if p.ndim > 1:
        q_tile, kv_tile = best.q_tile, best.kv_tile
        tbm = flexna.na_block_mask(*args, q_tile=q_tile, kv_tile=kv_tile, device=dev)
        row["build_tiled_ms"] = build_ms(
            lambda: flexna.na_block_mask(*args, q_tile=q_tile, kv_tile=kv_tile, device=dev))
        row["tiles"] = f"{'x'.join(map(str, q_tile))}/{'x'.join(map(str, kv_tile))}"
        row["tiled_blocks"] = (int(tbm.full_kv_num_blocks.sum()), int(tbm.kv_num_blocks.sum()))
        row["tiled_predicted_partial"] = best.partial_blocks
        ql, kl = TokenLayout.create(p.shape, q_tile), TokenLayout.create(p.shape, kv_tile)
        natten_layout = [t.detach().transpose(1, 2).reshape(1, *p.shape, heads, dim).contiguous()
                         for t in (q, k, v)]
        qt = ql.heads_first(natten_layout[0]).requires_grad_(backward)
        kt = kl.heads_first(natten_layout[1]).requires_grad_(backward)
        vt = kl.heads_first(natten_layout[2]).requires_grad_(backward)
        opts = {**TMA, "BLOCK_N": tbm.BLOCK_SIZE[1]} if tbm.BLOCK_SIZE[1] < 128 else TMA
        measure("tiled", lambda: bench(lambda: cflex(qt, kt, vt, block_mask=tbm, kernel_options=opts),
                                            backward, (qt, kt, vt) if backward else ()))
        # token permute into tiled order, heads first: bytes read + written per tensor
        x = natten_layout[0]
        ms = bench(lambda: ql.heads_first(x))
        row["permute_ms"] = ms
        row["permute_gbps"] = 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
        y = qt.detach()
        ms = bench(lambda: ql.from_heads_first(y).contiguous())
        row["unpermute_gbps"] = 2 * y.numel() * y.element_size() / (ms * 1e-3) / 1e9
    else:
        row["build_tiled_ms"] = build_ms(lambda: flexna.na_block_mask(*args, device=dev))

    # --- end to end per call, NATTEN layout in and out
    qn, kn, vn = (t.detach().transpose(1, 2).reshape(1, *p.shape, heads, dim).contiguous()
                  .requires_grad_(backward) for t in (q, k, v))
    grads_n = (qn, kn, vn) if backward else ()
    chosen = choose_tiles(p)
    row["auto_tiles"] = "row-major" if chosen is None else \
        f"{'x'.join(map(str, chosen[0]))}/{'x'.join(map(str, chosen[1]))}"

    def e2e():
        return flexna.neighborhood_attention(qn, kn, vn, p.kernel_size, p.stride, p.dilation,
                                             p.is_causal, tiles="auto")

    def e2e_cold():
        flexna.clear_cache()
        return e2e()

    measure("e2e", lambda: bench(e2e, backward, grads_n))
    measure("e2e_cold", lambda: bench(e2e_cold, backward, grads_n))

    if natten_ok:
        import natten

        natten.allow_flex_compile()
        if backward and hasattr(natten, "allow_flex_compile_backprop"):
            natten.allow_flex_compile_backprop()
        fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[p.ndim]
        measure("natten", lambda: bench(lambda: fn(qn, kn, vn, kernel_size=p.kernel_size, stride=p.stride,
                                                        dilation=p.dilation, is_causal=p.is_causal,
                                                        backend="flex-fna", torch_compile=True),
                                             backward, grads_n))
    # dense Flex with and without TMA loads; the faster is the baseline
    # (backward: default options only; each compile of dense Flex's backward autotunes for minutes)
    measure("flex_dense_default", lambda: bench(lambda: cflex(q, k, v), backward, grads))
    if not backward:
        measure("flex_dense_tma", lambda: bench(lambda: cflex(q, k, v, kernel_options=TMA), backward,
                                                     grads))
    dense = [row[k] for k in ("flex_dense_default", "flex_dense_tma") if k in row]
    if dense:
        row["flex_dense"] = min(dense)

    # --- kernel only, row-major 128-token blocks
    bm = flexna.na_block_mask(*args, device=dev)
    row["build_rowmajor_ms"] = (row["build_tiled_ms"] if p.ndim == 1
                                else build_ms(lambda: flexna.na_block_mask(*args, device=dev)))
    row["rowmajor_blocks"] = (int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum()))
    measure("rowmajor", lambda: bench(lambda: cflex(q, k, v, block_mask=bm, kernel_options=TMA),
                                           backward, grads))

    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="*", default=DEFAULT_WORKLOADS)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
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
        natten_ok = not a.no_natten
    except ImportError:
        natten_ok = False
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": str(datetime.date.today()),
            "dtype": a.dtype, "backward": a.backward, "natten": natten_ok}
    gpu = meta["device"].replace(" ", "-")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{gpu}-{meta['date']}-{a.dtype}-{'fwdbwd' if a.backward else 'fwd'}{a.tag}.json"
    rows = []
    for w in a.workloads:
        t0 = time.time()
        def save(partial: dict) -> None:
            path.write_text(json.dumps({"meta": meta, "rows": [*rows, partial]}, indent=1))

        rows.append(run_workload(w, dtype, a.backward, natten_ok, a.validate, save))
        rows[-1]["seconds"] = time.time() - t0
        print(f"{w}: {rows[-1]['seconds']:.0f} s {json.dumps(rows[-1])}", flush=True)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # after every workload
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
