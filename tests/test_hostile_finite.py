"""Non-finite inputs (issue 13, item 7): ``check_finite=True`` raises naming the tensor before
attention runs; off by default, when nothing is checked (no host sync)."""

from __future__ import annotations

import pytest
import torch

import flexna

SHAPE, HEADS, DIM = (6, 7), 2, 8


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("attention ran before the inputs were checked")

    monkeypatch.setattr(flexna.functional, "run_flex", fail)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "query": torch.randn(1, *SHAPE, HEADS, DIM, generator=g),
        "key": torch.randn(1, *SHAPE, HEADS, DIM, generator=g),
        "value": torch.randn(1, *SHAPE, HEADS, DIM, generator=g),
        "additional_keys": torch.randn(1, 3, HEADS, DIM, generator=g),
        "additional_values": torch.randn(1, 3, HEADS, DIM, generator=g),
        "rel_pos_bias": torch.randn(HEADS, *flexna.rpb_table_shape((3, 3)), generator=g),
    }


@pytest.mark.parametrize("name", ["query", "key", "value", "additional_keys", "additional_values",
                                  "rel_pos_bias"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_names_the_tensor(no_kernel: None, name: str, bad: float) -> None:
    t = _inputs()
    t[name] = t[name].clone()
    index = (0,) * (t[name].dim() - 1) + (1,)
    t[name][index] = bad
    q, k, v = t.pop("query"), t.pop("key"), t.pop("value")
    with pytest.raises(ValueError, match=rf"^{name} holds 1 non-finite value\(s\) \(NaN or inf\), the first at "
                                         rf"index \[{', '.join(map(str, index))}\]"):
        flexna.na2d(q, k, v, 3, check_finite=True, **t)


def test_tiled_packed_and_modules(no_kernel: None) -> None:
    x = torch.randn(1, 42, HEADS, DIM)
    y = x.clone()
    y[0, 5, 1, 2] = float("nan")
    layout = flexna.TokenLayout.create(SHAPE)
    with pytest.raises(ValueError, match=r"^value holds 1 non-finite value\(s\).* index \[0, 5, 1, 2\]"):
        flexna.tiled_neighborhood_attention(x, x, y, layout, 3, check_finite=True)
    n = flexna.packed_length([SHAPE])
    p, pk = torch.zeros(1, n, HEADS, DIM), torch.zeros(1, n, HEADS, DIM)
    pk[0, 3, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^key holds 1 non-finite"):
        flexna.packed_neighborhood_attention(p, pk, p, [SHAPE], 3, check_finite=True)
    m = flexna.NeighborhoodAttention2D(HEADS * DIM, HEADS, 3, check_finite=True)
    xs = torch.randn(1, *SHAPE, HEADS * DIM)
    xs[0, 2, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^query holds \d+ non-finite"):
        m(xs)
    with pytest.raises(TypeError, match="check_finite must be a bool, got str"):
        flexna.NeighborhoodAttention2D(HEADS * DIM, HEADS, 3, check_finite="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="check_finite must be a bool, got int"):
        flexna.na2d(*(xs.reshape(1, *SHAPE, HEADS, DIM),) * 3, 3, check_finite=1)


def test_off_by_default_checks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default (and check_finite=False): no isfinite, no sync; the NaN reaches attention."""
    def no_isfinite(*args: object) -> None:
        raise AssertionError("checked although check_finite is off")

    seen = []

    def stub(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(bool(torch.isnan(q).any()))
        return torch.zeros_like(q)

    monkeypatch.setattr(flexna.functional, "run_flex", stub)
    x = torch.randn(1, *SHAPE, HEADS, DIM)
    x[0, 0, 0, 0, 0] = float("nan")
    with monkeypatch.context() as mp:
        mp.setattr(torch, "isfinite", no_isfinite)
        flexna.na2d(x, x, x, 3)
        flexna.na2d(x, x, x, 3, check_finite=False)
        m = flexna.NeighborhoodAttention2D(HEADS * DIM, HEADS, 3)
        m(torch.randn(1, *SHAPE, HEADS * DIM))
    assert seen[:2] == [True, True]
    m.check_finite = True
    with pytest.raises(ValueError, match="non-finite"):
        m(torch.full((1, *SHAPE, HEADS * DIM), float("nan")))
