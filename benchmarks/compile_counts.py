"""Graphs, graph breaks and recompilations of flexna inside the user's torch.compile (CPU).

Run:  python benchmarks/compile_counts.py [--out FILE.md]

Scenarios (inference, float32, CPU; each from a fresh dynamo state), counted with dynamo's own
counters around the compiled calls only (eager references are made first):

* ``model``: 3 NeighborhoodAttention2D layers (kernels 3, 5 dilation 2, 3x5 stride 1x2 with rpb)
  and a functional ``na2d`` call, ``torch.compile(model, fullgraph=True)``: first call, then again;
* ``set kernel``: the same compiled model after ``layers[0].kernel_size = 7`` and
  ``layers[1].dilation = (2, 1)``;
* ``new resolution``: the model at 16x16 after 12x14, then 12x14 again;
* ``regional``: 10 layers of 8 (kernel, dilation) configurations, ``layer.compile()`` each, every
  layer called twice.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([
            flexna.NeighborhoodAttention2D(32, 2, 3),
            flexna.NeighborhoodAttention2D(32, 2, 5, dilation=2),
            flexna.NeighborhoodAttention2D(32, 2, (3, 5), stride=(1, 2), rel_pos_bias=True),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        q = x.unflatten(-1, (2, 16))
        return x + flexna.na2d(q, q, q, 7).flatten(-2)


def _count(fn) -> dict[str, object]:
    """Run ``fn`` and report what dynamo did meanwhile; an exception is reported, not raised."""
    graphs = counters["stats"]["unique_graphs"]
    calls = counters["stats"]["calls_captured"]
    breaks = sum(counters["graph_break"].values())
    try:
        fn()
        error = ""
    except Exception as exc:  # the older tree fails some scenarios
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    return {"graphs": counters["stats"]["unique_graphs"] - graphs,
            "captured": counters["stats"]["calls_captured"] - calls,
            "breaks": sum(counters["graph_break"].values()) - breaks, "error": error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--label", default="this tree")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows: list[tuple[str, dict[str, object]]] = []
    x = torch.randn(1, 12, 14, 32)
    x16 = torch.randn(1, 16, 16, 32)
    with torch.no_grad():
        model = Model().eval()
        model(x), model(x16)  # eager first (flexna's own compiled kernels are not counted below)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, fullgraph=True)
        rows.append(("model: first call", _count(lambda: compiled(x))))
        rows.append(("model: called again", _count(lambda: compiled(x))))

        def set_kernel() -> None:
            model.layers[0].kernel_size = 7
            model.layers[1].dilation = (2, 1)
            compiled(x)
        rows.append(("model: set kernel_size / dilation, call", _count(set_kernel)))
        rows.append(("model: new resolution 16x16", _count(lambda: compiled(x16))))
        rows.append(("model: 12x14 again", _count(lambda: compiled(x))))

        configs = [(3, 1), (5, 2), (3, 3), (7, 1), (5, 1), (3, 2), (5, 1), (3, 4), (5, 2), (3, 1)]
        layers = [flexna.NeighborhoodAttention2D(32, 2, k, dilation=d).eval() for k, d in configs]
        for layer in layers:
            layer(x)
        torch._dynamo.reset()
        counters.clear()
        for layer in layers:
            layer.compile(fullgraph=True)
        rows.append(("regional: 10 layers, 8 configs, first calls", _count(lambda: [m(x) for m in layers])))
        rows.append(("regional: called again", _count(lambda: [m(x) for m in layers])))
    table = "| scenario | graphs compiled | graph breaks | error |\n|---|---|---|---|\n" + "".join(
        f"| {name} | {r['graphs']} | {r['breaks']} | {r['error']} |\n" for name, r in rows)
    text = (f"### {args.label} — CPU, torch {torch.__version__}, {datetime.date.today()}\n\n{table}")
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
