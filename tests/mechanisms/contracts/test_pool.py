"""The pool contract: every layout="pool" mechanism, x (B, N, C) -> (B, C_out).

C_out does not depend on N; `attn_mask` (where supported) is a (B, N) key-padding mask,
True = token present. Pooling has no causal order and no decoding, so causal and kv_cache
must be refused with NotImplementedError when the spec says so.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.testing import assert_close

import attnlab
from _layouts import DIM, require, spec_param_list

SPECS = attnlab.list_specs(layout="pool")
spec_params = pytest.mark.parametrize(
    "spec", spec_param_list(SPECS, empty_reason="no pool mechanism is registered"))
TIGHT = dict(rtol=1e-10, atol=1e-12)


def tokens(B, N, dtype=torch.float64, C=DIM):
    return torch.randn(B, N, C, dtype=dtype)


def _has_number(msg: str, n: int) -> bool:
    return re.search(rf"(?<![\d.]){n}(?![\d.])", msg) is not None


@spec_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [3, 1, 0])
def test_shape_and_dtype(spec, make_mechanism, dtype, B):
    m = make_mechanism(spec, dtype=dtype)
    y5, y9 = m(tokens(B, 5, dtype)), m(tokens(B, 9, dtype))
    assert y5.dim() == 2 and y5.shape[0] == B, y5.shape
    assert y9.shape == y5.shape, "the pooled width must not depend on N"
    assert y5.dtype == dtype and torch.isfinite(y5).all()


@spec_params
def test_batch_invariance(spec, make_mechanism):
    m = make_mechanism(spec, dtype=torch.float32)
    x = tokens(4, 7, torch.float32)
    y = m(x)
    for i in range(4):
        assert_close(y[i:i + 1], m(x[i:i + 1]), rtol=1e-5, atol=1e-6)


@spec_params
def test_padding_tokens_have_no_effect(spec, make_mechanism):
    """Padded tokens with any finite value leave the pooled output alone; it equals pooling
    the valid tokens alone."""
    require(spec, "attn_mask")
    m = make_mechanism(spec)
    x = tokens(2, 6)
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    x2 = x.clone()
    x2[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    y, y2 = m(x, attn_mask=valid), m(x2, attn_mask=valid)
    assert_close(y2, y, **TIGHT)
    assert_close(y[1:], m(x[1:, :3]), **TIGHT)
    assert not torch.allclose(m(x2)[1], m(x)[1])       # without the mask the change shows


@spec_params
@pytest.mark.parametrize("feature", ["causal", "attn_mask", "kv_cache"])
def test_unsupported_feature_raises(spec, make_mechanism, feature):
    if spec.supports(feature):
        pytest.skip(f"{spec.name} supports {feature}; nothing to refuse")
    m = make_mechanism(spec)
    x = tokens(2, 5)
    kwargs = {"causal": dict(is_causal=True), "attn_mask": dict(attn_mask=torch.ones(2, 5, dtype=torch.bool)),
              "kv_cache": dict(cache=attnlab.KVCache())}[feature]
    with pytest.raises(NotImplementedError) as info:
        m(x, **kwargs)
    msg = str(info.value)
    assert spec.name in msg and feature in msg, msg


@spec_params
@pytest.mark.parametrize("shape", [(5, DIM), (2, 5, 1, DIM)], ids=["2d", "4d"])
def test_wrong_rank_raises(spec, make_mechanism, shape):
    with pytest.raises(ValueError) as info:
        make_mechanism(spec)(torch.randn(shape, dtype=torch.float64))
    msg = str(info.value)
    assert spec.name in msg and str(shape) in msg and _has_number(msg, DIM), msg


@spec_params
def test_wrong_width_raises(spec, make_mechanism):
    with pytest.raises(ValueError) as info:
        make_mechanism(spec)(tokens(2, 5, C=DIM - 1))
    msg = str(info.value)
    assert spec.name in msg and _has_number(msg, DIM) and _has_number(msg, DIM - 1), msg


@spec_params
@pytest.mark.parametrize("x", [None, "tokens", [[0.0] * DIM]], ids=["None", "str", "list"])
def test_non_tensor_input_raises(spec, make_mechanism, x):
    with pytest.raises(TypeError) as info:
        make_mechanism(spec)(x)
    msg = str(info.value)
    assert spec.name in msg and "Tensor" in msg and type(x).__name__ in msg, msg


@spec_params
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_input_raises(spec, make_mechanism, dtype):
    with pytest.raises(TypeError) as info:
        make_mechanism(spec)(torch.zeros(2, 5, DIM, dtype=dtype))
    msg = str(info.value)
    assert spec.name in msg and str(dtype).removeprefix("torch.") in msg and "float" in msg, msg


@spec_params
def test_bf16_runs_finite_and_close_to_float32(spec, make_mechanism):
    m16 = make_mechanism(spec, dtype=torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    x = tokens(2, 9, torch.bfloat16)
    y16 = m16(x)
    assert y16.dtype == torch.bfloat16 and torch.isfinite(y16).all()
    y32 = m32(x.float())
    assert_close(y16.float(), y32, rtol=1.6e-2, atol=1e-2 * y32.abs().max().item())


@spec_params
def test_gradients_flow_and_are_finite(spec, make_mechanism):
    m = make_mechanism(spec)
    x = tokens(2, 6).requires_grad_(True)
    y = m(x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if p.grad is None]
    assert not missing, f"{spec.name}: no gradient reached {missing}"
    bad = [n for n, p in named if not torch.isfinite(p.grad).all()]
    assert not bad, f"{spec.name}: non-finite gradients in {bad}"
