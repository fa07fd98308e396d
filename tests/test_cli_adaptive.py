"""``flexna show`` of catalogue entries with adaptive blocks (issue 15): the picture's block
classes against a brute-force construction written here, from the seeded data.

The brute force works per block: the window from the per-axis rule of docs/SEMANTICS.md
(``helpers.axis_ok``), blocks being boxes of the layout (row-major runs of whole rows, or
one tile), "any pair" / "every pair" of a box pair by prefix sums of the per-axis tables;
the selection from float64 pooling, NumPy's softmax, sort and cumulative sum. Blocks whose
selection sits on the threshold / top-k boundary within float32 rounding are left out of
the comparison (there must be few); every other block must have the class drawn.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import axis_ok, ceil_div, tiled_order

import flexna
from flexna.adaptive import local_qk
from flexna.tools import catalogue
from flexna.tools.cli import main
from flexna.tools.png import decode_png
from flexna.tools.render import BLOCK_COLOURS, block_panel, block_stats

REPO = Path(__file__).resolve().parent.parent
MASKS = REPO / "masks"
TOL_P = 1e-5  # probabilities / cumulative sums: far above float32 rounding of the library's pass
TOL_S = 1e-3  # scores (logits of a few tens)


def axis_table(length: int, k: int, s: int, d: int, causal: bool) -> np.ndarray:
    return np.array([[axis_ok(x, y, length, k, s, d, causal) for y in range(length)]
                     for x in range(length)], dtype=np.int64)


def block_boxes(shape, tile, block):
    """Per block: (lo, hi) per axis of its real tokens (a box, checked), their count, and whether
    every position of the block is a real token. ``order``: row-major index per position."""
    order = tiled_order(shape, tile)
    n, blocks = order.size, ceil_div(order.size, block)
    lo = np.zeros((blocks, len(shape)), dtype=np.int64)
    hi = np.full((blocks, len(shape)), -1, dtype=np.int64)
    count = np.zeros(blocks, dtype=np.int64)
    whole = np.zeros(blocks, dtype=bool)
    for b in range(blocks):
        pos = order[b * block:min(n, (b + 1) * block)]
        real = pos[pos >= 0]
        count[b] = real.size
        whole[b] = real.size == block
        if real.size:
            coords = np.stack(np.unravel_index(real, shape), 1)
            lo[b], hi[b] = coords.min(0), coords.max(0)
            assert math.prod(hi[b] - lo[b] + 1) == real.size, "the test needs box-shaped blocks"
    return order, lo, hi, count, whole


def box_sums(table: np.ndarray, qlo, qhi, klo, khi) -> np.ndarray:
    """``[rows, cols]``: sum of ``table[qlo..qhi, klo..khi]`` by a 2-D prefix sum."""
    p = np.zeros((table.shape[0] + 1, table.shape[1] + 1), dtype=np.int64)
    p[1:, 1:] = table.cumsum(0).cumsum(1)
    r0, r1 = qlo[:, None], qhi[:, None] + 1
    c0, c1 = klo[None, :], khi[None, :] + 1
    return p[r1, c1] - p[r0, c1] - p[r1, c0] + p[r0, c0]


def brute_classes(pattern, q, k, tiles, block, threshold, top_k):
    """(expected categories [rows, cols], ambiguous [rows, cols]) of the picture: 0 empty, 1 / 2 the
    window's partial / full blocks, 3 / 4 blocks the selection adds, partial / full."""
    shape = pattern.shape
    q_order, qlo, qhi, qcount, qwhole = block_boxes(shape, tiles[0], block[0])
    k_order, klo, khi, kcount, kwhole = block_boxes(shape, tiles[1], block[1])
    has_q, has_k = qcount > 0, kcount > 0
    any_pair = np.ones((len(qcount), len(kcount)), dtype=bool)
    all_pair = np.ones_like(any_pair)
    for a, length in enumerate(shape):
        t = axis_table(length, pattern.kernel_size[a], pattern.stride[a], pattern.dilation[a],
                       pattern.is_causal[a])
        sums = box_sums(t, qlo[:, a], qhi[:, a], klo[:, a], khi[:, a])
        area = (qhi[:, a] - qlo[:, a] + 1)[:, None] * (khi[:, a] - klo[:, a] + 1)[None, :]
        any_pair &= sums > 0
        all_pair &= sums == area
    window = any_pair & has_q[:, None] & has_k[None, :]
    window_full = all_pair & qwhole[:, None] & kwhole[None, :]

    def pool(x: torch.Tensor, order: np.ndarray, size: int, count: np.ndarray) -> np.ndarray:
        xn = x[0, 0].double().numpy()
        out = np.zeros((len(count), xn.shape[1]))
        for b in range(len(count)):
            idx = [i for i in range(b * size, min(order.size, (b + 1) * size)) if order[i] >= 0]
            if idx:
                out[b] = xn[idx].mean(0)
        return out

    scores = pool(q, q_order, block[0], qcount) @ pool(k, k_order, block[1], kcount).T / math.sqrt(q.shape[-1])
    scores[:, ~has_k] = -np.inf
    sel = np.zeros_like(window)
    unsure = np.zeros_like(window)
    for r in np.flatnonzero(has_q):
        row = scores[r]
        if top_k is not None:
            desc = np.argsort(-row, kind="stable")
            keep = desc[:top_k]
            sel[r, keep] = True
            if top_k < has_k.sum():  # the k-th and (k+1)-th scores: ambiguous when close
                edge = row[desc[top_k - 1]], row[desc[top_k]]
                unsure[r] = (row >= edge[1] - TOL_S) & (row <= edge[0] + TOL_S) & (edge[0] - edge[1] < TOL_S)
        else:
            p = np.exp(row - row.max())
            p /= p.sum()
            asc = np.argsort(p, kind="stable")
            cum = np.cumsum(p[asc])
            kept = cum >= 1 - threshold
            sel[r, asc[kept]] = True
            if threshold < 1:  # at 1 every block is kept, however rounded
                unsure[r, asc[np.abs(cum - (1 - threshold)) < TOL_P]] = True
                edge = p[asc[~kept]].max(initial=-1.0), p[asc[kept]].min()
                if edge[1] - edge[0] < TOL_P:  # near-ties across the boundary may swap places
                    unsure[r] |= (p >= edge[0] - TOL_P) & (p <= edge[1] + TOL_P)
    sel &= has_k[None, :]
    full = window_full | (sel & qwhole[:, None] & kwhole[None, :])
    cat = np.where(window, np.where(full, 2, 1), np.where(sel, np.where(full, 4, 3), 0))
    return cat, unsure & has_k[None, :]


def assert_classes(stats, pattern, q, k, tiles, block, adaptive):
    want, unsure = brute_classes(pattern, q, k, tiles, block, adaptive.threshold, adaptive.top_k)
    got = stats.categories
    assert got.shape == want.shape
    assert unsure.sum() <= max(2, want.size // 500), f"{unsure.sum()} blocks on the selection's boundary"
    wrong = np.argwhere((got != want) & ~unsure)
    assert wrong.size == 0, (f"{len(wrong)} blocks differ, e.g. (q block, kv block) {wrong[:5].tolist()}: "
                             f"drawn {got[tuple(wrong[0])]}, brute force {want[tuple(wrong[0])]}")
    # the window's blocks are drawn as the window whatever the selection
    assert np.array_equal(np.isin(got, (1, 2)), np.isin(want, (1, 2)))
    return want


@pytest.mark.parametrize("name", ["video-na-adaptive", "flux-na-adaptive"])
def test_shipped_adaptive_pictures_equal_the_brute_force(name):
    entry = catalogue.load_entry(name, MASKS if MASKS.is_dir() else None)
    assert entry.adaptive is not None
    stats = block_stats(entry.pattern, adaptive=entry.adaptive, head_dim=entry.head_dim)
    spec = flexna.MaskSpec.create(entry.pattern)
    q, k = local_qk(spec, 1, entry.head_dim, seed=entry.adaptive.seed)
    want = assert_classes(stats, entry.pattern, q, k, (None, None), (128, 128), entry.adaptive)
    assert (want == 4).sum() > 0.05 * np.isin(want, (1, 2)).sum(), "the picture shows few added blocks"
    # what is drawn: the panel's cells hold the categories' colours
    assert stats.categories.shape[0] <= 512
    panel = block_panel(stats).image
    rows, cols = stats.categories.shape
    cell = max(1, min(16, 512 // max(rows, cols)))
    cells = panel[13:13 + rows * cell:cell, 5:5 + cols * cell:cell]
    drawn = (cells[:, :, None, :] == BLOCK_COLOURS[None, None]).all(-1).argmax(-1)
    assert np.array_equal(drawn, stats.categories)


def write(folder: Path, name: str, **fields) -> None:
    entry = {"name": name, "description": "adaptive test entry", "source": "tests", "stride": 1,
             "dilation": 1, "is_causal": False, "heads": 2, "head_dim": 16, **fields}
    (folder / f"{name}.json").write_text(json.dumps(entry))


CASES = {  # entry fields, show options, (q tile, kv tile), (q block, kv block)
    "2d-tiles-padding": (dict(shape=[10, 12], kernel_size=[3, 5], dilation=[2, 1], is_causal=[False, True],
                              adaptive={"threshold": 0.8, "seed": 3}),
                         ["--q-tile", "2", "4", "--kv-tile", "4", "2"], ((2, 4), (4, 2)), (8, 8)),
    "3d-rows": (dict(shape=[4, 6, 8], kernel_size=[3, 3, 3], stride=[1, 2, 1],
                     adaptive={"top_k": 6, "seed": 11}),
                ["--block-size", "16"], (None, None), (16, 16)),
    "2d-rows-threshold-1": (dict(shape=[8, 16], kernel_size=[3, 3], adaptive={"threshold": 1, "seed": 0}),
                            ["--block-size", "32", "16"], (None, None), (32, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_show_draws_the_brute_force_classes(tmp_path, capsys, monkeypatch, case):
    fields, options, tiles, block = CASES[case]
    write(tmp_path, "t", **fields)
    monkeypatch.chdir(tmp_path)
    assert main(["show", "t", "--catalogue", str(tmp_path), *options]) == 0
    out = capsys.readouterr().out
    entry = catalogue.load_entry("t", tmp_path)
    spec = flexna.MaskSpec.create(entry.pattern, q_tile=tiles[0], kv_tile=tiles[1], block_size=block)
    q, k = local_qk(spec, 1, entry.head_dim, seed=entry.adaptive.seed)
    stats = block_stats(entry.pattern, tiles[0], tiles[1], block, adaptive=entry.adaptive,
                        head_dim=entry.head_dim)
    want = assert_classes(stats, entry.pattern, q, k, tiles, block, entry.adaptive)
    assert (want >= 3).any(), "the case must add blocks beyond the window"
    added = re.search(r"adaptive (\S+) added (\d+) blocks \(full (\d+), partial (\d+)\) to the window's (\d+);"
                      r" data-dependent: drawn from synthetic local q/k \(flexna.adaptive.local_qk, seed (\d+)",
                      out)
    assert added, out
    assert added.group(1) == entry.adaptive.describe() and int(added.group(6)) == entry.adaptive.seed
    assert [int(added.group(i)) for i in (3, 4, 5)] == [(want == 4).sum(), (want == 3).sum(),
                                                        np.isin(want, (1, 2)).sum()]
    image = decode_png(next(tmp_path.glob("t*.png")).read_bytes())
    for colour in BLOCK_COLOURS[3:]:  # the legend's swatches of the added blocks at least
        assert (image == colour).all(-1).any()
    if case == "2d-tiles-padding":
        assert (want == 3).any() and (want == 4).any()  # padded blocks are added as partial ones


def test_threshold_one_adds_every_block():
    """threshold = 1 keeps every key block: all blocks outside the window are added."""
    pattern = flexna.NAPattern.create((8, 16), 3)
    stats = block_stats(pattern, block_size=16, adaptive=catalogue.AdaptiveSelection(1.0, None, 0), head_dim=8)
    assert stats.empty == 0 and stats.added_full + stats.window == stats.total


def test_without_adaptive_the_picture_is_the_window():
    pattern = flexna.NAPattern.create((8, 16), 3)
    plain = block_stats(pattern, block_size=16)
    assert plain.categories.max() <= 2 and plain.adaptive is None
    drawn = block_stats(pattern, block_size=16, adaptive=catalogue.AdaptiveSelection(None, 2, 0), head_dim=8)
    assert np.array_equal(np.isin(drawn.categories, (1, 2)), plain.categories > 0)


@pytest.mark.parametrize("tiles, extra", [(((2, 4), (4, 2)), (0, 0)), (((3, 3), (3, 3)), (2, 5))])
def test_local_qk_is_one_feature_per_token_in_each_sides_order(tiles, extra):
    shape = (7, 9)
    spec = flexna.MaskSpec.create(flexna.NAPattern.create(shape, 3), q_tile=tiles[0], kv_tile=tiles[1],
                                  num_extra_q=extra[0], num_extra_kv=extra[1])
    q, k = local_qk(spec, 2, 6, seed=5)
    assert q.shape == (1, 2, spec.q_len, 6) and k.shape == (1, 2, spec.kv_len, 6)
    qo, ko = tiled_order(shape, tiles[0]), tiled_order(shape, tiles[1])
    by_token_q = {int(t): q[0, :, i] for i, t in enumerate(qo) if t >= 0}
    for i, t in enumerate(ko):
        if t >= 0:
            assert torch.equal(k[0, :, i], by_token_q[int(t)])
        else:
            assert not k[0, :, i].any()
    assert not q[0, :, :qo.size][:, qo < 0].any()
    n = min(extra)
    assert torch.equal(q[0, :, qo.size:qo.size + n], k[0, :, ko.size:ko.size + n])
    again, _ = local_qk(spec, 2, 6, seed=5)
    other, _ = local_qk(spec, 2, 6, seed=6)
    assert torch.equal(q, again) and not torch.equal(q, other)


@pytest.mark.parametrize("kwargs, match", [(dict(seed=-1), "seed = -1 is out of range"),
                                           (dict(seed=True), "seed = True"),
                                           (dict(dim=5), "dim = 5 is out of range")])
def test_local_qk_bad_input(kwargs, match):
    spec = flexna.MaskSpec.create(flexna.NAPattern.create((4, 4), 3))
    args = {"heads": 1, "dim": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        local_qk(spec, args.pop("heads"), args.pop("dim"), **args)


def test_list_and_analyze_say_an_entry_is_adaptive(tmp_path, capsys):
    write(tmp_path, "t", shape=[8, 8], kernel_size=3, adaptive={"top_k": 2, "seed": 1})
    assert main(["list", "--catalogue", str(tmp_path)]) == 0
    assert "+ adaptive blocks (top_k=2)" in capsys.readouterr().out
    assert main(["analyze", "t", "--catalogue", str(tmp_path)]) == 0
    assert "data-dependent" in capsys.readouterr().out
