"""One denoising step of full-size diffusers transformers (random bf16 weights): stock vs flexna.

Run (CUDA; needs diffusers, ``pip install "flexna[diffusers]"``)::

    python benchmarks/bench_diffusers.py                        # FLUX.1-dev, 256x256 image tokens + 512 text
    python benchmarks/bench_diffusers.py --model flux --grid 128 128
    python benchmarks/bench_diffusers.py --model hunyuan --layers 8 # HunyuanVideo 30x48x80 + 256 text, 8 blocks
    python benchmarks/bench_diffusers.py --model wan --layers 8     # Wan 2.x 14B at 720p (21x45x80), 8 blocks

For each mode (``stock``: the model's own processors, diffusers' native SDPA backend; ``gna``: the
catalogue's GNA preset for the model (``flux-gna``, ``hunyuan-gna``, ``cosmos-gna`` for Wan);
``na``: the same windows with stride 1) it times one transformer forward under ``torch.no_grad()``
(median of ``--reps`` after ``--warmup``, CUDA events), and one attention call alone on the
model's shapes (stock: ``dispatch_attention_fn``; flexna: the processors' attention core), so the
attention share of the step is ``layers x per-call / step``. ``--layers N`` builds the model with
only its first N attention blocks (FLUX / HunyuanVideo: double-stream blocks first, then
single-stream; say so when you quote the numbers). ``--compile`` wraps the transformer in
``torch.compile``. Writes a markdown table to ``--out`` (default
``benchmarks/results/diffusers-<model>-<gpu>-<date>.md``). Without CUDA it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {"flux": "flux-gna", "hunyuan": "hunyuan-gna", "wan": "cosmos-gna"}
DEFAULT_GRID = {"flux": (256, 256), "hunyuan": (30, 48, 80), "wan": (21, 45, 80)}
TEXT = {"flux": 512, "hunyuan": 256, "wan": 512}
TARGETS = {"flux": "Issue 14 (H200, 256x256 + 512): stock 7.07 s/step, attention 5.03 s; "
                   "GNA target <= 2.8 s/step."}
# --tiny: the same code on small random models (a smoke test of this script, on the CPU too)
TINY = {"flux": dict(in_channels=64, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=4096,
                     pooled_projection_dim=768, axes_dims_rope=(4, 6, 6)),
        "hunyuan": dict(num_attention_heads=2, attention_head_dim=16, num_refiner_layers=1, mlp_ratio=2.0,
                        rope_axes_dim=(4, 6, 6)),
        "wan": dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=32)}


def build(model: str, layers: int | None, dtype: torch.dtype, device: str, tiny: bool) -> tuple[Any, int]:
    """A full-size (or ``tiny``) transformer with random weights; returns it and its attention-layer count."""
    from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

    def split(double: int, single: int) -> tuple[int, int]:
        if layers is None:
            return double, single
        d = min(layers, double)
        return d, min(layers - d, single)

    extra = TINY[model] if tiny else {}
    torch.manual_seed(0)
    with torch.device(device):  # built in float32 (as checkpoints are), then cast like torch_dtype=
        if model == "flux":  # FLUX.1-dev
            d, s = split(19, 38)
            net = FluxTransformer2DModel(num_layers=d, num_single_layers=s, guidance_embeds=True, **extra)
        elif model == "hunyuan":  # HunyuanVideo (hunyuanvideo-community/HunyuanVideo)
            d, s = split(20, 40)
            net = HunyuanVideoTransformer3DModel(num_layers=d, num_single_layers=s, **extra)
        else:  # Wan 2.1 / 2.2 14B T2V
            d, s = (layers or 40), 0
            full = dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824)
            net = WanTransformer3DModel(num_layers=d, text_dim=4096, freq_dim=256, in_channels=16,
                                        out_channels=16, patch_size=(1, 2, 2), **{**full, **extra})
    return net.eval().to(dtype), d + s


def inputs(model: str, grid: tuple[int, ...], text: int, dtype: torch.dtype, dev: str) -> dict[str, Any]:
    """Random inputs of the pipelines' shapes (batch 1)."""
    g = torch.Generator(dev).manual_seed(1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g)

    if model == "flux":
        rows, cols = grid
        ids = torch.zeros(rows, cols, 3, device=dev)
        ids[..., 1] = torch.arange(rows, device=dev)[:, None]
        ids[..., 2] = torch.arange(cols, device=dev)[None]
        return dict(hidden_states=rnd(1, rows * cols, 64), encoder_hidden_states=rnd(1, text, 4096),
                    pooled_projections=rnd(1, 768), timestep=torch.tensor([0.5], device=dev),
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3, device=dev),
                    guidance=torch.tensor([3.5], device=dev))
    t, h, w = grid
    if model == "hunyuan":
        mask = torch.ones(1, text, device=dev, dtype=torch.bool)
        mask[:, text * 3 // 4:] = False  # a prompt shorter than the text length: padding
        return dict(hidden_states=rnd(1, 16, t, 2 * h, 2 * w), timestep=torch.tensor([500], device=dev),
                    encoder_hidden_states=rnd(1, text, 4096), encoder_attention_mask=mask,
                    pooled_projections=rnd(1, 768), guidance=torch.tensor([6000.0], device=dev))
    return dict(hidden_states=rnd(1, 16, t, 2 * h, 2 * w), timestep=torch.tensor([500], device=dev),
                encoder_hidden_states=rnd(1, text, 4096))


def timed(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median seconds of ``fn`` (CUDA events, synchronised per run; wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(reps):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def mode_config(model: str, mode: str) -> dict | None:
    """The flexna config of ``mode`` (``None``: stock)."""
    if mode == "stock":
        return None
    from flexna.tools import catalogue

    config = catalogue.load_entry(PRESETS[model]).sparsity_config()
    if mode == "na":
        config["pattern"]["stride"] = 1
    return config


def attention_call(model: str, mode: str, grid: tuple[int, ...], text: int, heads: int, head_dim: int,
                   dtype: torch.dtype, dev: str) -> Callable[[], Any]:
    """One attention core call on the model's shapes, as the stock or the flexna processor runs it."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from flexna import tiled_neighborhood_attention
    from flexna.integrations.config import SparsityConfig
    from flexna.integrations.diffusers import LayerPlan, _common_layout, joint_attention

    n = math.prod(grid)
    text_len = 0 if model == "wan" else text
    q, k, v = (torch.randn(1, n + text_len, heads, head_dim, device=dev, dtype=dtype) for _ in range(3))
    valid = None
    if model == "hunyuan":
        valid = torch.ones(1, text_len, device=dev, dtype=torch.bool)
        valid[:, text_len * 3 // 4:] = False
    config = mode_config(model, mode)
    if config is None:
        mask = None if valid is None else torch.cat([torch.ones(1, n, device=dev, dtype=torch.bool), valid],
                                                    1)[:, None, None]
        return lambda: dispatch_attention_fn(q, k, v, attn_mask=mask)
    layer = SparsityConfig.create(config).layer(0)
    assert layer is not None
    plan = LayerPlan.create(grid, layer.resolve(grid))
    if model == "flux":  # FLUX stays in one token order: the joint sequence [image tokens, text]
        layout = _common_layout(grid, [plan])
        assert layout is not None
        return lambda: tiled_neighborhood_attention(q, k, v, layout, plan.kernel_size, plan.stride,
                                                    plan.dilation, plan.is_causal, num_extra_tokens=text_len)
    return lambda: joint_attention(q, k, v, grid, plan, text_len=text_len, text_first=model == "flux",
                                   text_valid=valid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="flux")
    ap.add_argument("--grid", type=int, nargs="+", help="token grid (default: the model's issue-14 size)")
    ap.add_argument("--text", type=int, help="text tokens (default: 512 FLUX / Wan, 256 HunyuanVideo)")
    ap.add_argument("--layers", type=int, help="build only the first N attention blocks")
    ap.add_argument("--modes", default="stock,gna,na")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument("--out")
    ap.add_argument("--tiny", action="store_true", help="small random models (a smoke test; CPU too)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("bench_diffusers: no CUDA device; nothing measured (this benchmark needs a GPU)")
        return 0
    try:
        import diffusers
    except ImportError:
        print('bench_diffusers: diffusers is not installed (pip install "flexna[diffusers]")')
        return 0
    import flexna
    from flexna.integrations.diffusers import apply_neighborhood_attention, remove_neighborhood_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    grid = tuple(args.grid) if args.grid else DEFAULT_GRID[args.model]
    text = args.text or TEXT[args.model]
    net, num_layers = build(args.model, args.layers, dtype, dev, args.tiny)
    x = inputs(args.model, grid, text, dtype, dev)
    heads, head_dim = net.config.num_attention_heads, net.config.attention_head_dim
    run = torch.compile(net) if args.compile else net
    rows = []
    with torch.no_grad():
        for mode in args.modes.split(","):
            config = mode_config(args.model, mode)
            if config is None:
                if hasattr(net, "_flexna_state"):
                    remove_neighborhood_attention(net)
            else:
                apply_neighborhood_attention(net, config)
            step = timed(lambda: run(**x, return_dict=False), args.warmup, args.reps)
            call = timed(attention_call(args.model, mode, grid, text, heads, head_dim, dtype, dev), 3, 10)
            rows.append((mode, step, call, num_layers * call))
            print(f"{mode}: step {step:.3f} s, attention call {call * 1e3:.2f} ms "
                  f"(x{num_layers} = {num_layers * call:.3f} s, {100 * num_layers * call / step:.0f}% of the "
                  "step)", flush=True)
            if args.compile:
                torch.compiler.reset()
    stock = next((r for r in rows if r[0] == "stock"), None)
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    head = (f"# diffusers {args.model}: one denoising step, stock vs flexna — {gpu}, "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, flexna {flexna.__version__}, "
            f"{datetime.date.today()}\n\n"
            f"Random {str(dtype).removeprefix('torch.')} weights{' (--tiny models)' if args.tiny else ''}, "
            f"batch 1, `torch.no_grad()`, token grid {grid} + {text} text tokens, "
            f"{num_layers} attention layers{' (of a smaller-than-full model: --layers)' if args.layers else ''}"
            f"{', torch.compile' if args.compile else ', eager model'}; median of {args.reps} steps after "
            f"{args.warmup}. GNA = catalogue `{PRESETS[args.model]}` (rescaled to the grid); NA = same window, "
            "stride 1. Attention per call measured alone on the model's shapes.\n\n"
            "| mode | step s | speed-up | attention ms/call | attention s/step (share) |\n"
            "|---|---|---|---|---|\n")
    body = "".join(
        f"| {m} | {s:.3f} | {(stock[1] / s if stock else float('nan')):.2f}x | {c * 1e3:.2f} | "
        f"{a:.3f} ({100 * a / s:.0f}%) |\n" for m, s, c, a in rows)
    note = f"\n{TARGETS[args.model]}\n" if args.model in TARGETS and grid == DEFAULT_GRID[args.model] else ""
    table = head + body + note
    print(table)
    name = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"diffusers-{args.model}-{name}-{datetime.date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
