"""`attnlab.ops.neighborhood.api`: `neighborhood_attention` on each backend against a float64
einsum, dtypes, shapes, grouped heads.
"""
from __future__ import annotations


import pytest
import torch
from torch.testing import assert_close

from attnlab.ops.neighborhood import neighborhood_attention

from _oracle import oracle


def test_reference_backend_matches_oracle():
    torch.manual_seed(0)
    spatial, ks, dil, st, causal = (5, 6, 7), (2, 3, 2), (2, 1, 3), (2, 3, 1), (False, True, False)
    q, k, v = (torch.randn(1, 2, *spatial, 4, dtype=torch.float64) for _ in range(3))
    assert_close(neighborhood_attention(q, k, v, ks, dil, st, causal, backend="reference"),
                 oracle(q, k, v, ks, dil, st, causal))

def test_default_backend_on_cpu_has_gradients():
    q, k, v = (torch.randn(1, 2, 10, 4, requires_grad=True) for _ in range(3))
    neighborhood_attention(q, k, v, 3).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))

def test_grouped_query_heads_and_value_width():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 6, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 6, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 3, dtype=torch.float64)
    out = neighborhood_attention(q, k, v, 4, 2, backend="blocked")
    assert out.shape == (2, 4, 9, 3)
    assert_close(out, oracle(q, k, v, 4, 2))

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_float32_out_in_dtype(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 8).to(dtype) for _ in range(3))
    out = neighborhood_attention(q, k, v, 5)
    assert out.dtype == dtype
    assert_close(out.float(), oracle(q.float(), k.float(), v.float(), 5).float(), rtol=2e-2, atol=2e-2)

def test_empty_batch():
    q, k, v = (torch.randn(0, 2, 7, 4, requires_grad=True) for _ in range(3))
    out = neighborhood_attention(q, k, v, 3)
    assert out.shape == (0, 2, 7, 4)
    out.sum().backward()

def test_custom_scale():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    assert_close(neighborhood_attention(q, k, v, 3, scale=0.3), oracle(q, k, v, 3, scale=0.3))
