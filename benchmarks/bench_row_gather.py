"""Speed of the eager token permute (NATTEN layout -> tile order and back) on CUDA.

Run (CUDA):  python benchmarks/bench_row_gather.py [--out FILE.md]

For the catalogue's 2-D and 3-D rows (fp16, batch 1, the row's heads, head dim 128), TB/s
counting bytes read + written (2 x the tensor; padding counted as written): a plain copy
(``clone``, the memory-speed ceiling), ``index_select`` of whole token rows plus an in-place
``index_fill_`` of the padding (flexna's gather before the Triton row copy), flexna's
``TokenLayout.heads_first`` (the Triton row copy) and ``from_heads_first`` (back, padding
dropped). Median of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import datetime

import torch
from triton.testing import do_bench

import flexna
from flexna.analysis import choose_tiles
from flexna.layout import TokenLayout, order_index
from flexna.tools.catalogue import load_entry

ROWS = ("flux-na", "flux-gna", "hunyuan-na", "hunyuan-gna")


def _row(name: str) -> str:
    entry = load_entry(name)
    p = entry.pattern
    tiles = choose_tiles(p, padding="auto", backend="flash")
    assert tiles is not None
    layout = TokenLayout.create(p.shape, tiles[0])
    x = torch.randn(1, *p.shape, entry.heads, 128, device="cuda", dtype=torch.float16)
    rows = x.reshape(1, -1, entry.heads, 128)
    to_order, _ = order_index(layout, x.device)
    padding = torch.nonzero(to_order < 0).flatten()
    clamped = to_order.clamp(min=0)

    def old() -> torch.Tensor:
        out = rows.index_select(1, clamped)
        return out.index_fill_(1, padding, 0) if padding.numel() else out

    hf = layout.heads_first(x)
    assert torch.equal(hf.transpose(1, 2), old()), name
    assert torch.equal(layout.from_heads_first(hf), x), name
    written = layout.length * entry.heads * 128 * 2
    read = x.numel() * 2

    def tbps(fn, moved=read + written) -> str:  # type: ignore[no-untyped-def]
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        return f"{moved / ms / 1e9:.2f} ({ms:.3f} ms)"

    return (f"| {name} | {'x'.join(map(str, tiles[0]))} | {x[0, ..., 0, 0].numel()} "
            f"({layout.length}) | {tbps(lambda: x.clone(), 2 * read)} | {tbps(old)} | "
            f"{tbps(lambda: layout.heads_first(x))} | {tbps(lambda: layout.from_heads_first(hf))} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = ["| row | tiles | tokens (padded) | clone | index_select + fill | heads_first | "
             "from_heads_first |", "|---|---|---|---|---|---|---|"]
    for name in ROWS:
        lines.append(_row(name))
        print(lines[-1], flush=True)
    head = (f"# Token permute speed — {torch.cuda.get_device_name()}, {datetime.date.today()}\n\n"
            f"torch {torch.__version__}, flexna {flexna.__version__}; `benchmarks/bench_row_gather.py`; "
            "TB/s = bytes read + written / median time (fp16, batch 1, head dim 128).\n\n")
    text = head + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
