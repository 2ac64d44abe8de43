"""The cross contract: every layout="cross" mechanism, queries from x, keys/values from context.

Interface assumed (no cross mechanism exists yet): `forward(x: (B, N, C), context: (B, M, C),
*, attn_mask=None, is_causal=False, cache=None) -> (B, N, C)`; attn_mask, where supported, a
(B, M) key-padding mask over the context. With no cross spec registered every test here skips
with that reason; a mechanism that registers with layout="cross" is picked up automatically.
The checks are plain functions so that a throwaway mechanism (bottom) proves they run and fail.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.testing import assert_close

import attnlab
from _layouts import CONTEXT_LEN, DIM, NUM_HEADS, SEQ_LEN, spec_param_list

SPECS = attnlab.list_specs(layout="cross")
spec_params = pytest.mark.parametrize("spec", spec_param_list(
    SPECS, empty_reason="no mechanism with layout='cross' is registered; this suite runs once one is"))


def _pair(B, dtype=torch.float64, C=DIM):
    return torch.randn(B, SEQ_LEN, C, dtype=dtype), torch.randn(B, CONTEXT_LEN, C, dtype=dtype)


def _number(msg, n):
    return re.search(rf"(?<![\d.]){n}(?![\d.])", msg) is not None


def _build(spec, dtype=torch.float64):
    return attnlab.create(spec.name, DIM, NUM_HEADS, **spec.test_kwargs).to(dtype).eval()


def check_shape_dtype_and_context_used(spec):
    for dtype in (torch.float32, torch.float64):
        m = _build(spec, dtype)
        x, ctx = _pair(2, dtype)
        y = m(x, ctx)
        assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
        assert not torch.allclose(m(x, ctx + 1.0), y), f"{spec.name}: output ignores the context"
        assert m(x, torch.randn(2, CONTEXT_LEN + 3, DIM, dtype=dtype)).shape == x.shape


def check_batch_invariance(spec):
    m = _build(spec, torch.float32)
    x, ctx = _pair(3, torch.float32)
    y = m(x, ctx)
    for i in range(3):
        assert_close(y[i:i + 1], m(x[i:i + 1], ctx[i:i + 1]), rtol=1e-5, atol=1e-6)


def check_unsupported_features(spec):
    m = _build(spec)
    x, ctx = _pair(2)
    calls = {"attn_mask": dict(attn_mask=torch.ones(2, CONTEXT_LEN, dtype=torch.bool)),
             "causal": dict(is_causal=True), "kv_cache": dict(cache=attnlab.KVCache())}
    for feature, kwargs in calls.items():
        if spec.supports(feature):
            continue
        with pytest.raises(NotImplementedError) as info:
            m(x, ctx, **kwargs)
        assert spec.name in str(info.value) and feature in str(info.value), str(info.value)


def check_bad_input(spec):
    m = _build(spec)
    x, ctx = _pair(2)
    for bad_x, bad_ctx in ((x[0], ctx), (x, ctx[0])):               # wrong rank
        with pytest.raises(ValueError) as info:
            m(bad_x, bad_ctx)
        assert spec.name in str(info.value), str(info.value)
    with pytest.raises(ValueError) as info:                          # wrong width
        m(x[..., :-1], ctx)
    assert spec.name in str(info.value) and _number(str(info.value), DIM - 1), str(info.value)
    with pytest.raises(ValueError) as info:                          # batch sizes differ
        m(x, ctx[:1])
    assert spec.name in str(info.value), str(info.value)
    for bad in (None, "tokens"):
        with pytest.raises(TypeError, match="Tensor"):
            m(x, bad)
    with pytest.raises(TypeError, match="int64"):
        m(x.long(), ctx)


def check_bf16_and_gradients(spec):
    m16 = _build(spec, torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    x, ctx = _pair(2, torch.bfloat16)
    y16 = m16(x, ctx)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    y32 = m32(x.float(), ctx.float())
    assert_close(y16.float(), y32, rtol=1.6e-2, atol=1e-2 * y32.abs().max().item())
    m = _build(spec)
    x, ctx = (t.requires_grad_(True) for t in _pair(2))
    y = m(x, ctx)
    (y * torch.randn_like(y)).sum().backward()
    for name, t in (("x", x), ("context", ctx), *m.named_parameters()):
        if t.requires_grad:
            assert t.grad is not None and torch.isfinite(t.grad).all(), f"{spec.name}: gradient of {name}"


CHECKS = [check_shape_dtype_and_context_used, check_batch_invariance, check_unsupported_features,
          check_bad_input, check_bf16_and_gradients]


@spec_params
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_cross_contract(spec, check):
    check(spec)


# --- the checks themselves, on a throwaway naive cross-attention -----------------------------

def _register_naive(registry, *, ignore_context=False):
    from attnlab._checks import check_features, check_tokens

    spec = attnlab.MechanismSpec(name="_test_cross", paper="test", year=2024, family="test", layout="cross",
                                 time="O(N M d)", memory="O(N M)", exact=True)

    @attnlab.register(spec)
    class NaiveCross(torch.nn.Module):
        def __init__(self, dim, num_heads=8):
            super().__init__()
            self.dim, self.h = dim, num_heads
            self.q, self.kv, self.proj = (torch.nn.Linear(dim, n * dim) for n in (1, 2, 1))

        def forward(self, x, context, *, attn_mask=None, is_causal=False, cache=None):
            check_tokens("_test_cross", x, self.dim)
            check_tokens("_test_cross", context, self.dim)
            check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
            if x.shape[0] != context.shape[0]:
                raise ValueError(f"_test_cross: batch of x {x.shape[0]} != context {context.shape[0]}")
            B, N, C = x.shape
            q = self.q(x).view(B, N, self.h, -1).transpose(1, 2)                         # (B, h, N, d)
            k, v = self.kv(context).view(B, -1, 2, self.h, C // self.h).permute(2, 0, 3, 1, 4)
            probs = (q @ k.transpose(-2, -1) / (C // self.h) ** 0.5).float().softmax(-1).to(x.dtype)
            out = (probs @ v).transpose(1, 2).reshape(B, N, C)
            return self.proj(out if not ignore_context else self.q(x))

    return NaiveCross.spec


def test_checks_pass_on_a_naive_cross_attention(registry_snapshot):
    spec = _register_naive(registry_snapshot)
    assert attnlab.list_specs(layout="cross") == [spec]
    for check in CHECKS:
        check(spec)


def test_checks_fail_on_a_mechanism_that_ignores_its_context(registry_snapshot):
    spec = _register_naive(registry_snapshot, ignore_context=True)
    with pytest.raises(AssertionError, match="ignores the context"):
        check_shape_dtype_and_context_used(spec)
