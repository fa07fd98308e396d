"""flexna.integrations.diffusers on tiny randomly initialised FLUX, HunyuanVideo and Wan transformers.

Built from their config classes (no downloads), on the CPU. With a window covering the whole grid
the output equals the stock processors'; with real windows it equals the same model whose
attention calls are replaced by a float64 masked softmax over a mask built from
``flexna.reference.reference_mask`` plus the text tokens (the stock processors do everything
else, so only the attention core differs). Skipped when diffusers is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import (
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)
from diffusers.models.transformers import (
    transformer_flux,
    transformer_hunyuan_video,
    transformer_wan,
)

from flexna.integrations.diffusers import (
    FluxNAAttnProcessor,
    apply_neighborhood_attention,
    remove_neighborhood_attention,
    set_denoising_step,
)
from flexna.reference import reference_attention, reference_mask

FLUX_GRID, FLUX_TEXT = (6, 8), 5
VIDEO_GRID = (3, 4, 6)  # frames, rows, columns of tokens (after patching)
HUNYUAN_TEXT = 6


# --------------------------------------------------------------------------- tiny models and inputs
def flux_model(grid: tuple[int, int] = FLUX_GRID) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    rows, cols = grid
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None]
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, rows * cols, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, FLUX_TEXT, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(FLUX_TEXT, 3))
    return model, inputs


def hunyuan_model(grid: tuple[int, int, int] = VIDEO_GRID) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                           attention_head_dim=16, num_layers=1, num_single_layers=1,
                                           num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                                           text_embed_dim=16, pooled_projection_dim=8,
                                           rope_axes_dim=(4, 6, 6)).eval()
    t, h, w = grid
    g = torch.Generator().manual_seed(1)
    text_mask = torch.ones(2, HUNYUAN_TEXT, dtype=torch.bool)
    text_mask[0, 4:] = False  # sample 0: 4 real text tokens, 2 padding; sample 1: 6 real
    inputs = dict(hidden_states=torch.randn(2, 4, t, 2 * h, 2 * w, generator=g),
                  timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(2, HUNYUAN_TEXT, 16, generator=g),
                  encoder_attention_mask=text_mask, pooled_projections=torch.randn(2, 8, generator=g),
                  guidance=torch.tensor([3500.0, 3500.0]))
    return model, inputs


def wan_model(num_layers: int = 2, grid: tuple[int, int, int] = VIDEO_GRID) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                  num_layers=num_layers, rope_max_seq_len=32).eval()
    t, h, w = grid
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, t, 2 * h, 2 * w, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 7, 16, generator=g))
    return model, inputs


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# --------------------------------------------------------------------------- float64 reference
def joint_mask(grid: tuple[int, ...], window: tuple[int, ...] | None, stride: tuple[int, ...], text_len: int,
               text_first: bool) -> torch.Tensor:
    """``[N, N]``: layout queries see their neighborhood (``None``: everything) and all text; text
    queries see everything."""
    n = math.prod(grid)
    mask = torch.ones(n + text_len, n + text_len, dtype=torch.bool)
    if window is not None:
        img = slice(text_len, None) if text_first else slice(0, n)
        mask[img, img] = reference_mask(grid, window, stride)
    return mask


def reference_dispatch(masks: list[torch.Tensor | None]) -> Callable[..., torch.Tensor]:
    """A stand-in for diffusers' ``dispatch_attention_fn``: float64 masked softmax; the i-th
    self-attention call of a forward uses ``masks[i % len(masks)]`` (``None``: no mask but the
    model's own). Cross-attention calls (keys of another length) attend all their keys."""
    calls = [0]

    def dispatch(query, key, value, attn_mask=None, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, heads, N, D]
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
        if q.shape[-2] == k.shape[-2]:
            layer = masks[calls[0] % len(masks)]
            calls[0] += 1
            if layer is not None:
                mask = layer
        if attn_mask is not None:
            mask = mask & attn_mask
        out, _ = reference_attention(q, k, v, mask)
        return out.to(query.dtype).transpose(1, 2)

    return dispatch


def reference_run(monkeypatch, module, model, inputs, masks):
    with monkeypatch.context() as m:
        m.setattr(module, "dispatch_attention_fn", reference_dispatch(masks))
        return run(model, inputs)


# --------------------------------------------------------------------------- whole grid = stock
FAMILIES = {
    "flux": (flux_model, {"window_size": (-1, -1)}),
    "hunyuan": (hunyuan_model, {"window_size": (-1, -1, -1)}),
    "wan": (wan_model, {"window_size": (-1, -1, -1)}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_whole_grid_window_equals_stock_attention(family):
    make, whole = FAMILIES[family]
    model, inputs = make()
    stock = run(model, inputs)
    apply_neighborhood_attention(model, whole)
    assert torch.allclose(run(model, inputs), stock, atol=1e-5, rtol=1e-5)
    remove_neighborhood_attention(model)
    assert torch.equal(run(model, inputs), stock)


# --------------------------------------------------------------------------- real windows = reference
def test_flux_windows_equal_the_float64_reference(monkeypatch):
    model, inputs = flux_model()
    window, stride = (3, 5), (1, 2)
    mask = joint_mask(FLUX_GRID, window, stride, FLUX_TEXT, text_first=True)
    expected = reference_run(monkeypatch, transformer_flux, model, inputs, [mask])
    dense = run(model, inputs)
    apply_neighborhood_attention(model, {"window_size": window, "stride": stride})
    out = run(model, inputs)
    assert (out - dense).abs().max() > 1e-2  # the pattern matters at this size
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_flux_stays_tiled_and_equals_the_float64_reference(monkeypatch):
    """A grid where FLUX runs in a tiled order (32 x 64 in 32 x 4 tiles): the inputs are reordered
    once per forward (latents, img_ids, ControlNet residuals), every layer is one joint call in
    that order, the output comes back row-major; equal to the stock model under a float64 masked
    softmax, with and without ControlNet residuals, and on a dense step."""
    grid, window = (32, 64), (9, 9)
    model, inputs = flux_model(grid)
    g = torch.Generator().manual_seed(5)
    inputs["controlnet_block_samples"] = [torch.randn(1, math.prod(grid), 32, generator=g)]
    inputs["controlnet_single_block_samples"] = [torch.randn(1, math.prod(grid), 32, generator=g)]
    mask = joint_mask(grid, window, (1, 1), FLUX_TEXT, text_first=True)
    expected = reference_run(monkeypatch, transformer_flux, model, inputs, [mask])
    stock = run(model, inputs)
    apply_neighborhood_attention(model, {"window_size": window}, dense_steps=1)
    state = model._flexna_state
    assert torch.allclose(run(model, inputs), stock, atol=1e-5, rtol=1e-5)  # dense step, tiled order
    assert state.layout is not None and not state.layout.is_row_major, state.layout
    out = run(model, inputs)
    assert (out - stock).abs().max() > 1e-2  # the pattern matters at this size
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)
    del inputs["controlnet_block_samples"], inputs["controlnet_single_block_samples"]
    expected = reference_run(monkeypatch, transformer_flux, model_without(model), inputs, [mask])
    apply_neighborhood_attention(model, {"window_size": window})
    assert torch.allclose(run(model, inputs), expected, atol=2e-5, rtol=1e-4)
    remove_neighborhood_attention(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize("family", ["hunyuan", "wan"])
def test_video_models_stay_tiled_and_equal_the_float64_reference(monkeypatch, family):
    """A grid where HunyuanVideo / Wan stay in one tiled order (4 x 16 x 32 in 2 x 16 x 4 tiles):
    the patch embedding's tokens and the rotary frequencies move into it as they are made,
    proj_out's tokens back before the unpatchify; equal to the stock model under a float64
    masked softmax (HunyuanVideo with its text padding), and on a dense step."""
    grid, window = (4, 16, 32), (2, 8, 8)
    if family == "hunyuan":
        model, inputs = hunyuan_model(grid)
        module, text = transformer_hunyuan_video, HUNYUAN_TEXT
        mask = joint_mask(grid, window, (1, 1, 1), text, text_first=False)
    else:
        model, inputs = wan_model(1, grid)
        module, mask = transformer_wan, reference_mask(grid, window)
    expected = reference_run(monkeypatch, module, model, inputs, [mask])
    stock = run(model, inputs)
    apply_neighborhood_attention(model, {"window_size": window}, dense_steps=1)
    assert torch.allclose(run(model, inputs), stock, atol=1e-5, rtol=1e-5)  # dense step, tiled order
    layout = model._flexna_state.layout
    assert layout is not None and layout.tile == (2, 16, 4), layout
    out = run(model, inputs)
    assert (out - stock).abs().max() > 1e-3  # the pattern matters at this size
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)
    remove_neighborhood_attention(model)
    assert torch.equal(run(model, inputs), stock)


def model_without(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its stock processors (flexna's removed)."""
    remove_neighborhood_attention(model)
    return model


def test_hunyuan_windows_and_text_padding_equal_the_float64_reference(monkeypatch):
    model, inputs = hunyuan_model()
    window, stride = (2, 3, 3), (1, 1, 2)
    mask = joint_mask(VIDEO_GRID, window, stride, HUNYUAN_TEXT, text_first=False)
    expected = reference_run(monkeypatch, transformer_hunyuan_video, model, inputs, [mask])
    apply_neighborhood_attention(model, {"window_size": window, "stride": stride})
    out = run(model, inputs)
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)
    # the padding is respected: changing sample 0's padded text embeddings changes nothing of it
    inputs2 = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    inputs2["encoder_hidden_states"][0, 4:] += 3.0
    assert torch.allclose(run(model, inputs2)[0], out[0], atol=1e-5)
    inputs2["encoder_hidden_states"][0, :4] += 3.0  # ... while its real text tokens matter
    assert (run(model, inputs2)[0] - out[0]).abs().max() > 1e-3


def test_hunyuan_tiled_order_with_text_padding_equals_the_float64_reference(monkeypatch):
    """A grid where flexna runs tiled and padded (4x16x20 in 2x8x8 tiles: 1536 keys before the text):
    the padding score_mod must find the text keys behind the padded layout."""
    grid, window = (4, 16, 20), (2, 8, 8)
    model, inputs = hunyuan_model(grid)
    mask = joint_mask(grid, window, window, HUNYUAN_TEXT, text_first=False)
    expected = reference_run(monkeypatch, transformer_hunyuan_video, model, inputs, [mask])
    # force a padded order (whatever the tile ranking prefers at this size)
    monkeypatch.setattr("flexna.integrations.diffusers.choose_tiles", lambda p, **kw: ((2, 8, 8), (2, 8, 8)))
    apply_neighborhood_attention(model, {"window_size": window, "stride": window})
    out = run(model, inputs)
    plan = model._flexna_state.plans[0]
    assert plan.tiles == ((2, 8, 8), (2, 8, 8)) and plan.kv_layout_len == 1536 > math.prod(grid)
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_wan_per_layer_config_equals_the_float64_reference(monkeypatch):
    model, inputs = wan_model()
    layers = [{"window_size": (2, 3, 3), "dilation": (1, 1, 2)},
              {"window_size": (-1, 2, 6), "stride": (1, 2, 3)}]  # -1: the whole axis (3 frames)
    masks = [reference_mask(VIDEO_GRID, (2, 3, 3), 1, (1, 1, 2)),
             reference_mask(VIDEO_GRID, (3, 2, 6), (1, 2, 3))]
    expected = reference_run(monkeypatch, transformer_wan, model, inputs, masks)
    apply_neighborhood_attention(model, layers)
    assert torch.allclose(run(model, inputs), expected, atol=2e-5, rtol=1e-4)
    # the same list with the second layer dense
    remove_neighborhood_attention(model)
    expected_dense = reference_run(monkeypatch, transformer_wan, model, inputs, [masks[0], None])
    apply_neighborhood_attention(model, layers, dense_layers=[1])
    assert torch.allclose(run(model, inputs), expected_dense, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- schedule, inverse
def test_dense_steps_schedule_and_step_reset():
    model, inputs = flux_model()
    stock = run(model, inputs)
    apply_neighborhood_attention(model, {"window_size": (3, 5)}, dense_steps=2)
    steps = [run(model, inputs) for _ in range(3)]
    assert torch.equal(steps[0], stock) and torch.equal(steps[1], stock)  # the stock processors ran
    assert (steps[2] - stock).abs().max() > 1e-2
    set_denoising_step(model, 0)
    assert torch.equal(run(model, inputs), stock)
    set_denoising_step(model, 2)
    assert torch.allclose(run(model, inputs), steps[2])


def test_calls_per_step_counts_guidance_passes():
    model, inputs = flux_model()
    stock = run(model, inputs)
    apply_neighborhood_attention(model, {"window_size": (3, 5), "stride": 1},
                                 dense_steps=1, calls_per_step=2)
    outs = [run(model, inputs) for _ in range(3)]
    assert torch.equal(outs[0], stock) and torch.equal(outs[1], stock) and not torch.equal(outs[2], stock)


def test_remove_restores_the_stock_processors():
    model, _ = flux_model()
    before = [type(b.attn.processor) for b in (*model.transformer_blocks, *model.single_transformer_blocks)]
    apply_neighborhood_attention(model, {"window_size": (3, 5)})
    assert all(isinstance(b.attn.processor, FluxNAAttnProcessor) for b in model.transformer_blocks)
    apply_neighborhood_attention(model, {"window_size": (5, 5)})  # applying again replaces
    remove_neighborhood_attention(model)
    after = [type(b.attn.processor) for b in (*model.transformer_blocks, *model.single_transformer_blocks)]
    assert after == before and not model._forward_pre_hooks
    with pytest.raises(ValueError, match="no flexna attention"):
        remove_neighborhood_attention(model)


# --------------------------------------------------------------------------- the grid
def test_flux_grid_given_explicitly_must_match_img_ids():
    model, inputs = flux_model()
    apply_neighborhood_attention(model, {"window_size": (-1, -1)}, grid=(8, 6))  # 48 tokens, transposed
    with pytest.raises(ValueError, match=r"grid = \(8, 6\) does not match .* token grid \(6, 8\)"):
        run(model, inputs)
    apply_neighborhood_attention(model, {"window_size": (-1, -1)}, grid=(4, 4))
    with pytest.raises(ValueError, match=r"grid = \(4, 4\) holds 16 tokens, but .* got 48 image tokens"):
        run(model, inputs)
    apply_neighborhood_attention(model, {"window_size": (-1, -1)})
    shuffled = dict(inputs, img_ids=inputs["img_ids"].flip(0))
    with pytest.raises(ValueError, match="img_ids do not describe one row-major image grid"):
        run(model, shuffled)


def test_video_grid_is_inferred_from_latents_and_checked():
    model, inputs = wan_model(num_layers=1)
    apply_neighborhood_attention(model, {"window_size": (-1, -1, -1)}, grid=(3, 6, 4))
    with pytest.raises(ValueError, match=r"grid = \(3, 6, 4\) does not match .* \(3, 4, 6\) .*patch size"):
        run(model, inputs)


# --------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize(("config", "kwargs", "error", "match"), [
    ({"window_size": (3, 3, 3)}, {}, ValueError, r"window_size = \(3, 3, 3\) has 3 axes, but the model's token "
     r"grid \(6, 8\) has 2"),
    ({"window_size": (9, 3)}, {}, ValueError,
     r"layer 0 on the token grid \(6, 8\): kernel_size\[axis 0\] = 9 is out of range"),
    ([{"window_size": (3, 3)}] * 3, {}, ValueError,
     "per-layer config has 3 entries, but FluxTransformer2DModel has 2 attention layers"),
    ({"window_size": (3, 3)}, {"dense_layers": [2]}, ValueError, "dense_layers: layer 2 is out of range"),
    ({"window_size": (3, 0)}, {}, ValueError, r"window_size\[axis 1\] = 0 is out of range"),
    ({"window": (3, 3)}, {}, ValueError, "unknown key 'window'"),
    ({"window_size": (3, 3)}, {"grid": (6, 8, 1)}, ValueError, "grid = .* must be 2 positive ints"),
    ({"window_size": (3, 3)}, {"dense_steps": -1}, ValueError, "dense_steps = -1 is out of range"),
])
def test_bad_configs_give_clear_errors(config, kwargs, error, match):
    model, _ = flux_model()
    with pytest.raises(error, match=match):
        apply_neighborhood_attention(model, config, **{"grid": FLUX_GRID, **kwargs})
    assert not hasattr(model, "_flexna_state")


def test_other_processors_are_not_replaced():
    model, _ = flux_model()
    model.single_transformer_blocks[0].attn.set_processor(lambda *args, **kwargs: None)
    with pytest.raises(TypeError, match="attention layer 1 runs function; flexna replaces only the stock "
                       "FluxAttnProcessor"):
        apply_neighborhood_attention(model, {"window_size": (3, 3)})


def test_unknown_model_class_is_a_clear_error():
    with pytest.raises(TypeError, match=r"transformer is a Linear; .* supports FluxTransformer2DModel, "
                       "HunyuanVideoTransformer3DModel, WanTransformer3DModel"):
        apply_neighborhood_attention(torch.nn.Linear(2, 2), {"window_size": 3})


# --------------------------------------------------------------------------- torch.compile
WHOLE_3D = {"window_size": (-1, -1, -1)}
COMPILE_CASES = {  # two attention layers each: a real window and the whole grid
    "flux": (flux_model, [{"window_size": (3, 5)}, {"window_size": (-1, -1)}]),
    "flux-tiled": (lambda: flux_model((32, 64)), [{"window_size": (9, 9)}, {"window_size": (-1, -1)}]),
    "hunyuan": (hunyuan_model, [{"window_size": (2, 3, 3)}, {"window_size": (-1, -1, -1)}]),
    "hunyuan-tiled": (lambda: hunyuan_model((4, 16, 32)), [{"window_size": (2, 8, 8)}, WHOLE_3D]),
    "wan-tiled": (lambda: wan_model(2, (4, 16, 32)), [{"window_size": (2, 8, 8)}, WHOLE_3D]),
    "wan": (wan_model, [{"window_size": (2, 3, 3)}, {"window_size": (-1, -1, -1)}]),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(COMPILE_CASES))
def test_compiled_transformer_has_no_graph_breaks_and_compiles_once_per_schedule_phase(family):
    from torch._dynamo.utils import counters

    make, layers = COMPILE_CASES[family]
    model, inputs = make()
    expected_dense = run(model, inputs)
    apply_neighborhood_attention(model, layers)
    expected_sparse = run(model, inputs)
    apply_neighborhood_attention(model, layers, dense_steps=1)
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(model)
    outs = [run(compiled, inputs) for _ in range(4)]
    breaks = sum(counters["graph_break"].values())
    assert breaks == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # the dense step, then the sparse steps: no recompiles
    assert torch.allclose(outs[0], expected_dense, atol=1e-4)
    assert all(torch.allclose(o, expected_sparse, atol=1e-4) for o in outs[1:])
    torch.compiler.reset()


@pytest.mark.slow
def test_gpu_benchmark_script_runs_tiny_models_on_the_cpu(tmp_path):
    """benchmarks/bench_diffusers.py --tiny: the GPU benchmark's code path on small random models."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out_file = tmp_path / "bench.md"
    env = {**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": "",
           "FLEXNA_MASKS": str(root / "masks")}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_diffusers.py"), "--tiny", "--model",
                           "hunyuan", "--grid", "2", "4", "6", "--text", "8", "--layers", "2", "--warmup", "1",
                           "--reps", "1", "--out", str(out_file)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out_file.read_text()
    assert all(f"| {mode} |" in table for mode in ("stock", "gna", "na"))


def test_layer_plans_tile_grids_no_tile_divides():
    """Wan's 720p grid (21 x 45 x 80) has no 128-token tile that divides it: the layer plans pick
    padded tiles (fixed per model and grid), not row-major order, for its GNA windows."""
    from flexna.integrations.diffusers import LayerPlan

    plan = LayerPlan.create((21, 45, 80), ((21, 12, 24), (1, 4, 8), (1, 1, 1), (False, False, False)))
    assert plan.tiles is not None and all(math.prod(t) == 128 for t in plan.tiles)
    assert plan.kv_layout_len > 21 * 45 * 80  # padded
