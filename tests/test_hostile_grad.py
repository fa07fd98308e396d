"""Gradients to tensors a score_mod reaches other than through a closure cell (issue 13, item 3).

A bound method of an ``nn.Module`` reading ``self.param``, a module-level global and a
``functools.partial`` holding a parameter must take the differentiable path on the CPU (not
the inference-only compiled one) and their gradients must equal a float64 reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

import flexna
from flexna.flex import EagerFallbackWarning, reachable_tensors, score_mod_needs_grad
from flexna.reference import reference_mask

SHAPE, HEADS, DIM, KERNEL = (5, 6), 2, 8, 3


class Biased(torch.nn.Module):
    """A module whose bound method is the score_mod (reads ``self.bias``)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.4, -0.7]))

    def mod(self, score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor,
            k: torch.Tensor) -> torch.Tensor:
        return score + 0.1 * self.bias[h] * (q - k)  # a per-head constant alone: softmax-invariant


GLOBAL_TEMPERATURE = torch.nn.Parameter(torch.tensor(1.3))


def global_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor,
               k: torch.Tensor) -> torch.Tensor:
    return score * GLOBAL_TEMPERATURE


def scaled_mod(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               *, weight: torch.Tensor) -> torch.Tensor:
    return score * weight + 0.01 * (q - k)


def _cases() -> list[tuple[str, Callable[..., torch.Tensor], torch.nn.Parameter,
                           Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]]:
    """(name, score_mod, the parameter it reaches, the same rule on float64 [H, N, N] scores)."""
    module = Biased()
    weight = torch.nn.Parameter(torch.tensor(0.8))
    n = SHAPE[0] * SHAPE[1]
    diff = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).double()
    return [
        ("method", module.mod, module.bias, lambda s, p, h: s + 0.1 * p[h] * diff),
        ("global", global_mod, GLOBAL_TEMPERATURE, lambda s, p, h: s * p),
        ("partial", functools.partial(scaled_mod, weight=weight), weight, lambda s, p, h: s * p + 0.01 * diff),
    ]


@pytest.mark.parametrize("case", range(3), ids=["method", "global", "partial"])
def test_reached_parameter_gets_reference_gradient(case: int) -> None:
    name, mod, param, rule = _cases()[case]
    torch.manual_seed(case)
    q, k, v = (torch.randn(1, *SHAPE, HEADS, DIM) for _ in range(3))
    param.grad = None
    with pytest.warns(EagerFallbackWarning, match="score_mod reaches a tensor that requires grad"):
        out = flexna.na2d(q, k, v, KERNEL, score_mod=mod)
    out.pow(2).sum().backward()
    assert param.grad is not None, f"{name}: no gradient arrived"

    # float64 reference: dense masked softmax from the definition, autograd to a float64 copy
    p64 = param.detach().double().requires_grad_(True)
    n = SHAPE[0] * SHAPE[1]
    q64, k64, v64 = (t.double().reshape(n, HEADS, DIM).transpose(0, 1) for t in (q, k, v))
    heads = torch.arange(HEADS)[:, None, None]
    scores = rule(q64 @ k64.transpose(-2, -1) * DIM ** -0.5, p64, heads)
    scores = scores.masked_fill(~reference_mask(SHAPE, KERNEL), float("-inf"))
    ref = torch.softmax(scores, dim=-1) @ v64
    ref.pow(2).sum().backward()
    assert p64.grad is not None and p64.grad.abs().min() > 1e-3  # a gradient to compare, not zeros
    torch.testing.assert_close(out.double().reshape(n, HEADS, DIM).transpose(0, 1), ref.detach(),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(param.grad.double(), p64.grad, rtol=1e-4, atol=1e-4)


def test_reachable_tensors_walk() -> None:
    """The walk finds tensors behind cells, methods, partials, globals, defaults and objects."""
    cases = _cases()
    method, glob, partial = (c[1] for c in cases)
    params = [c[2] for c in cases]
    assert any(t is params[0] for t in reachable_tensors(method)[0])
    assert any(t is GLOBAL_TEMPERATURE for t in reachable_tensors(glob)[0])
    assert any(t is params[2] for t in reachable_tensors(partial)[0])

    table = torch.zeros(3)

    def default_mod(score: torch.Tensor, *idx: torch.Tensor, t: torch.Tensor = table) -> torch.Tensor:
        return score + t[0]

    assert any(t is table for t in reachable_tensors(default_mod)[0])
    assert not score_mod_needs_grad(default_mod)  # no tensor there requires grad: compiled path stays

    class Callable_:
        def __init__(self) -> None:
            self.inner = Biased()

        def __call__(self, score: torch.Tensor, *idx: torch.Tensor) -> torch.Tensor:
            return score

    holder = Callable_()
    assert any(t is holder.inner.bias for t in reachable_tensors(holder)[0])
    assert score_mod_needs_grad(holder)


def test_walk_past_its_limit_assumes_gradients() -> None:
    """Too much to walk: flexna assumes a tensor needing gradients is there."""
    many = [object() for _ in range(50)]

    def mod(score: torch.Tensor, *idx: torch.Tensor) -> torch.Tensor:
        return score + 0 * len(many)

    assert reachable_tensors(mod, limit=10)[1] is False
    assert reachable_tensors(mod)[1] is True
    assert not score_mod_needs_grad(mod)


def test_no_grad_keeps_compiled_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad the score_mod is not walked (inference takes the compiled path)."""
    monkeypatch.setattr(flexna.flex, "score_mod_needs_grad",
                        lambda mod: (_ for _ in ()).throw(AssertionError("walked under no_grad")))
    x = torch.randn(1, *SHAPE, HEADS, DIM)
    with torch.no_grad():
        assert flexna.flex._eager_reason(x, (x,), False, global_mod) is None


@pytest.mark.slow
def test_inside_torch_compile_a_reached_parameter_gets_gradients() -> None:
    """Traced by the user's torch.compile on the CPU, a score_mod's captures are not visible at
    trace time: with grad enabled it takes the differentiable stand-in (warned about), and the
    gradient equals the eager one (itself checked against float64 above)."""
    module = Biased()
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, *SHAPE, HEADS, DIM) for _ in range(3))

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flexna.na2d(q, k, v, KERNEL, score_mod=module.mod).pow(2).sum()

    with pytest.warns(EagerFallbackWarning):
        step(q, k, v).backward()
    want = module.bias.grad.clone()
    module.bias.grad = None
    torch._dynamo.reset()
    with pytest.warns(EagerFallbackWarning, match="user score_mod"):
        torch.compile(step, fullgraph=True)(q, k, v).backward()
    assert module.bias.grad is not None
    torch.testing.assert_close(module.bias.grad, want, rtol=1e-4, atol=1e-4)
    assert want.abs().max() > 1e-3  # a gradient that is there, not a zero that matches zero
