"""The modules the bench times: the hand-written baseline and the wrappers that give spatial,
pooling and cross-attention mechanisms the bench's (B, N, C) tokens."""
from __future__ import annotations

import pytest
import torch

from attnlab.bench.adapters import (CrossAsSequence, PoolAsSequence, SDPABaseline, SpatialAsSequence,
                                    build_module)


def test_baseline_matches_mhsa():
    """The hand-written baseline computes what mhsa computes, given the same weights."""
    torch.manual_seed(0)
    base = SDPABaseline(16, 2)
    mhsa = build_module("mhsa", 16, 2, {})
    mhsa.load_state_dict(base.state_dict())
    x = torch.randn(2, 9, 16)
    for causal in (False, True):
        torch.testing.assert_close(base(x, is_causal=causal), mhsa(x, is_causal=causal))


def test_spatial_mechanisms_run_on_square_token_counts():
    torch.manual_seed(0)
    m = build_module("halo2d", 32, 4, {"block_size": 4, "halo_size": 1})
    assert isinstance(m, SpatialAsSequence)
    x = torch.randn(2, 64, 32)
    torch.testing.assert_close(m(x), m.inner(x.reshape(2, 8, 8, 32)).reshape(2, 64, 32))
    assert m.useful_flops(2, 64, 32, 4, False) == m.inner.useful_flops(2, 64, 32, 4, False)
    with pytest.raises(ValueError, match="perfect square, got N=60"):
        m(torch.randn(1, 60, 32))
    with pytest.raises(NotImplementedError, match="no causal mode"):
        m(x, is_causal=True)


def test_pooling_mechanisms_are_timed_through_a_broadcast():
    m = build_module("lowrank", 32, 4, {})
    assert isinstance(m, PoolAsSequence)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, 0, 0], m.inner(x).mean(-1))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_cross_mechanisms_take_the_tokens_as_their_context():
    torch.manual_seed(0)
    m = build_module("cross_mhsa", 32, 4, {})
    assert isinstance(m, CrossAsSequence)
    x = torch.randn(2, 9, 32, requires_grad=True)
    out = m(x)
    torch.testing.assert_close(out, m.inner(x, x))
    assert m.useful_flops(2, 9, 32, 4, False) == m.inner.useful_flops(2, 9, 32, 4, False, context_len=9)
    out.sum().backward()
    assert x.grad is not None and m.inner.kv.weight.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="no causal mode"):
        m(x, is_causal=True)
    # Given the same weights, cross-attention over its own tokens is mhsa's self-attention.
    mhsa = build_module("mhsa", 32, 4, {})
    with torch.no_grad():
        mhsa.qkv.weight.copy_(torch.cat([m.inner.q.weight, m.inner.kv.weight]))
        mhsa.proj.load_state_dict(m.inner.proj.state_dict())
    torch.testing.assert_close(mhsa(x), out)
