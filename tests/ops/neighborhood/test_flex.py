"""`attnlab.ops.neighborhood.flex`: the FlexAttention backend on CPU (forward only there)."""
from __future__ import annotations


import pytest
import torch
from torch.testing import assert_close

from attnlab.ops import BackendUnavailable
from attnlab.ops.neighborhood import neighborhood_attention

from _oracle import oracle


def test_flex_on_cpu_without_grad_matches_reference():
    torch.manual_seed(0)
    spatial, ks, dil, st, causal = (9, 10), (3, 4), (2, 2), (2, 3), (True, False)
    q, k, v = (torch.randn(1, 2, *spatial, 8) for _ in range(3))
    out = neighborhood_attention(q, k, v, ks, dil, st, causal, backend="flex")
    assert_close(out, oracle(q, k, v, ks, dil, st, causal).float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, oracle(q, k, v, spatial).float())   # the mask did something

def test_explicit_flex_with_grad_on_cpu_refuses_with_reason():
    q, k, v = (torch.randn(1, 1, 8, 4, requires_grad=True) for _ in range(3))
    with pytest.raises(BackendUnavailable, match="no backward on CPU"):
        neighborhood_attention(q, k, v, 3, backend="flex")
