"""flexna.compat: the same code against NATTEN <= 0.17's and >= 0.20's signatures."""

from __future__ import annotations

import pytest
import torch
from natten_peer import natten_attention, natten_available

import flexna
import flexna.compat as compat


def test_legacy_module_takes_dilation_fourth_and_bias_as_rpb() -> None:
    torch.manual_seed(0)
    legacy = compat.LegacyNeighborhoodAttention2D(32, 2, 5, 2)  # NATTEN <= 0.17: 4th is dilation
    assert legacy.dilation == (2, 2) and legacy.stride == (1, 1) and legacy.rpb is not None
    current = flexna.NeighborhoodAttention2D(32, 2, 5, dilation=2, rel_pos_bias=True)
    current.load_state_dict(legacy.state_dict())  # same keys: qkv.*, proj.*, rpb
    x = torch.randn(1, 11, 13, 32)
    with torch.no_grad():
        torch.testing.assert_close(legacy(x), current(x))
    assert compat.LegacyNeighborhoodAttention2D(32, 2, 5, bias=False).rpb is None
    three = compat.LegacyNeighborhoodAttention3D(32, 2, 3, kernel_size_d=5, dilation=2, dilation_d=1)
    assert three.kernel_size == (5, 3, 3) and three.dilation == (1, 2, 2)


def test_natten_020_keywords_accepted_or_explained() -> None:
    q = torch.randn(1, 16, 16, 2, 16)
    with torch.no_grad():
        want = flexna.na2d(q, q, q, 5, 1, 2)
        got = compat.na2d(q, q, q, 5, 1, 2, False, None, None, None, None, "flex-fna", torch_compile=True)
        torch.testing.assert_close(got, want)
        tiled = compat.na2d(q, q, q, 5, dilation=2, q_tile_shape=(8, 16), kv_tile_shape=(8, 16))
        torch.testing.assert_close(tiled, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="FlexAttention only"):
        compat.na2d(q, q, q, 5, backend="cutlass-fna")
    with pytest.raises(flexna.BackendError, match="CUDA GPUs only"):  # NATTEN's Hopper kernels -> FLASH
        compat.na2d(q, q, q, 5, backend="hopper-fna")
    with pytest.raises(ValueError, match="attention_kwargs"):
        compat.na2d(q, q, q, 5, attention_kwargs={"foo": 1})
    with pytest.raises(ValueError, match="backward_kv_splits"):
        compat.na2d(q, q, q, 5, backward_kv_splits=(2, 2))
    with pytest.raises(TypeError, match="unexpected keyword"):
        compat.na2d(q, q, q, 5, no_such_option=1)
    with pytest.raises(ValueError, match="together"):
        compat.na2d(q, q, q, 5, q_tile_shape=(8, 16))


@pytest.mark.skipif(not natten_available(), reason="NATTEN not installed")
def test_same_call_runs_on_natten_and_on_flexna() -> None:
    """One NATTEN >= 0.20 call, run by NATTEN (its Flex backend) and by flexna.compat."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 12, 14, 2, 16) for _ in range(3))
    args = dict(kernel_size=(5, 3), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))
    with torch.no_grad():
        ours = compat.na2d(q, k, v, **args)
    theirs = natten_attention(q, k, v, (5, 3), (1, 2), (2, 1), (False, True))
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=1e-5)
