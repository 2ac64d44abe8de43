"""The spatial contract: every layout="2d" / "3d" mechanism, channels-last x (B, *spatial, C).

Interface (STYLE.md): `forward(x: (B, *spatial, C), *, attn_mask=None, is_causal=False,
cache=None) -> (B, *spatial, C)`; `x.flatten(1, -2)` is the token sequence (row-major), so
"causal" means: an output never depends on a token later in that order.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.testing import assert_close

import attnlab
from _layouts import DIM, SPATIAL, require, spec_param_list

SPECS = [s for layout in SPATIAL for s in attnlab.list_specs(layout=layout)]
spec_params = pytest.mark.parametrize(
    "spec", spec_param_list(SPECS, empty_reason="no 2d/3d mechanism is registered"))
TIGHT = dict(rtol=1e-10, atol=1e-12)


def image(spec, B, dtype=torch.float64, C=DIM, scale=1.0):
    return scale * torch.randn(B, *SPATIAL[spec.layout], C, dtype=dtype)


def _has_number(msg: str, n: int) -> bool:
    return re.search(rf"(?<![\d.]){n}(?![\d.])", msg) is not None


@spec_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [2, 1, 0])
def test_shape_and_dtype_kept(spec, make_mechanism, dtype, B):
    m = make_mechanism(spec, dtype=dtype)
    x = image(spec, B, dtype)
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y).all()


@spec_params
def test_batch_invariance(spec, make_mechanism):
    m = make_mechanism(spec, dtype=torch.float32)
    x = image(spec, 3, torch.float32)
    y = m(x)
    for i in range(3):
        assert_close(y[i:i + 1], m(x[i:i + 1]), rtol=1e-5, atol=1e-6)


@spec_params
def test_each_pixel_sees_its_neighbours(spec, make_mechanism):
    """Changing one pixel changes the output at that pixel and at its neighbour: it is
    attention over space, not a per-pixel map (which would pass every other test here)."""
    m = make_mechanism(spec)
    x = image(spec, 1)
    x2 = x.clone()
    x2[(0,) + (0,) * len(SPATIAL[spec.layout])] += 3.0
    y, y2 = m(x).flatten(1, -2), m(x2).flatten(1, -2)
    assert not torch.allclose(y[:, 1], y2[:, 1]), "pixel 1 does not depend on pixel 0"


@spec_params
def test_causal_no_leak(spec, make_mechanism):
    require(spec, "causal")
    m = make_mechanism(spec)
    x = image(spec, 2)
    N = x[0, ..., 0].numel()
    t = N // 2
    x2 = x.clone().flatten(1, -2)
    x2[:, t:] = 3.0 * torch.randn_like(x2[:, t:])
    x2 = x2.reshape(x.shape)
    y = m(x, is_causal=True).flatten(1, -2)
    y2 = m(x2, is_causal=True).flatten(1, -2)
    assert y.shape == (2, N, DIM)
    assert_close(y2[:, :t], y[:, :t], **TIGHT)
    assert not torch.allclose(m(x2).flatten(1, -2)[:, :t], m(x).flatten(1, -2)[:, :t])


def _call_with_feature(m, spec, feature):
    x = image(spec, 2)
    if feature == "attn_mask":
        return m(x, attn_mask=torch.ones(2, x[0, ..., 0].numel(), dtype=torch.bool))
    if feature == "causal":
        return m(x, is_causal=True)
    if feature == "kv_cache":
        return m(x, cache=attnlab.KVCache())
    raise AssertionError(feature)


@spec_params
@pytest.mark.parametrize("feature", ["causal", "attn_mask", "kv_cache"])
def test_unsupported_feature_raises(spec, make_mechanism, feature):
    if spec.supports(feature):
        pytest.skip(f"{spec.name} supports {feature}; nothing to refuse")
    with pytest.raises(NotImplementedError) as info:
        _call_with_feature(make_mechanism(spec), spec, feature)
    msg = str(info.value)
    assert spec.name in msg and feature in msg, msg


@spec_params
def test_wrong_rank_raises(spec, make_mechanism):
    m = make_mechanism(spec)
    x = torch.randn(2, 32, DIM, dtype=torch.float64)          # a token sequence, not an image
    with pytest.raises(ValueError) as info:
        m(x)
    msg = str(info.value)
    assert spec.name in msg and str(tuple(x.shape)) in msg and _has_number(msg, DIM), msg


@spec_params
def test_wrong_width_raises(spec, make_mechanism):
    m = make_mechanism(spec)
    with pytest.raises(ValueError) as info:
        m(image(spec, 2, C=DIM - 1))
    msg = str(info.value)
    assert spec.name in msg and _has_number(msg, DIM) and _has_number(msg, DIM - 1), msg


@spec_params
def test_channels_first_input_raises(spec, make_mechanism):
    """(B, C, *spatial) is the usual mistake: the error names the expected width."""
    m = make_mechanism(spec)
    x = image(spec, 2).movedim(-1, 1)
    with pytest.raises(ValueError) as info:
        m(x)
    assert spec.name in str(info.value) and _has_number(str(info.value), DIM), str(info.value)


@spec_params
@pytest.mark.parametrize("x", [None, "pixels", 1.0], ids=["None", "str", "float"])
def test_non_tensor_input_raises(spec, make_mechanism, x):
    with pytest.raises(TypeError) as info:
        make_mechanism(spec)(x)
    msg = str(info.value)
    assert spec.name in msg and "Tensor" in msg and type(x).__name__ in msg, msg


@spec_params
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_input_raises(spec, make_mechanism, dtype):
    m = make_mechanism(spec)
    with pytest.raises(TypeError) as info:
        m(torch.zeros(2, *SPATIAL[spec.layout], DIM, dtype=dtype))
    msg = str(info.value)
    assert spec.name in msg and str(dtype).removeprefix("torch.") in msg and "float" in msg, msg


@spec_params
def test_bf16_runs_finite_and_close_to_float32(spec, make_mechanism):
    m16 = make_mechanism(spec, dtype=torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    x = image(spec, 2, torch.bfloat16)
    y16 = m16(x)
    assert y16.dtype == torch.bfloat16 and y16.shape == x.shape
    assert torch.isfinite(y16).all()
    y32 = m32(x.float())
    assert_close(y16.float(), y32, rtol=1.6e-2, atol=1e-2 * y32.abs().max().item())


@spec_params
def test_gradients_flow_and_are_finite(spec, make_mechanism):
    m = make_mechanism(spec)
    x = image(spec, 2).requires_grad_(True)
    y = m(x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if p.grad is None]
    assert not missing, f"{spec.name}: no gradient reached {missing}"
    bad = [n for n, p in named if not torch.isfinite(p.grad).all()]
    assert not bad, f"{spec.name}: non-finite gradients in {bad}"
