"""`attnlab.ops._dispatch`: one backend table and one default for every op."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab import registry
from attnlab.ops import BackendUnavailable, attention, neighborhood_attention
from attnlab.ops._dispatch import BACKENDS, serving
from attnlab.ops.neighborhood import NA_BACKENDS, BlockedConfig, reference_neighborhood_mask
from attnlab.ops.sdpa import PRIORITY


def na_oracle(q, k, v, kernel_size):
    """float64 dense attention under the reference mask, written here."""
    mask = reference_neighborhood_mask(q.shape[2:-1], kernel_size)
    scores = (q.flatten(2, -2) @ k.flatten(2, -2).transpose(-2, -1)) / q.shape[-1] ** 0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.flatten(2, -2)
    return out.view(*q.shape[:-1], v.shape[-1])


def test_one_vocabulary():
    assert registry.BACKENDS == tuple(BACKENDS)
    assert PRIORITY == serving("attention") == ("sdpa", "flex", "reference")
    assert NA_BACKENDS == serving("neighborhood_attention") == ("flex", "blocked", "reference")
    assert all(b.summary and b.ops for b in BACKENDS.values())


def test_use_backend_reference_reaches_neighborhood_attention(monkeypatch):
    monkeypatch.delenv("ATTNLAB_BACKEND", raising=False)
    x = torch.randn(1, 2, 10, 8, dtype=torch.float64)
    fused_only = BlockedConfig(method="fused")      # the blocked backend refuses float64 with this
    with pytest.raises(BackendUnavailable, match="float32"):
        neighborhood_attention(x, x, x, 3, config=fused_only)
    with attnlab.use_backend("reference"):          # the reference path ignores the blocked config
        assert_close(neighborhood_attention(x, x, x, 3, config=fused_only), na_oracle(x, x, x, 3))
    monkeypatch.setenv("ATTNLAB_BACKEND", "reference")
    assert_close(neighborhood_attention(x, x, x, 3, config=fused_only), na_oracle(x, x, x, 3))


def test_default_is_explicit_for_every_op_it_serves(monkeypatch):
    monkeypatch.delenv("ATTNLAB_BACKEND", raising=False)
    x = torch.randn(1, 1, 8, 4, requires_grad=True)
    with attnlab.use_backend("flex"):               # no CPU backward: neither op falls back
        with pytest.raises(BackendUnavailable, match="neighborhood_attention: backend 'flex'.*backward"):
            neighborhood_attention(x, x, x, 3)
        with pytest.raises(BackendUnavailable, match="attention: backend 'flex'.*backward"):
            attention(x, x, x)


def test_an_op_without_the_default_uses_its_own_priority(backend_spy, caplog):
    x = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    with caplog.at_level("DEBUG", logger="attnlab.ops"):
        with attnlab.use_backend("blocked"):
            attention(x, x, x)
        with attnlab.use_backend("sdpa"):
            assert_close(neighborhood_attention(x, x, x, 3), na_oracle(x, x, x, 3))
    assert backend_spy.ran == ["sdpa"]
    assert "attention: the default backend 'blocked' does not serve it" in caplog.text
    assert "neighborhood_attention: the default backend 'sdpa' does not serve it" in caplog.text


def test_explicit_backend_of_another_op_is_a_value_error():
    x = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="'blocked' does not serve attention"):
        attention(x, x, x, backend="blocked")
    with pytest.raises(ValueError, match="'sdpa' does not serve neighborhood_attention"):
        neighborhood_attention(x, x, x, 3, backend="sdpa")
    with pytest.raises(ValueError, match="bogus"):
        neighborhood_attention(x, x, x, 3, backend="bogus")
    with attnlab.use_backend("blocked"):           # any backend of the table is a valid default
        assert attnlab.ops.default_backend() == "blocked"
