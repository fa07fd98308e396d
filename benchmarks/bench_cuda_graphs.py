"""Per-call time of a host-bound flexna call with and without CUDA graphs.

Run (CUDA):  python benchmarks/bench_cuda_graphs.py [--out FILE.md]

The 1-D row of the catalogue (32768 tokens, window 2048, 1 head, head dim 128, fp16, forward):
its kernel takes ~0.1 ms on an H200, so an eager call is bound by host work. Times (median of
``triton.testing.do_bench``) the kernel alone (compiled ``flex_attention`` on a prebuilt mask),
``flexna.na1d`` eager, inside ``torch.compile`` and inside ``torch.compile(mode="reduce-overhead")``
(CUDA graphs: no host work per call in the steady state).
"""

from __future__ import annotations

import argparse
import datetime

import torch
from torch.nn.attention.flex_attention import flex_attention
from triton.testing import do_bench

import flexna


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    length, window, heads, dim = 32768, 2048, 1, 128
    q, k, v = (torch.randn(1, length, heads, dim, device=dev, dtype=torch.float16) for _ in range(3))
    mask = flexna.na_block_mask(length, window, device=dev)
    kernel = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flexna.na1d(q, k, v, window)

    compiled = torch.compile(f, fullgraph=True)
    graphed = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    # q, k, v at fixed addresses, as inside a model (where they come from a projection in the
    # graph): CUDA graphs then copy nothing per replay (the masks are static already)
    qs, ks, vs = (t.clone() for t in (q, k, v))
    for t in (qs, ks, vs):
        torch._dynamo.mark_static_address(t)
    graphed_static = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    # a layer: qkv projection, attention and output projection in one graph
    layer = flexna.NeighborhoodAttention1D(heads * dim, heads, window).to(dev, torch.float16).eval()
    x = torch.randn(1, length, heads * dim, device=dev, dtype=torch.float16)
    layer_c = torch.compile(layer, fullgraph=True)
    layer_g = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    rows = {}
    with torch.no_grad():
        ref = f(q, k, v)
        ref_layer = layer(x)
        for name, fn in (("kernel only (prebuilt mask)", lambda: kernel(qt, kt, vt, block_mask=mask)),
                         ("flexna.na1d eager", lambda: f(q, k, v)),
                         ("flexna.na1d in torch.compile", lambda: compiled(q, k, v)),
                         ("flexna.na1d in torch.compile(mode='reduce-overhead')", lambda: graphed(q, k, v)),
                         ("flexna.na1d reduce-overhead, q/k/v at static addresses",
                          lambda: graphed_static(qs, ks, vs)),
                         ("NeighborhoodAttention1D eager (qkv + attention + proj)", lambda: layer(x)),
                         ("NeighborhoodAttention1D in torch.compile", lambda: layer_c(x)),
                         ("NeighborhoodAttention1D in torch.compile(mode='reduce-overhead')",
                          lambda: layer_g(x))):
            for _ in range(3):
                fn()
            rows[name] = do_bench(fn, warmup=100, rep=500, return_mode="median")
        for fn in (compiled, graphed):
            torch.testing.assert_close(fn(q, k, v).float(), ref.float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(graphed_static(qs, ks, vs).float(), ref.float(), atol=2e-3, rtol=2e-3)
        for fn in (layer_c, layer_g):
            torch.testing.assert_close(fn(x).float(), ref_layer.float(), atol=2e-3, rtol=2e-3)
    head = (f"# CUDA graphs: host-bound 1-D call — {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"flexna {flexna.__version__}, {datetime.date.today()}\n\n"
            f"1-D {length} tokens, window {window}, {heads} head, head dim {dim}, fp16, forward; median ms "
            "of triton.testing.do_bench.\n\n| call | ms |\n|---|---|\n")
    table = head + "".join(f"| {n} | {ms:.3f} |\n" for n, ms in rows.items())
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table)


if __name__ == "__main__":
    main()
