"""flexna.integrations.transformers: a tiny random transformers DiNAT (and NAT, where the installed
transformers still ships it: < 5) on flexna equals the same model whose attention follows the
definition of NATTEN's legacy ops in float64.

The legacy definition (``natten2dqkrpb`` + softmax + ``natten2dav`` on ``[batch, heads, H, W, dim]``):
query ``(i, j)`` attends the ``kernel²`` keys of its dilated neighborhood (``flexna.reference.
reference_mask``), score ``q·k / sqrt(dim) + rpb[h, (ki - i) / d + kernel - 1, (kj - j) / d + kernel - 1]``.
Skipped when transformers is not installed.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from flexna.integrations.transformers import (
    apply_neighborhood_attention,
    dinat_module,
    nat_module,
    remove_neighborhood_attention,
)
from flexna.reference import reference_mask


def legacy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel: int,
                     dilation: int) -> torch.Tensor:
    """float64 NATTEN legacy ops: ``[B, heads, H, W, d]`` in and out."""
    b, heads, height, width, dim = q.shape
    n = height * width
    q, k, v = (t.double().reshape(b, heads, n, dim) for t in (q, k, v))
    rows, cols = torch.arange(n) // width, torch.arange(n) % width
    di = (rows[None, :] - rows[:, None]).div(dilation, rounding_mode="floor") + kernel - 1
    dj = (cols[None, :] - cols[:, None]).div(dilation, rounding_mode="floor") + kernel - 1
    mask = reference_mask((height, width), kernel, 1, dilation)
    bias = rpb.double()[:, di.clamp(0, 2 * kernel - 2), dj.clamp(0, 2 * kernel - 2)]  # [heads, N, N]
    scores = (q / math.sqrt(dim)) @ k.transpose(-1, -2) + bias
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ v).reshape(b, heads, height, width, dim)


def reference_forward(self, hidden_states, output_attentions=False):
    batch, height, width, _ = hidden_states.shape
    shape = (batch, height, width, self.num_attention_heads, self.attention_head_size)
    q, k, v = (p(hidden_states).view(shape).permute(0, 3, 1, 2, 4) for p in (self.query, self.key, self.value))
    out = legacy_attention(q, k, v, self.rpb, self.kernel_size, getattr(self, "dilation", 1))  # NAT: 1
    return (out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1).to(hidden_states.dtype),)


def nat_or_skip():
    try:
        return nat_module()
    except ImportError as exc:  # transformers >= 5 ships no NAT
        pytest.skip(str(exc))


def tiny_dinat(family="dinat"):
    common = dict(patch_size=4, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4], kernel_size=3,
                  mlp_ratio=2.0)
    if family == "nat":
        dinat = nat_or_skip()
        config = dinat.NatConfig(**common)
        torch.manual_seed(0)
        model = dinat.NatModel(config).eval()
    else:
        dinat = dinat_module()
        config = dinat.DinatConfig(**common, dilations=[[1, 2], [1, 1]])
        torch.manual_seed(0)
        model = dinat.DinatModel(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dinat.NeighborhoodAttention):
                m.rpb.normal_()  # checkpoints' rpb are not zero: make the bias matter
    return dinat, model


@pytest.mark.parametrize("family", ["dinat", "nat"])
def test_dinat_on_flexna_equals_the_legacy_ops_in_float64(monkeypatch, family):
    dinat, model = tiny_dinat(family)
    x = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))  # 8x10 then 4x5 tokens
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(dinat.NeighborhoodAttention, "forward", reference_forward)
            expected = model(x).last_hidden_state
            m.setattr(dinat.NeighborhoodAttention, "forward", _no_bias)
            without_bias = model(x).last_hidden_state
        apply_neighborhood_attention(model)
        out = model(x).last_hidden_state
    assert (expected - without_bias).abs().max() > 1e-2  # the rpb matters, so it is tested
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)
    assert sum(type(m).__name__ == "FlexNANeighborhoodAttention" for m in model.modules()) == 4
    assert set(model.state_dict()) == set(tiny_dinat(family)[1].state_dict())


def _no_bias(self, hidden_states, output_attentions=False):
    """The reference with the rpb zeroed."""
    rpb = self.rpb
    try:
        self.rpb = torch.nn.Parameter(torch.zeros_like(rpb))
        return reference_forward(self, hidden_states)
    finally:
        self.rpb = rpb


@pytest.mark.parametrize("family", ["dinat", "nat"])
def test_inverse_and_errors(family):
    dinat, model = tiny_dinat(family)
    apply_neighborhood_attention(model)
    apply_neighborhood_attention(model)  # idempotent
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(x, output_attentions=True)
    remove_neighborhood_attention(model)
    assert all(type(m) is dinat.NeighborhoodAttention for m in model.modules()
               if isinstance(m, dinat.NeighborhoodAttention))
    with pytest.raises(ValueError, match="has no flexna attention to remove"):
        remove_neighborhood_attention(model)
    with pytest.raises(TypeError, match="no transformers DiNAT NeighborhoodAttention"):
        apply_neighborhood_attention(torch.nn.Linear(2, 2))


def test_nat_missing_is_a_clear_error():
    """With transformers >= 5 (no NAT) nat_module() says which version lacks it and what to do."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("this transformers ships NAT")
    with pytest.raises(ImportError, match=r"has no NAT .* install transformers<5"):
        nat_module()
