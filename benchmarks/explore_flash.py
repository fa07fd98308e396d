"""Explore FlexAttention's FLASH backend with flexna's masks on one GPU (a probe, not the benchmark).

For every kind of mask and score_mod flexna emits: does FLASH compile it, does its output
match Triton's, and how fast is each. Then the crossover in call size between the backends,
and the token-permute bandwidth of several ways to reach tile order. Prints markdown.

    PYTHONPATH=$PWD python benchmarks/explore_flash.py > result.md
"""

from __future__ import annotations

import math
import sys
import traceback

import torch
from torch.nn.attention.flex_attention import flex_attention

import flexna
from flexna.blockmask import spec_block_mask
from flexna.pattern import NAPattern
from flexna.scores import spec_rpb_score_mod
from flexna.spec import MaskSpec

flex = torch.compile(flex_attention, dynamic=False)


def bench(fn, reps=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100 if reps is None else reps, return_mode="median")


def run(q, k, v, bm, backend, score_mod=None, gqa=False):
    opts = {"BACKEND": "FLASH"} if backend == "flash" else {"FORCE_USE_FLEX_ATTENTION": True}
    return flex(q, k, v, block_mask=bm, score_mod=score_mod, kernel_options=opts, enable_gqa=gqa)


def case(name, spec, heads=4, dim=64, rpb=False, kv_heads=None, batch=1):
    dev = "cuda"
    kv_heads = heads if kv_heads is None else kv_heads
    q = torch.randn(batch, heads, spec.q_len, dim, device=dev, dtype=torch.float16)
    k = torch.randn(batch, kv_heads, spec.kv_len, dim, device=dev, dtype=torch.float16)
    v = torch.randn_like(k)
    bm = spec_block_mask(spec, dev)
    mod = None
    if rpb:
        p = spec.samples[0][0]
        table = torch.randn(heads, *flexna.rpb_table_shape(p.kernel_size, p.stride, p.is_causal, p.ndim),
                            device=dev)
        mod = spec_rpb_score_mod(table, spec, dev)
    gqa = kv_heads != heads
    ref = run(q, k, v, bm, "triton", mod, gqa)
    t_tri = bench(lambda: run(q, k, v, bm, "triton", mod, gqa))
    try:
        out = run(q, k, v, bm, "flash", mod, gqa)
        err = (out.float() - ref.float()).abs().max().item()
        t_fl = bench(lambda: run(q, k, v, bm, "flash", mod, gqa))
        print(f"| {name} | ok | {err:.2e} | {t_tri:.3f} | {t_fl:.3f} |")
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        print(f"| {name} | FAIL {type(exc).__name__}: {msg[-1][:150] if msg else ''} | | {t_tri:.3f} | |")
        traceback.print_exc(file=sys.stderr)


def main() -> None:
    torch._dynamo.config.recompile_limit = 1000  # a probe compiles one graph per row
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}\n")
    try:
        from torch._inductor.codegen.cutedsl import cutedsl_op_overrides as ov

        names = sorted(n for n, f in vars(ov.CuteDSLOpOverrides).items()
                       if isinstance(f, staticmethod) and not n.startswith("_"))
        print("CuteDSL op overrides:", " ".join(names), "\n")
    except Exception as exc:
        print("no cutedsl overrides:", exc)
    print("| mask | FLASH | max err vs Triton | Triton ms | FLASH ms |\n|---|---|---|---|---|")
    p2 = NAPattern.create((64, 64), 13)
    p2s = NAPattern.create((64, 64), 16, 8, 1, (True, False))
    p3 = NAPattern.create((8, 32, 32), (5, 9, 9), dilation=(1, 2, 1))
    p1 = NAPattern.create(8192, 511, 1, 2)
    case("1-D 8192 k511 d2", MaskSpec.create(p1))
    case("2-D 64x64 k13 row-major", MaskSpec.create(p2))
    case("2-D 64x64 k13 tiled 8x16", MaskSpec.create(p2, q_tile=(8, 16), kv_tile=(8, 16)))
    case("2-D k16 s8 causal-y tiled", MaskSpec.create(p2s, q_tile=(8, 16), kv_tile=(8, 16)))
    case("3-D 8x32x32 dil", MaskSpec.create(p3, q_tile=(2, 8, 8), kv_tile=(2, 8, 8)))
    case("2-D per-axis (3-D wide: unfused)", MaskSpec.create(NAPattern.create((2048, 2048), 17)), heads=1)
    heads = [NAPattern.create((64, 64), 13, 1, d) for d in (1, 2, 3, 4)]
    case("per-head dilation", MaskSpec.create(heads))
    case("extra kv 77 + extra q 13", MaskSpec.create(p2, num_extra_kv=77, num_extra_q=13))
    case("extra kv tiled", MaskSpec.create(p2, q_tile=(8, 16), kv_tile=(8, 16), num_extra_kv=77))
    case("packed 3 samples", MaskSpec.create(None, samples=[[NAPattern.create((48, 40), 7)],  # type: ignore[arg-type]
                                                            [NAPattern.create((64, 64), 7)],
                                                            [NAPattern.create((16, 80), 7)]]))
    case("q/kv regions", MaskSpec.create(p2, q_region=((0, 32), (0, 64)), kv_region=((0, 48), (0, 64))))
    case("rpb", MaskSpec.create(p2), rpb=True)
    case("rpb tiled + extra", MaskSpec.create(p2, q_tile=(8, 16), kv_tile=(8, 16), num_extra_kv=5), rpb=True)
    case("GQA 8/2", MaskSpec.create(p2), heads=8, kv_heads=2)
    # score mods from flexna.scores
    spec = MaskSpec.create(p2)
    for name, mod in (("softcap", flexna.softcap_score_mod(30.0)),
                      ("distance decay", flexna.distance_decay_score_mod(torch.rand(4, device="cuda"),
                                                                         (64, 64)))):
        dev = "cuda"
        q = torch.randn(1, 4, 4096, 64, device=dev, dtype=torch.float16)
        bm = spec_block_mask(spec, dev)
        k, v = torch.randn_like(q), torch.randn_like(q)
        ref = run(q, k, v, bm, "triton", mod)
        try:
            out = run(q, k, v, bm, "flash", mod)
            print(f"| {name} | ok | {(out.float() - ref.float()).abs().max().item():.2e} | | |")
        except Exception as exc:
            print(f"| {name} | FAIL {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:150]} | | | |")

    print("\n## Crossover: forward ms by size (fp16, d128)\n")
    print("| row | block pairs x heads | Triton | FLASH |\n|---|---|---|---|")
    for n, w, h in ((4096, 511, 1), (8192, 1023, 1), (32768, 2047, 1), (32768, 2047, 4), (32768, 2047, 16),
                    (65536, 4095, 8), (131072, 2047, 16)):
        p = NAPattern.create(n, w)
        s = MaskSpec.create(p)
        bm = spec_block_mask(s, "cuda")
        pairs = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) * h
        q = torch.randn(1, h, n, 128, device="cuda", dtype=torch.float16)
        t1 = bench(lambda q=q, bm=bm: run(q, q, q, bm, "triton"))
        t2 = bench(lambda q=q, bm=bm: run(q, q, q, bm, "flash"))
        print(f"| 1-D {n} w{w} h{h} | {pairs} | {t1:.3f} | {t2:.3f} |")
    for shape, ker, tile, h in (((64, 64), 13, (8, 16), 4), ((128, 128), 33, (8, 16), 8),
                                ((128, 128), 33, (8, 16), 24), ((16, 48, 48), (5, 9, 9), (2, 8, 8), 8)):
        p = NAPattern.create(shape, ker)
        s = MaskSpec.create(p, q_tile=tile, kv_tile=tile)
        bm = spec_block_mask(s, "cuda")
        pairs = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) * h
        q = torch.randn(1, h, s.q_len, 128, device="cuda", dtype=torch.float16)
        t1 = bench(lambda q=q, bm=bm: run(q, q, q, bm, "triton"))
        t2 = bench(lambda q=q, bm=bm: run(q, q, q, bm, "flash"))
        print(f"| {shape} k{ker} h{h} | {pairs} | {t1:.3f} | {t2:.3f} |")

    print("\n## Token permute into tile order (256x256, 24 heads, d128, fp16)\n")
    from flexna.layout import TokenLayout

    x = torch.randn(1, 256, 256, 24, 128, device="cuda", dtype=torch.float16)
    lay = TokenLayout((256, 256), (8, 16))
    nbytes = 2 * x.numel() * x.element_size()

    def heads_last():
        t = x.view(1, 32, 8, 16, 16, 24, 128).permute(0, 1, 3, 2, 4, 5, 6)
        return t.reshape(1, 65536, 24, 128)

    idx = torch.arange(65536, device="cuda").view(32, 8, 16, 16).permute(0, 2, 1, 3).reshape(-1)

    def gather():
        return x.view(1, 65536, 24 * 128).index_select(1, idx)

    comp = torch.compile(lambda t: t.view(1, 32, 8, 16, 16, 24, 128).permute(0, 5, 1, 3, 2, 4, 6)
                         .reshape(1, 24, 65536, 128))
    for name, fn in (("clone (memory limit)", lambda: x.clone()),
                     ("flexna heads_first", lambda: lay.heads_first(x)),
                     ("heads-last reshape", heads_last), ("index_select rows", gather),
                     ("torch.compile heads-first", lambda: comp(x))):
        t = bench(fn)
        print(f"| {name} | {t:.3f} ms | {nbytes / t / 1e9:.2f} TB/s |")
    # does Flex keep a strided (heads-last) query's layout in its output?
    q = heads_last().transpose(1, 2)
    spec = MaskSpec.create(NAPattern.create((256, 256), 33), q_tile=(8, 16), kv_tile=(8, 16))
    bm = spec_block_mask(spec, "cuda")
    for be in ("triton", "flash"):
        try:
            o = run(q, q, q, bm, be)
            print(f"\nFlex {be} output strides for heads-last input: {o.stride()} (input {q.stride()})")
        except Exception as exc:
            print(f"\n{be} failed on strided input: {exc}")
    print("\nmath.prod check", math.prod((1, 2)))


if __name__ == "__main__":
    main()
