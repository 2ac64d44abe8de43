"""spec.backends is honest: every listed backend runs the spec's test config (forward, no grad)."""
from __future__ import annotations

import pytest
import torch

import attnlab

SHAPE = {"seq": (2, 8, 32), "pool": (2, 8, 32), "cross": (2, 8, 32), "2d": (2, 8, 8, 32), "3d": (2, 4, 4, 4, 32)}
CONTEXT_SHAPE = (2, 5, 32)   # the cross layout's second input
CASES = [(s, b) for s in attnlab.list_specs() for b in s.backends]


@pytest.mark.parametrize("spec,backend", CASES, ids=[f"{s.name}-{b}" for s, b in CASES])
def test_listed_backend_runs_the_test_config(spec, backend):
    m = attnlab.create(spec.name, 32, 4, backend=backend, **spec.test_kwargs).double().eval()
    x = (torch.randn(*SHAPE[spec.layout], dtype=torch.float64),)
    if spec.layout == "cross":
        x += (torch.randn(*CONTEXT_SHAPE, dtype=torch.float64),)
    with torch.no_grad():
        y = m(*x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("spec", [s for s in attnlab.list_specs() if not s.backends], ids=lambda s: s.name)
def test_no_backend_listed_means_none_is_used_by_the_test_config(spec):
    """A mechanism that lists none either has no backend option or refuses one for its test config."""
    if "backend" not in spec.options():
        return
    with pytest.raises(ValueError, match="backend"):
        attnlab.create(spec.name, 32, 4, backend="sdpa", **spec.test_kwargs)
