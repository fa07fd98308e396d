"""flexna.integrations.config: the NATTEN / Cosmos-Predict2 per-layer format and the dense schedule
(no model library needed), and the catalogue's model configs."""

from __future__ import annotations

import pytest

from flexna.integrations.config import LayerPattern, SparsityConfig
from flexna.tools import catalogue

COSMOS_2B = {"window_size": (-1, 12, 24), "stride": (1, 4, 8), "base_size": (-1, 44, 80)}
COSMOS_14B = {"window_size": (-1, 4, 16), "stride": (1, 1, 1), "dilation": (1, 11, 5),
              "base_size": (-1, 44, 80), "layer_id": 3}


@pytest.mark.parametrize(("entry", "grid", "expected"), [
    # at the base size: as written, -1 is the whole axis
    (COSMOS_2B, (24, 44, 80), ((24, 12, 24), (1, 4, 8), (1, 1, 1))),
    (COSMOS_14B, (24, 44, 80), ((24, 4, 16), (1, 1, 1), (1, 11, 5))),
    # half the resolution: windows and strides halve (rounded), dilation round(0.5) = 0 -> 1
    (COSMOS_2B, (8, 22, 40), ((8, 6, 12), (1, 2, 4), (1, 1, 1))),
    # twice the resolution: doubled; dilation 1 -> 2 (at most 88 // 24 = 3)
    (COSMOS_2B, (5, 88, 160), ((5, 24, 48), (1, 8, 16), (1, 2, 2))),
    # 14B at half size: window max(2, round(4 * 0.5)) = 2; dilation round(5.5) = 6 capped at 22 // 2 = 11
    (COSMOS_14B, (3, 22, 40), ((3, 2, 8), (1, 1, 1), (1, 6, 2))),
    # no base_size: nothing rescales
    ({"window_size": (3, -1), "stride": 2}, (10, 7), ((3, 7), (2, 2), (1, 1))),
])
def test_cosmos_rescaling(entry, grid, expected):
    kernel, stride, dilation, causal = LayerPattern.from_dict(entry).resolve(grid)
    assert (kernel, stride, dilation) == expected and causal == (False,) * len(grid)


@pytest.mark.parametrize(("entry", "grid", "match"), [
    ({"window_size": (3, 3)}, (8, 8, 8), r"window_size = \(3, 3\) has 2 axes, but the model's token grid "
     r"\(8, 8, 8\) has 3"),
    ({"window_size": (9, 3)}, (8, 8), r"kernel_size\[axis 0\] = 9 is out of range"),
    ({"window_size": (4, 4), "stride": 5}, (8, 8), r"stride\[axis 0\] = 5 is out of range"),
    ({"window_size": (3, 3), "dilation": (1, 3)}, (8, 8), r"kernel_size\[axis 1\] = 3 is out of range"),
    ({"window_size": 3, "base_size": (-1, 8)}, (8,), r"base_size = \(-1, 8\) has 2 axes"),
])
def test_patterns_that_do_not_fit_the_grid(entry, grid, match):
    with pytest.raises(ValueError, match=match):
        LayerPattern.from_dict(entry).resolve(grid)


@pytest.mark.parametrize(("entry", "match"), [
    ({"stride": 2}, "'window_size' is missing"),
    ({"window_size": (3, 3), "kernel": 3}, "unknown key 'kernel'"),
    ({"window_size": (3, 0)}, r"window_size\[axis 1\] = 0 is out of range: need an int >= 1 or -1"),
    ({"window_size": (3, -2)}, r"window_size\[axis 1\] = -2 is out of range"),
    ({"window_size": (3, 3), "stride": 0}, "stride = 0 is out of range: need an int >= 1"),
    ({"window_size": (3, 3), "dilation": (1, -1)}, r"dilation\[axis 1\] = -1 is out of range"),
    ({"window_size": (3, 3.5)}, r"window_size\[axis 1\] = 3.5 must be an int"),
    ({"window_size": (3, 3), "base_size": 44}, "base_size = 44 must give one size per axis"),
    ({"window_size": (3, 3), "is_causal": "yes"}, "is_causal = 'yes' must be a bool"),
    ({"window_size": (1, 2, 3, 4)}, "must have 1 to 3 entries"),
])
def test_bad_layer_dicts(entry, match):
    with pytest.raises(ValueError, match=match):
        LayerPattern.from_dict(entry, "layer")


def test_model_configs_and_schedule():
    one = SparsityConfig.create(COSMOS_2B)
    assert one.layer(0) == one.layer(27) == LayerPattern.from_dict(COSMOS_2B)
    per_layer = SparsityConfig.create([None, COSMOS_2B, "dense"], dense_steps=3)
    assert per_layer.layer(0) is None and per_layer.layer(2) is None and per_layer.layer(1) is not None
    assert per_layer.dense_steps == 3
    per_layer.check(3, "M")
    with pytest.raises(ValueError, match="per-layer config has 3 entries, but M has 4 attention layers"):
        per_layer.check(4, "M")
    model = SparsityConfig.create({"pattern": COSMOS_2B, "dense_layers": [0, 2], "dense_steps": 1})
    assert model.layer(0) is None and model.layer(1) is not None and model.dense_steps == 1
    assert SparsityConfig.create(model, dense_steps=5).dense_steps == 5  # keywords override
    with pytest.raises(ValueError, match="dense_layers: layer 7 is out of range: M has layers 0 to 3"):
        model.__class__.create(model, dense_layers=[7]).check(4, "M")


@pytest.mark.parametrize(("config", "kwargs", "error", "match"), [
    ({"layers": [COSMOS_2B], "pattern": COSMOS_2B}, {}, ValueError, "exactly one of 'layers'"),
    ({"pattern": COSMOS_2B, "steps": 2}, {}, ValueError, "unknown key 'steps'"),
    ([], {}, ValueError, "per-layer list is empty"),
    ([COSMOS_2B, 3], {}, TypeError, r"config\[1\] must be"),
    (COSMOS_2B, {"dense_steps": True}, ValueError, "dense_steps = True is out of range"),
    (COSMOS_2B, {"calls_per_step": 0}, ValueError, "calls_per_step = 0 is out of range: need an int >= 1"),
    (COSMOS_2B, {"dense_layers": "0"}, ValueError, "dense_layers = '0' must be a list"),
    ("flux", {}, TypeError, "config must be"),
])
def test_bad_model_configs(config, kwargs, error, match):
    with pytest.raises(error, match=match):
        SparsityConfig.create(config, **kwargs)


def test_catalogue_entries_give_model_configs():
    flux = catalogue.load_entry("flux-gna")
    cfg = SparsityConfig.create(flux.sparsity_config())
    assert cfg.layer(0).resolve((256, 256))[:3] == ((80, 80), (16, 16), (1, 1))
    assert cfg.layer(0).resolve((128, 128))[:3] == ((40, 40), (8, 8), (1, 1))  # rescaled with the grid
    cosmos = catalogue.load_entry("cosmos-gna")
    layer = SparsityConfig.create(cosmos.sparsity_config()).layer(0)
    assert layer.resolve(cosmos.pattern.shape)[:2] == (cosmos.pattern.kernel_size, cosmos.pattern.stride)
    assert layer.resolve((30, 22, 40))[:2] == ((30, 6, 12), (1, 2, 4))  # -1: every frame, any length


def test_catalogue_rejects_a_model_config_that_does_not_fit(tmp_path):
    entry = (catalogue.catalogue_dir() / "flux-gna.json").read_text()
    add = '"head_dim": 128, "model_config": {"pattern": {"window_size": [300, 3]}}'
    bad = entry.replace('"head_dim": 128', add)
    (tmp_path / "flux-gna.json").write_text(bad)
    with pytest.raises(catalogue.CatalogueError, match=r"field 'model_config': kernel_size\[axis 0\] = 300"):
        catalogue.load_entry("flux-gna", tmp_path)
    not_a_dict = entry.replace('"head_dim": 128', '"head_dim": 128, "model_config": 3')
    (tmp_path / "flux-gna.json").write_text(not_a_dict)
    with pytest.raises(catalogue.CatalogueError, match="field 'model_config': must be an object"):
        catalogue.load_entry("flux-gna", tmp_path)


def test_flexna_imports_without_the_optional_libraries():
    """flexna and flexna.integrations need neither diffusers nor transformers; the integration
    modules say which package is missing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "sys.modules['diffusers'] = sys.modules['transformers'] = None\n"
            "import flexna, flexna.integrations, flexna.tools.catalogue\n"
            "for name in ('diffusers', 'transformers'):\n"
            "    try:\n"
            "        __import__('flexna.integrations.' + name)\n"
            "    except ImportError as exc:\n"
            "        print(name, 'missing:', exc)\n")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "diffusers missing:" in out.stdout and "'diffusers'" in out.stdout
