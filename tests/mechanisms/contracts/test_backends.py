"""Every spec on every backend of `spec.backends`, against the reference backend in float64.

A mechanism picks its backend with its `backend` option (set on the module: `m.backend = name`,
which attnlab.hooks documents as working for every mechanism) and, with backend=None, from
`attnlab.use_backend(name)`. A backend that cannot run here (FlexAttention with grad on CPU,
say) raises BackendUnavailable; the test skips with the dispatcher's own reason.
The reference backend itself is checked against a naive softmax formula written here, so the
chain ends at something attnlab did not write.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab.ops import BackendUnavailable
from _layouts import layout_inputs

PAIRS = [pytest.param(s, b, id=f"{s.name}-{b}") for s in attnlab.list_specs() for b in s.backends
         if b != "reference"]
CLOSE = dict(rtol=1e-9, atol=1e-10)


def _run(m, backend, inputs):
    m.backend = backend
    try:
        return m(*inputs)
    except BackendUnavailable as err:
        pytest.skip(f"{backend} cannot run here: {err}")


def test_reference_backend_is_the_softmax_formula():
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64) for n in (5, 6, 6))
    allowed = torch.rand(2, 1, 5, 6) > 0.3
    allowed[..., 0] = True
    scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~allowed, -math.inf)
    naive = scores.softmax(-1) @ v
    assert_close(attnlab.ops.attention(q, k, v, attn_mask=allowed, backend="reference"), naive)


@pytest.mark.parametrize("spec,backend", PAIRS)
def test_forward_matches_reference_in_float64(spec, backend, make_mechanism):
    m = make_mechanism(spec)
    inputs = layout_inputs(spec.layout)
    with torch.no_grad():
        y = _run(m, backend, inputs)
        ref = _run(m, "reference", inputs)
    assert_close(y, ref, **CLOSE)


@pytest.mark.parametrize("spec,backend", PAIRS)
def test_gradients_match_reference_in_float64(spec, backend, make_mechanism):
    m = make_mechanism(spec)
    grads, base = [], layout_inputs(spec.layout)
    for name in (backend, "reference"):
        inputs = tuple(t.clone().requires_grad_(True) for t in base)
        torch.manual_seed(1)
        y = _run(m, name, inputs)
        (y * torch.randn_like(y)).sum().backward()
        grads.append([t.grad for t in inputs])
        m.zero_grad(set_to_none=True)
    for g, g_ref in zip(*grads):
        assert_close(g, g_ref, **CLOSE)


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in attnlab.list_specs()
                                  if "flex" in s.backends])
def test_use_backend_reaches_the_mechanism_and_never_falls_back(spec, make_mechanism):
    """Under use_backend("flex") a CPU forward with grad cannot run FlexAttention: it must raise,
    not quietly run another backend; without grad it runs and matches the reference."""
    m = make_mechanism(spec)
    m.backend = None
    x = layout_inputs(spec.layout)
    if torch.cuda.is_available():
        pytest.skip("the refusal checked here is the CPU one")
    with attnlab.use_backend("flex"):
        with pytest.raises(BackendUnavailable, match="flex"):
            m(*(t.clone().requires_grad_(True) for t in x))
        with torch.no_grad():
            y = m(*x)
    with attnlab.use_backend("reference"), torch.no_grad():
        assert_close(y, m(*x), **CLOSE)
