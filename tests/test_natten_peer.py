"""Self-test of tests/natten_peer.py: NATTEN's mask vs. a brute-force definition.

Skipped when NATTEN is not installed (see .ci/install_natten.sh).
"""

import itertools
import math
import random

import pytest
import torch
from helpers import axis_ok as _axis_ok
from natten_peer import natten_attention, natten_available, natten_mask

pytestmark = pytest.mark.skipif(not natten_available(), reason="NATTEN not installed")


def brute_mask(shape, kernel_size, stride, dilation, is_causal):
    coords = list(itertools.product(*[range(L) for L in shape]))  # row-major
    n = len(coords)
    m = torch.zeros((n, n), dtype=torch.bool)
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            m[qi, ki] = all(
                _axis_ok(x, y, L, k, s, d, c)
                for x, y, L, k, s, d, c in zip(qc, kc, shape, kernel_size, stride, dilation, is_causal,
                                               strict=False)
            )
    return m


def random_config(rng, max_tokens=400):
    while True:
        na_dim = rng.randint(1, 3)
        max_len = {1: 20, 2: 20, 3: 7}[na_dim]
        shape, ks, st, di, ca = [], [], [], [], []
        for _ in range(na_dim):
            L = rng.randint(2, max_len)
            k = rng.randint(2, L)
            d = rng.randint(1, L // k)
            s = rng.randint(1, k)
            shape.append(L)
            ks.append(k)
            st.append(s)
            di.append(d)
            ca.append(rng.random() < 0.4)
        if math.prod(shape) <= max_tokens:
            return tuple(shape), tuple(ks), tuple(st), tuple(di), tuple(ca)


CONFIGS = [random_config(random.Random(seed)) for seed in range(200)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_natten_mask_matches_brute_force(cfg):
    got = natten_mask(*cfg)
    want = brute_mask(*cfg)
    assert got.shape == want.shape
    bad = (got != want).nonzero().tolist()
    assert not bad, f"{cfg}: {len(bad)} mismatches, first {bad[:5]}"


@pytest.mark.parametrize("cfg", CONFIGS[:10])
def test_capture_shortcut_equals_real_block_mask(cfg):
    from natten_peer import natten_mask_mod
    from torch.nn.attention.flex_attention import create_mask

    n = math.prod(cfg[0])
    real = create_mask(natten_mask_mod(*cfg, via_block_mask=True), None, None, n, n, device="cpu")[0, 0]
    assert torch.equal(real, natten_mask(*cfg))


def test_natten_rejects_kernel_1():
    with pytest.raises(ValueError):
        natten_mask((8,), (1,), (1,), (1,), (False,))


@pytest.mark.parametrize("cfg", CONFIGS[:25])
def test_natten_attention_eager_matches_masked_sdpa(cfg):
    shape = cfg[0]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, *shape, 3, 16, generator=g) for _ in range(3))
    out = natten_attention(q, k, v, *cfg[1:])
    n = math.prod(shape)
    mask = natten_mask(*cfg)
    qf, kf, vf = (t.reshape(2, n, 3, 16).transpose(1, 2) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask)
    ref = ref.transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
