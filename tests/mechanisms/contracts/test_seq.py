"""The seq contract: every layout="seq" mechanism in the registry, one parametrisation.

(The suites of the other layouts sit beside this file: test_spatial.py, test_pool.py,
test_cross.py; test_backends.py and test_hooks.py run over every layout.)

A new mechanism is covered by registering it with `layout="seq"` and a tiny `test_kwargs`.
Each property is skipped (with the reason) where the spec marks the feature unsupported, and
the "unsupported feature" test checks the other half of that contract: the feature raises.

Decisions recorded here:
- NaN input is not an error. A NaN token may legitimately turn outputs NaN (NaN * 0 is NaN, so
  even a masked NaN key can reach other rows of its own sample); the only property asked is
  that a NaN stays inside its own sample.
- "Masked keys have no effect" holds for any *finite* value they hold; in self-attention the
  masked tokens are also queries, so only outputs at unmasked positions are compared.
- A query row with no allowed key gets a zero attention output (attnlab.masks). Through a
  module that means: no NaN/inf anywhere, gradients finite, and every such row of a sample
  gets the same output (what the post-attention layers make of a zero row, e.g. proj.bias).
  test_mhsa checks the exact value for mhsa.
"""
from __future__ import annotations

import copy
import re

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab import KVCache

DIM, NUM_HEADS = 32, 4      # what make_mechanism builds by default

# Each spec with its test_kwargs, then once more per extra entry of spec.test_configs (the same
# spec with those options as its test_kwargs), so options that change the code path are covered.
SEQ_SPECS, SEQ_IDS = [], []
for _spec in attnlab.list_specs(layout="seq"):
    SEQ_SPECS.append(_spec)
    SEQ_IDS.append(_spec.name)
    for _i, _config in enumerate(_spec.test_configs, start=1):
        SEQ_SPECS.append(dataclasses.replace(_spec, test_kwargs=dict(_config), test_configs=()))
        SEQ_IDS.append(f"{_spec.name}-cfg{_i}")
FEATURES = ("causal", "attn_mask", "kv_cache")

# float64 comparisons of two computations that should agree up to reassociation.
TIGHT = dict(rtol=1e-10, atol=1e-12)


def spec_params(**kwargs):
    return pytest.mark.parametrize("spec", SEQ_SPECS, ids=SEQ_IDS, **kwargs)


def require(spec, *features):
    for feature in features:
        if not spec.supports(feature):
            pytest.skip(f"{spec.name} does not support {feature} (spec.{feature}=False)")


def tokens(B, N, dtype=torch.float64, scale=1.0):
    return scale * torch.randn(B, N, DIM, dtype=dtype)


def padding_mask(B, N, p_masked=0.4, keep_first=True):
    """(B, N) bool, True = may attend; token 0 kept valid so every causal query has a key."""
    valid = torch.rand(B, N) >= p_masked
    if keep_first:
        valid[:, 0] = True
    return valid


# --- shape and dtype ---------------------------------------------------------------------------

@spec_params()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B,N", [(2, 7), (0, 5), (3, 1), (1, 1)])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_shape_and_dtype_kept(spec, make_mechanism, dtype, B, N, is_causal):
    if is_causal:
        require(spec, "causal")
    m = make_mechanism(spec, dtype=dtype)
    x = tokens(B, N, dtype)
    y = m(x, is_causal=is_causal)
    assert y.shape == x.shape
    assert y.dtype == dtype
    assert torch.isfinite(y).all()


# --- causal no-leak ----------------------------------------------------------------------------

@spec_params()
@pytest.mark.parametrize("t", [1, 4, 8])
def test_causal_no_leak(spec, make_mechanism, t):
    require(spec, "causal")
    m = make_mechanism(spec)
    x = tokens(2, 9)
    x2 = x.clone()
    x2[:, t:] = tokens(2, 9 - t, scale=3.0)
    y, y2 = m(x, is_causal=True), m(x2, is_causal=True)
    assert_close(y2[:, :t], y[:, :t], **TIGHT)
    # The change did reach the later positions, and without is_causal it reaches the earlier
    # ones too: this test can see a leak.
    assert not torch.allclose(y2[:, t:], y[:, t:])
    assert not torch.allclose(m(x2)[:, :t], m(x)[:, :t])


# --- masked keys -------------------------------------------------------------------------------

def _as_float_mask(valid: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(valid.shape, dtype=dtype).masked_fill(~valid, float("-inf"))


@spec_params()
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_masked_keys_have_no_effect(spec, make_mechanism, mask_kind, is_causal):
    require(spec, "attn_mask", *(["causal"] if is_causal else []))
    m = make_mechanism(spec)
    B, N = 3, 8
    valid = padding_mask(B, N)
    mask = valid if mask_kind == "bool" else _as_float_mask(valid, torch.float64)
    x = tokens(B, N)
    x2 = x.clone()
    x2[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    y = m(x, attn_mask=mask, is_causal=is_causal)
    y2 = m(x2, attn_mask=mask, is_causal=is_causal)
    assert torch.isfinite(y2).all()
    assert_close(y2[valid], y[valid], **TIGHT)
    # Without the mask the same change is visible at the valid positions.
    assert not torch.allclose(m(x2, is_causal=is_causal)[valid], m(x, is_causal=is_causal)[valid])


@spec_params()
def test_bool_and_float_masks_agree(spec, make_mechanism):
    require(spec, "attn_mask")
    m = make_mechanism(spec)
    x = tokens(2, 6)
    allowed = torch.rand(2, 1, 6, 6) > 0.5
    allowed[..., 0] = True
    y_bool = m(x, attn_mask=allowed)
    y_float = m(x, attn_mask=_as_float_mask(allowed, torch.float64))
    assert_close(y_float, y_bool, **TIGHT)


@spec_params()
def test_causal_combines_with_mask_by_and(spec, make_mechanism):
    require(spec, "attn_mask", "causal")
    m = make_mechanism(spec)
    B, N = 2, 7
    x = tokens(B, N)
    valid = padding_mask(B, N)
    tril = torch.ones(N, N, dtype=torch.bool).tril()
    explicit = valid[:, None, None, :] & tril          # (B, 1, N, N)
    assert_close(m(x, attn_mask=valid, is_causal=True), m(x, attn_mask=explicit), **TIGHT)


# --- fully masked rows -------------------------------------------------------------------------

@spec_params()
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_fully_masked_rows_finite_and_constant(spec, make_mechanism, is_causal):
    require(spec, "attn_mask", *(["causal"] if is_causal else []))
    m = make_mechanism(spec)
    B, N = 3, 6
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1] = False            # sample 1 is all padding: every query row is fully masked
    valid[2, 3:] = False
    x = tokens(B, N).requires_grad_(True)
    y = m(x, attn_mask=valid, is_causal=is_causal)
    assert torch.isfinite(y).all()
    assert_close(y[1], y[1, :1].expand(N, DIM), rtol=0, atol=1e-12)
    # The other samples are what they are without the padded one.
    keep = torch.tensor([0, 2])
    assert_close(y[keep], m(x[keep].detach(), attn_mask=valid[keep], is_causal=is_causal), **TIGHT)
    # No NaN in gradients either.
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), [x, *params], allow_unused=True)
    for g in grads:
        assert g is None or torch.isfinite(g).all()


# --- KV cache ----------------------------------------------------------------------------------

CHUNKINGS = {"token_by_token": [1] * 9, "3+1+rest": [3, 1, 5], "all_at_once": [9]}


@spec_params()
@pytest.mark.parametrize("chunks", list(CHUNKINGS.values()), ids=list(CHUNKINGS))
@pytest.mark.parametrize("max_len", [None, 9])
def test_kv_cache_decode_matches_full_forward(spec, make_mechanism, chunks, max_len):
    require(spec, "kv_cache", "causal")
    m = make_mechanism(spec)
    B, N = 2, sum(chunks)
    x = tokens(B, N)
    full = m(x, is_causal=True)
    cache = KVCache(max_len=max_len)
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(m(x[:, start:start + n], is_causal=True, cache=cache))
            start += n
    assert len(cache) == N
    assert_close(torch.cat(outs, dim=1), full, **TIGHT)


@spec_params()
def test_kv_cache_decode_with_padding_matches_full_forward(spec, make_mechanism):
    require(spec, "kv_cache", "causal", "attn_mask")
    m = make_mechanism(spec)
    B, N = 3, 8
    x = tokens(B, N)
    valid = padding_mask(B, N)
    full = m(x, attn_mask=valid, is_causal=True)
    cache = KVCache()
    outs, start = [], 0
    for n in (3, 1, 1, 3):
        end = start + n
        outs.append(m(x[:, start:end], attn_mask=valid[:, :end], is_causal=True, cache=cache))
        start = end
    assert_close(torch.cat(outs, dim=1), full, **TIGHT)


# --- batch invariance --------------------------------------------------------------------------

@spec_params()
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_batch_invariance(spec, make_mechanism, is_causal, masked):
    if is_causal:
        require(spec, "causal")
    if masked:
        require(spec, "attn_mask")
    m = make_mechanism(spec, dtype=torch.float32)
    B, N = 4, 7
    x = tokens(B, N, torch.float32)
    valid = padding_mask(B, N) if masked else None
    y = m(x, attn_mask=valid, is_causal=is_causal)
    for i in range(B):
        yi = m(x[i:i + 1], attn_mask=None if valid is None else valid[i:i + 1], is_causal=is_causal)
        assert_close(y[i:i + 1], yi, rtol=1e-5, atol=1e-6)


# --- bf16 --------------------------------------------------------------------------------------

@spec_params()
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_bf16_close_to_float32(spec, make_mechanism, is_causal):
    if is_causal:
        require(spec, "causal")
    m16 = make_mechanism(spec, dtype=torch.bfloat16)
    m32 = copy.deepcopy(m16).float()        # the same (bf16-rounded) weights, float32 compute
    x16 = tokens(2, 11, torch.bfloat16)
    y16 = m16(x16, is_causal=is_causal)
    assert y16.dtype == torch.bfloat16
    assert torch.isfinite(y16).all()
    y32 = m32(x16.float(), is_causal=is_causal)
    # bf16 keeps 8 bits of mantissa (eps 2**-8 = 0.0039); the error of a few roundings deep is
    # bounded relative to the output's scale (mhsa: max error ~0.4% of max |y|).
    scale = y32.abs().max().item()
    assert_close(y16.float(), y32, rtol=1.6e-2, atol=1e-2 * scale)


# --- unsupported features ----------------------------------------------------------------------

def call_with_feature(m, feature, B=2, N=5, dtype=torch.float64):
    x = tokens(B, N, dtype)
    if feature == "attn_mask":
        return m(x, attn_mask=torch.ones(B, N, dtype=torch.bool))
    if feature == "causal":
        return m(x, is_causal=True)
    if feature == "kv_cache":
        return m(x, cache=KVCache())
    raise AssertionError(feature)


def assert_feature_refused(m, spec, feature):
    with pytest.raises(NotImplementedError) as info:
        call_with_feature(m, feature)
    msg = str(info.value)
    assert spec.name in msg, msg
    assert feature in msg, msg


@spec_params()
@pytest.mark.parametrize("feature", FEATURES)
def test_unsupported_feature_raises(spec, make_mechanism, feature):
    if spec.supports(feature):
        pytest.skip(f"{spec.name} supports {feature}; nothing to refuse")
    assert_feature_refused(make_mechanism(spec), spec, feature)


def test_unsupported_feature_check_on_a_throwaway_mechanism(registry_snapshot):
    """Exercises the generic check above on a mechanism that supports nothing."""
    from attnlab._checks import check_features, check_tokens

    spec = attnlab.MechanismSpec(name="_test_plain", paper="test", year=2024, family="test", layout="seq",
                                 time="O(N)", memory="O(N)", exact=False)

    @attnlab.register(spec)
    class Plain(torch.nn.Module):
        def __init__(self, dim, num_heads=8):
            super().__init__()
            self.dim = dim
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, x, *, attn_mask=None, is_causal=False, cache=None):
            check_tokens("_test_plain", x, self.dim)
            check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
            return self.proj(x)

    m = attnlab.create("_test_plain", DIM, NUM_HEADS).double()
    for feature in FEATURES:
        assert_feature_refused(m, Plain.spec, feature)


# --- bad input ---------------------------------------------------------------------------------

def _has_number(msg: str, n: int) -> bool:
    return re.search(rf"(?<![\d.]){n}(?![\d.])", msg) is not None


@spec_params()
@pytest.mark.parametrize("shape", [(5, DIM), (2, 5, 1, DIM)], ids=["2d", "4d"])
def test_wrong_rank_raises(spec, make_mechanism, shape):
    m = make_mechanism(spec)
    with pytest.raises(ValueError) as info:
        m(torch.randn(shape, dtype=torch.float64))
    msg = str(info.value)
    assert spec.name in msg and str(shape) in msg and _has_number(msg, DIM), msg


@spec_params()
def test_wrong_width_raises(spec, make_mechanism):
    m = make_mechanism(spec)
    with pytest.raises(ValueError) as info:
        m(torch.randn(2, 5, DIM - 1, dtype=torch.float64))
    msg = str(info.value)
    assert spec.name in msg and _has_number(msg, DIM) and _has_number(msg, DIM - 1), msg


@spec_params()
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_input_raises(spec, make_mechanism, dtype):
    m = make_mechanism(spec)
    with pytest.raises(TypeError) as info:
        m(torch.zeros(2, 5, DIM, dtype=dtype))
    msg = str(info.value)
    assert spec.name in msg and str(dtype).removeprefix("torch.") in msg and "float" in msg, msg


@spec_params()
@pytest.mark.parametrize("x", [[[0.0] * DIM], None, "tokens"], ids=["list", "None", "str"])
def test_non_tensor_input_raises(spec, make_mechanism, x):
    m = make_mechanism(spec)
    with pytest.raises(TypeError) as info:
        m(x)
    msg = str(info.value)
    assert spec.name in msg and "Tensor" in msg and type(x).__name__ in msg, msg


@spec_params()
@pytest.mark.parametrize("mask_shape", [(2, 6), (3, 5), (2, 3, 5, 5), (2, 1, 6, 5), (1, 2, 1, 1, 5)],
                         ids=["pad_M+1", "pad_B+1", "heads3", "N+1", "5d"])
def test_mask_not_broadcastable_raises(spec, make_mechanism, mask_shape):
    require(spec, "attn_mask")
    m = make_mechanism(spec)
    with pytest.raises(ValueError) as info:
        m(tokens(2, 5), attn_mask=torch.ones(mask_shape, dtype=torch.bool))
    assert str(mask_shape) in str(info.value), str(info.value)


@spec_params()
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_mask_wrong_dtype_raises(spec, make_mechanism, dtype):
    require(spec, "attn_mask")
    m = make_mechanism(spec)
    with pytest.raises(TypeError) as info:
        m(tokens(2, 5), attn_mask=torch.ones(2, 5, dtype=dtype))
    assert str(dtype).removeprefix("torch.") in str(info.value), str(info.value)


@spec_params()
def test_float_mask_with_nan_raises(spec, make_mechanism):
    require(spec, "attn_mask")
    m = make_mechanism(spec)
    mask = torch.zeros(2, 5, dtype=torch.float64)
    mask[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(tokens(2, 5), attn_mask=mask)


@spec_params()
@pytest.mark.parametrize("num_heads", [0, -4])
def test_non_positive_heads_raise_at_create(spec, num_heads):
    with pytest.raises(ValueError) as info:
        attnlab.create(spec.name, DIM, num_heads, **spec.test_kwargs)
    assert _has_number(str(info.value), num_heads), str(info.value)


@spec_params()
def test_dim_not_divisible_by_heads(spec):
    """Where heads split the width, dim % num_heads != 0 is a ValueError at create naming both.

    A mechanism whose heads do not split the width (random_features: num_heads counts random
    features) may accept it, and must then work at that width.
    """
    dim, num_heads = 30, 4
    try:
        m = attnlab.create(spec.name, dim, num_heads, **spec.test_kwargs)
    except ValueError as err:
        msg = str(err)
        assert _has_number(msg, dim) and _has_number(msg, num_heads), msg
        return
    x = torch.randn(2, 5, dim)
    assert m.eval()(x).shape == x.shape


@spec_params()
def test_unknown_option_raises_type_error(spec):
    with pytest.raises(TypeError, match="bogus_option"):
        attnlab.create(spec.name, DIM, NUM_HEADS, **spec.test_kwargs, bogus_option=1)


# --- gradients ---------------------------------------------------------------------------------

@spec_params()
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gradients_flow_and_are_finite(spec, make_mechanism, is_causal):
    """d(loss)/dx and every trainable parameter's gradient exist, are finite and not all zero."""
    if is_causal:
        require(spec, "causal")
    m = make_mechanism(spec)
    x = tokens(2, 6).requires_grad_(True)
    y = m(x, is_causal=is_causal)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if p.grad is None]
    assert not missing, f"{spec.name}: no gradient reached {missing}"
    bad = [n for n, p in named if not torch.isfinite(p.grad).all()]
    assert not bad, f"{spec.name}: non-finite gradients in {bad}"
    assert any(p.grad.abs().sum() > 0 for _, p in named) or not named


# --- NaN input ---------------------------------------------------------------------------------

@spec_params()
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_nan_input_stays_in_its_sample(spec, make_mechanism, is_causal):
    """NaN input is not an error and may make its own sample NaN; other samples are untouched."""
    if is_causal:
        require(spec, "causal")
    m = make_mechanism(spec)
    x = tokens(3, 6)
    x[0, 2, 5] = float("nan")
    y = m(x, is_causal=is_causal)
    assert torch.isfinite(y[1:]).all()
    assert_close(y[1:], m(x[1:], is_causal=is_causal), **TIGHT)
