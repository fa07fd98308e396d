"""GPU benchmark rows of the patterns beyond one window (docs/patterns.md), fp16 forward.

    PYTHONPATH=$PWD FLEXNA_MASKS=$PWD/masks python benchmarks/bench_patterns.py [--rows NAME ...]

Without CUDA it prints a line and exits 0 (``--dry-run`` builds every row's BlockMask on the
CPU instead, timing nothing). Per row (batch 1, the catalogue entry's heads and
head_dim): cuDNN dense attention (SDPA), the flexna kernel alone (compiled FlexAttention with
the BlockMask, inputs already in the row's token order, TMA on Hopper), end to end per call
(permute in, kernel, permute out; BlockMask cached, as in a model; adaptive rows: selection +
BlockMask build + kernel), the BlockMask build on the GPU (cache cleared, synchronised), and
the block counts. Rows:

* ``sta-*``: STA on HunyuanVideo (``hunyuan-sta``: 6x8x8 tiles, 3x3x3 and 2x6x10 windows,
  with 256 text tokens), its even-window 2-D row, and GNA in the same order for the odd one;
* ``curve-*``: flux-na / hunyuan-na in Hilbert and Morton order beside the best tiles;
* ``radial-*``: hunyuan-radial (with 256 text tokens), wan-radial (row-major 128-token
  blocks), the 3-D-window variant in a (1, 8, 16) tiled order;
* ``adaptive-*``: flux-na / hunyuan-gna windows united with NABLA threshold-0.9 and top-8
  blocks (one feature per token on both sides, in each side's order: local random Fourier
  features plus noise, :func:`flexna.adaptive.local_qk`, seed 0; the selection is
  data-dependent, so its counts are those of this draw);
* ``perhead-svg``: half the heads spatial (own frame), half temporal (own position), 30x48x80,
  row-major.

Writes ``benchmarks/results/patterns-<gpu>-<date>.json`` (after every row) and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.adaptive import local_qk
from flexna.blockmask import spec_block_mask
from flexna.layout import CurveOrder, TokenLayout
from flexna.radial import radial_window_pattern
from flexna.tools.catalogue import load_entry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import build_ms  # the synchronised wall-clock timer of BlockMask builds


def bench(fn: Callable[[], object]) -> float:
    """Median ms over triton's do_bench (CUDA events) after warm-up."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def counts(bm) -> tuple[int, int]:
    return int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum())


def spec_row(name: str, spec: flexna.MaskSpec, heads: int, dim: int,
             order: TokenLayout | CurveOrder | None = None) -> Callable[[Callable], dict]:
    """A row for a static spec: kernel, end to end (permuting ``order``), build, counts."""

    def run(flex: Callable | None) -> dict:
        row: dict = {"name": name, "spec": str(spec.samples[0][0]), "heads": heads, "head_dim": dim,
                     "q_len": spec.q_len, "kv_len": spec.kv_len, "blocks": (spec.q_block, spec.kv_block)}
        if flex is None:  # --dry-run: the BlockMask on the CPU only
            row["full"], row["partial"] = counts(spec_block_mask(spec, "cpu"))
            return row
        dev = torch.device("cuda")
        q, k, v = (torch.randn(1, heads, n, dim, device=dev, dtype=torch.float16)
                   for n in (spec.q_len, spec.kv_len, spec.kv_len))
        dense_n = spec.samples[0][0].num_tokens + spec.num_extra_kv
        qd = torch.randn(1, heads, dense_n, dim, device=dev, dtype=torch.float16)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            row["cudnn_ms"] = bench(lambda: F.scaled_dot_product_attention(qd, qd, qd))

        def build() -> object:
            flexna.clear_cache()
            return spec_block_mask(spec, dev)

        row["build_ms"] = build_ms(build)
        bm = spec_block_mask(spec, dev)
        row["full"], row["partial"] = counts(bm)
        opts = flexna.flex.cuda_kernel_options(dev)
        row["kernel_ms"] = bench(lambda: flex(q, k, v, block_mask=bm, kernel_options=opts))
        if order is not None and spec.num_extra_q == 0 and spec.num_extra_kv == 0:
            x = torch.randn(1, *order.shape, heads, dim, device=dev, dtype=torch.float16)

            def e2e() -> torch.Tensor:
                t = order.heads_first(x)
                out = flex(t, t, t, block_mask=spec_block_mask(spec, dev), kernel_options=opts)
                return order.from_heads_first(out)

            row["e2e_ms"] = bench(e2e)
        row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["kernel_ms"]
        return row

    return run


def adaptive_row(name: str, spec: flexna.MaskSpec, heads: int, dim: int, **select) -> Callable:
    def run(flex: Callable | None) -> dict:
        row: dict = {"name": name, "spec": str(spec.samples[0][0]), "select": select, "heads": heads,
                     "head_dim": dim, "q_len": spec.q_len, "blocks": (spec.q_block, spec.kv_block)}
        torch.manual_seed(0)
        if flex is None:  # --dry-run: one small-head selection on the CPU
            qc, kc = local_qk(spec, 1, 16, "cpu", torch.float32)
            row["full"], row["partial"] = counts(flexna.adaptive_block_mask(qc, kc, spec, **select))
            return row
        dev = torch.device("cuda")
        q, k = local_qk(spec, heads, dim, dev, torch.float16)
        v = torch.randn_like(k)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            row["cudnn_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        spec_block_mask(spec, dev)  # the base maps, as a model has them after its first call
        row["build_ms"] = build_ms(lambda: flexna.adaptive_block_mask(q, k, spec, **select))
        bm = flexna.adaptive_block_mask(q, k, spec, **select)
        row["full"], row["partial"] = counts(bm)
        base = spec_block_mask(spec, dev)
        row["window_full"], row["window_partial"] = counts(base)
        opts = flexna.flex.cuda_kernel_options(dev)
        row["kernel_ms"] = bench(lambda: flex(q, k, v, block_mask=bm, kernel_options=opts))
        row["e2e_ms"] = bench(lambda: flex(q, k, v, block_mask=flexna.adaptive_block_mask(q, k, spec, **select),
                                           kernel_options=opts))
        row["speedup_vs_cudnn"] = row["cudnn_ms"] / row["kernel_ms"]
        return row

    return run


def rows() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    sta = load_entry("hunyuan-sta")
    shape, tile = sta.pattern.shape, sta.pattern.tile
    for window in ((3, 3, 3), (2, 6, 10)):
        tag = "x".join(map(str, window))
        out[f"sta-hunyuan-{tag}"] = spec_row(f"sta-hunyuan-{tag}", flexna.sta_spec(shape, tile, window),
                                             sta.heads, sta.head_dim, TokenLayout(shape, tile))
        out[f"sta-hunyuan-{tag}-text256"] = spec_row(
            f"sta-hunyuan-{tag}-text256", flexna.sta_spec(shape, tile, window, text_length=256),
            sta.heads, sta.head_dim)
    gna = flexna.NAPattern.create(shape, sta.pattern.kernel_size, sta.pattern.stride)
    out["sta-hunyuan-3x3x3-as-gna"] = spec_row("sta-hunyuan-3x3x3-as-gna",
                                               flexna.MaskSpec.create(gna, q_tile=tile, kv_tile=tile),
                                               sta.heads, sta.head_dim, TokenLayout(shape, tile))
    even = load_entry("sta-2d-even")
    out["sta-2d-even"] = spec_row("sta-2d-even", flexna.sta_spec(even.pattern.shape, even.pattern.tile,
                                                                 even.pattern.window, block_size=128),
                                  even.heads, even.head_dim, TokenLayout(even.pattern.shape, even.pattern.tile))
    for wl in ("flux-na", "hunyuan-na"):
        e = load_entry(wl)
        best = flexna.search_tiles(e.pattern, kv_tokens=(128,), top=1)[0]
        same = TokenLayout(e.pattern.shape, best.q_tile) if best.q_tile == best.kv_tile else None
        out[f"curve-{wl}-tiles"] = spec_row(
            f"curve-{wl}-tiles", flexna.MaskSpec.create(e.pattern, q_tile=best.q_tile, kv_tile=best.kv_tile),
            e.heads, e.head_dim, same)
        for curve in ("hilbert", "morton"):
            out[f"curve-{wl}-{curve}"] = spec_row(
                f"curve-{wl}-{curve}", flexna.MaskSpec.create(e.pattern, q_curve=curve, kv_curve=curve),
                e.heads, e.head_dim, CurveOrder(e.pattern.shape, curve))
    for wl in ("hunyuan-radial", "wan-radial"):
        e = load_entry(wl)
        out[f"radial-{wl}"] = spec_row(f"radial-{wl}", flexna.MaskSpec.create(e.pattern), e.heads, e.head_dim,
                                       TokenLayout(e.pattern.shape, (1, 1)))
    e = load_entry("hunyuan-radial")
    text = flexna.MaskSpec.create(e.pattern, num_extra_q=256, num_extra_kv=256)
    out["radial-hunyuan-text256"] = spec_row("radial-hunyuan-text256", text, e.heads, e.head_dim)
    w = load_entry("video-radial-window")
    big = radial_window_pattern((30, 48, 80), (12, 20), min_radius=(2, 2), dense_frames=1)
    for name, p, heads, dim in (("radial-window-16x32x32", w.pattern, w.heads, w.head_dim),
                                ("radial-window-30x48x80", big, 24, 128)):
        out[name] = spec_row(name, flexna.MaskSpec.create(p, q_tile=(1, 8, 16), kv_tile=(1, 8, 16)), heads, dim,
                             TokenLayout(p.shape, (1, 8, 16)))
    for wl, tiles in (("flux-na", ((8, 16), (16, 8))), ("hunyuan-gna", ((2, 8, 8), (2, 8, 8)))):
        e = load_entry(wl)
        spec = flexna.MaskSpec.create(e.pattern, q_tile=tiles[0], kv_tile=tiles[1])
        out[f"adaptive-{wl}-thr0.9"] = adaptive_row(f"adaptive-{wl}-thr0.9", spec, e.heads, e.head_dim,
                                                    threshold=0.9)
        out[f"adaptive-{wl}-top8"] = adaptive_row(f"adaptive-{wl}-top8", spec, e.heads, e.head_dim, top_k=8)
    svg_shape, heads = (30, 48, 80), 24
    spatial = flexna.NAPattern.create(svg_shape, (1, 48, 80))
    temporal = flexna.NAPattern.create(svg_shape, (30, 1, 1))
    svg = flexna.MaskSpec.create([spatial, temporal] * (heads // 2))  # row-major: a frame is 30 blocks
    out["perhead-svg"] = spec_row("perhead-svg", svg, heads, 128, TokenLayout(svg_shape, (1, 1, 1)))
    return out


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [f"# Patterns beyond one window: {meta['device']}, torch {meta['torch']}, {meta['date']}", "",
             "fp16 forward, batch 1. kernel: compiled FlexAttention with the BlockMask (inputs in the row's "
             "order); e2e: permute in + kernel + permute out (adaptive: selection + BlockMask + kernel); "
             "build: BlockMask on the GPU, cache cleared (adaptive: selection + assembly).", "",
             "| row | tokens (q/kv) | blocks full / partial | cuDNN ms | kernel ms | e2e ms | build ms | "
             "vs cuDNN |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | | | | {r['error']} |")
            continue
        e2e = f"{r['e2e_ms']:.3f}" if "e2e_ms" in r else ""
        lines.append(f"| {r['name']} | {r['q_len']}/{r.get('kv_len', r['q_len'])} | "
                     f"{r['full']} / {r['partial']} | {r['cudnn_ms']:.3f} | {r['kernel_ms']:.3f} | {e2e} | "
                     f"{r['build_ms']:.1f} | {r['speedup_vs_cudnn']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    table = rows()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=list(table), help=f"any of: {' '.join(table)}")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--dry-run", action="store_true",
                    help="build each row's BlockMask on the CPU, time nothing")
    a = ap.parse_args()
    unknown = [r for r in a.rows if r not in table]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {' '.join(table)}")
    if a.dry_run:
        for name in a.rows:
            t0 = time.time()
            r = table[name](None)
            print(f"{name}: full {r['full']}, partial {r['partial']} ({time.time() - t0:.1f} s on the CPU)")
        return
    if not torch.cuda.is_available():
        print("bench_patterns.py: no CUDA device, nothing measured (run it on a GPU)")
        return
    torch._dynamo.config.cache_size_limit = 256
    flex = torch.compile(flex_attention, dynamic=False)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": str(datetime.date.today())}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"patterns-{meta['device'].replace(' ', '-')}-{meta['date']}"
    results: list[dict] = []
    for name in a.rows:
        t0 = time.time()
        try:
            results.append(table[name](flex))
        except Exception as exc:  # one row's failure must not end the run
            results.append({"name": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
            torch.cuda.empty_cache()
        results[-1]["seconds"] = time.time() - t0
        print(json.dumps(results[-1]), flush=True)
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    stem.with_suffix(".md").write_text(markdown(meta, results))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
