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


def _graphs_of(fn, *args: object) -> tuple[object, int]:
    """``fn(*args)`` and the graphs dynamo compiled for it (counted around this call only)."""
    before = counters["stats"]["unique_graphs"]
    out = fn(*args)
    return out, counters["stats"]["unique_graphs"] - before


def test_changing_a_layers_pattern_recompiles_nothing() -> None:
    """Kernel size, dilation, stride and causality set on a compiled model's layers: the next call
    runs the new patterns (against the eager model, which is exact) without recompiling."""
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(1, 12, 14, 32)
    _fresh()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        before, graphs = _graphs_of(compiled, x)
        assert graphs == 1
        model.layers[0].kernel_size = 7
        model.layers[1].dilation = (2, 1)
        model.layers[1].is_causal = (True, False)
        model.layers[2].dilation = 2  # rpb layer: its table shape does not depend on dilation
        got, graphs = _graphs_of(compiled, x)
        assert graphs == 0, "setting a layer's pattern recompiled the model"
        assert not counters["graph_break"], dict(counters["graph_break"])
        want = model(x)  # eager, with the new patterns
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, before), "the compiled model still runs the old patterns"
    _fresh()


def test_pattern_setter_validates_before_changing_anything() -> None:
    layer = flexna.NeighborhoodAttention2D(32, 2, 3).eval()
    biased = flexna.NeighborhoodAttention2D(32, 2, 3, rel_pos_bias=True).eval()
    x = torch.randn(1, 12, 14, 32)
    _fresh()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        compiled(x)
        layer.dilation = 1  # the same value: fine
        with pytest.raises(ValueError, match=r"kernel_size\[axis 0\] = 13 is out of range"):
            layer.kernel_size = 13  # too large for the 12-row layout this layer was compiled for
        assert layer.kernel_size == (3, 3)
        with pytest.raises(ValueError, match="rel_pos_bias table would change shape"):
            biased.kernel_size = 5
        assert biased.kernel_size == (3, 3)
        with pytest.raises(ValueError, match="kernel_size"):
            layer.kernel_size = (3, 3, 3)
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)
    _fresh()


def test_a_copied_layer_has_its_own_pattern() -> None:
    """``copy.deepcopy`` (and pickling) gives a layer its own plan store: changing the copy's
    kernel leaves the original's compiled graph on the original pattern."""
    import copy
    import pickle

    torch.manual_seed(0)
    layer = flexna.NeighborhoodAttention2D(32, 2, 3).eval()
    x = torch.randn(1, 12, 14, 32)
    _fresh()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        before = compiled(x)
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            twin.kernel_size = 5
            assert layer.kernel_size == (3, 3)
            torch.testing.assert_close(compiled(x), before)
            fresh = flexna.NeighborhoodAttention2D(32, 2, 5).eval()
            fresh.load_state_dict(layer.state_dict())
            torch.testing.assert_close(twin(x), fresh(x), atol=1e-5, rtol=1e-5)
    _fresh()


def test_regional_compilation_shares_one_graph_across_layer_configs() -> None:
    """``layer.compile()`` on layers of different kernels and dilations (DiNAT-style): one graph
    for all of them, none more when called again; each gives its own pattern's output."""
    torch.manual_seed(0)
    configs = [(3, 1), (5, 2), (3, 3), (7, 1), (5, 1), (3, 2), (5, 1), (3, 4), (5, 2), (3, 1)]
    layers = [flexna.NeighborhoodAttention2D(32, 2, k, dilation=d).eval() for k, d in configs]
    x = torch.randn(1, 12, 14, 32)
    with torch.no_grad():
        want = [layer(x) for layer in layers]
        _fresh()
        for layer in layers:
            layer.compile(fullgraph=True)
        got, graphs = _graphs_of(lambda: [layer(x) for layer in layers])
        assert graphs == 1, f"{graphs} graphs for {len(layers)} layers of one class"
        again, graphs = _graphs_of(lambda: [layer(x) for layer in layers])
        assert graphs == 0
    for a, b, c in zip(got, again, want, strict=True):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)
    _fresh()


@pytest.mark.parametrize("dynamic", [None, True])
def test_new_resolutions_compile_once_each(dynamic: bool | None) -> None:
    """A compiled model called at other resolutions: dynamo's automatic dynamic shapes (or
    ``dynamic=True``) make the sizes symbolic; flexna specialises them (a mask is made for one
    shape), so each resolution is correct and compiles once, and a seen one compiles nothing."""
    torch.manual_seed(0)
    model = Model().eval()
    _fresh()
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        for hw in ((12, 14), (16, 16), (20, 18), (12, 14), (16, 16)):
            x = torch.randn(1, *hw, 32)
            before = counters["stats"]["unique_graphs"]
            got = compiled(x)
            graphs = counters["stats"]["unique_graphs"] - before
            torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
            assert graphs <= 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    _fresh()


def test_a_dynamic_int_argument_is_a_clear_error() -> None:
    """An int argument of the user's compiled function that changes becomes symbolic: flexna
    says so (it needs the kernel size's value) instead of failing inside dynamo."""
    def f(q: torch.Tensor, kernel: int) -> torch.Tensor:
        return flexna.na2d(q, q, q, kernel)

    q = torch.randn(1, 12, 14, 2, 16)
    _fresh()
    compiled = torch.compile(f, fullgraph=True)
    with torch.no_grad():
        compiled(q, 3)
        with pytest.raises(Exception, match=r"is dynamic under torch\.compile"):
            compiled(q, 5)
        torch.testing.assert_close(torch.compile(f, dynamic=False)(q, 5), f(q, 5), atol=1e-5, rtol=1e-5)
    _fresh()


def test_traced_plans_are_bounded_by_the_cache_budget() -> None:
    """Plans made at trace time keep masks alive: their store is held to flexna's cache budget
    (oldest first); a graph whose plan was dropped plans again and stays correct."""
    from flexna import plan as plans

    budget = flexna.cache_info().max_bytes
    flexna.clear_cache()
    _fresh()
    q = torch.randn(1, 12, 14, 2, 16)
    fns = [torch.compile(lambda q, k=k: flexna.na2d(q, q, q, k), fullgraph=True, dynamic=False)
           for k in (3, 5, 7)]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", flexna.CacheWarning)  # masks over a 1-byte budget
            flexna.set_cache_limit(1)
            outs = [fn(q) for fn in fns]
            assert len(plans._TRACED_BYTES) == 1, "traced plans beyond the budget were kept"
            again = fns[0](q)  # its plan was dropped: re-planned, same result
            flexna.set_cache_limit(budget)
            want = flexna.na2d(q, q, q, 3)
    finally:
        flexna.set_cache_limit(budget)
        flexna.clear_cache()
    torch.testing.assert_close(again, outs[0])
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-5)
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_flexna_layers_without_copying_masks() -> None:
    """``mode="reduce-overhead"``: a model of flexna layers is captured; a replay copies no input
    (flexna's masks are static addresses; the model input is marked static here, as a model's
    activations inside a larger graph would be) and equals the eager model."""
    torch.manual_seed(0)
    model = Model().cuda().eval()
    x = torch.randn(1, 12, 14, 32, device="cuda")
    torch._dynamo.mark_static_address(x)
    _fresh()
    graphed = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        want = model(x)
        for _ in range(3):  # warm-up, record, replay
            graphed(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = graphed(x)
            torch.cuda.synchronize()
        got = out.clone()
    names = [e.name for e in prof.events()]
    assert any("cudaGraphLaunch" in n for n in names), "no graph replay seen"
    copies = [n for n in names if n == "aten::copy_" or "Memcpy" in n]
    assert not copies, f"a replay copied inputs: {copies}"
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    _fresh()
