"""flexna inside the user's compiled model: one graph, no breaks, no recompiles; torch.export."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import flexna

pytestmark = pytest.mark.slow


class Model(torch.nn.Module):
    """Layers of different kernels, dilations and strides (one with rpb), plus a functional call."""

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


def _fresh() -> None:
    torch._dynamo.reset()
    counters.clear()


def test_model_compiles_fullgraph_to_one_graph_without_recompiles() -> None:
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(1, 12, 14, 32)
    with torch.no_grad():
        want = model(x)  # eager (CPU Flex runs compiled inside flexna here)
    _fresh()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings from flexna's own code
        got = compiled(x)
        graphs = counters["stats"]["unique_graphs"]
        got2 = compiled(torch.randn(1, 12, 14, 32))
    assert graphs == 1, graphs
    assert counters["stats"]["unique_graphs"] == 1, "called again with the same shapes: recompiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert got2.shape == got.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _fresh()


def test_functional_call_in_a_compiled_function_is_one_flex_op() -> None:
    def f(q: torch.Tensor) -> torch.Tensor:
        return flexna.na2d(q, q, q, 5, dilation=(1, 2)) * 2

    q = torch.randn(1, 10, 16, 2, 16)
    with torch.no_grad():
        want = f(q)
    _fresh()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        got = torch.compile(f, backend=backend, fullgraph=True)(q)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("flex_attention" in t for t in targets) == 1, targets
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _fresh()


@pytest.mark.parametrize("strict", [False, True])
def test_export_contains_flex_attention(strict: bool) -> None:
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(1, 12, 14, 32)
    with torch.no_grad():
        want = model(x)
        program = torch.export.export(model, (x,), strict=strict)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("flex_attention" in t for t in targets) == 4, targets  # 3 layers + 1 functional call
    # no N x N intermediates: the dense stand-in never ran
    assert not any("logsumexp" in t or "softmax" in t for t in targets), targets
    with torch.no_grad():
        got = program.module()(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _fresh()


def test_export_with_gradients_on_cpu_is_a_clear_error() -> None:
    model = Model()
    x = torch.randn(1, 12, 14, 32)
    with pytest.raises(Exception, match="dense N x N stand-in"):
        torch.export.export(model, (x,), strict=False)
    _fresh()


def test_flexna_warnings_point_at_the_callers_line() -> None:
    x = torch.randn(1, 6, 7, 1, 16, requires_grad=True)
    with pytest.warns(flexna.EagerFallbackWarning) as record:
        flexna.na2d(x, x, x, 3)
    assert record[0].filename == __file__, record[0].filename
