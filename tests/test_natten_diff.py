"""Differential tests vs NATTEN (its own Flex-backend mask_mod and attention), when installed.

NATTEN requires every length >= 2 and kernel >= 2 (see tests/natten_peer.py), so the
configurations are drawn with those minimums.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import EAGER_FLEX_MSG, assert_block_masks_equal, dense_mask, expected_block_mask
from hypothesis import given, settings
from natten_peer import natten_attention, natten_available, natten_mask
from strategies import configs
from torch.nn.attention.flex_attention import flex_attention

import flexna
from flexna.reference import reference_mask

pytestmark = pytest.mark.skipif(not natten_available(), reason="NATTEN not installed")

natten_configs = configs(min_len=2, min_kernel=2, max_tokens=700)


@settings(max_examples=80, deadline=None)
@given(natten_configs)
def test_masks_equal_natten(cfg):
    want = natten_mask(*cfg.args())
    n = cfg.num_tokens
    got = {
        "reference": reference_mask(*cfg.args()),
        "na_mask_mod": dense_mask(flexna.na_mask_mod(**cfg.kwargs()), n, n),
        "na_block_mask.mask_mod": dense_mask(flexna.na_block_mask(**cfg.kwargs(), block_size=32).mask_mod,
                                             n, n),
    }
    for name, mask in got.items():
        bad = (mask != want).nonzero().tolist()
        assert not bad, f"{name} vs NATTEN, {cfg}: {len(bad)} mismatches, first {bad[:8]}"


@settings(max_examples=40, deadline=None)
@given(natten_configs)
def test_block_sets_equal_natten_block_sets(cfg):
    """flexna's analytic block sets == torch's create_block_mask over NATTEN's dense mask."""
    want = natten_mask(*cfg.args())
    for bs in ((128, 128), (16, 48)):
        got = flexna.na_block_mask(**cfg.kwargs(), block_size=bs)
        assert_block_masks_equal(got, expected_block_mask(want, bs), f"{cfg} block {bs}")


@settings(max_examples=12, deadline=None)
@given(configs(min_len=2, min_kernel=2, max_tokens=300))
def test_attention_equals_natten(cfg):
    """Eager Flex with flexna's BlockMask vs NATTEN's own Flex FNA (eager), fp32."""
    g = torch.Generator().manual_seed(cfg.num_tokens)
    q, k, v = (torch.randn(2, *cfg.shape, 2, 16, generator=g) for _ in range(3))
    n = cfg.num_tokens
    qb, kb, vb = (t.reshape(2, n, 2, 16).transpose(1, 2) for t in (q, k, v))
    bm = flexna.na_block_mask(**cfg.kwargs())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=EAGER_FLEX_MSG)
        # NATTEN 0.21 itself calls flex_attention(return_lse=...), deprecated in torch >= 2.9
        warnings.filterwarnings("ignore", message="return_lse is deprecated", category=FutureWarning)
        want = natten_attention(q, k, v, cfg.kernel_size, cfg.stride, cfg.dilation, cfg.is_causal)
        out = flex_attention(qb, kb, vb, block_mask=bm)
    got = out.transpose(1, 2).reshape(want.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
