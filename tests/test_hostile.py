"""Careless or hostile arguments: a clear error before anything compiles (issue 13, item 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flexna

X = torch.randn(1, 6, 7, 2, 16)


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("attention ran before the arguments were checked")

    monkeypatch.setattr(flexna.functional, "run_flex", fail)


@pytest.mark.parametrize("scale,error,match", [
    ("abc", TypeError, "scale must be a real number or None, got str"),
    (1 + 2j, TypeError, "got complex"),
    (float("nan"), ValueError, "finite"),
    (math.inf, ValueError, "finite"),
    (torch.tensor(0.5), TypeError, "got Tensor"),
    (True, TypeError, "got bool"),
])
def test_scale_checked(no_kernel: None, scale: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        flexna.na2d(X, X, X, 3, scale=scale)


def test_score_mod_and_return_lse_checked(no_kernel: None) -> None:
    with pytest.raises(TypeError, match=r"score_mod must be a callable .* got int"):
        flexna.na2d(X, X, X, 3, score_mod=5)
    with pytest.raises(TypeError, match="return_lse must be a bool, got str"):
        flexna.na2d(X, X, X, 3, return_lse="no")
    layout = flexna.TokenLayout.create((6, 7))
    seq = X.reshape(1, 42, 2, 16)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        flexna.tiled_neighborhood_attention(seq, seq, seq, layout, 3, return_lse=1)
    packed = torch.randn(1, flexna.packed_length([(6, 7)]), 2, 16)
    with pytest.raises(TypeError, match="score_mod must be a callable"):
        flexna.packed_neighborhood_attention(packed, packed, packed, [(6, 7)], 3, score_mod="x")


def test_module_qk_scale_zero_is_kept() -> None:
    m = flexna.NeighborhoodAttention2D(32, 2, 3, qk_scale=0.0)
    assert m.scale == 0.0
    assert flexna.NeighborhoodAttention2D(32, 2, 3).scale == 16 ** -0.5


def test_rpb_table_shape_ranges() -> None:
    with pytest.raises(ValueError, match=r"kernel_size\[axis 0\] = 0"):
        flexna.rpb_table_shape(0)
    with pytest.raises(ValueError, match=r"stride\[axis 0\] = 7 .* kernel_size = 3"):
        flexna.rpb_table_shape(3, 7)
    assert flexna.rpb_table_shape(np.int64(3), np.int64(2)) == (6,)


def test_softcap_and_search_tiles_ranges() -> None:
    for cap in (math.inf, math.nan, 0.0, -1.0, "1"):
        with pytest.raises(ValueError, match="cap"):
            flexna.softcap_score_mod(cap)  # type: ignore[arg-type]
    pattern = flexna.NAPattern.create((32, 32), 5)
    for top in (-1, 0, True):
        with pytest.raises(ValueError, match="top"):
            flexna.search_tiles(pattern, top=top)
    assert len(flexna.search_tiles(pattern, top=2)) == 2
