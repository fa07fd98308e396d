"""The MaskSpec house: every combination through one route, one bounded thread-safe cache,
flexna's compilations apart from the user's, and the stage-wise import rules."""

from __future__ import annotations

import ast
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from ext_reference import attention64, per_head_mask_and_bias
from helpers import permuted_mask, tiled_order
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexna
from flexna.blockmask import spec_block_mask
from flexna.reference import reference_attention, reference_mask

PACKAGE = Path(flexna.__file__).parent


# ----------------------------------------------------------------- combinations, float64 reference

def _heads_kwargs() -> list[dict]:
    return [{"kernel_size": 3}, {"kernel_size": 3, "dilation": 2}, {"kernel_size": (5, 3)},
            {"kernel_size": 3, "is_causal": (True, False)}]


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra", [0, 5])
@pytest.mark.parametrize("with_rpb", [False, True])
def test_tiled_order_with_per_head_extra_tokens_and_rpb(extra: int, with_rpb: bool, device: str) -> None:
    """Tiled order (8x16 tiles) with per-head patterns, extra keys and rpb vs float64."""
    torch.manual_seed(0)
    shape, heads, dim = (12, 20), 4, 16
    heads_kw = _heads_kwargs() if not with_rpb else [  # one table shape: kernel 3 everywhere
        {"kernel_size": 3}, {"kernel_size": 3, "dilation": 2}, {"kernel_size": 3, "dilation": (1, 3)},
        {"kernel_size": 3, "stride": 1}]
    per_head = {name: flexna.PerHead([h.get(name, default) for h in heads_kw])
                for name, default in (("kernel_size", 1), ("stride", 1), ("dilation", 1),
                                      ("is_causal", False))}
    q, k, v = (torch.randn(1, *shape, heads, dim) for _ in range(3))
    kwargs: dict = {}
    if extra:
        kwargs["additional_keys"] = torch.randn(1, extra, heads, dim)
        kwargs["additional_values"] = torch.randn(1, extra, heads, dim)
    table = torch.randn(heads, 5, 5) if with_rpb else None
    on = {key: t.to(device) for key, t in kwargs.items()}
    with torch.no_grad():
        out = flexna.neighborhood_attention(q.to(device), k.to(device), v.to(device), **per_head,
                                            rel_pos_bias=None if table is None else table.to(device),
                                            tiles=(8, 16), **on).cpu()
    mask, bias = per_head_mask_and_bias(table, shape, heads_kw)
    n = mask.shape[-1]
    if extra:
        mask = torch.cat([mask, torch.ones(heads, n, extra, dtype=torch.bool)], dim=-1)
        if bias is not None:
            bias = torch.cat([bias, torch.zeros(heads, n, extra)], dim=-1)
    flat = [t.reshape(1, n, heads, dim).transpose(1, 2) for t in (q, k, v)]
    if extra:
        flat[1] = torch.cat([flat[1], kwargs["additional_keys"].transpose(1, 2)], dim=2)
        flat[2] = torch.cat([flat[2], kwargs["additional_values"].transpose(1, 2)], dim=2)
    want = attention64(*flat, mask[None], None if bias is None else bias[None])
    got = out.reshape(1, n, heads, dim).transpose(1, 2).double()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_tiled_extra_queries_and_per_head_block_mask_equal_create_block_mask() -> None:
    """The spec's BlockMask (tiled, per head, extra rows and columns) equals torch's own build."""
    shape, q_tile = (10, 13), (4, 8)
    patterns = [flexna.NAPattern.create(shape, 3), flexna.NAPattern.create(shape, (5, 3), 1, (2, 1))]
    spec = flexna.MaskSpec.create(patterns, q_tile=q_tile, kv_tile=q_tile, num_extra_q=7, num_extra_kv=40,
                                  block_size=32)
    got = spec_block_mask(spec, "cpu")
    dense = [permuted_mask(reference_mask(shape, p.kernel_size, p.stride, p.dilation, p.is_causal),
                           shape, q_tile, q_tile) for p in patterns]
    nq, nk = dense[0].shape
    full = torch.zeros(2, spec.q_len, spec.kv_len, dtype=torch.bool)
    full[:, :nq, :nk] = torch.stack(dense)
    full[:, nq:, :nk] = torch.from_numpy(tiled_order(shape, q_tile) >= 0)  # extra queries: real keys
    full[:, :, nk:] = True  # extra keys: every query row
    want = create_block_mask(lambda b, h, qi, ki: full[h, qi, ki], 1, 2, spec.q_len, spec.kv_len,
                             device="cpu", BLOCK_SIZE=32)
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.to_dense(), want.to_dense())
    # and the mask_mod is the dense mask
    qq, kk = torch.arange(spec.q_len)[:, None], torch.arange(spec.kv_len)[None, :]
    for head in range(2):
        assert torch.equal(got.mask_mod(torch.tensor(0), torch.tensor(head), qq, kk), full[head])


# ----------------------------------------------------------------- caches

def test_rpb_tables_built_once_across_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    import flexna.scores as scores

    calls = []
    real = scores.rpb_bases
    monkeypatch.setattr(scores, "rpb_bases", lambda spec: calls.append(spec) or real(spec))
    flexna.clear_cache()
    m = flexna.NeighborhoodAttention2D(32, 2, 3, rel_pos_bias=True)
    x = torch.randn(1, 9, 11, 32)
    with torch.no_grad():
        outs = [m(x) for _ in range(3)]
    assert len(calls) == 1
    torch.testing.assert_close(outs[0], outs[2])


def test_first_functional_call_builds_each_block_map_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import flexna.blocksparsity as bs

    calls = []
    real = bs.order_block_maps
    monkeypatch.setattr(bs, "order_block_maps", lambda *a, **k: calls.append(a[1:5]) or real(*a, **k))
    flexna.clear_cache()
    flexna.analysis._choose_tiles.cache_clear()
    x = torch.randn(1, 40, 36, 1, 16)
    with torch.no_grad():
        flexna.na2d(x, x, x, 7)  # analysis (row-major cost) and the real mask
    assert calls and len(calls) == len({repr(c) for c in calls})


def test_cache_is_bounded_by_bytes_and_clearable() -> None:
    flexna.clear_cache()
    before = flexna.cache_info().max_bytes
    try:
        flexna.set_cache_limit(300_000)
        for k in (3, 5, 7, 9, 11, 13):
            spec = flexna.MaskSpec.create(flexna.NAPattern.create((64, 64), k))
            spec_block_mask(spec, "cpu")
            assert flexna.cache_info().bytes <= 300_000
        assert flexna.cache_info().entries >= 1
        big = flexna.MaskSpec.create(flexna.NAPattern.create((512, 512), 3))
        with pytest.warns(flexna.CacheWarning, match="not kept"):
            mask = spec_block_mask(big, "cpu")
        assert mask.seq_lengths == (512 * 512, 512 * 512)
        assert flexna.cache_info().bytes <= 300_000
        flexna.clear_cache()
        assert flexna.cache_info().entries == 0 and flexna.cache_info().bytes == 0
    finally:
        flexna.set_cache_limit(before)
    with pytest.raises(ValueError, match="max_bytes"):
        flexna.set_cache_limit(-1)


def test_cached_window_bounds_cannot_be_changed_by_a_caller() -> None:
    _, hi = flexna.geometry.axis_window_bounds(20, 5, 1, 1, False)
    hi += 5  # a caller's own copy
    mm = flexna.na_mask_mod(20, 5, device="cpu")
    got = mm(0, 0, torch.arange(20)[:, None], torch.arange(20)[None, :])
    assert torch.equal(got, reference_mask(20, 5))
    raw_lo, _ = flexna.geometry.window_bounds(20, 5, 1, 1, False)
    with pytest.raises(ValueError):
        raw_lo[0] = 3


# ----------------------------------------------------------------- threads

def test_four_threads_build_and_run_masks_at_once() -> None:
    """Four threads building new masks and running compiled attention at once: no crash, and
    every result equals the float64 reference (the build touches no process-global state)."""
    flexna.clear_cache()
    threads_before = torch.get_num_threads()
    shape = (12, 14)
    x = torch.randn(1, *shape, 2, 16)
    flat = x.reshape(1, -1, 2, 16).transpose(1, 2)
    errors: list[BaseException] = []
    results: dict[tuple[int, int], torch.Tensor] = {}

    def work(t: int) -> None:
        try:
            for k in (3 + 2 * t, 4 + 2 * t):
                with torch.no_grad():
                    results[t, k] = flexna.na2d(x, x, x, 2 + k % 4, dilation=1 + t % 2)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    assert torch.get_num_threads() == threads_before
    for (t, k), out in results.items():
        want, _ = reference_attention(flat, flat, flat, reference_mask(shape, 2 + k % 4, 1, 1 + t % 2))
        torch.testing.assert_close(out.reshape(1, -1, 2, 16).transpose(1, 2).double(), want,
                                   atol=1e-5, rtol=1e-5)


def test_no_process_global_thread_settings_in_the_package() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "set_num_threads" not in text and "set_num_interop_threads" not in text, path


# ----------------------------------------------------------------- compile budget

def test_user_flex_attention_keeps_its_recompile_budget() -> None:
    """After flexna compiled more shapes than dynamo's limit, the user's own
    torch.compile(flex_attention) still compiles a new shape (flexna compiles its own frame)."""
    import flexna.flex as F

    name = F._limit_names()[0]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**{name: 2}):
        for length in (5, 6, 7):
            x = torch.randn(1, length, 9, 1, 16)
            with torch.no_grad():
                flexna.na2d(x, x, x, 3)
        user = torch.compile(flex_attention, dynamic=False)
        q = torch.randn(1, 1, 256, 16)
        mask = flexna.na_block_mask(256, 9, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an eager fallback would warn
            with torch._dynamo.config.patch(**{F._limit_names()[1]: True}):
                out = user(q, q, q, block_mask=mask)
    want, _ = reference_attention(q, q, q, reference_mask(256, 9))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------- the house's import rules

def _flexna_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _closure(module: str) -> set[str]:
    """Every module imported by ``module``, following flexna's own modules transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        if path.exists() and name.startswith("flexna"):
            todo += [m for m in _flexna_imports(path) if m != "flexna"]
    return seen


def test_core_never_imports_the_tools() -> None:
    core = [p for p in PACKAGE.glob("*.py") if p.name != "__main__.py"]  # the entry point may
    assert core
    for path in core:
        for mod in _flexna_imports(path):
            assert not mod.startswith("flexna.tools"), f"{path.name} imports {mod}"


@pytest.mark.parametrize("module", ["flexna.geometry", "flexna.spec", "flexna.layout", "flexna.analysis",
                                    "flexna.pattern", "flexna.blocksparsity", "flexna.cache"])
def test_pure_stages_import_nothing_from_flex_attention(module: str) -> None:
    bad = {m for m in _closure(module) if m.startswith("torch.nn.attention")}
    assert not bad, f"{module} reaches {bad}"


@pytest.mark.parametrize("shape,kernel,stride,dilation,tile,block", [
    ((40, 36), 7, 1, 1, None, None),            # row-major 128-token blocks: box path
    ((64, 64), 13, 1, 1, None, None),           # row-major, a block is two rows: factorised
    ((30, 20, 12), (5, 7, 3), (1, 2, 1), 1, (2, 4, 4), None),
    ((33, 17), 5, 1, (2, 1), (4, 8), (64, 64)),  # dilation, two tiles per block
    ((300,), 31, 4, 1, None, 32),
])
def test_analyze_counts_equal_the_block_mask(shape, kernel, stride, dilation, tile, block) -> None:
    """analyze (factorised counts where a block is one box, block maps otherwise) counts what
    torch's create_block_mask of the same mask_mod holds."""
    pattern = flexna.NAPattern.create(shape, kernel, stride, dilation)
    a = flexna.analyze(pattern, tile, tile, block)
    mm = flexna.na_mask_mod(shape, kernel, stride, dilation, q_tile=tile, kv_tile=tile, device="cpu")
    n = flexna.tiled_length(shape, tile)
    want = create_block_mask(mm, None, None, n, n, device="cpu", BLOCK_SIZE=(a.q_block, a.kv_block))
    assert a.full_blocks == int(want.full_kv_num_blocks.sum())
    assert a.partial_blocks == int(want.kv_num_blocks.sum())
    assert a.total_blocks == want.kv_num_blocks.shape[-1] * want.kv_indices.shape[-1]


# ----------------------------------------------------------------- a rule not separable per axis

@dataclass(frozen=True)
class DiamondNA(flexna.NAPattern):
    """A test rule that is not separable: the NA window AND |dy| + |dx| <= radius (2-D,
    dilation 1). Only the bounds, the flag and the element check change: the seam."""

    radius: int = 1
    separable: ClassVar[bool] = False

    def core_bounds(self, axis: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.envelope_bounds(axis)
        x, half = np.arange(self.shape[axis]), self.radius // 2  # the square inside the diamond
        return np.maximum(lo, x - half), np.minimum(hi, x + half)

    def element_check(self, q: tuple, kv: tuple) -> object:
        return abs(q[0] - kv[0]) + abs(q[1] - kv[1]) <= self.radius


def _diamond_reference(shape: tuple[int, int], kernel: int, radius: int) -> torch.Tensor:
    c = np.stack(np.unravel_index(np.arange(shape[0] * shape[1]), shape), axis=1)
    l1 = np.abs(c[:, None, :] - c[None, :, :]).sum(-1)
    return reference_mask(shape, kernel) & torch.from_numpy(l1 <= radius)


@pytest.mark.parametrize("shape,kernel,radius,tile,block", [
    ((13, 17), 9, 8, None, 4), ((16, 24), 9, 5, (2, 2), 4), ((20, 20), 11, 6, (4, 4), 16),
    ((16, 24), 9, 5, (4, 8), 32)])
def test_non_separable_rule_through_the_seam(shape, kernel, radius, tile, block) -> None:
    """mask_mod equals the brute-force rule; the BlockMask keeps every attending pair, and its
    full blocks (from the core windows) hold only attending pairs."""
    rule = DiamondNA(**vars(flexna.NAPattern.create(shape, kernel)), radius=radius)
    spec = flexna.MaskSpec.create(rule, q_tile=tile, kv_tile=tile, block_size=block)
    mask = spec_block_mask(spec, "cpu")
    want = permuted_mask(_diamond_reference(shape, kernel, radius), shape, tile, tile)
    qq, kk = torch.arange(spec.q_len)[:, None], torch.arange(spec.kv_len)[None, :]
    got = mask.mask_mod(torch.tensor(0), torch.tensor(0), qq, kk)
    assert torch.equal(got, want)
    def cells(m: torch.Tensor) -> torch.Tensor:
        return m.repeat_interleave(block, 0).repeat_interleave(block, 1)[:spec.q_len, :spec.kv_len].bool()

    blocks = cells(mask.to_dense()[0, 0])
    assert not (want & ~blocks).any(), "an attending pair lies in a skipped block"
    from flexna.tools.blockmaps import block_maps as decode

    full = cells(decode(mask)[1][0, 0])
    assert full.any() or block > 16  # the core windows do give full blocks
    assert not (full & ~want).any(), "a full block holds a pair the rule drops"
