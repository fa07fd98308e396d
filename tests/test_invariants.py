"""Consequences of docs/SEMANTICS.md, checked on the reference and on flexna's mask_mod.

Each property is stated independently of the per-axis rule (counts, closed formulas
for blocked / full / causal attention, stride groups, densities).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from helpers import ceil_div, dense_mask
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import Config, axis_params, configs

import flexna
from flexna import NAPattern
from flexna.reference import reference_mask


def _both(cfg: Config) -> dict[str, torch.Tensor]:
    """The reference mask and flexna's mask_mod (via torch's create_mask), row-major."""
    n = cfg.num_tokens
    return {
        "reference": reference_mask(*cfg.args()),
        "na_mask_mod": dense_mask(flexna.na_mask_mod(**cfg.kwargs()), n, n),
    }


def _coords(shape) -> np.ndarray:
    return np.stack(np.unravel_index(np.arange(math.prod(shape)), shape), axis=1)


@settings(max_examples=120, deadline=None)
@given(configs(causal=False))
def test_non_causal_every_query_attends_prod_kernel_keys(cfg):
    for name, mask in _both(cfg).items():
        counts = mask.sum(dim=1)
        assert (counts == math.prod(cfg.kernel_size)).all(), (name, cfg, counts.unique())


@settings(max_examples=120, deadline=None)
@given(configs(causal=False))
def test_non_causal_stride_groups_share_key_sets(cfg):
    """Queries with the same dilation residue and stride group on every axis share keys."""
    coords = _coords(cfg.shape)
    d = np.asarray(cfg.dilation)
    s = np.asarray(cfg.stride)
    group = np.concatenate([coords % d, (coords // d) // s], axis=1)
    _, inverse = np.unique(group, axis=0, return_inverse=True)
    inverse = torch.from_numpy(inverse.reshape(-1))
    for name, mask in _both(cfg).items():
        first = torch.zeros(int(inverse.max()) + 1, dtype=torch.long)
        first.scatter_reduce_(0, inverse, torch.arange(len(inverse)), reduce="amin",
                              include_self=False)
        assert torch.equal(mask, mask[first[inverse]]), (name, cfg)


def _blocked_axis_allowed(length, k, d, causal):
    """stride == kernel on one axis: closed form of the per-axis relation, [L, L] bool.

    Within the dilation group of length Lg, block b = x' // k covers [b*k, b*k + k);
    the last, incomplete block uses the last k positions of the group. Non-causal:
    the key set is the whole (shifted) block. Causal: the block start up to the query.
    """
    x = np.arange(length)[:, None]
    y = np.arange(length)[None, :]
    g = x % d
    lg = -(-(length - g) // d)
    xq, yq = x // d, y // d
    start = np.minimum((xq // k) * k, lg - k)
    end = xq if causal else start + k - 1
    ok = (yq >= start) & (yq <= end)
    return ok & (x % d == y % d)


@st.composite
def blocked_configs(draw):
    cfg = draw(configs(max_tokens=1200))
    return Config(cfg.shape, cfg.kernel_size, cfg.kernel_size, cfg.dilation, cfg.is_causal)


@settings(max_examples=120, deadline=None)
@given(blocked_configs())
def test_stride_equal_kernel_is_blocked_attention(cfg):
    want = torch.ones(cfg.num_tokens, cfg.num_tokens, dtype=torch.bool)
    coords = _coords(cfg.shape)
    for a in range(cfg.ndim):
        ax = _blocked_axis_allowed(cfg.shape[a], cfg.kernel_size[a], cfg.dilation[a],
                                   cfg.is_causal[a])
        want &= torch.from_numpy(ax[coords[:, a][:, None], coords[:, a][None, :]])
    for name, mask in _both(cfg).items():
        assert torch.equal(mask, want), (name, cfg)
    if not any(cfg.is_causal) and all(d == 1 for d in cfg.dilation) and all(
            length % k == 0 for length, k in zip(cfg.shape, cfg.kernel_size, strict=True)):
        # window attention: key set of a query == its own block
        block = torch.from_numpy(np.ravel_multi_index(
            (coords // np.asarray(cfg.kernel_size)).T,
            [length // k for length, k in zip(cfg.shape, cfg.kernel_size, strict=True)]))
        assert torch.equal(want, block[:, None] == block[None, :])


@settings(max_examples=60, deadline=None)
@given(configs(max_tokens=1000), st.data())
def test_kernel_equal_length_non_causal_is_full_attention(cfg, data):
    stride = tuple(data.draw(st.integers(1, length)) for length in cfg.shape)
    full = Config(cfg.shape, cfg.shape, stride, (1,) * cfg.ndim, (False,) * cfg.ndim)
    for name, mask in _both(full).items():
        assert mask.all(), (name, full)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300))
def test_1d_causal_kernel_equal_length_is_standard_causal(length):
    cfg = Config((length,), (length,), (1,), (1,), (True,))
    want = torch.ones(length, length, dtype=torch.bool).tril()
    for name, mask in _both(cfg).items():
        assert torch.equal(mask, want), name


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60))
def test_2d_causal_full_kernel_is_coordinatewise_causal(h, w):
    """Both axes causal with kernel == length: key <= query on every axis (not row-major causal)."""
    cfg = Config((h, w), (h, w), (1, 1), (1, 1), (True, True))
    if h * w > 1500:
        return
    c = _coords((h, w))
    want = torch.from_numpy((c[None, :, 0] <= c[:, None, 0]) & (c[None, :, 1] <= c[:, None, 1]))
    for name, mask in _both(cfg).items():
        assert torch.equal(mask, want), name


@settings(max_examples=80, deadline=None)
@given(configs(causal=True))
def test_causal_axes_never_look_ahead_and_include_self(cfg):
    coords = _coords(cfg.shape)
    ahead = np.zeros((cfg.num_tokens, cfg.num_tokens), dtype=bool)
    for a in range(cfg.ndim):
        ahead |= coords[None, :, a] > coords[:, None, a]
    ahead = torch.from_numpy(ahead)
    for name, mask in _both(cfg).items():
        assert not (mask & ahead).any(), name
        assert mask.diagonal().all(), name


@settings(max_examples=120, deadline=None)
@given(configs())
def test_every_query_attends_itself(cfg):
    for name, mask in _both(cfg).items():
        assert mask.diagonal().all(), (name, cfg)


@settings(max_examples=150, deadline=None)
@given(configs())
def test_density_and_flop_limit(cfg):
    pattern = NAPattern.create(*cfg.args())
    ref = reference_mask(*cfg.args())
    density = ref.double().mean().item()
    assert math.isclose(pattern.density(), density, rel_tol=1e-12)
    assert math.isclose(pattern.flop_limit(), 1.0 / density, rel_tol=1e-12)
    if not any(cfg.is_causal):
        want = math.prod(cfg.kernel_size) / math.prod(cfg.shape)
        assert math.isclose(pattern.density(), want, rel_tol=1e-12)
        assert math.isclose(pattern.flop_limit(), math.prod(cfg.shape) / math.prod(cfg.kernel_size),
                            rel_tol=1e-12)
    assert pattern.num_tokens == cfg.num_tokens
    assert pattern.keys_per_query == math.prod(cfg.kernel_size)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_density_one_axis_large(data):
    """Density from the pair count on a long axis, vs a direct count by the rule."""
    length = data.draw(st.integers(1, 5000))
    k, s, d, c = data.draw(axis_params(length))
    pattern = NAPattern.create((length,), k, s, d, c)
    x = np.arange(length)
    g = x % d
    lg = -(-(length - g) // d)
    xq = x // d
    if c:
        leader = np.minimum((xq // s) * s + s - 1, lg - 1)
        count = xq - np.maximum(leader - k + 1, 0) + 1
    else:
        count = np.full(length, k)
    assert pattern.density() == int(count.sum()) / length**2


def test_dilation_groups_are_independent():
    """Dilation d on an axis = d interleaved copies of the undilated pattern on each group."""
    length, k, d = 23, 3, 4
    mask = reference_mask((length,), k, 1, d, False)
    lib = dense_mask(flexna.na_mask_mod((length,), k, 1, d, False), length, length)
    for g in range(d):
        idx = torch.arange(g, length, d)
        sub = reference_mask((len(idx),), k, 1, 1, False)
        assert torch.equal(mask[idx][:, idx], sub)
        assert torch.equal(lib[idx][:, idx], sub)
    assert ceil_div(length, d) * d >= length
