"""Compilation behaviour: no recompiles for new pattern parameters, no silent eager fallback."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import flexna
import flexna.flex as F
from flexna.reference import reference_attention, reference_mask


def _ref(x: torch.Tensor, shape: tuple[int, ...], **kw) -> torch.Tensor:
    n = x.shape[1] * x.shape[2]
    t = x.reshape(1, n, 2, 16).transpose(1, 2)
    args = [kw.get("kernel_size"), kw.get("stride", 1), kw.get("dilation", 1), kw.get("is_causal", False)]
    out, _ = reference_attention(t, t, t, reference_mask(shape, *args))
    return out.transpose(1, 2).reshape(x.shape)


def test_pattern_changes_do_not_recompile() -> None:
    shape = (10, 12)
    x = torch.randn(1, *shape, 2, 16)
    flexna.na2d(x, x, x, 3)  # compiles once for this signature
    before = counters["stats"]["unique_graphs"]
    variants = [dict(kernel_size=5), dict(kernel_size=(3, 7), stride=(1, 2)),
                dict(kernel_size=3, dilation=2), dict(kernel_size=4, is_causal=(True, False))]
    for kw in variants:
        out = flexna.na2d(x, x, x, **kw)
        torch.testing.assert_close(out.double(), _ref(x, shape, **kw), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == before


def test_recompile_limit_raises_instead_of_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "RECOMPILE_LIMIT", 1)
    torch._dynamo.reset()
    # dynamo's own config is patched through its scoped patch (a monkeypatch teardown of a
    # dynamo config attribute hides it for the rest of the session with pytest >= 9.2)
    with torch._dynamo.config.patch(**{F._limit_names()[0]: 1}), \
            pytest.raises(F.RecompileLimitError, match="RECOMPILE_LIMIT"):
        for length in (5, 6, 7):
            x = torch.randn(1, length, 12, 2, 16)
            flexna.na2d(x, x, x, 3)
    torch._dynamo.reset()


def test_calls_leave_dynamo_config_as_they_found_it() -> None:
    """flexna raises dynamo's recompile limit only around its own compiled call: after a call,
    and after one that fails inside the compiled function, the user's values are back."""
    cfg = torch._dynamo.config
    limit_name, fail_name = F._limit_names()
    with cfg.patch(**{limit_name: 3, fail_name: False}):
        x = torch.randn(1, 6, 7, 2, 16)
        flexna.na2d(x, x, x, 3)
        assert (getattr(cfg, limit_name), getattr(cfg, fail_name)) == (3, False)
        with pytest.raises(Exception):  # noqa: B017  any failure inside the compiled call
            F.call_compiled(x, x, x[..., :3])  # 5-D tensors: flex_attention rejects them
        assert (getattr(cfg, limit_name), getattr(cfg, fail_name)) == (3, False)


def test_overlapping_calls_in_threads_restore_dynamo_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two calls overlap in threads: A enters, B enters, A leaves, B leaves. Each runs with the
    raised limit (torch keeps dynamo's config per thread context, so a call that skipped raising
    it because another thread had would run at the default limit) and the user's values are
    back at the end."""
    import threading

    cfg = torch._dynamo.config
    limit_name, fail_name = F._limit_names()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, tuple[object, object]] = {}

    def fake_compiled() -> object:
        def run(who: str) -> None:
            seen[who] = getattr(cfg, limit_name), getattr(cfg, fail_name)
            if who == "a":
                a_in.set()
                assert b_in.wait(10)
            else:
                b_in.set()
                assert a_out.wait(10)
        return run

    monkeypatch.setattr(F, "compiled_flex_attention", fake_compiled)

    def thread_a() -> None:
        F.call_compiled("a")
        a_out.set()

    def thread_b() -> None:
        assert a_in.wait(10)
        F.call_compiled("b")

    with cfg.patch(**{limit_name: 5, fail_name: False}):
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert seen == {"a": (F.RECOMPILE_LIMIT, True), "b": (F.RECOMPILE_LIMIT, True)}
        assert (getattr(cfg, limit_name), getattr(cfg, fail_name)) == (5, False)


def test_auto_tiles_never_recompile_for_a_shape() -> None:
    """tiles='auto' keeps a shape's sequence length whatever the pattern (issue 13, item 6):
    24 x 40 (no 128-token tile divides it) runs kernels (1,1), (1,3), (3,1) in one graph (the
    tile search used to pick three paddings: three graphs). On 64 x 64 'auto' tiles (3, 1) in
    (64, 2) tiles: eagerly every order reaches Flex as the same strided view of [B, N, H, D]
    memory (the row gather), so switching order compiles nothing either."""
    def graphs_for(shape: tuple[int, int], kernels: list[tuple[int, int]]) -> list[int]:
        x = torch.randn(1, *shape, 2, 16)
        counts = []
        for k in kernels:
            out = flexna.na2d(x, x, x, k)
            torch.testing.assert_close(out.double(), _ref(x, shape, kernel_size=k), atol=1e-5, rtol=1e-5)
            counts.append(counters["stats"]["unique_graphs"])
        return [c - counts[0] for c in counts]

    assert graphs_for((24, 40), [(1, 1), (1, 3), (3, 1)]) == [0, 0, 0]
    assert flexna.choose_tiles(flexna.NAPattern.create((64, 64), (3, 1))) == ((64, 2), (64, 2))
    assert graphs_for((64, 64), [(1, 1), (3, 3), (3, 1), (1, 3), (3, 1)]) == [0, 0, 0, 0, 0]
