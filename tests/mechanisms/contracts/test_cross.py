"""The cross contract: every layout="cross" mechanism, queries from x, keys/values from context.

Interface: `forward(x: (B, N, C), context: (B, M, C), *, attn_mask=None, is_causal=False,
cache=None) -> (B, N, C)`; attn_mask, where supported, a (B, M) key-padding mask over the context
(True = present); cache, where supported (spec.kv_cache), an `attnlab.ContextCache`: the
context's keys/values computed once and reused while the context stays the same. A mechanism
that registers with layout="cross" is picked up automatically, once with its test_kwargs and
once per entry of its test_configs.

`cross_mhsa` is the oracle (`_layouts.cross_mhsa_oracle`): a cross spec that claims exact=True
and whose weights load into cross_mhsa (timm's q / kv / proj) must equal it, masked or not.

Decisions recorded here:
- "Masked context tokens have no effect" holds for any finite value they hold, and a sample
  equals the same sample with its masked context tokens dropped.
- A query with no allowed context token gets a zero attention output (attnlab.masks): through
  a module, no NaN or inf anywhere, gradients finite, nothing depends on the context, and
  hook_out (where declared: per-head outputs before the projection) is zero there. A mechanism
  whose queries also attend their own tokens (class attribute `attends_own_tokens = True`: one
  softmax over [context; x], as visor's text stream) has no empty row: there a fully masked
  context must instead equal an empty one (context[:, :0]), output and hook_out alike.
- The context cache: several decoding steps with new queries and the same context equal the
  uncached calls; a context of another batch or length while the cache is full is a ValueError
  naming `reset()`; after `reset()` a new context works.
The checks are plain functions so that throwaway mechanisms (bottom) prove they run and fail.
"""
from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from torch.testing import assert_close

import attnlab
from _layouts import CONTEXT_LEN, DIM, NUM_HEADS, SEQ_LEN, cross_mhsa_oracle, require

TIGHT = dict(rtol=1e-10, atol=1e-12)


def _cases():
    """Each cross spec with its test_kwargs, then once per test_configs entry."""
    params = []
    for spec in attnlab.list_specs(layout="cross"):
        params.append(pytest.param(spec, id=spec.name))
        for i, config in enumerate(spec.test_configs, start=1):
            params.append(pytest.param(dataclasses.replace(spec, test_kwargs=dict(config), test_configs=()),
                                       id=f"{spec.name}-cfg{i}"))
    if not params:
        reason = "no mechanism with layout='cross' is registered; this suite runs once one is"
        return [pytest.param(None, id="none", marks=pytest.mark.skip(reason=reason))]
    return params


spec_params = pytest.mark.parametrize("spec", _cases())


def _pair(B, dtype=torch.float64, C=DIM, M=CONTEXT_LEN):
    return torch.randn(B, SEQ_LEN, C, dtype=dtype), torch.randn(B, M, C, dtype=dtype)


def _number(msg, n):
    return re.search(rf"(?<![\d.]){n}(?![\d.])", msg) is not None


def _build(spec, dtype=torch.float64):
    return attnlab.create(spec.name, DIM, NUM_HEADS, **spec.test_kwargs).to(dtype).eval()


def _padding(B, M=CONTEXT_LEN):
    """(B, M) key-padding mask with a varying number of present context tokens, at least one."""
    valid = torch.ones(B, M, dtype=torch.bool)
    for b in range(1, B):
        valid[b, M - b:] = False
    return valid


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


def check_matches_cross_mhsa(spec):
    """An exact cross mechanism with cross_mhsa's weights computes cross_mhsa (masked too)."""
    if not spec.exact:
        pytest.skip(f"{spec.name} is not exact (spec.exact=False); cross_mhsa is not its oracle")
    m = _build(spec)
    oracle, why = cross_mhsa_oracle(m)
    if oracle is None:
        pytest.skip(f"{spec.name}: no cross_mhsa oracle: {why}")
    x, ctx = _pair(3)
    assert_close(m(x, ctx), oracle(x, ctx), **TIGHT, msg=lambda s: f"{spec.name} != cross_mhsa: {s}")
    if spec.supports("attn_mask"):
        valid = _padding(3)
        assert_close(m(x, ctx, attn_mask=valid), oracle(x, ctx, attn_mask=valid), **TIGHT)


def check_masked_context_has_no_effect(spec):
    require(spec, "attn_mask")
    m = _build(spec)
    x, ctx = _pair(3)
    valid = _padding(3)
    ctx2 = ctx.clone()
    ctx2[~valid] = 1e3 * torch.randn(int((~valid).sum()), DIM, dtype=torch.float64)
    y = m(x, ctx, attn_mask=valid)
    assert_close(m(x, ctx2, attn_mask=valid), y, **TIGHT, msg=lambda s: f"{spec.name}: masked context leaks: {s}")
    for b in range(3):      # each sample equals itself with its masked context tokens dropped
        kept = ctx[b:b + 1, valid[b]]
        assert_close(y[b:b + 1], m(x[b:b + 1], kept), **TIGHT)
    assert not torch.allclose(m(x, ctx2)[1:], m(x, ctx)[1:]), f"{spec.name}: without the mask the change shows"


def check_fully_masked_rows_are_finite_and_zero(spec):
    require(spec, "attn_mask")
    m = _build(spec)
    x, ctx = _pair(3)
    x.requires_grad_(True)
    ctx.requires_grad_(True)
    valid = _padding(3)
    valid[1] = False                # sample 1 has no context token: every query row is empty
    seen = {}
    hook = getattr(m, "hook_out", None)
    handle = hook.register_forward_hook(lambda mod, i, out: seen.setdefault("out", out)) if hook is not None else None
    y = m(x, ctx, attn_mask=valid)
    if handle is not None:
        handle.remove()
    if getattr(type(m), "attends_own_tokens", False):     # no empty row: fully masked = no context
        with torch.no_grad():
            empty = {}
            handle = hook.register_forward_hook(lambda mod, i, out: empty.setdefault("out", out)) \
                if hook is not None else None
            assert_close(y[1:2], m(x[1:2], ctx[1:2, :0]), **TIGHT,
                         msg=lambda s: f"{spec.name}: a fully masked context != an empty one: {s}")
            if handle is not None:
                handle.remove()
                assert_close(seen["out"][1:2], empty["out"], **TIGHT)
    elif handle is not None:
        assert torch.equal(seen["out"][1], torch.zeros_like(seen["out"][1])), \
            f"{spec.name}: hook_out is not zero for a query with no context token"
    assert torch.isfinite(y).all(), f"{spec.name}: NaN/inf for a query with no context token"
    with torch.no_grad():
        assert_close(m(x, ctx + torch.randn_like(ctx), attn_mask=valid)[1], y[1], **TIGHT)
        keep = torch.tensor([0, 2])
        assert_close(y[keep], m(x[keep], ctx[keep], attn_mask=valid[keep]), **TIGHT)
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), [x, ctx, *params], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads), f"{spec.name}: non-finite gradients"


def check_context_cache_equals_recompute(spec):
    require(spec, "kv_cache")
    m = _build(spec)
    _, ctx = _pair(2)
    valid = _padding(2)
    masks = [None, valid] if spec.supports("attn_mask") else [None]
    for attn_mask in masks:
        cache = attnlab.ContextCache()
        for step, n in enumerate((3, 1, 1, 2)):          # new queries each step, the same context
            x_t = torch.randn(2, n, DIM, dtype=torch.float64)
            with torch.no_grad():
                y_t = m(x_t, ctx, attn_mask=attn_mask, cache=cache)
                assert_close(y_t, m(x_t, ctx, attn_mask=attn_mask), **TIGHT,
                             msg=lambda s: f"{spec.name}: cached step {step} != recompute: {s}")
    for bad_ctx in (ctx[:1], ctx[:, :2]):                # another batch, another length
        with pytest.raises(ValueError, match=r"reset\(\)"):
            m(torch.randn(bad_ctx.shape[0], 1, DIM, dtype=torch.float64), bad_ctx, cache=cache)
    cache.reset()
    x, new_ctx = _pair(3, M=CONTEXT_LEN + 2)
    assert_close(m(x, new_ctx, cache=cache), m(x, new_ctx), **TIGHT)


def check_unsupported_features(spec):
    m = _build(spec)
    x, ctx = _pair(2)
    calls = {"attn_mask": dict(attn_mask=torch.ones(2, CONTEXT_LEN, dtype=torch.bool)),
             "causal": dict(is_causal=True), "kv_cache": dict(cache=attnlab.ContextCache())}
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
    for bad_x, bad_ctx in ((x[..., :-1], ctx), (x, ctx[..., :-1])):  # wrong width
        with pytest.raises(ValueError) as info:
            m(bad_x, bad_ctx)
        assert spec.name in str(info.value) and _number(str(info.value), DIM - 1), str(info.value)
    with pytest.raises(ValueError) as info:                          # batch sizes differ
        m(x, ctx[:1])
    assert spec.name in str(info.value), str(info.value)
    for bad in (None, "tokens"):
        with pytest.raises(TypeError, match="Tensor"):
            m(x, bad)
    with pytest.raises(TypeError, match="int64"):
        m(x.long(), ctx)


def check_bad_mask(spec):
    require(spec, "attn_mask")
    m = _build(spec)
    x, ctx = _pair(2)
    for shape in ((2, CONTEXT_LEN + 1), (3, CONTEXT_LEN), (2, 1, SEQ_LEN + 1, CONTEXT_LEN)):
        with pytest.raises(ValueError) as info:
            m(x, ctx, attn_mask=torch.ones(shape, dtype=torch.bool))
        msg = str(info.value)
        assert spec.name in msg and _number(msg, CONTEXT_LEN), msg
    with pytest.raises(TypeError):
        m(x, ctx, attn_mask=torch.ones(2, CONTEXT_LEN, dtype=torch.int64))


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


CHECKS = [check_shape_dtype_and_context_used, check_batch_invariance, check_matches_cross_mhsa,
          check_masked_context_has_no_effect, check_fully_masked_rows_are_finite_and_zero,
          check_context_cache_equals_recompute, check_unsupported_features, check_bad_input,
          check_bad_mask, check_bf16_and_gradients]


@spec_params
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_cross_contract(spec, check):
    check(spec)


# --- the checks themselves, on throwaway naive cross-attentions -------------------------------

def _register_naive(registry, *, ignore_context=False, features=False, bug=None, own_tokens=False):
    """A naive cross-attention (q / kv / proj as timm). features=True: it supports a (B, M)
    key-padding mask and a ContextCache; own_tokens=True: the queries attend [context; x] in one
    softmax (attends_own_tokens); bug names a flaw the checks must catch."""
    from attnlab._checks import check_features, check_tokens

    spec = attnlab.MechanismSpec(name="_test_cross", paper="test", year=2024, family="test", layout="cross",
                                 time="O(N M d)", memory="O(N M)", exact=not own_tokens, cross=True,
                                 attn_mask=features, kv_cache=features)

    @attnlab.register(spec)
    class NaiveCross(torch.nn.Module):
        attends_own_tokens = own_tokens

        def __init__(self, dim, num_heads=8):
            super().__init__()
            self.dim, self.h = dim, num_heads
            self.q, self.kv, self.proj = (torch.nn.Linear(dim, n * dim) for n in (1, 2, 1))

        def project(self, context):
            B, M, C = context.shape
            kv = self.kv(context).view(B, M, 2, self.h, C // self.h).permute(2, 0, 3, 1, 4)  # (2, B, h, M, d)
            return kv[0], kv[1]

        def forward(self, x, context, *, attn_mask=None, is_causal=False, cache=None):
            check_tokens("_test_cross", x, self.dim)
            check_tokens("_test_cross", context, self.dim, what="context")
            check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
            if x.shape[0] != context.shape[0]:
                raise ValueError(f"_test_cross: batch of x {x.shape[0]} != context {context.shape[0]}")
            B, N, C = x.shape
            M = context.shape[1]
            if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool):
                raise TypeError("_test_cross: attn_mask must be a bool tensor")
            if attn_mask is not None and tuple(attn_mask.shape) != (B, M):
                raise ValueError(f"_test_cross: attn_mask must be (B, M) = ({B}, {M}), got {tuple(attn_mask.shape)}")
            q = self.q(x).view(B, N, self.h, -1).transpose(1, 2)                         # (B, h, N, d)
            k, v = self.project(context) if cache is None else cache.fetch(context, self.project, owner=self)
            if own_tokens:                                         # keys [context; x]
                k_x, v_x = self.project(x)
                k, v = torch.cat([k, k_x], 2), torch.cat([v, v_x], 2)                   # (B, h, M + N, d)
                if attn_mask is not None:
                    attn_mask = torch.cat([attn_mask, attn_mask.new_ones(B, N)], 1)     # (B, M + N)
            scores = q @ k.transpose(-2, -1) / (C // self.h) ** 0.5                      # (B, h, N, M [+ N])
            if attn_mask is not None and bug != "mask_ignored":
                scores = scores.masked_fill(~attn_mask[:, None, None, :], float("-inf"))
            if attn_mask is not None and bug == "empty_context_zero":   # own tokens dropped for such rows
                scores = scores.masked_fill(~attn_mask[:, None, None, :M].any(-1, keepdim=True), float("-inf"))
            probs = scores.to(torch.promote_types(x.dtype, torch.float32)).softmax(-1).to(x.dtype)
            if attn_mask is not None and bug != "nan_rows":
                probs = probs.nan_to_num(0.0)                      # empty rows: softmax of all -inf
            out = (probs @ v).transpose(1, 2).reshape(B, N, C)
            return self.proj(out if not ignore_context else self.q(x))

    return NaiveCross.spec


def _run_all(spec):
    """Every check; those that need a feature the spec lacks skip (and must be those)."""
    ran = []
    for check in CHECKS:
        try:
            check(spec)
            ran.append(check)
        except pytest.skip.Exception:
            pass
    return ran


def test_checks_pass_on_a_naive_cross_attention(registry_snapshot):
    spec = _register_naive(registry_snapshot)
    assert spec in attnlab.list_specs(layout="cross")
    ran = _run_all(spec)
    needs_features = {check_masked_context_has_no_effect, check_fully_masked_rows_are_finite_and_zero,
                      check_context_cache_equals_recompute, check_bad_mask}
    assert set(CHECKS) - set(ran) == needs_features


def test_checks_pass_on_a_naive_cross_attention_with_mask_and_cache(registry_snapshot):
    spec = _register_naive(registry_snapshot, features=True)
    assert _run_all(spec) == CHECKS


def test_checks_fail_on_a_mechanism_that_ignores_its_context(registry_snapshot):
    spec = _register_naive(registry_snapshot, ignore_context=True)
    with pytest.raises(AssertionError, match="ignores the context"):
        check_shape_dtype_and_context_used(spec)
    with pytest.raises(AssertionError, match="!= cross_mhsa"):
        check_matches_cross_mhsa(spec)


def test_checks_fail_on_a_mechanism_that_ignores_the_mask(registry_snapshot):
    spec = _register_naive(registry_snapshot, features=True, bug="mask_ignored")
    with pytest.raises(AssertionError, match="masked context leaks"):
        check_masked_context_has_no_effect(spec)


def test_checks_fail_on_nan_for_an_empty_context_row(registry_snapshot):
    spec = _register_naive(registry_snapshot, features=True, bug="nan_rows")
    with pytest.raises(AssertionError, match="NaN"):
        check_fully_masked_rows_are_finite_and_zero(spec)


def test_checks_pass_on_a_naive_joint_attention(registry_snapshot):
    """Queries over [context; x] (attends_own_tokens): a fully masked context equals an empty one."""
    spec = _register_naive(registry_snapshot, features=True, own_tokens=True)
    assert _run_all(spec) == [c for c in CHECKS if c is not check_matches_cross_mhsa]   # not exact


def test_checks_fail_on_a_joint_attention_that_zeroes_rows_without_context(registry_snapshot):
    spec = _register_naive(registry_snapshot, features=True, own_tokens=True, bug="empty_context_zero")
    with pytest.raises(AssertionError, match="fully masked context != an empty one"):
        check_fully_masked_rows_are_finite_and_zero(spec)
